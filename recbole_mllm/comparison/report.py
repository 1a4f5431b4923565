"""The files of a comparison: comparison.md, comparison.csv, comparison_slices.csv, comparison_pvalues.csv,
comparison_fusion.csv, comparison_phases.csv, runs.csv, comparison.png, runs/."""

import csv
import io
import json
from pathlib import Path

from recbole_mllm.comparison.analysis import (CHOSEN_WEIGHT, FIRST_STAGE, LLM_ALONE, analyse, first_stage_rows,
                                              fusion_rows, is_plugin_model, phase_rows, reranker_movement_rows,
                                              run_label)
from recbole_mllm.comparison.records import save_record
from recbole_mllm.fileio import atomic_write

_COMPARE = ["reference", "delta", "p_value"]
_FACTS = ["epochs", "train_seconds", "peak_gpu_memory_gb", "candidates"]
_KEYS = {"model", "protocol", "slice", "users", "seed", "seeds", "best_valid_score", "hyper_parameters",
         *_COMPARE, *_FACTS}


def _metrics(rows):
    """The metric columns of ``rows``, in the evaluator's order."""
    return list(dict.fromkeys(k for r in rows for k in r if k not in _KEYS and not k.endswith("_std")))


def run_rows(entries):
    """One row per run (and first stage) and protocol: what each seed gave before averaging."""
    rows = []
    for e in entries:
        for protocol, metrics in e.test_result.items():
            rows.append({"model": e.model, "seed": e.seed, "protocol": protocol, **metrics,
                         "best_valid_score": e.result.get("best_valid_score"),
                         **{k: e.result.get(k) for k in ("epochs", "train_seconds", "peak_gpu_memory_gb")},
                         "candidates": e.result.get("fingerprints", {}).get(protocol, ""),
                         "hyper_parameters": json.dumps(e.result.get("hyper_parameters", {}), sort_keys=True)})
    return rows


def _cell(row, column, metrics):
    value = row.get(column)
    if value is None:
        return ""
    if column in metrics:
        spread = row.get(f"{column}_std")
        return f"{value:.4f}" + (f" ± {spread:.4f}" if row.get("seeds", 1) > 1 and spread is not None else "")
    formats = {"delta": "{:+.4f}", "p_value": "{:.3g}", "epochs": "{:g}", "train_seconds": "{:.1f}",
               "peak_gpu_memory_gb": "{:.2f}"}
    return formats.get(column, "{}").format(value)


def markdown_table(rows, columns):
    """A GitHub Markdown table; metrics as ``mean ± std`` when a row has more than one seed."""
    metrics = set(_metrics(rows))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row, c, metrics) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _phase_columns(rows):
    """The phases of ``rows`` in the order runs met them, ``other`` and ``total`` last."""
    names = [n for n in dict.fromkeys(k for r in rows for k in r) if n not in ("model", "seeds", "other", "total")]
    return [*names, "other", "total"]


FUSION_COLUMNS = ["model", "seed", "valid by weight", "chosen", "first stage valid", "p over first stage", "first stage kept"]


