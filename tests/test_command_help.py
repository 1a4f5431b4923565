"""Every command line answers --help (exit 0) with what it reads and the defaults."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script, expected", [
    ("run_recbole_mllm.py", "stopping_step            10"),
    ("scripts/stage_examples.py", "example_windows  6"),
    ("scripts/score_fusion_eval.py", "fusion_weights  '0.3,1,3,10'"),
    ("scripts/cut_user_subset.py", "how many users to keep"),
    ("benchmarks/scoring.py", "(default: [20, 100])"),
    ("benchmarks/joint_step_host.py", "training rows (lists) a step (default: 16)"),
    ("dataset_scripts/movielens.py", "(default: drop)"),
    ("dataset_scripts/amazon.py", "seconds per download attempt (default: 20.0)"),
    ("dataset_scripts/sequences.py", "the titles' column with the title (default: title)"),
])
def test_scripts_answer_help(script, expected, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    monkeypatch.syspath_prepend(str(REPO / "dataset_scripts"))  # how `python dataset_scripts/x.py` finds its modules
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / script), run_name="__main__")
    assert exit_info.value.code == 0
    assert expected in capsys.readouterr().out


def test_a_config_key_is_never_read_as_an_abbreviated_option(monkeypatch):
    """--seed=3 is RecBole's seed, not --seeds=3: given with --seeds it is refused, not silently dropped."""
    monkeypatch.setattr(sys, "argv", ["run_recbole_mllm.py", "--seed=3", "--seeds=1", "--dataset=none", "--debug"])
    with pytest.raises(ValueError, match="either --seed or --seeds"):
        runpy.run_path(str(REPO / "run_recbole_mllm.py"), run_name="__main__")
