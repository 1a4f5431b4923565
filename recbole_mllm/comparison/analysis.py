"""Run results -> table rows: means and stds over seeds, each row's reference, paired p-values, slices."""

import functools
import json
import logging
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
from scipy.stats import wilcoxon

from recbole_mllm.comparison.metrics import as_numpy, per_user_metrics, split_metric_keys, target_ranks
from recbole_mllm.utils import get_model

logger = logging.getLogger(__name__)

FIRST_STAGE = " (first stage)"
LLM_ALONE = " (LLM alone)"
CHOSEN_WEIGHT = " (chosen weight)"
FALLBACK = " (first-stage fallback)"
DERIVED_ROWS = {FIRST_STAGE: ("first_stage_result", "first_stage_per_user"),
                LLM_ALONE: ("llm_alone_result", "llm_alone_per_user"),
                CHOSEN_WEIGHT: ("chosen_weight_result", "chosen_weight_per_user"),
                FALLBACK: ("fallback_result", "fallback_per_user")}
"""Rows a run adds beside its own, by name suffix: the same checkpoint scored by its first stage alone, (under late
fusion) by its LLM's score alone, (runs with ``first_stage_fallback_alpha``) at the fusion weight validation chose,
whether or not that ranked the test, and (``--fallback_alpha``: ``records.with_first_stage_fallback``) as a fusion choice
that keeps the first stage without a significant validation gain would have tested it; each one's reference is the
run's row."""


def default_slices(cold_item_max=5, short_history_max=20):
    """Slice name -> (per-user field, largest value inside the slice)."""
    return {"cold item": ("target_train_count", cold_item_max), "short history": ("history_length", short_history_max)}


def slice_label(name, field, limit):
    """The slice column's text, which carries its definition into the CSV."""
    return f"{name} ({field} <= {limit})"


@dataclass
class Entry:
    """One model at one seed, or its first stage: what the tables average over seeds."""

    model: str
    seed: int
    result: dict  # the run: epochs, train_seconds, fingerprints, ...
    test_result: dict  # protocol -> metric -> value (RecBole's evaluator)
    per_user: dict  # protocol -> field -> array [n]
    user_metrics: dict  # protocol -> metric -> array [n]
    stage_of: Optional[str] = None  # a derived row (first stage, LLM alone): the run whose checkpoint it scores


def _user_metrics(per_user, test_result):
    """Every top-k metric the evaluator reported, per user, for each protocol with per-user data."""
    return {protocol: per_user_metrics(fields["topk"], *split_metric_keys(test_result.get(protocol, {})))
            for protocol, fields in per_user.items()}


def run_label(result):
    """A run's row name: its ``label`` (e.g. an ablation ``FusedSASRec[id]``), else its model's name."""
    return result.get("label") or result["model"]


class ComparisonError(ValueError):
    """Runs that cannot be compared as asked; the message is one line, for the command to print."""


def run_labels(results):
    """Each result's row name: ``run_label``, followed by ``[key=value,...]`` of the hyper-parameters in which
    runs sharing that label differ, so runs of one model with different settings are never pooled.

    Raises ``ComparisonError`` for two runs with one row name and one seed: they would be averaged as two seeds.
    """
    labels = [run_label(r) for r in results]
    members = {}
    for i, label in enumerate(labels):
        members.setdefault(label, []).append(i)
    for label, indices in members.items():
        settings = [results[i].get("hyper_parameters") or {} for i in indices]
        differing = sorted(k for k in {k for s in settings for k in s}
                           if len({json.dumps(s.get(k), sort_keys=True, default=str) for s in settings}) > 1)
        for i, setting in zip(indices, settings):
            if differing:
                labels[i] = f"{label}[{','.join(f'{k}={setting.get(k)}' for k in differing)}]"
    seen = {}
    for label, result in zip(labels, results):
        seed = int(result.get("seed", 0))
        if (label, seed) in seen:
            raise ComparisonError(f"two runs of {label} at seed {seed} with the same hyper-parameters "
                                  f"({json.dumps(result.get('hyper_parameters') or {}, sort_keys=True, default=str)}): "
                                  "give each its own run_label, or leave one out")
        seen[(label, seed)] = True
    return labels


