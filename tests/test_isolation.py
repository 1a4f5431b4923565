"""The test suite writes nothing into the user's home or the checkout: hash records and weights go to a temporary
home, RecBole's ``log/`` and ``saved/`` to a temporary working folder."""

import logging
import os
from pathlib import Path

import pytest
from recbole.utils import init_logger

from recbole_mllm.config import Config
from tests.conftest import REPO_ROOT

from recbole_mllm.mllm.weights import cache_home, file_sha256


def test_hash_records_go_to_a_temporary_home(recbole_mllm_home, tmp_path, tmp_path_factory):
    home, explicit = recbole_mllm_home
    if explicit:
        pytest.skip("RECBOLE_MLLM_HOME was set before the run: the developer's choice is kept")
    assert cache_home() == home and home.is_relative_to(tmp_path_factory.getbasetemp())
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"weights")
    before = set((home / "hashes").glob("*.json")) if (home / "hashes").is_dir() else set()
    file_sha256(weights)
    assert len(set((home / "hashes").glob("*.json")) - before) == 1


def test_recbole_logs_go_to_a_temporary_working_folder(working_folder, tiny_data, tmp_path_factory):
    assert Path(os.getcwd()) == working_folder and working_folder.is_relative_to(tmp_path_factory.getbasetemp())
    assert not working_folder.is_relative_to(REPO_ROOT)
    config = Config("SASRec", "tiny", config_dict=tiny_data)
    init_logger(config)  # what every run does first: log/<model>/... under the working folder
    try:
        assert (working_folder / "log" / "SASRec").is_dir()
    finally:
        for handler in logging.getLogger().handlers[:]:
            if isinstance(handler, logging.FileHandler):
                handler.close()
                logging.getLogger().removeHandler(handler)