def fusion_table(rows):
    """Markdown: one row per run's late-fusion choice (``analysis.fusion_rows``); blank where the run did not record it."""
    def cell(value, column):
        return "" if value is None else f"{value:.3g}" if column == "p over first stage" else str(value)
    lines = ["| " + " | ".join(FUSION_COLUMNS) + " |", "|" + "---|" * len(FUSION_COLUMNS)]
    lines += ["| " + " | ".join(cell(row.get(c), c) for c in FUSION_COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def phase_table(rows):
    """Markdown: one row per model, the mean seconds of each phase (``analysis.phase_rows``)."""
    phases = _phase_columns(rows)
    lines = ["| model | " + " | ".join(phases) + " | seeds |", "|" + "---|" * (len(phases) + 2)]
    lines += [f"| {row['model']} | " + " | ".join(f"{row.get(p, 0.0):.1f}" for p in phases) + f" | {row['seeds']} |"
              for row in rows]
    return "\n".join(lines)


def _csv_text(rows, columns):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _with_std(metrics):
    return [c for m in metrics for c in (m, f"{m}_std")]


def pairs_table(analysis):
    """Markdown: one row per (model, protocol), one column per reference, each cell ``delta (p)``."""
    references = list(dict.fromkeys(p["reference"] for p in analysis.pairs))
    cells = {}
    for pair in analysis.pairs:
        delta = "" if pair.get("delta") is None else f"{pair['delta']:+.4f}"
        p = "" if pair.get("p_value") is None else f" (p {pair['p_value']:.3g})"
        cells.setdefault((pair["model"], pair["protocol"]), {})[pair["reference"]] = delta + p
    lines = ["| model | protocol | " + " | ".join(f"vs {r}" for r in references) + " |",
             "|" + "---|" * (len(references) + 2)]
    lines += [f"| {model} | {protocol} | " + " | ".join(by_reference.get(r, "") for r in references) + " |"
              for (model, protocol), by_reference in cells.items()]
    return "\n".join(lines)


def notes(analysis):
    """What the p-values compare and with which test, one line per reference."""
    metric = analysis.metric
    if analysis.descriptive:
        return ["Descriptive table: the runs were not tested on identical candidates (see `candidates`), so no "
                "row has a reference, delta or p-value."]
    lines = [f"delta = row mean minus reference mean of {metric}; p_value: two-sided Wilcoxon signed-rank test "
             f"(scipy, zero_method='wilcox') on per-user {metric}, users paired by user_id, each user's value "
             "first averaged over the seeds both models ran (blank: no per-user data or no common seed)."]
    for protocol, model in analysis.best.items():
        kind = ("the best baseline" if model in analysis.extra_baselines or not is_plugin_model(model)
                else "the best model (no baseline ran)")
        lines.append(f"[{protocol}] reference: {model}, {kind} by mean validation score (best_valid_score).")
    for entry in {e.model: e for e in analysis.entries if e.stage_of}.values():
        model, parent = entry.model, entry.stage_of
        if model.endswith(FIRST_STAGE):
            lines.append(f"{model}: the {parent} checkpoint ranked by its first stage alone; its reference is {parent}, "
                         "so its delta is minus what the LLM reranker adds.")
        elif model.endswith(LLM_ALONE):
            lines.append(f"{model}: the {parent} checkpoint ranked by its LLM's score alone (late fusion off); its "
                         f"reference is {parent}, so its delta is minus what the chosen late fusion adds; the p-value "
                         f"file also sets it against {parent}{FIRST_STAGE} (what the LLM adds over its first stage).")
        elif model.endswith(CHOSEN_WEIGHT):
            lines.append(f"{model}: the {parent} checkpoint at the late-fusion weight chosen on validation, whether or "
                         f"not the first-stage fallback let it rank the test; its reference is {parent}.")
    return lines


def plot_comparison(rows, path, topk):
    """Grouped bars: one panel per protocol, NDCG and Hit at the middle cut-off, one bar per model, std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = sorted(topk)[len(topk) // 2] if topk else 10
    metric_names = [m for m in (f"ndcg@{k}", f"hit@{k}", f"mrr@{k}") if m in rows[0]]
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(protocols), figsize=(5 * len(protocols), 4), squeeze=False)
    width = 0.8 / max(len(models), 1)
    for ax, protocol in zip(axes[0], protocols):
        for i, model in enumerate(models):
            row = next((r for r in rows if r["model"] == model and r["protocol"] == protocol), {})
            values = [row.get(m, 0.0) for m in metric_names]
            errors = [row.get(f"{m}_std", 0.0) for m in metric_names]
            positions = [j + i * width for j in range(len(metric_names))]
            bars = ax.bar(positions, values, width, yerr=errors, capsize=2, label=model)
            ax.bar_label(bars, fmt="%.3f", fontsize=7)
        ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(metric_names))], metric_names)
        ax.set_title(f"test protocol: {protocol}")
        ax.set_ylim(0, 1.1 * max([r.get(m, 0) + r.get(f"{m}_std", 0) for r in rows for m in metric_names] + [0.01]))
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def record_folders(results, runs_dir):
    """``runs_dir/<label>-seed<seed>`` for each result, ``-2``, ``-3``... added where two would share one."""
    folders = []
    for result in results:
        name = f"{run_label(result)}-seed{result.get('seed', 0)}"
        folder, n = runs_dir / name, 1
        while folder in folders:
            n += 1
            folder = runs_dir / f"{name}-{n}"
        folders.append(folder)
    return folders


def write_comparison(results, output_dir, topk=(10,), slices=None, descriptive=False, extra_baselines=()):
    """Save every run's record under ``runs/`` and write the comparison files; return the main table.

    ``slices``: name -> (per-user field, largest value), default ``analysis.default_slices()``. Records are
    saved first, so a ``ComparisonError`` (runs tested on different candidates without ``descriptive``, two runs
    of one row and seed) loses none of them. ``extra_baselines``: labels of plugin-model runs counted as baselines.
    """
    output = Path(output_dir)
    for result, folder in zip(results, record_folders(results, output / "runs")):
        save_record(result, folder)
    analysis = analyse(results, slices, descriptive, extra_baselines)
    rows, sliced, runs = analysis.rows, analysis.slice_rows, run_rows(analysis.entries)
    metrics, slice_metrics = _metrics(rows), _metrics(sliced)
    table = markdown_table(rows, ["model", "protocol", *metrics, "seeds", *_COMPARE, *_FACTS])
    slice_table = markdown_table(sliced, ["model", "protocol", "slice", "users", *slice_metrics, "seeds", *_COMPARE])
    seeds = sorted({e.seed for e in analysis.entries})
    title = (f"# {', '.join(dict.fromkeys(r['model'] for r in rows))} on "
             f"{', '.join(dict.fromkeys(r['dataset'] for r in results))} (seeds {', '.join(map(str, seeds))})")
    markdown = [title, table, "## Slices", slice_table if sliced else "(no per-user data)"]
    if analysis.pairs:
        markdown += [f"## Against every baseline: delta (paired p-value) of {analysis.metric}", pairs_table(analysis)]
    reach = first_stage_rows(results)
    if reach:  # what the LLM can reorder: targets in the first stage's top k; seen items in its unmasked top k
        markdown += ["## First stage reach (full ranking): share of targets in its top k (recall@k), of already-seen "
                     "items in its unmasked top k (seen@k)",
                     markdown_table(reach, ["model", "protocol", *_metrics(reach), "seeds"])]
    movement = reranker_movement_rows(results)
    if movement:  # whether the LLM moves targets up more often than down (its own order against its first stage's)
        markdown += ["## What the LLM did to the target: among users whose target its first stage ranks in the top k, "
                     "the share it ranks higher, the same or lower (its own order, fusion off)",
                     markdown_table(movement, ["model", "protocol", "users", *_metrics(movement), "seeds"])]
    fusion = fusion_rows(results)
    if fusion:  # what validation chose between the LLM, the fused scores and the first stage, run by run
        markdown += ["## Late fusion chosen on validation (per run)", fusion_table(fusion)]
    phases = phase_rows(results)
    if phases:  # where each model's wall time went (the runs' phase_seconds)
        markdown += ["## Wall time per phase (seconds, mean over seeds)", phase_table(phases)]
    markdown += notes(analysis)
    files = {
        "comparison.md": "\n\n".join(markdown) + "\n",
        "comparison.csv": _csv_text(rows, ["model", "protocol", *_with_std(metrics), "seeds", *_COMPARE, *_FACTS]),
        "comparison_slices.csv": _csv_text(sliced, ["model", "protocol", "slice", "users", *_with_std(slice_metrics),
                                                    "seeds", *_COMPARE]),
        "comparison_pvalues.csv": _csv_text(analysis.pairs, ["model", "protocol", *_COMPARE]),
        "comparison_phases.csv": _csv_text(phases, ["model", *_phase_columns(phases), "seeds"]),
        "comparison_movement.csv": _csv_text(movement, ["model", "protocol", "users", *_with_std(_metrics(movement)),
                                                        "seeds"]),
        "comparison_fusion.csv": _csv_text(fusion, FUSION_COLUMNS),
        "runs.csv": _csv_text(runs, ["model", "seed", "protocol", *_metrics(runs), "best_valid_score", *_FACTS,
                                     "hyper_parameters"]),
    }
    for name, text in files.items():
        atomic_write(output / name, text.encode("utf-8"))
    plot_comparison(rows, output / "comparison.png", list(topk))
    return table