def build_entries(results):
    """An Entry per run, and one more per derived result the run carries (``DERIVED_ROWS``: ``<model> (first stage)``,
    ``<model> (LLM alone)``)."""
    entries = []
    for result, label in zip(results, run_labels(results)):
        parts = [(label, "test_result", "per_user", None)]
        parts += [(label + suffix, scores, users, label) for suffix, (scores, users) in DERIVED_ROWS.items()
                  if scores in result]
        for model, scores, users, stage_of in parts:
            per_user = {p: {k: as_numpy(v) for k, v in fields.items()} for p, fields in result.get(users, {}).items()}
            seed = int(result.get("seed", 0))  # older callers record no seed
            entries.append(Entry(model, seed, result, result[scores], per_user,
                                 _user_metrics(per_user, result[scores]), stage_of))
    return entries


def check_fingerprints(entries, descriptive=False):
    """Refuse models of one seed tested on different candidates (their users would be paired across different
    user sets), unless ``descriptive``: then warn and return True (the tables get no references, deltas or p-values).

    Returns whether candidates differ; raises ``ComparisonError`` naming the runs and their hashes.
    """
    seen = {}
    for entry in entries:
        for protocol, fingerprint in entry.result.get("fingerprints", {}).items():
            seen.setdefault((protocol, entry.seed), {})[entry.model] = fingerprint
    differing = [f"[{protocol}] seed {seed}: " + ", ".join(f"{model} {hash_}" for model, hash_ in by_model.items())
                 for (protocol, seed), by_model in seen.items() if len(set(by_model.values())) > 1]
    if not differing:
        return False
    text = f"runs were not tested on identical candidates ({'; '.join(differing)})"
    if not descriptive:
        raise ComparisonError(f"{text}: deltas and paired p-values would compare different users and items; "
                              "--descriptive writes the table without them")
    logger.warning(f"{text}: a descriptive table, without references, deltas or p-values")
    return True


def group_runs(entries):
    """(model, protocol) -> that model's entries over seeds, in the order models and protocols came."""
    groups = {}
    for entry in entries:
        for protocol in entry.test_result:
            groups.setdefault((entry.model, protocol), []).append(entry)
    return groups


def is_plugin_model(name):
    """True for recbole_mllm's own models; RecBole's models and unknown names are baselines."""
    try:
        return get_model(name).__module__.startswith("recbole_mllm")
    except (ValueError, ImportError):
        return False


def _valid_mean(runs):
    """Mean ``best_valid_score`` over seeds, negated when smaller is better; -inf where absent (never chosen)."""
    values = [float(e.result["best_valid_score"]) for e in runs if e.result.get("best_valid_score") is not None]
    if not values:
        return -np.inf
    return float(np.mean(values)) * (1 if runs[0].result.get("valid_metric_bigger", True) else -1)


def baselines(groups, protocol, extra=frozenset()):
    """The rows of ``protocol`` that are baselines, in the order they came: models not from recbole_mllm, and the
    labels in ``extra`` (plugin-model runs that are a baseline in substance, e.g. FusedSASRec on ids, which is SASRec)."""
    return [m for (m, p), runs in groups.items() if p == protocol and runs[0].stage_of is None
            and (m in extra or not is_plugin_model(runs[0].result["model"]))]


def check_extra_baselines(groups, extra):
    """Refuse a label given as a baseline that names no run's own row (a typo would silently change nothing)."""
    own = {m for (m, _), runs in groups.items() if runs[0].stage_of is None}
    unknown = sorted(set(extra) - own)
    if unknown:
        raise ComparisonError(f"--baseline names {', '.join(unknown)}, which is no run's label here "
                              f"(labels: {', '.join(sorted(own))})")


def best_models(groups, extra=frozenset()):
    """Protocol -> the baseline with the best mean validation score (``best_valid_score``, the metric that chose
    each run's epoch), or the best model when no baseline ran. Never chosen by a test score."""
    best = {}
    for protocol in dict.fromkeys(p for _, p in groups):
        pool = [m for (m, p), runs in groups.items() if p == protocol and runs[0].stage_of is None]
        best[protocol] = max(baselines(groups, protocol, extra) or pool,
                             key=lambda m: _valid_mean(groups[(m, protocol)]))
    return best


def _summary(values):
    """Mean and sample standard deviation (ddof=1; 0 for one value)."""
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)


