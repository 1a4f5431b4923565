"""The stages' command lines: --help, exit statuses, one-line errors, values read without running them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from recbole_mllm.stages import item_fusion, user_profile
from recbole_mllm.stages.cache import StageCache
from recbole_mllm.stages.common import stage_config, stage_main
from stage_doubles import Interrupt, fake_compute

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("stage", [item_fusion, user_profile])
def test_help_lists_the_keys_with_their_defaults(stage, capsys):
    with pytest.raises(SystemExit) as exit_info:
        stage.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "Keys read (--key=value) and their defaults:" in out
    for key, value in stage.DEFAULTS.items():
        assert f"{key}" in out and repr(value) in out


def test_help_as_a_module_command():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "recbole_mllm.stages.item_fusion", "--help"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "stage_shard_size            256" in done.stdout


def _partial_cache(root) -> StageCache:
    cache = StageCache(root, "demo", {"model": {"name": "m"}}, [f"k{i}" for i in range(9)], shard_size=4)
    calls = []

    def stop_after_one(keys):
        if calls:
            raise Interrupt("stopped")
        calls.append(keys)
        return fake_compute(keys)

    with pytest.raises(Interrupt):
        cache.build(stop_after_one, progress=False)
    return cache


def test_an_incomplete_cache_exits_1(tmp_path, capsys):
    cache = _partial_cache(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        stage_main([], lambda argv: {}, lambda config: cache)
    assert exit_info.value.code == 1
    assert f"the cache {cache.path} is incomplete" in capsys.readouterr().err


def test_a_complete_cache_prints_its_folder(tmp_path, capsys):
    cache = StageCache(tmp_path, "demo", {"model": {"name": "m"}}, ["a", "b"]).build(fake_compute, progress=False)
    stage_main([], lambda argv: {}, lambda config: cache)
    assert capsys.readouterr().out.strip() == str(cache.path)


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    def run(config):
        raise FileNotFoundError(f"the item file {tmp_path}/x.item does not exist")

    with pytest.raises(SystemExit) as exit_info:
        stage_main(["--dataset=x"], lambda argv: {}, run)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: the item file {tmp_path}/x.item does not exist (--debug shows the traceback)"]
    with pytest.raises(FileNotFoundError):  # --debug: the exception itself, with its traceback
        stage_main(["--dataset=x", "--debug"], lambda argv: {}, run)
    with pytest.raises(SystemExit) as exit_info:
        stage_main(["positional"], stage_config, run)
    assert exit_info.value.code == 2 and "arguments are --key=value" in capsys.readouterr().err


def test_a_value_that_is_code_stays_a_string(tmp_path):
    marker = tmp_path / "ran"
    code = f'__import__("pathlib").Path({str(marker)!r}).touch()'
    config = stage_config(["--dataset=ml-100k", f"--run_label={code}", "--stage_batch_size=4",
                           "--learning_rate=1e-3", "--ranker_use_cot=false", "--topk=[5, 10]"])
    assert not marker.exists()
    assert config["run_label"] == code
    assert (config["stage_batch_size"], config["learning_rate"], config["ranker_use_cot"], config["topk"]) == (
        4, 1e-3, False, [5, 10])


def test_unreachable_hub_model_is_one_line(monkeypatch, capsys):
    import socket

    import huggingface_hub.constants

    import recbole_mllm.mllm as mllm

    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)  # the probe would ask a proxy instead of the hub
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
        monkeypatch.setattr(mllm, "_hub_offline", lambda: False)
        with pytest.raises(SystemExit) as exit_info:
            item_fusion.main(["--dataset=ml-100k", "--mllm=some-org/some-model", "--use_gpu=False"])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: cannot reach the Hugging Face hub") and "HF_HUB_OFFLINE=1" in line
