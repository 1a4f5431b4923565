"""The side-by-side record of a comparison run: a Markdown table, a CSV and a bar chart.

One row per (model, test protocol); the metric columns are whatever RecBole's evaluator returned,
in its order, so a table never claims a metric that was not computed.
"""

import csv
import os

_RUN_COLUMNS = ["epochs", "train_seconds", "peak_gpu_memory_gb", "candidates"]


def comparison_rows(results):
    """Flatten run results into rows: model, protocol, every metric, then run facts."""
    rows = []
    for result in results:
        for protocol, metrics in result["test_result"].items():
            row = {"model": result["model"], "protocol": protocol}
            row.update({name: float(value) for name, value in metrics.items()})
            row["epochs"] = result["epochs"]
            row["train_seconds"] = round(result["train_seconds"], 1)
            peak = result.get("peak_gpu_memory_gb")
            row["peak_gpu_memory_gb"] = None if peak is None else round(peak, 2)
            row["candidates"] = result["fingerprints"].get(protocol, "")
            rows.append(row)
    return rows


def _columns(rows):
    metrics = [k for k in rows[0] if k not in ("model", "protocol", *_RUN_COLUMNS)]
    return ["model", "protocol", *metrics, *_RUN_COLUMNS]


def markdown_table(rows):
    """Render rows as a GitHub Markdown table (metrics with 4 decimals)."""
    columns = _columns(rows)
    fmt = lambda v: "" if v is None else (f"{v:.4f}" if isinstance(v, float) and not isinstance(v, bool) else str(v))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [fmt(row.get(c)) if c not in ("train_seconds", "peak_gpu_memory_gb") else ("" if row.get(c) is None else str(row[c])) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_comparison(rows, path, topk):
    """Grouped bars: one panel per protocol, NDCG and Hit at the middle cut-off, one bar per model."""
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
            row = next((r for r in rows if r["model"] == model and r["protocol"] == protocol), None)
            values = [row.get(m, 0.0) if row else 0.0 for m in metric_names]
            positions = [j + i * width for j in range(len(metric_names))]
            bars = ax.bar(positions, values, width, label=model)
            ax.bar_label(bars, fmt="%.3f", fontsize=7)
        ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(metric_names))], metric_names)
        ax.set_title(f"test protocol: {protocol}")
        ax.set_ylim(0, 1.05 * max([r.get(m, 0) for r in rows for m in metric_names] + [0.01]))
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_comparison(results, output_dir, topk=(10,)):
    """Write comparison.md, comparison.csv and comparison.png under ``output_dir``; return the table."""
    os.makedirs(output_dir, exist_ok=True)
    rows = comparison_rows(results)
    table = markdown_table(rows)
    dataset = results[0]["dataset"]
    with open(os.path.join(output_dir, "comparison.md"), "w", encoding="utf-8") as f:
        f.write(f"# {', '.join(r['model'] for r in results)} on {dataset}\n\n{table}\n")
    with open(os.path.join(output_dir, "comparison.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(rows))
        writer.writeheader()
        writer.writerows(rows)
    plot_comparison(rows, os.path.join(output_dir, "comparison.png"), list(topk))
    return table