def _metric_columns(values_by_name):
    """{name: [value per seed]} -> {name: mean, name_std: std}."""
    row = {}
    for name, values in values_by_name.items():
        row[name], row[f"{name}_std"] = _summary(values)
    return row


def summary_rows(groups):
    """One row per (model, protocol): the evaluator's metrics over seeds and the runs' facts."""
    rows = []
    for (model, protocol), runs in groups.items():
        names = dict.fromkeys(name for e in runs for name in e.test_result[protocol])
        row = {"model": model, "protocol": protocol}
        row.update(_metric_columns({n: [float(e.test_result[protocol][n]) for e in runs if n in e.test_result[protocol]]
                                    for n in names}))
        peaks = [e.result["peak_gpu_memory_gb"] for e in runs if e.result.get("peak_gpu_memory_gb") is not None]
        row.update(seeds=len(runs), epochs=float(np.mean([e.result["epochs"] for e in runs])),
                   train_seconds=float(np.mean([e.result["train_seconds"] for e in runs])),
                   peak_gpu_memory_gb=max(peaks) if peaks else None,
                   candidates="/".join(dict.fromkeys(e.result.get("fingerprints", {}).get(protocol, "") for e in runs)))
        rows.append(row)
    return rows


def first_stage_rows(results):
    """One row per (run label, protocol) of the runs that record their first stage's reach in full ranking: the share
    of targets in its top ``rerank_top_k``, 50 and 100 (``first_stage_recall``) and of already-seen items in its
    unmasked top 10 and 20 (``first_stage_seen_share``), mean and std over seeds."""
    values = {}
    for result in results:
        for field in ("first_stage_recall", "first_stage_seen_share"):
            for protocol, shares in (result.get(field) or {}).items():
                row = values.setdefault((run_label(result), protocol), {})
                for name, value in shares.items():
                    row.setdefault(name, []).append(float(value))
    rows = []
    for (model, protocol), by_name in values.items():
        ordered = sorted(by_name, key=lambda n: (n.split("@")[0] != "recall", int(n.split("@")[1])))
        rows.append({"model": model, "protocol": protocol, **_metric_columns({n: by_name[n] for n in ordered}),
                     "seeds": max(len(v) for v in by_name.values())})
    return rows


def reranker_movement_rows(results):
    """What the LLM did to the target, per (run label, protocol) of the runs that record their first stage: among the
    users whose target the first stage ranks within the records' top k (``topk``'s largest cut-off), the share the LLM
    ranks higher (``up``), at the same rank (``same``) or lower, outside that top k included (``down``); the LLM's
    own order (``llm_alone_per_user``, else the run's ``per_user``: without fusion the LLM ranks alone). Mean and std
    over seeds, and the mean number of such users. A reranker that adds nothing can still move targets: this shows
    whether its moves are up more often than down."""
    values = {}
    for result in results:
        llm = result.get("llm_alone_per_user") or result.get("per_user") or {}
        for protocol, first in (result.get("first_stage_per_user") or {}).items():
            if protocol not in llm:
                continue
            before, after = target_ranks(first["topk"]), target_ranks(llm[protocol]["topk"])
            if not np.array_equal(as_numpy(first["user_id"]), as_numpy(llm[protocol]["user_id"])):
                raise ComparisonError(f"{run_label(result)} seed {result.get('seed')}: the first stage's and the "
                                      f"LLM's per-user rows of {protocol} are not the same users")
            listed = before > 0
            moved = np.where(after[listed] == 0, np.inf, after[listed]) - before[listed]
            row = values.setdefault((run_label(result), protocol), {"users": [], "up": [], "same": [], "down": []})
            row["users"].append(float(listed.sum()))
            for name, share in (("up", moved < 0), ("same", moved == 0), ("down", moved > 0)):
                row[name].append(float(share.mean()) if listed.any() else float("nan"))
    return [{"model": model, "protocol": protocol, "users": round(float(np.mean(row.pop("users"))), 1),
             **_metric_columns(row), "seeds": len(row["up"])} for (model, protocol), row in values.items()]


