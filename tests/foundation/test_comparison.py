"""The comparison record, on synthetic run results: per-user metrics, seeds, references, p-values, slices, files."""

import csv
import json

import numpy as np
import pytest
import torch
from recbole.evaluator import Evaluator
from recbole.evaluator.collector import DataStruct
from scipy.stats import wilcoxon

from recbole_mllm.comparison import find_records, load_record, per_user_metrics, save_record, write_comparison
from recbole_mllm.comparison.__main__ import main
from recbole_mllm.comparison.analysis import ComparisonError, analyse, is_plugin_model
from recbole_mllm.comparison.records import with_chosen_weight, with_first_stage_fallback, with_llm_alone


def _topk(ranks, maxk=10):
    """RecBole ``rec.topk`` rows for one positive per user at 1-based ``ranks`` (> maxk: not in the list)."""
    rows = np.zeros((len(ranks), maxk + 1), dtype=np.int64)
    for row, rank in zip(rows, ranks):
        if rank <= maxk:
            row[rank - 1] = 1
    rows[:, -1] = 1
    return rows


def _ndcg(ranks):
    """ndcg@10 by hand for one positive: 1 / log2(rank + 1) inside the top 10."""
    ranks = np.asarray(ranks, dtype=float)
    return np.where(ranks <= 10, 1 / np.log2(ranks + 1), 0.0)


def _per_user(ranks, users=None, train_count=None, history=None):
    n = len(ranks)
    return {"user_id": np.arange(1, n + 1) if users is None else np.asarray(users), "target_item": np.arange(n) + 100,
            "topk": _topk(ranks), "target_train_count": np.full(n, 50) if train_count is None else np.asarray(train_count),
            "history_length": np.full(n, 50) if history is None else np.asarray(history)}


def _run(model, seed, ranks, protocol="uni100", fingerprint="cands", valid=0.5, **per_user):
    """A run result as quick_start.run makes it, with metrics consistent with ``ranks``."""
    ranks = np.asarray(ranks)
    return {"model": model, "dataset": "toy", "seed": seed, "best_valid_score": valid, "best_valid_result": {},
            "test_result": {protocol: {"ndcg@10": float(_ndcg(ranks).mean()), "hit@10": float((ranks <= 10).mean())}},
            "fingerprints": {protocol: fingerprint}, "epochs": 3, "train_seconds": 10.0,
            "peak_gpu_memory_gb": None, "hyper_parameters": {"lr": 0.001},
            "per_user": {protocol: _per_user(ranks, **per_user)}}


def _row(rows, model, **keys):
    return next(r for r in rows if r["model"] == model and all(r.get(k) == v for k, v in keys.items()))


def test_per_user_metrics_average_to_recbole_evaluator():
    rng = np.random.default_rng(0)
    hits = (rng.random((60, 10)) < 0.15).astype(np.int64)
    topk = np.concatenate([hits, hits.sum(1, keepdims=True) + rng.integers(1, 3, (60, 1))], axis=1)
    metrics = ["Recall", "MRR", "NDCG", "Hit", "Precision", "MAP"]
    values = per_user_metrics(torch.from_numpy(topk), metrics, [5, 10])
    data = DataStruct()
    data.set("rec.topk", torch.from_numpy(topk))
    expected = Evaluator({"metrics": metrics, "topk": [5, 10], "metric_decimal_place": 4}).evaluate(data)
    assert set(values) == set(expected) and len(expected) == 12
    for key, value in expected.items():
        assert values[key].shape == (60,)
        assert values[key].mean() == pytest.approx(value, abs=5e-5), key


def test_ndcg_hit_and_mrr_by_hand_for_ranks_1_3_and_beyond_10():
    values = per_user_metrics(_topk([1, 3, 11]), ["NDCG", "Hit", "MRR"], [10])
    np.testing.assert_allclose(values["ndcg@10"], [1.0, 0.5, 0.0])
    np.testing.assert_allclose(values["hit@10"], [1, 1, 0])
    np.testing.assert_allclose(values["mrr@10"], [1.0, 1 / 3, 0.0])


