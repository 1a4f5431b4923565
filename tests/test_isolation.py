"""The test suite writes nothing into the user's home: hash records and weights go to a temporary home."""

import pytest

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