def fusion_rows(results):
    """One row per run with a late-fusion choice (``late_fusion_selection``): each weight's validation score, the
    weight chosen, the first stage's validation score, the one-sided p of the chosen weight over it and whether the
    first stage was kept (``first_stage_fallback_alpha``); runs recorded before the first stage was scored there leave
    those blank."""
    rows = []
    for result in sorted(results, key=lambda r: (run_label(r), r.get("seed") or 0)):
        selection = result.get("late_fusion_selection")
        if not selection:
            continue
        rows.append({"model": run_label(result), "seed": result.get("seed"),
                     "valid by weight": ", ".join(f"{w:g}: {v:.4f}" for w, v in zip(selection["weights"],
                                                                                      selection["valid_scores"])),
                     "chosen": f"{selection['chosen']:g}", "first stage valid": selection.get("first_stage_valid_score"),
                     "p over first stage": selection.get("p_over_first_stage"),
                     "first stage kept": selection.get("first_stage")})
    return rows


def phase_rows(results):
    """One row per run label of the runs that record ``phase_seconds``: each phase's seconds, mean over those runs (a
    phase a run did not go through, such as a resumed run's warm-up, counts 0), ``other`` and ``total`` last."""
    by_label = {}
    for result in results:
        if result.get("phase_seconds"):
            by_label.setdefault(run_label(result), []).append(result["phase_seconds"])
    rows = []
    for label, runs in by_label.items():
        names = [n for n in dict.fromkeys(n for run in runs for n in run) if n not in ("other", "total")]
        rows.append({"model": label, **{n: float(np.mean([run.get(n, 0.0) for run in runs]))
                                        for n in (*names, "other", "total")}, "seeds": len(runs)})
    return rows


def slice_rows(groups, slices):
    """One row per (model, protocol, slice) with per-user data: slice size, per-user metrics over seeds."""
    rows = []
    for (model, protocol), runs in groups.items():
        if not all(protocol in e.per_user for e in runs):
            continue
        for name, (field, limit) in slices.items():
            masks = [e.per_user[protocol][field] <= limit for e in runs]
            users = np.unique(np.concatenate([e.per_user[protocol]["user_id"][m] for e, m in zip(runs, masks)]))
            row = {"model": model, "protocol": protocol, "slice": slice_label(name, field, limit), "users": len(users)}
            if len(users):
                row.update(_metric_columns({n: [float(e.user_metrics[protocol][n][m].mean()) for e, m in zip(runs, masks)]
                                            for n in runs[0].user_metrics[protocol]}))
            rows.append(dict(row, seeds=len(runs)))
    return rows


def _user_values(entry, protocol, metric, where):
    """(sorted user ids, their ``metric``) for the users inside ``where`` = (field, limit), or all."""
    fields = entry.per_user[protocol]
    keep = fields[where[0]] <= where[1] if where else np.ones(len(fields["user_id"]), bool)
    users, values = fields["user_id"][keep], entry.user_metrics[protocol][metric][keep]
    order = np.argsort(users)
    return users[order], values[order]


def _user_means(runs, protocol, metric, seeds, where):
    """Each user's ``metric`` averaged over ``seeds``, for the users that every one of those runs evaluated.

    Summed in seed order, whatever order the records came in: floating-point sums depend on their order, and a user
    whose two models tie would otherwise differ by 1e-17 in one order and not in another, which Wilcoxon's test counts
    (the p-value of the same runs changed with the order of the paths given)."""
    frames = [_user_values(e, protocol, metric, where) for e in sorted(runs, key=lambda e: e.seed) if e.seed in seeds]
    users = functools.reduce(np.intersect1d, [u for u, _ in frames])
    return users, np.mean([v[np.searchsorted(u, users)] for u, v in frames], axis=0)


def wilcoxon_p(values, reference):
    """Two-sided Wilcoxon signed-rank p of paired arrays; 1.0 when every difference is zero (scipy raises)."""
    if not np.any(values != reference):
        return 1.0
    return float(wilcoxon(values, reference, zero_method="wilcox").pvalue)


def paired_p_value(runs, reference_runs, protocol, metric, where=None):
    """p of ``runs`` against ``reference_runs`` on per-user ``metric``, users paired by user_id.

    Each user's value is first averaged over the seeds both models ran; None when they share no seed
    with per-user data (or no user).
    """
    seeds = [{e.seed for e in r if metric in e.user_metrics.get(protocol, {})} for r in (runs, reference_runs)]
    common = seeds[0] & seeds[1]
    if not common:
        return None
    users, values = _user_means(runs, protocol, metric, common, where)
    reference_users, reference_values = _user_means(reference_runs, protocol, metric, common, where)
    _, i, j = np.intersect1d(users, reference_users, return_indices=True)
    return wilcoxon_p(values[i], reference_values[j]) if len(i) else None


