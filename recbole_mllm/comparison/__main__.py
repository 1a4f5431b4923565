"""Compare runs recorded by separate processes: ``python -m recbole_mllm.comparison RUN_DIR ... --output=DIR``."""

import argparse
import sys
from pathlib import Path

from recbole_mllm.cli import input_error
from recbole_mllm.comparison.analysis import ComparisonError, default_slices
from recbole_mllm.comparison.metrics import split_metric_keys
from recbole_mllm.comparison.records import find_records, load_record, with_first_stage_fallback
from recbole_mllm.comparison.report import write_comparison


def main(argv=None):
    """Merge the records found under each RUN_DIR into one comparison; exit code 2 when a RUN_DIR has none."""
    parser = argparse.ArgumentParser(prog="python -m recbole_mllm.comparison", description=__doc__)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="a run's record folder (record.json), or any folder with record folders below it")
    parser.add_argument("--output", required=True, help="folder for comparison.md, .csv, .png, runs.csv and runs/")
    parser.add_argument("--cold_item_max", type=int, default=5,
                        help="cold-item slice: users whose target has at most this many training interactions")
    parser.add_argument("--short_history_max", type=int, default=20,
                        help="short-history slice: users with at most this many interactions before the target")
    parser.add_argument("--descriptive", action="store_true",
                        help="runs tested on different candidates: write the tables without references, deltas or "
                             "p-values (without it, such runs are refused)")
    parser.add_argument("--baseline", action="append", default=[], metavar="LABEL",
                        help="a plugin-model run's label to count as a baseline besides RecBole's models (repeat for "
                             "more), e.g. 'FusedSASRec[id]': FusedSASRec on ids alone is SASRec")
    parser.add_argument("--fallback_alpha", type=float, metavar="ALPHA",
                        help="also report each MLLMSRec run as first_stage_fallback_alpha=ALPHA would have tested it "
                             "(the first stage where its validation p over it is >= ALPHA): '<model> (first-stage "
                             "fallback)', from runs that recorded that p")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    try:
        if args.fallback_alpha is not None and not 0 < args.fallback_alpha <= 1:  # before any record is read
            raise ComparisonError(f"--fallback_alpha: a significance level in (0, 1], got {args.fallback_alpha}")
        folders = find_records(args.run_dirs, skip=Path(args.output) / "runs")
        results = [load_record(folder) for folder in folders]
        if args.fallback_alpha is not None:
            results = [with_first_stage_fallback(result, args.fallback_alpha) for result in results]
        _, cutoffs = split_metric_keys(k for r in results for metrics in r["test_result"].values() for k in metrics)
        print(write_comparison(results, args.output, topk=cutoffs or (10,),
                               slices=default_slices(args.cold_item_max, args.short_history_max),
                               descriptive=args.descriptive, extra_baselines=args.baseline))
    except (FileNotFoundError, ComparisonError) as error:
        return input_error(error, args.debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