def test_mean_and_std_over_two_seeds(tmp_path):
    first, second = _run("SASRec", 1, [1, 3], fingerprint="a"), _run("SASRec", 2, [1, 11], fingerprint="b")
    first.update(epochs=4, train_seconds=10.0, peak_gpu_memory_gb=1.5)
    second.update(epochs=6, train_seconds=20.0, peak_gpu_memory_gb=2.5)
    table = write_comparison([first, second], tmp_path)
    with open(tmp_path / "comparison.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["ndcg@10"]) == pytest.approx(0.625)  # seeds: (1 + 0.5) / 2 and (1 + 0) / 2
    assert float(row["ndcg@10_std"]) == pytest.approx(np.std([0.75, 0.5], ddof=1))
    assert (row["seeds"], float(row["epochs"]), float(row["train_seconds"])) == ("2", 5.0, 15.0)
    assert (float(row["peak_gpu_memory_gb"]), row["candidates"], row["reference"]) == (2.5, "a/b", "")
    assert "| SASRec | uni100 | 0.6250 ± 0.1768 | 0.7500 ± 0.3536 | 2 |" in table
    with open(tmp_path / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert [(r["seed"], float(r["ndcg@10"]), json.loads(r["hyper_parameters"])) for r in runs] == [
        ("1", 0.75, {"lr": 0.001}), ("2", 0.5, {"lr": 0.001})]


def test_p_value_is_wilcoxon_on_seed_means_paired_by_user_id():
    rng = np.random.default_rng(1)
    ranks = {(m, s): rng.integers(1, 15, 40) for m in ("SASRec", "MLLMSRec") for s in (1, 2, 3)}
    results = [_run(m, s, r) for (m, s), r in ranks.items() if (m, s) != ("SASRec", 3)]  # seed 3: MLLMSRec only
    p = analyse(results).rows[1]["p_value"]
    expected = wilcoxon((_ndcg(ranks["MLLMSRec", 1]) + _ndcg(ranks["MLLMSRec", 2])) / 2,
                        (_ndcg(ranks["SASRec", 1]) + _ndcg(ranks["SASRec", 2])) / 2, zero_method="wilcox").pvalue
    assert p == pytest.approx(expected, rel=1e-12) and p < 1
    order = rng.permutation(40)
    for result in results[3:]:  # the MLLMSRec runs: the same users in another order
        result["per_user"]["uni100"] = {k: v[order] for k, v in result["per_user"]["uni100"].items()}
    assert analyse(results).rows[1]["p_value"] == pytest.approx(expected, rel=1e-12)


def test_identical_per_user_values_give_p_1_and_no_common_seed_gives_no_p():
    same = analyse([_run("SASRec", 1, [1, 2, 3]), _run("MLLMSRec", 1, [1, 2, 3])]).rows[1]
    assert (same["reference"], same["delta"], same["p_value"]) == ("SASRec", 0.0, 1.0)
    apart = analyse([_run("SASRec", 1, [1, 2, 3]), _run("MLLMSRec", 2, [4, 5, 6])]).rows[1]
    assert apart["reference"] == "SASRec" and apart["p_value"] is None and apart["delta"] < 0


def test_reference_is_the_best_baseline_never_a_plugin_model():
    assert is_plugin_model("MLLMSRec") and not is_plugin_model("SASRec") and not is_plugin_model("NoSuchModel")
    results = [_run("SASRec", 1, [2, 5, 9], valid=0.3), _run("BERT4Rec", 1, [1, 3, 6], valid=0.4),
               _run("MLLMSRec", 1, [1, 1, 1], valid=0.9)]
    rows = analyse(results).rows
    assert [r.get("reference") for r in rows] == ["BERT4Rec", None, "BERT4Rec"]
    assert _row(rows, "MLLMSRec")["delta"] == pytest.approx(1 - _ndcg([1, 3, 6]).mean())
    alone = analyse([_run("MLLMSRec", 1, [1, 2]), _run("MLLMSRec2", 1, [3, 4])])  # an unknown name is a baseline
    assert alone.best == {"uni100": "MLLMSRec2"}
    assert analyse([_run("MLLMSRec", 1, [1, 2])]).best == {"uni100": "MLLMSRec"}  # no baseline: the best model


def test_a_plugin_run_named_as_baseline_can_be_the_reference_and_is_paired_with_every_row(tmp_path):
    # FusedSASRec on ids alone is SASRec: named a baseline, it competes for the reference by validation
    ids = dict(_run("FusedSASRec", 1, [1, 2, 2], valid=0.8), label="FusedSASRec[id]")
    results = [_run("SASRec", 1, [2, 5, 9], valid=0.3), ids, _run("MLLMSRec", 1, [1, 1, 3], valid=0.9)]
    assert analyse(results).best == {"uni100": "SASRec"}  # by default only RecBole's models are baselines
    named = analyse(results, extra_baselines=["FusedSASRec[id]"])
    assert named.best == {"uni100": "FusedSASRec[id]"}
    assert _row(named.rows, "MLLMSRec")["reference"] == "FusedSASRec[id]"
    assert {(p["model"], p["reference"]) for p in named.pairs} >= {("MLLMSRec", "FusedSASRec[id]"), ("MLLMSRec", "SASRec")}
    with pytest.raises(ComparisonError, match=r"FusedSASRec\[ID\].*no run's label"):
        analyse(results, extra_baselines=["FusedSASRec[ID]"])
    for result in results:
        save_record(result, tmp_path / "runs" / f"{result.get('label', result['model'])}-{result['seed']}")
    assert main([str(tmp_path / "runs"), f"--output={tmp_path / 'out'}", "--baseline=FusedSASRec[id]"]) == 0
    assert "reference: FusedSASRec[id], the best baseline" in (tmp_path / "out" / "comparison.md").read_text()


def test_reference_is_chosen_by_validation_never_by_test():
    # SASRec tests better but validates worse than BERT4Rec, at both seeds (mean valid 0.35 against 0.45)
    results = [_run("SASRec", s, [1, 1, 2], valid=v) for s, v in ((1, 0.3), (2, 0.4))]
    results += [_run("BERT4Rec", s, [4, 6, 9], valid=v) for s, v in ((1, 0.5), (2, 0.4))]
    results += [_run("MLLMSRec", s, [2, 3, 4], valid=0.9) for s in (1, 2)]
    analysis = analyse(results)
    assert analysis.best == {"uni100": "BERT4Rec"} and _row(analysis.rows, "MLLMSRec")["reference"] == "BERT4Rec"
    smaller = [dict(r, valid_metric_bigger=False) for r in results]  # a loss-like valid metric: smaller wins
    assert analyse(smaller).best == {"uni100": "SASRec"}


def test_p_values_against_every_baseline(tmp_path):
    rng = np.random.default_rng(3)
    ranks = {m: rng.integers(1, 15, 30) for m in ("SASRec", "BERT4Rec", "MLLMSRec", "first")}
    llm = _run("MLLMSRec", 1, ranks["MLLMSRec"])
    first = _run("MLLMSRec", 1, ranks["first"])
    llm.update(first_stage_result=first["test_result"], first_stage_per_user=first["per_user"])
    results = [_run("SASRec", 1, ranks["SASRec"], valid=0.6), _run("BERT4Rec", 1, ranks["BERT4Rec"], valid=0.4), llm]
    write_comparison(results, tmp_path)
    with open(tmp_path / "comparison_pvalues.csv") as f:
        pairs = {(r["model"], r["reference"]): r for r in csv.DictReader(f)}
    assert sorted(pairs) == sorted([("SASRec", "BERT4Rec"), ("BERT4Rec", "SASRec"), ("MLLMSRec", "SASRec"),
                                    ("MLLMSRec", "BERT4Rec"), ("MLLMSRec (first stage)", "MLLMSRec"),
                                    ("MLLMSRec (first stage)", "SASRec"), ("MLLMSRec (first stage)", "BERT4Rec")])
    for model, reference in pairs:
        mine = ranks["first" if "first" in model else model]
        expected = wilcoxon(_ndcg(mine), _ndcg(ranks[reference]), zero_method="wilcox").pvalue
        assert float(pairs[model, reference]["p_value"]) == pytest.approx(expected, rel=1e-9)
        assert float(pairs[model, reference]["delta"]) == pytest.approx(_ndcg(mine).mean() - _ndcg(ranks[reference]).mean())
    with open(tmp_path / "comparison.csv") as f:  # the main table keeps one reference per row
        main_rows = {r["model"]: r["reference"] for r in csv.DictReader(f)}
    assert main_rows == {"SASRec": "", "BERT4Rec": "SASRec", "MLLMSRec": "SASRec", "MLLMSRec (first stage)": "MLLMSRec"}
    markdown = (tmp_path / "comparison.md").read_text()
    assert "| model | protocol | vs BERT4Rec | vs SASRec | vs MLLMSRec |" in markdown
    p = pairs["MLLMSRec", "BERT4Rec"]
    assert f"| MLLMSRec | uni100 | {float(p['delta']):+.4f} (p {float(p['p_value']):.3g}) |" in markdown


def test_runs_of_one_model_with_different_settings_are_never_pooled(tmp_path):
    tuned = [dict(_run("MLLMSRec", s, [1, 2, 3]), hyper_parameters={"lr": 0.01, "dropout": 0.1}) for s in (1, 2)]
    default = [dict(_run("MLLMSRec", s, [4, 5, 6]), hyper_parameters={"lr": 0.001, "dropout": 0.1}) for s in (1, 2)]
    rows = analyse(tuned + default).rows
    assert [(r["model"], r["seeds"]) for r in rows] == [("MLLMSRec[lr=0.01]", 2), ("MLLMSRec[lr=0.001]", 2)]
    write_comparison(tuned + default, tmp_path)  # no record overwrites another
    assert len(list((tmp_path / "runs").iterdir())) == 4
    with pytest.raises(ComparisonError, match=r"two runs of SASRec at seed 1 .*run_label"):
        analyse([_run("SASRec", 1, [1]), _run("SASRec", 1, [2])])


def test_first_stage_row_is_compared_with_its_llm_model():
    rng = np.random.default_rng(2)
    llm_ranks, first_ranks, base_ranks = rng.integers(1, 14, 30), rng.integers(1, 14, 30), rng.integers(1, 14, 30)
    llm = _run("MLLMSRec", 7, llm_ranks)
    first = _run("MLLMSRec", 7, first_ranks)
    llm.update(first_stage_result=first["test_result"], first_stage_per_user=first["per_user"])
    rows = analyse([_run("SASRec", 7, base_ranks), llm]).rows
    assert [r["model"] for r in rows] == ["SASRec", "MLLMSRec", "MLLMSRec (first stage)"]
    row = rows[2]
    assert (row["reference"], rows[1]["reference"]) == ("MLLMSRec", "SASRec")
    assert row["delta"] == pytest.approx(_ndcg(first_ranks).mean() - _ndcg(llm_ranks).mean())
    assert row["p_value"] == pytest.approx(wilcoxon(_ndcg(first_ranks), _ndcg(llm_ranks), zero_method="wilcox").pvalue)


def test_llm_alone_row_is_compared_with_its_fused_model_and_survives_the_record(tmp_path):
    rng = np.random.default_rng(4)
    fused_ranks, first_ranks, alone_ranks = (rng.integers(1, 14, 30) for _ in range(3))
    fused, first, alone = (_run("MLLMSRec", 7, r) for r in (fused_ranks, first_ranks, alone_ranks))
    fused.update(first_stage_result=first["test_result"], first_stage_per_user=first["per_user"],
                 llm_alone_result=alone["test_result"], llm_alone_per_user=alone["per_user"])
    save_record(fused, tmp_path / "run")
    loaded = load_record(tmp_path / "run")
    rows = analyse([_run("SASRec", 7, rng.integers(1, 14, 30)), loaded]).rows
    assert [r["model"] for r in rows] == ["SASRec", "MLLMSRec", "MLLMSRec (first stage)", "MLLMSRec (LLM alone)"]
    row = rows[3]
    assert row["reference"] == "MLLMSRec"
    assert row["delta"] == pytest.approx(_ndcg(alone_ranks).mean() - _ndcg(fused_ranks).mean())
    assert row["p_value"] == pytest.approx(wilcoxon(_ndcg(alone_ranks), _ndcg(fused_ranks), zero_method="wilcox").pvalue)


def test_a_record_whose_fusion_chose_weight_0_reads_back_with_its_llm_alone_row(tmp_path):
    """Written without the LLM-alone parts (as runs did before they were recorded), a run whose late fusion chose
    weight 0 still gets its ``(LLM alone)`` row, the test's own: the row keeps every seed."""
    rng = np.random.default_rng(6)
    fused, first = (_run("MLLMSRec", 7, rng.integers(1, 14, 30)) for _ in range(2))
    fused.update(first_stage_result=first["test_result"], first_stage_per_user=first["per_user"],
                 late_fusion_selection={"weights": [0.0, 1.0], "valid_scores": [0.2, 0.1], "chosen": 0.0})
    save_record(fused, tmp_path / "chose_0")
    without_first_stage = {k: v for k, v in fused.items() if not k.startswith("first_stage")}
    assert "llm_alone_result" not in with_llm_alone(dict(without_first_stage))  # no row where other seeds lack one
    save_record(dict(fused, late_fusion_selection=dict(fused["late_fusion_selection"], chosen=1.0)), tmp_path / "chose_1")
    loaded = load_record(tmp_path / "chose_0")
    assert loaded["llm_alone_result"] == loaded["test_result"]
    assert all(np.array_equal(loaded["llm_alone_per_user"]["uni100"][k], loaded["per_user"]["uni100"][k])
               for k in loaded["per_user"]["uni100"])
    assert "MLLMSRec (LLM alone)" in [r["model"] for r in analyse([loaded]).rows]
    assert "llm_alone_result" not in load_record(tmp_path / "chose_1")  # a fused test is not the LLM alone



def test_each_runs_fusion_choice_is_reported_with_its_test_against_the_first_stage(tmp_path):
    """comparison.md and comparison_fusion.csv list every run's late-fusion choice; a run recorded before the first
    stage was scored on validation leaves those cells blank."""
    rng = np.random.default_rng(8)
    new, old = (_run("MLLMSRec", seed, rng.integers(1, 14, 30)) for seed in (1, 2))
    new["late_fusion_selection"] = {"weights": [0.0, 1.0], "valid_scores": [0.2, 0.25], "chosen": 1.0,
                                    "first_stage_valid_score": 0.24, "p_over_first_stage": 0.3125, "first_stage": True}
    old["late_fusion_selection"] = {"weights": [0.0, 1.0], "valid_scores": [0.3, 0.1], "chosen": 0.0}
    write_comparison([old, new], tmp_path)
    with open(tmp_path / "comparison_fusion.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["seed"], r["valid by weight"], r["chosen"]) for r in rows] == [("1", "0: 0.2000, 1: 0.2500", "1"),
                                                                               ("2", "0: 0.3000, 1: 0.1000", "0")]
    assert (rows[0]["first stage valid"], rows[0]["p over first stage"], rows[0]["first stage kept"]) == ("0.24", "0.3125", "True")
    assert rows[1]["p over first stage"] == rows[1]["first stage kept"] == ""
    markdown = (tmp_path / "comparison.md").read_text()
    assert "## Late fusion chosen on validation" in markdown and "| MLLMSRec | 1 | 0: 0.2000, 1: 0.2500 | 1 | 0.24 | 0.312 | True |" in markdown

def test_the_first_stage_fallback_row_is_what_the_rule_would_have_tested(tmp_path, capsys):
    """--fallback_alpha 0.05: seed 1 beat its first stage on validation (p 0.01, higher score) and keeps its test;
    seed 2 (p 0.3) and seed 3 (p 0.01 but a lower score) get their first stage's; a run that already kept its first
    stage under another alpha, where this one would keep the LLM, has no LLM test to give and gets no row."""
    rng = np.random.default_rng(9)
    runs, expected = [], []
    for seed, p, chosen_score in ((1, 0.01, 0.25), (2, 0.3, 0.25), (3, 0.01, 0.23)):
        test_ranks, first_ranks = rng.integers(1, 14, 30), rng.integers(1, 14, 30)
        run, first = _run("MLLMSRec", seed, test_ranks), _run("MLLMSRec", seed, first_ranks)
        run.update(first_stage_result=first["test_result"], first_stage_per_user=first["per_user"],
                   late_fusion_selection={"weights": [0.0, 1.0], "valid_scores": [0.2, chosen_score], "chosen": 1.0,
                                          "first_stage_valid_score": 0.24, "p_over_first_stage": p, "first_stage": False})
        save_record(run, tmp_path / "runs_in" / f"seed{seed}")
        runs.append(run)
        expected.append(_ndcg(test_ranks if seed == 1 else first_ranks).mean())
    assert main([str(tmp_path / "runs_in"), "--output", str(tmp_path / "out"), "--fallback_alpha", "0.05"]) == 0
    with open(tmp_path / "out" / "comparison.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["model"] == "MLLMSRec (first-stage fallback)")
    assert row["reference"] == "MLLMSRec" and row["seeds"] == "3"
    assert float(row["ndcg@10"].split(" ± ")[0]) == pytest.approx(np.mean(expected), abs=1e-4)
    assert "fallback_result" not in json.loads((tmp_path / "out" / "runs" / "MLLMSRec-seed1" / "record.json").read_text())
    kept = dict(runs[0], late_fusion_selection=dict(runs[0]["late_fusion_selection"], first_stage=True))
    assert "fallback_result" not in with_first_stage_fallback(kept, 0.05)
    assert "fallback_result" not in with_first_stage_fallback({"test_result": {}}, 0.05)  # nothing recorded to decide by
    assert main([str(tmp_path / "runs_in"), "--output", str(tmp_path / "bad"), "--fallback_alpha", "0"]) == 2
    assert "--fallback_alpha: a significance level in (0, 1], got 0.0" in capsys.readouterr().err


def test_runs_made_with_the_fallback_have_a_chosen_weight_row_in_every_seed(tmp_path):
    """Under first_stage_fallback_alpha the chosen weight's test is the run's own where it ranked (saved once), the
    trainer's extra pass where the first stage ranked, and the LLM alone's where it chose 0; --fallback_alpha with a
    looser level gives a kept run that weight's test instead of no row."""
    rng = np.random.default_rng(11)
    loaded = []
    for seed, kept, chosen in ((1, False, 1.0), (2, True, 1.0), (3, True, 0.0)):
        run, first, other = (_run("MLLMSRec", seed, rng.integers(1, 14, 30)) for _ in range(3))
        run.update(first_stage_result=first["test_result"], first_stage_per_user=first["per_user"],
                   llm_alone_result=other["test_result"], llm_alone_per_user=other["per_user"],
                   late_fusion_selection={"weights": [0.0, 1.0], "valid_scores": [0.26, 0.25], "chosen": chosen,
                                          "first_stage_valid_score": 0.24, "p_over_first_stage": 0.2,
                                          "first_stage": kept, "first_stage_fallback_alpha": 0.05})
        if kept and chosen:
            scored = _run("MLLMSRec", seed, rng.integers(1, 14, 30))
            run.update(chosen_weight_result=scored["test_result"], chosen_weight_per_user=scored["per_user"])
        save_record(with_chosen_weight(run), tmp_path / f"seed{seed}")
        loaded.append(load_record(tmp_path / f"seed{seed}"))
        expected = {(False, 1.0): run["test_result"], (True, 1.0): run.get("chosen_weight_result"),
                    (True, 0.0): run["llm_alone_result"]}[(kept, chosen)]
        assert loaded[-1]["chosen_weight_result"] == expected
    with np.load(tmp_path / "seed1" / "per_user.npz") as arrays:  # the test's own data: saved once
        assert not [key for key in arrays.files if key.startswith("chosen_weight_per_user/")]
    rows = [r for r in analyse(loaded).rows if r["model"] == "MLLMSRec (chosen weight)"]
    assert rows and all(r["seeds"] == 3 for r in rows)
    looser = with_first_stage_fallback(dict(loaded[1]), 0.5)  # p 0.2 < 0.5 and the weight above the first stage
    assert looser["fallback_result"] == loaded[1]["chosen_weight_result"]
    older = {k: v for k, v in loaded[1].items() if not k.startswith("chosen_weight")}
    assert "fallback_result" not in with_first_stage_fallback(older, 0.5)  # recorded before the pass: no row


def test_the_llm_alone_is_also_tested_against_its_first_stage_in_the_p_value_file():
    """What the LLM adds over its first stage, fusion aside: the pair (LLM alone, first stage) has its own p-value."""
    rng = np.random.default_rng(5)
    fused_ranks, first_ranks, alone_ranks = (rng.integers(1, 14, 30) for _ in range(3))
    fused, first, alone = (_run("MLLMSRec", 7, r) for r in (fused_ranks, first_ranks, alone_ranks))
    fused.update(first_stage_result=first["test_result"], first_stage_per_user=first["per_user"],
                 llm_alone_result=alone["test_result"], llm_alone_per_user=alone["per_user"])
    pairs = analyse([_run("SASRec", 7, rng.integers(1, 14, 30)), fused]).pairs
    references = {(p["model"], p["reference"]): p for p in pairs}
    pair = references[("MLLMSRec (LLM alone)", "MLLMSRec (first stage)")]
    assert pair["delta"] == pytest.approx(_ndcg(alone_ranks).mean() - _ndcg(first_ranks).mean())
    assert pair["p_value"] == pytest.approx(wilcoxon(_ndcg(alone_ranks), _ndcg(first_ranks), zero_method="wilcox").pvalue)
    assert ("MLLMSRec (first stage)", "MLLMSRec (LLM alone)") not in references  # each pair once


def test_the_p_value_does_not_depend_on_the_order_of_the_runs():
    """Users whose two models score the same per seed tie in their seed means only when both sums run in one order:
    0.1 + 0.2 + 0.3 and 0.3 + 0.2 + 0.1 differ in the last bit, and Wilcoxon's test counts such a difference."""
    from types import SimpleNamespace

    from recbole_mllm.comparison.analysis import paired_p_value

    rng = np.random.default_rng(6)
    other = rng.random((3, 20))  # users 5..24: differences between the models, per seed

    def entry(seed, values):
        users = np.arange(25)
        return SimpleNamespace(seed=seed, per_user={"full": {"user_id": users}},
                               user_metrics={"full": {"ndcg@10": np.asarray(values, dtype=float)}})

    tied = [[0.1] * 5, [0.2] * 5, [0.3] * 5]  # users 0..4: the same value in both models at each seed
    ours = [entry(seed, tied[k] + list(other[k])) for k, seed in enumerate((1, 2, 3))]
    base = [entry(seed, tied[k] + list(other[k] * 0.5)) for k, seed in enumerate((1, 2, 3))]
    in_order = paired_p_value(ours, base, "full", "ndcg@10")
    assert paired_p_value(ours, base[::-1], "full", "ndcg@10") == in_order
    assert paired_p_value(ours[::-1], base, "full", "ndcg@10") == in_order


def test_slices_by_hand_with_their_p_value_on_the_same_users(tmp_path):
    slices = dict(train_count=[1, 10, 3, 50, 2, 4], history=[5, 30, 25, 10, 3, 40])
    base = _run("SASRec", 1, [2, 2, 2, 2, 2, 2], **slices)
    ours = _run("MLLMSRec", 1, [1, 2, 11, 3, 1, 1], **slices)
    write_comparison([base, ours], tmp_path)
    with open(tmp_path / "comparison_slices.csv") as f:
        rows = list(csv.DictReader(f))
    cold = _row(rows, "MLLMSRec", slice="cold item (target_train_count <= 5)")  # users 1, 3, 5, 6
    assert (cold["users"], float(cold["ndcg@10"]), float(cold["hit@10"])) == ("4", 0.75, 0.75)
    assert float(cold["p_value"]) == pytest.approx(
        wilcoxon(_ndcg([1, 11, 1, 1]), _ndcg([2, 2, 2, 2]), zero_method="wilcox").pvalue)
    short = _row(rows, "MLLMSRec", slice="short history (history_length <= 20)")  # users 1, 4, 5
    assert (short["users"], float(short["ndcg@10"])) == ("3", pytest.approx(2.5 / 3))
    assert _row(rows, "SASRec", slice=short["slice"])["reference"] == ""
    custom = analyse([base, ours], slices={"warm": ("target_train_count", 10)}).slice_rows
    assert [r["users"] for r in custom] == [5, 5] and custom[0]["slice"] == "warm (target_train_count <= 10)"
    assert "## Slices" in (tmp_path / "comparison.md").read_text()


def test_save_load_round_trip_accepts_torch_and_drops_config(tmp_path):
    result = _run("MLLMSRec", 3, [1, 4, 12])
    result["per_user"]["uni100"]["topk"] = torch.from_numpy(result["per_user"]["uni100"]["topk"])
    result.update(first_stage_result={"full": {"ndcg@10": np.float32(0.25)}},
                  first_stage_per_user={"full": _per_user([2, 2, 2])}, config={"valid_metric": "NDCG@10"})
    save_record(result, tmp_path / "rec")
    assert sorted(p.name for p in (tmp_path / "rec").iterdir()) == ["per_user.npz", "record.json"]
    loaded = load_record(tmp_path / "rec")
    assert "config" not in loaded and loaded["valid_metric"] == "ndcg@10"
    assert loaded["test_result"] == result["test_result"] and loaded["first_stage_result"]["full"]["ndcg@10"] == 0.25
    np.testing.assert_array_equal(loaded["per_user"]["uni100"]["topk"], _topk([1, 4, 12]))
    np.testing.assert_array_equal(loaded["first_stage_per_user"]["full"]["user_id"], [1, 2, 3])
    assert {k: v for k, v in loaded.items() if "per_user" not in k and k != "valid_metric"} == {
        k: v for k, v in result.items() if "per_user" not in k and k not in ("config", "first_stage_result")} | {
        "first_stage_result": {"full": {"ndcg@10": 0.25}}}


def test_merge_cli_on_two_record_folders(tmp_path, capsys):
    save_record(_run("SASRec", 1, [2, 3, 4]), tmp_path / "job1" / "SASRec-seed1")
    save_record(_run("MLLMSRec", 1, [1, 1, 5]), tmp_path / "job2")
    assert [f.name for f in find_records([tmp_path])] == ["SASRec-seed1", "job2"]
    assert main([str(tmp_path / "job1"), str(tmp_path / "job2"), f"--output={tmp_path / 'out'}"]) == 0
    printed = capsys.readouterr().out
    assert "| SASRec | uni100 |" in printed and "| MLLMSRec | uni100 |" in printed
    assert sorted(p.name for p in (tmp_path / "out" / "runs").iterdir()) == ["MLLMSRec-seed1", "SASRec-seed1"]
    assert (tmp_path / "out" / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_merge_cli_reruns_with_its_output_inside_the_runs_it_reads(tmp_path, capsys):
    """``outputs/ml-100k-* --output=outputs/ml-100k-comparison`` (the README's command): the second run must not read
    the first one's ``runs/`` copies as more runs (that refused them as two runs of one row and seed)."""
    save_record(_run("SASRec", 1, [2, 3, 4]), tmp_path / "ml-100k-SASRec" / "SASRec-seed1")
    save_record(_run("MLLMSRec", 1, [1, 1, 5]), tmp_path / "ml-100k-MLLMSRec" / "MLLMSRec-seed1")
    runs = [str(p) for p in sorted(tmp_path.glob("ml-100k-*"))]
    out = f"--output={tmp_path / 'ml-100k-comparison'}"
    assert main([*runs, out]) == 0
    first = (tmp_path / "ml-100k-comparison" / "comparison.md").read_text()
    runs = [str(p) for p in sorted(tmp_path.glob("ml-100k-*"))]  # now holds the comparison folder too
    assert main([*runs, out]) == 0, capsys.readouterr().err
    assert (tmp_path / "ml-100k-comparison" / "comparison.md").read_text() == first
    with pytest.raises(FileNotFoundError, match="outside"):  # only the copies, not named themselves: nothing to read
        find_records([tmp_path / "ml-100k-comparison"], skip=tmp_path / "ml-100k-comparison" / "runs")
    # the copies are still readable when named themselves
    assert len(find_records([tmp_path / "ml-100k-comparison" / "runs"], skip=tmp_path / "ml-100k-comparison" / "runs")) == 2


def test_merge_cli_names_a_folder_without_records(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), f"--output={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "empty") in err
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "RUN_DIR" in capsys.readouterr().out


def test_results_of_older_callers_still_make_a_table(tmp_path):
    old = [{k: v for k, v in _run(m, 0, [1, 2]).items() if k not in ("seed", "per_user")} for m in ("SASRec", "GRU4Rec")]
    table = write_comparison(old, tmp_path, topk=[10])
    assert "| SASRec | uni100 | 0.8155 | 1.0000 | 1 |" in table
    assert "(no per-user data)" in (tmp_path / "comparison.md").read_text()
    assert (tmp_path / "runs" / "GRU4Rec-seed0" / "record.json").is_file()


def test_different_candidates_are_refused_unless_descriptive(tmp_path, capsys):
    runs = [_run("SASRec", 1, [1, 2], fingerprint="x1"), _run("GRU4Rec", 1, [3, 1], fingerprint="y2")]
    with pytest.raises(ComparisonError, match=r"\[uni100\] seed 1: SASRec x1, GRU4Rec y2.*--descriptive"):
        write_comparison(runs, tmp_path / "refused")
    assert len(list((tmp_path / "refused" / "runs").iterdir())) == 2  # the records are kept
    assert not (tmp_path / "refused" / "comparison.csv").exists()
    for i, run in enumerate(runs):
        save_record(run, tmp_path / "in" / str(i))
    assert main([str(tmp_path / "in"), f"--output={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SASRec x1, GRU4Rec y2" in err
    assert main([str(tmp_path / "in"), f"--output={tmp_path / 'out'}", "--descriptive"]) == 0
    with open(tmp_path / "out" / "comparison.csv") as f:
        assert [(r["reference"], r["delta"], r["p_value"]) for r in csv.DictReader(f)] == [("", "", "")] * 2
    assert "Descriptive table" in (tmp_path / "out" / "comparison.md").read_text()
    assert (tmp_path / "out" / "comparison_pvalues.csv").read_text() == "model,protocol,reference,delta,p_value\n"


def test_the_first_stage_reach_table_averages_recall_and_seen_shares_over_seeds(tmp_path):
    runs = [_run("MLLMSRec", 1, [1, 3], protocol="full"), _run("MLLMSRec", 2, [2, 5], protocol="full"),
            _run("SASRec", 1, [1, 3], protocol="full")]
    for run, (r20, r50, seen) in zip(runs, [(0.3, 0.5, 0.4), (0.4, 0.6, 0.5)]):
        run["first_stage_recall"] = {"full": {"recall@100": r50 + 0.1, "recall@20": r20, "recall@50": r50}}
        run["first_stage_seen_share"] = {"full": {"seen@10": seen, "seen@20": seen / 2}}
    write_comparison(runs, tmp_path)
    markdown = (tmp_path / "comparison.md").read_text()
    assert "| model | protocol | recall@20 | recall@50 | recall@100 | seen@10 | seen@20 | seeds |" in markdown
    assert "| MLLMSRec | full | 0.3500 ± 0.0707 | 0.5500 ± 0.0707 | 0.6500 ± 0.0707 | 0.4500 ± 0.0707 | " \
           "0.2250 ± 0.0354 | 2 |" in markdown
    assert "| SASRec | full | " not in markdown.split("## First stage reach")[1]  # a baseline records no first stage
    saved = find_records([tmp_path / "runs"])  # the records keep the fields: the merge command rebuilds the table
    assert sorted(load_record(folder).get("first_stage_recall", {}).get("full", {}).get("recall@20", 0)
                  for folder in saved) == [0, 0.3, 0.4]


def test_the_phase_table_averages_each_phase_over_seeds_and_a_missing_phase_counts_zero(tmp_path):
    runs = [_run("MLLMSRec", 1, [1, 3]), _run("MLLMSRec", 2, [2, 5]), _run("SASRec", 1, [1, 3]), _run("GRU4Rec", 1, [2])]
    runs[0]["phase_seconds"] = {"stages": 80.0, "warmup": 200.0, "train": 400.0, "test": 60.0, "other": 10.0, "total": 750.0}
    runs[1]["phase_seconds"] = {"stages": 2.0, "train": 380.0, "test": 58.0, "other": 12.0, "total": 452.0}  # resumed
    runs[2]["phase_seconds"] = {"train": 30.0, "valid": 5.0, "test": 1.0, "other": 2.0, "total": 38.0}
    write_comparison(runs, tmp_path)
    markdown = (tmp_path / "comparison.md").read_text().split("## Wall time per phase (seconds, mean over seeds)")[1]
    assert "| model | stages | warmup | train | test | valid | other | total | seeds |" in markdown
    assert "| MLLMSRec | 41.0 | 100.0 | 390.0 | 59.0 | 0.0 | 11.0 | 601.0 | 2 |" in markdown
    assert "| SASRec | 0.0 | 0.0 | 30.0 | 1.0 | 5.0 | 2.0 | 38.0 | 1 |" in markdown
    assert "GRU4Rec" not in markdown  # a record without phase_seconds (an older run) has no row
    with open(tmp_path / "comparison_phases.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["MLLMSRec", "SASRec"] and float(rows[0]["total"]) == 601.0


def test_the_movement_table_counts_where_the_llm_put_targets_its_first_stage_listed(tmp_path):
    """Up, same, down among the users whose target the first stage ranks within the records' top k (10 here): the
    LLM's own order (its LLM-alone row when the run fused), a target pushed out of the top k counting as down."""
    from recbole_mllm.comparison.analysis import reranker_movement_rows

    first = [1, 3, 5, 7, 12, 2]   # the fifth user's target is outside the first stage's top 10: not counted
    alone = [2, 3, 1, 11, 4, 1]   # down, same, up, down (out of the top 10), -, up
    fused = _run("MLLMSRec", 7, [1, 3, 5, 7, 12, 2])
    fused.update(first_stage_per_user={"uni100": _per_user(first)}, llm_alone_per_user={"uni100": _per_user(alone)})
    other_seed = _run("MLLMSRec", 8, [1, 1])  # no fusion: the run's own order is the LLM's
    other_seed["first_stage_per_user"] = {"uni100": _per_user([2, 1])}
    rows = reranker_movement_rows([fused, other_seed])
    assert len(rows) == 1 and rows[0]["model"] == "MLLMSRec" and rows[0]["seeds"] == 2 and rows[0]["users"] == 3.5
    assert (rows[0]["up"], rows[0]["same"], rows[0]["down"]) == pytest.approx((0.5 * (2 / 5 + 1 / 2), 0.5 * (1 / 5 + 1 / 2),
                                                                                0.5 * (2 / 5 + 0)))
    mismatched = dict(fused, llm_alone_per_user={"uni100": _per_user(alone, users=np.arange(6) + 50)})
    with pytest.raises(ComparisonError, match="not the same users"):
        reranker_movement_rows([mismatched])
    assert reranker_movement_rows([_run("SASRec", 7, [1, 2])]) == []  # no first stage, no row
    write_comparison([fused, other_seed], tmp_path)
    assert "## What the LLM did to the target" in (tmp_path / "comparison.md").read_text()
    with open(tmp_path / "comparison_movement.csv") as f:
        assert [(r["model"], r["protocol"], r["users"]) for r in csv.DictReader(f)] == [("MLLMSRec", "uni100", "3.5")]


def test_the_one_sided_paired_test_says_which_side_is_above():
    from recbole_mllm.evaluation import one_sided_p

    rng = np.random.default_rng(0)
    reference = rng.random(200)
    above = reference + rng.random(200) * 0.1
    assert one_sided_p(above, reference) < 1e-6  # above on most users
    assert one_sided_p(reference, above) > 0.99  # the other side: no evidence at all
    assert one_sided_p(reference, reference.copy()) == 1.0  # no pair differs