def _compare(row, reference_row, groups, metric, where):
    """``{reference, delta, p_value}`` of ``row`` against ``reference_row`` (delta: difference of mean ``metric``)."""
    model, reference, protocol = row["model"], reference_row["model"], row["protocol"]
    out = {"reference": reference}
    if metric in row and metric in reference_row:
        out["delta"] = row[metric] - reference_row[metric]
    out["p_value"] = paired_p_value(groups[(model, protocol)], groups[(reference, protocol)], protocol, metric, where)
    return out


def add_comparisons(rows, groups, best, metric, slices=None):
    """Fill ``reference``, ``delta`` (row mean minus reference mean of ``metric``) and ``p_value``.

    A first stage's reference is its own model; every other row's is ``best`` of its protocol.
    """
    wheres = {slice_label(name, *where): where for name, where in (slices or {}).items()}
    index = {(r["model"], r["protocol"], r.get("slice")): r for r in rows}
    for row in rows:
        model, protocol, label = row["model"], row["protocol"], row.get("slice")
        reference = groups[(model, protocol)][0].stage_of or best[protocol]
        reference_row = index.get((reference, protocol, label))
        if reference != model and reference_row is not None:
            row.update(_compare(row, reference_row, groups, metric, wheres.get(label)))


def pairwise_rows(rows, groups, best, metric, extra=frozenset()):
    """One row per (row, reference) for every reference of each (model, protocol) row: its own model for a derived
    row, and for an LLM alone also its first stage (what the LLM adds over it without fusion); then every baseline of
    its protocol (the best model when no baseline ran), never itself."""
    index = {(r["model"], r["protocol"]): r for r in rows}
    pairs = []
    for row in rows:
        model, protocol = row["model"], row["protocol"]
        own = groups[(model, protocol)][0].stage_of
        owns = [own, own + FIRST_STAGE] if own and model == own + LLM_ALONE else [own] if own else []
        references = dict.fromkeys(owns + (baselines(groups, protocol, extra) or [best[protocol]]))
        pairs += [{"model": model, "protocol": protocol, **_compare(row, index[(r, protocol)], groups, metric, None)}
                  for r in references if r != model and (r, protocol) in index]
    return pairs


def key_metric(results):
    """The runs' lower-cased ``valid_metric`` (what chose their best epoch), default ``ndcg@10``."""
    for result in results:
        config = result.get("config")
        name = config["valid_metric"] if config is not None else result.get("valid_metric")
        if name:
            return str(name).lower()
    return "ndcg@10"


class Analysis(NamedTuple):
    """What ``analyse`` found, for the report to write."""

    entries: list
    rows: list  # (model, protocol) rows
    slice_rows: list  # (model, protocol, slice) rows
    best: dict  # protocol -> reference model
    metric: str  # the metric of references, deltas and p-values
    pairs: list  # (model, protocol, reference) rows: delta and p-value against every baseline
    descriptive: bool  # candidates differ: no references, deltas or p-values
    extra_baselines: frozenset = frozenset()  # plugin-model labels counted as baselines


def analyse(results, slices=None, descriptive=False, extra_baselines=()):
    """Everything the comparison files show, from a list of run results.

    Runs tested on different candidates raise ``ComparisonError`` unless ``descriptive``, which leaves the
    comparison columns empty. ``extra_baselines``: labels of plugin-model runs to count as baselines.
    """
    metric, slices = key_metric(results), default_slices() if slices is None else slices
    entries = build_entries(results)
    differ = check_fingerprints(entries, descriptive)
    groups = group_runs(entries)
    extra = frozenset(extra_baselines)
    check_extra_baselines(groups, extra)
    best = best_models(groups, extra)
    rows, sliced = summary_rows(groups), slice_rows(groups, slices)
    if differ:
        return Analysis(entries, rows, sliced, {}, metric, [], True, extra)
    add_comparisons(rows, groups, best, metric)
    add_comparisons(sliced, groups, best, metric, slices)
    return Analysis(entries, rows, sliced, best, metric, pairwise_rows(rows, groups, best, metric, extra), False, extra)
