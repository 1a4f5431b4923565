"""``benchmarks/scoring.py --tiny`` runs on a CPU in seconds and finds the naive path's scores in ours."""

import re
import runpy
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "scoring.py"


def test_tiny_benchmark_prints_equal_scores(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(BENCHMARK), "--tiny", "--device", "cpu"])
    runpy.run_path(str(BENCHMARK), run_name="__main__")
    out = capsys.readouterr().out
    assert re.search(r"^tiny +2x100 ours ", out, re.MULTILINE), out
    differences = [float(d) for d in re.findall(r"max \|ours - naive\| = (\S+)", out)]
    assert len(differences) == 2 and max(differences) < 1e-4, out
    speed_ups = [float(x) for x in re.findall(r"list speed-up ([\d.]+)x", out)]  # the list-wise layout's row and ratio
    assert re.search(r"^tiny +2x100 list ", out, re.MULTILINE) and len(speed_ups) == 2 and min(speed_ups) > 0, out


def test_tiny_benchmark_times_a_checkpointed_training_step_alone(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(BENCHMARK), "--tiny", "--device", "cpu", "--train_only", "--gradient_checkpointing"])
    runpy.run_path(str(BENCHMARK), run_name="__main__")
    out = capsys.readouterr().out
    rows = re.findall(r"^tiny +\S+ +(\S+) +([\d.]+) ", out, re.MULTILINE)
    assert rows and {path for path, _ in rows} == {"train+gc", "ltrain+gc"} and all(float(ms) > 0 for _, ms in rows), out
    sizes = {path: size for size, path in re.findall(r"^tiny +(\S+) +(\S*train)\+gc ", out, re.MULTILINE)}
    assert sizes == {"train": "2x4", "ltrain": "2x20"}, out  # the packed pointwise step and the list-wise one


def test_tiny_benchmark_times_both_training_steps_without_checkpointing(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(BENCHMARK), "--tiny", "--device", "cpu", "--train_only"])
    runpy.run_path(str(BENCHMARK), run_name="__main__")
    out = capsys.readouterr().out
    assert [path for path in re.findall(r"^tiny +\S+ +(\S+) ", out, re.MULTILINE)] == ["train", "ltrain"], out


def test_training_rows_run_with_mllmsrecs_lora_dropout_unless_told(monkeypatch, capsys):
    """The training rows time what a run trains: LoRA dropout at MLLMSRec's declared default, active (it costs time and
    memory on every LoRA'd module's input), or the value given (peft builds no dropout module for 0)."""
    import torch

    from recbole_mllm.properties_path import declared

    default, forward = declared("model/MLLMSRec.yaml", "lora_dropout")["lora_dropout"], torch.nn.Dropout.forward
    for argv, expected in (([], default), (["--lora_dropout", "0"], 0.0)):
        calls = []
        monkeypatch.setattr(torch.nn.Dropout, "forward", lambda self, x: calls.append((self.p, self.training)) or forward(self, x))
        monkeypatch.setattr(sys, "argv", [str(BENCHMARK), "--tiny", "--device", "cpu", "--train_only", *argv])
        runpy.run_path(str(BENCHMARK), run_name="__main__")
        out = capsys.readouterr().out
        assert f"training LoRA dropout {expected:g}," in out and re.search(r"^tiny +\S+ +ltrain ", out, re.M), out
        assert set(calls) == ({(expected, True)} if expected else set()), calls


def test_device_busy_merges_overlapping_spans_and_prints_a_share_per_training_row(monkeypatch, capsys):
    """--device_busy: kernels of several streams (or nested ops) overlap and count once; each training row gets a share
    of its wall time in (0, 100 %]."""
    merged_seconds = runpy.run_path(str(BENCHMARK))["merged_seconds"]
    assert merged_seconds([(0, 4), (1, 2), (3, 6), (8, 9)]) == 7
    assert merged_seconds([(5, 6), (0, 1)]) == 2 and merged_seconds([]) == 0
    monkeypatch.setattr(sys, "argv", [str(BENCHMARK), "--tiny", "--device", "cpu", "--train_only", "--device_busy"])
    runpy.run_path(str(BENCHMARK), run_name="__main__")
    out = capsys.readouterr().out
    shares = dict(re.findall(r"^tiny +\S+ +(\S+) +device busy ([\d.]+)% of the wall time", out, re.MULTILINE))
    assert set(shares) == {"train", "ltrain"} and all(0 < float(share) <= 100 for share in shares.values()), out
