"""A build's fingerprint hashes the code the build runs: its converter and every module the converters share."""

import sys
from pathlib import Path

from dataset_scripts import amazon, movielens, sequences  # noqa: F401 (loads every module a converter runs)
from dataset_scripts.fingerprint import CONVERTERS, shared_code


def test_every_shared_module_is_hashed_and_the_other_converter_is_not():
    loaded = {Path(module.__file__).name for name, module in sys.modules.items() if name.startswith("dataset_scripts.")}
    hashed = {path.name for path in shared_code()}
    assert set(CONVERTERS) <= loaded and loaded - set(CONVERTERS) <= hashed
    assert not hashed & set(CONVERTERS)  # changing amazon.py does not rebuild a MovieLens dataset
