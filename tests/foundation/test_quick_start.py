"""End-to-end smoke runs of RecBole baselines through the plugin, as RecBole's own tests do."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from recbole_mllm.quick_start import run, run_comparison
from tests.conftest import REPO_ROOT


@pytest.mark.parametrize("model", ["SASRec", "BERT4Rec", "GRU4Rec"])
def test_baseline_trains_and_tests_under_every_protocol(model, tiny_data):
    result = run(model, "tiny", config_dict=tiny_data)
    assert set(result["test_result"]) == {"uni100", "full"}
    for metrics in result["test_result"].values():
        assert 0.0 <= metrics["ndcg@10"] <= metrics["hit@10"] <= 1.0
        assert metrics["recall@10"] == metrics["hit@10"]  # one target per user
    assert result["epochs"] == 1


def test_a_run_that_never_validates_tests_its_last_epoch_and_records_no_valid_score(tiny_data):
    results, output_dir = run_comparison(["SASRec"], "tiny", config_dict=dict(tiny_data, eval_step=0))
    assert results[0]["best_valid_score"] is None and results[0]["best_valid_result"] == {}
    assert set(results[0]["test_result"]) == {"uni100", "full"} and Path(output_dir, "comparison.csv").is_file()


def test_a_finished_runs_memory_is_released_before_the_next_model(monkeypatch, tiny_data):
    """``run_comparison`` releases each run's memory before the next model: its trainer-model cycle is collected and,
    with glibc, the freed heap is handed back to the system."""
    import platform

    import psutil
    import torch

    from recbole_mllm import quick_start

    released = []
    monkeypatch.setattr(quick_start, "release_memory", lambda: released.append(1))
    run_comparison(["SASRec", "GRU4Rec"], "tiny", config_dict=tiny_data)
    assert len(released) == 2
    monkeypatch.undo()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        process = psutil.Process()
        held = [torch.ones(256) for _ in range(200_000)]  # ~200 MB in blocks below glibc's mmap threshold
        before = process.memory_info().rss
        del held
        quick_start.release_memory()
        assert process.memory_info().rss < before - 100 * 2**20


def test_comparison_uses_identical_candidates_and_writes_three_files(tiny_data):
    results, output_dir = run_comparison(["SASRec", "BERT4Rec"], "tiny", config_dict=tiny_data)
    assert results[0]["fingerprints"] == results[1]["fingerprints"]
    with open(f"{output_dir}/comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["protocol"]) for r in rows] == [
        ("SASRec", "uni100"), ("SASRec", "full"), ("BERT4Rec", "uni100"), ("BERT4Rec", "full")]
    assert float(rows[0]["ndcg@10"]) == pytest.approx(results[0]["test_result"]["uni100"]["ndcg@10"], abs=1e-6)
    markdown = open(f"{output_dir}/comparison.md").read()
    assert "| SASRec | uni100 |" in markdown and "| BERT4Rec | full |" in markdown
    with open(f"{output_dir}/comparison.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_unknown_dataset_is_a_clear_error(tiny_data):
    with pytest.raises(FileNotFoundError, match="Dataset 'nope' not found"):
        run("SASRec", "nope", config_dict=tiny_data)


def _cli(tiny_data, *args):
    overrides = [f"--{k}={v}" for k, v in tiny_data.items()]
    return subprocess.run([sys.executable, str(REPO_ROOT / "run_recbole_mllm.py"), *args, *overrides],
                          cwd=Path(tiny_data["data_path"]).parent, capture_output=True, text=True, timeout=600)


def test_cli_prints_table_and_names_output_folder(tiny_data):
    proc = _cli(tiny_data, "--model=SASRec,BERT4Rec", "--dataset=tiny")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "| SASRec | uni100 |" in log and "| BERT4Rec | full |" in log
    assert "written to " + tiny_data["output_dir"] in log


def test_cli_unknown_model_fails_with_its_name(tiny_data):
    proc = _cli(tiny_data, "--model=NoSuchModel", "--dataset=tiny")
    assert proc.returncode != 0
    assert "Unknown model 'NoSuchModel'" in proc.stderr


def test_seeds_give_mean_std_and_paired_p_values_against_the_best_baseline(tiny_data):
    results, output_dir = run_comparison(["SASRec", "GRU4Rec"], "tiny", config_dict=tiny_data, seeds=[1, 2])
    assert [(r["model"], r["seed"]) for r in results] == [("SASRec", 1), ("SASRec", 2), ("GRU4Rec", 1), ("GRU4Rec", 2)]
    with open(f"{output_dir}/comparison.csv") as f:
        rows = {(r["model"], r["protocol"]): r for r in csv.DictReader(f)}
    full = [r["test_result"]["full"]["ndcg@10"] for r in results[:2]]
    assert float(rows["SASRec", "full"]["ndcg@10"]) == pytest.approx(sum(full) / 2, abs=1e-6)
    assert rows["SASRec", "full"]["seeds"] == "2"
    reference = rows["SASRec", "full"]["reference"] or rows["GRU4Rec", "full"]["reference"]
    other = ({"SASRec", "GRU4Rec"} - {reference}).pop()
    assert 0.0 <= float(rows[other, "full"]["p_value"]) <= 1.0  # the other model is tested against the best baseline
    assert {p.name for p in (Path(output_dir) / "runs").iterdir()} == {
        "SASRec-seed1", "SASRec-seed2", "GRU4Rec-seed1", "GRU4Rec-seed2"}


def test_seed_and_seeds_together_are_refused(tiny_data):
    with pytest.raises(ValueError, match="either --seed or --seeds"):
        run_comparison(["SASRec"], "tiny", config_dict=tiny_data, cmd_args=["--seed=3"], seeds=[1])
