"""The benchmarks in ``benchmarks/`` run on a CPU in seconds and print one well-formed line per setting."""

import re
import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(monkeypatch, capsys, script, *args):
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / script), *args])
    runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    return capsys.readouterr().out


def test_stage_benchmark_times_batch_one_and_batched(monkeypatch, capsys):
    out = _run(monkeypatch, capsys, "stages.py", "--tiny", "--device", "cpu")
    rows = re.findall(r"^tiny +(item|user_window) +\d+ +(\d+) +(\d+) +([\d.]+) +([\d.]+)", out, re.MULTILINE)
    assert [(kind, int(batch)) for kind, batch, *_ in rows] == [("item", 1), ("item", 8), ("user_window", 1),
                                                                ("user_window", 8)], out
    for _, _, requests, per_second, tokens_per_second in rows:
        assert float(per_second) > 0  # 4 new tokens per request, every reply full length (no stop tokens)
        assert float(tokens_per_second) == pytest.approx(4 * float(per_second), rel=0.02, abs=0.2)


def test_train_step_benchmark_splits_an_epoch(monkeypatch, capsys, tiny_data):
    out = _run(monkeypatch, capsys, "train_step.py", "--dataset=tiny", f"--data_path={tiny_data['data_path']}",
               "--models", "SASRec", "GRU4Rec", "--corners", "small", "--steps", "2", "--load_col_inter_only")
    rows = re.findall(r"^(SASRec|GRU4Rec) +small +(eager|sdpa) +(\d+)((?: +[\d.]+){5})$", out, re.MULTILINE)
    assert [model_attention for *model_attention, _, _ in rows] == [["SASRec", "eager"], ["SASRec", "sdpa"],
                                                                      ["GRU4Rec", "eager"]], out
    for _, _, batches, seconds in rows:
        loader, *steps, epoch = (float(s) for s in seconds.split())  # seconds per epoch, 2 decimals
        assert int(batches) >= 1 and loader >= 0 and all(s > 0 for s in steps) and epoch > 0

