"""Hyper-parameter tuning with one budget for every model: a Latin-hypercube random search, selected on validation.

    python -m recbole_mllm.tuning --model=SASRec --dataset=ml-1m-mm --trials=8 [--trial=3] [--key=value ...]
    python -m recbole_mllm.tuning --model=SASRec --dataset=ml-1m-mm --jobs=8 --gpu_ids=0,1   # 8 trials at once

The space is RecBole's (``HyperTuning``'s ``params_dict`` layout, ``properties/tuning/<Model>.yaml`` by
default; see ``search_space.py``). Unlike ``HyperTuning.run``, which asks hyperopt for one trial after
another in one process, the trial list is drawn up front and written to ``trials.json``: a Latin
hypercube with a fixed seed (with 8 trials, plain random draws from a 48-setting space left out every
low-dropout setting), no repeats. So trials can run as separate processes (``--trial=i``, several per
GPU), and a stopped search resumes: a trial whose record exists is never run again. Each trial is a
full ``quick_start.run`` (early stopping on the validation metric, full ranking); the selected trial is
the one with the best validation score, and its test result is the only one reported. The selection is
written as a YAML a user can pass with ``--config_files`` (``selected.yaml``, and ``--selected_config``).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from recbole_mllm import distributed
from recbole_mllm.cli import config_file_list, input_error
from recbole_mllm.comparison import load_record, save_record
from recbole_mllm.config import Config
from recbole_mllm.config_check import ConfigKeyError
from recbole_mllm.fileio import atomic_write
from recbole_mllm.search_space import load_search_space, search_space_file, space_keys

DEFAULT_TRIALS = 8
SAMPLING_SEED = 2020
PLACEMENT_KEYS = ("gpu_id", "use_gpu", "worker", "show_progress", "data_path", "checkpoint_dir", "output_dir",
                  "stage_cache_dir")
"""Keys that say where a trial runs and where its files go, not what it computes: trial processes of one
search may set them differently (one GPU each, say) without starting another search."""


def _column(space_type, values, n_trials, rng):
    """``n_trials`` values of one parameter, each option (or each 1/n-th of a range) taken equally often."""
    if space_type == "choice":
        column = [values[i % len(values)] for i in range(n_trials)]
        return [column[i] for i in rng.permutation(n_trials)]
    low, high = float(values[0]), float(values[1])
    strata = (rng.permutation(n_trials) + rng.random(n_trials)) / n_trials  # one draw in each 1/n-th, shuffled
    if space_type == "loguniform":  # RecBole's (hyperopt's) bounds are natural logs
        return np.exp(low + strata * (high - low)).tolist()
    column = (low + strata * (high - low)).tolist()
    return (np.round(np.asarray(column) / float(values[2])) * float(values[2])).tolist() if space_type == "quniform" else column


def sample_trials(space, n_trials, seed=SAMPLING_SEED):
    """``n_trials`` distinct settings of ``space``: a Latin hypercube (each option of a choice, each stratum of a
    range, is tried about equally often), so eight trials cover every dropout and every length; fewer if the
    space has fewer combinations. Mapping options of a ``choice`` are flattened into their keys.
    """
    rng, trials, seen = np.random.default_rng(seed), [], set()
    for _ in range(100):
        columns = {name: _column(space_type, values, n_trials, rng)
                   for space_type, entries in space.items() for name, values in entries.items()}
        for row in range(n_trials):
            params = {}
            for name, column in columns.items():
                params.update(column[row] if isinstance(column[row], dict) else {name: column[row]})
            key = json.dumps(params, sort_keys=True)
            if key not in seen:
                seen.add(key)
                trials.append(dict(sorted(params.items())))
        if len(trials) >= n_trials:
            break
    return trials[:n_trials]


class SearchError(ValueError):
    """A search that cannot start as asked (one line, for the command to print); nothing has been written."""


class Search:
    """One model's search on one dataset, kept in ``folder``: ``trials.json``, ``trial-<i>/`` records, the selection."""

    def __init__(self, folder, model, dataset, space_path, n_trials, overrides):
        self.folder, self.model, self.dataset = Path(folder), model, dataset
        if n_trials < 1:
            raise SearchError(f"--trials must be at least 1; got {n_trials}")
        space = load_search_space(space_path)
        clash = sorted(set(space_keys(space)) & {arg[2:].partition("=")[0] for arg in overrides})
        if clash:
            raise SearchError(f"--{clash[0]} is tuned by {space_path}: drop it from the command line or the space")
        settings = [arg for arg in overrides if arg[2:].partition("=")[0] not in PLACEMENT_KEYS]
        plan = {"model": model, "dataset": dataset, "space": space, "sampling_seed": SAMPLING_SEED,
                "overrides": settings,
                "trials": sample_trials(space, n_trials)}
        plan_file = self.folder / "trials.json"
        if plan_file.is_file():
            existing = json.loads(plan_file.read_text())
            if existing != plan:
                raise SearchError(f"{plan_file} holds another search (space, trials or overrides differ): "
                                 f"use another --tuning_dir or remove it")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(plan_file, json.dumps(plan, indent=1).encode())
        self.trials = plan["trials"]

    def trial_dir(self, index):
        return self.folder / f"trial-{index}"

    def done(self, index):
        return (self.trial_dir(index) / "record.json").is_file()

    def run_trial(self, index, config_file_list, overrides):
        """Train and evaluate trial ``index`` (its checkpoints stay in its own folder) and save its record."""
        from recbole_mllm.quick_start import run

        params = dict(self.trials[index])
        folder = self.trial_dir(index)
        result = run(self.model, self.dataset, config_file_list,
                     config_dict={**params, "checkpoint_dir": str(folder / "saved")}, cmd_args=overrides)
        result["hyper_parameters"] = params
        save_record(result, folder)
        return result

    def select(self):
        """The trial with the best validation score (all trials must be done); writes ``selected.yaml`` and ``tuning.md``."""
        missing = [i for i in range(len(self.trials)) if not self.done(i)]
        if missing:
            raise RuntimeError(f"{self.folder}: trials {missing} are not done yet; run them (--trial=i) first")
        records = [load_record(self.trial_dir(i)) for i in range(len(self.trials))]
        bigger = records[0].get("valid_metric_bigger", True)  # as RecBole's trainer compares scores
        scores = [r["best_valid_score"] for r in records]
        best = int(np.argmax(scores) if bigger else np.argmin(scores))
        metric = records[best].get("valid_metric", "valid score")
        header = (f"# {self.model} on {self.dataset}: trial {best} of {len(records)} of a Latin-hypercube random search "
                  f"(python -m recbole_mllm.tuning, {datetime.now():%Y-%m-%d}), valid {metric} {scores[best]:.4f}.\n"
                  f"# Pass it with --config_files; the search and every trial: docs/results.md.\n")
        lines = "".join(f"{key}: {json.dumps(value)}\n" for key, value in self.trials[best].items())
        selected = header + lines
        atomic_write(self.folder / "selected.yaml", selected.encode())
        atomic_write(self.folder / "tuning.md", self._table(records, best).encode())
        return best, records[best], selected

    def _table(self, records, best):
        keys = list(self.trials[0])
        rows = [f"# Tuning {self.model} on {self.dataset}", "",
                "| trial | " + " | ".join(keys) + " | valid score | epochs | train s |",
                "|" + "---|" * (len(keys) + 4)]
        for i, (params, record) in enumerate(zip(self.trials, records)):
            mark = " (selected)" if i == best else ""
            rows.append(f"| {i}{mark} | " + " | ".join(str(params[k]) for k in keys)
                        + f" | {record['best_valid_score']:.4f} | {record['epochs']} | {record['train_seconds']:.0f} |")
        test = records[best].get("test_result", {})
        rows += ["", "Test result of the selected trial (the only one reported): "
                 + "; ".join(f"{p}: ndcg@10 {m.get('ndcg@10', float('nan')):.4f}" for p, m in test.items())]
        return "\n".join(rows) + "\n"


def build_parser():
    """The command line of ``python -m recbole_mllm.tuning``; unknown ``--key=value`` pairs are config overrides."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # --gpu_id=1 (a trial's GPU) is no abbreviation of --gpu_ids
    parser.add_argument("-m", "--model", required=True, help="model to tune (one name)")
    parser.add_argument("-d", "--dataset", required=True, help="dataset name (RecBole atomic files)")
    parser.add_argument("--config_files", default=None, help="YAML files, separated by spaces or commas")
    parser.add_argument("--space", default=None, help="search-space YAML (default: properties/tuning/<model>.yaml)")
    parser.add_argument("--trials", type=int, default=DEFAULT_TRIALS, help=f"trials in the search (default {DEFAULT_TRIALS})")
    parser.add_argument("--trial", type=int, default=None, help="run only this trial (0-based), e.g. one process per trial")
    parser.add_argument("--select_only", action="store_true", help="run nothing; select from the trials done")
    parser.add_argument("--tuning_dir", default="outputs/tuning", help="searches go to <tuning_dir>/<dataset>/<model>/")
    parser.add_argument("--selected_config", default=None, help="also write the selected YAML here")
    parser.add_argument("--jobs", type=int, default=1,
                        help="trials run at once, each as its own process (--trial=i); a GPU holds several")
    parser.add_argument("--gpu_ids", default=None, help="with --jobs: GPUs the trial processes take in turn, e.g. 0,1")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    return parser


def argument_error(args, space_path):
    """The first option of ``args`` that cannot start a search, in words; None when they all can."""
    if args.jobs < 1:
        return f"--jobs must be at least 1; got {args.jobs}"
    if args.trials < 1:
        return f"--trials must be at least 1; got {args.trials}"
    if args.trial is not None and not 0 <= args.trial < args.trials:
        return f"--trial must be between 0 and {args.trials - 1} (--trials={args.trials}); got {args.trial}"
    if distributed.launched():  # every rank would write the same records, and its trial processes join its rendezvous
        return "run the search as one process, not under torchrun: --jobs runs trials side by side"
    if not space_path.is_file():
        return f"no search space {space_path}: pass --space=<file>"
    return None


def main(argv=None):
    """Exit status 2, with one line on stderr, for a bad option or key, before anything is written."""
    args, overrides = build_parser().parse_known_args(argv)
    space_path = Path(args.space) if args.space else search_space_file(args.model)
    error = argument_error(args, space_path)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    config_files = config_file_list(args.config_files)
    try:
        Config(args.model, args.dataset, config_files, cmd_args=overrides)  # a bad key fails before trials.json is written
        return _search(args, space_path, config_files, overrides)
    except (ConfigKeyError, SearchError) as error:
        return input_error(error, args.debug)


def _trial_command(args, overrides):
    """The command line of one trial process of this search (placement keys set per process are added later)."""
    command = [sys.executable, "-m", "recbole_mllm.tuning", f"--model={args.model}", f"--dataset={args.dataset}",
               f"--trials={args.trials}", f"--tuning_dir={args.tuning_dir}"]
    command += [f"--config_files={args.config_files}"] if args.config_files else []
    command += [f"--space={args.space}"] if args.space else []
    dropped = ("--gpu_id=",) if args.gpu_ids else ()
    return command + [arg for arg in overrides if not arg.startswith(dropped)]


def run_in_processes(search, command, todo, jobs, gpu_ids=None):
    """Run the trials ``todo`` as processes of ``command --trial=i``, ``jobs`` at a time.

    Why processes: a small sequence model leaves most of a GPU idle, so several trials share one (their
    epochs overlap); each trial stays a plain, resumable ``--trial=i`` run. GPUs from ``gpu_ids`` are
    taken in turn; each process gets an even share of the CPU threads; its output goes to
    ``trial-<i>/log.txt``. A failed trial is reported with its log once the others are done.
    """
    gpus = [g for g in str(gpu_ids).replace(" ", "").split(",") if g] if gpu_ids else []
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    pending, running, failed = list(todo), [], []
    with tqdm(total=len(todo), desc=f"{search.model} trials", unit="trial") as bar:
        while pending or running:
            while pending and len(running) < jobs:
                index = pending.pop(0)
                placement = [f"--gpu_id={gpus[index % len(gpus)]}"] if gpus else []
                search.trial_dir(index).mkdir(parents=True, exist_ok=True)
                log = open(search.trial_dir(index) / "log.txt", "ab")
                process = subprocess.Popen([*command, f"--trial={index}", *placement], stdout=log,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
                running.append((index, process, log))
            time.sleep(0.5)
            for entry in [e for e in running if e[1].poll() is not None]:
                index, process, log = entry
                log.close()
                running.remove(entry)
                bar.update()
                if process.returncode != 0 or not search.done(index):
                    failed.append(index)
    if failed:
        logs = ", ".join(str(search.trial_dir(i) / "log.txt") for i in sorted(failed))
        raise RuntimeError(f"trials {sorted(failed)} failed; their output: {logs}")


def _search(args, space_path, config_files, overrides):
    """Run the trials ``args`` asks for, then select when every trial is done."""
    search = Search(Path(args.tuning_dir) / args.dataset / args.model, args.model, args.dataset, space_path,
                    args.trials, overrides)
    if not args.select_only:
        todo = [i for i in ([args.trial] if args.trial is not None else range(len(search.trials))) if not search.done(i)]
        if args.jobs > 1 and len(todo) > 1:
            run_in_processes(search, _trial_command(args, overrides), todo, args.jobs, args.gpu_ids)
        for index in todo:
            if not search.done(index):
                search.run_trial(index, config_files, overrides)
    if not all(search.done(i) for i in range(len(search.trials))):
        print(f"{search.folder}: {sum(map(search.done, range(len(search.trials))))}/{len(search.trials)} trials done")
        return 0
    best, record, selected = search.select()
    if args.selected_config:
        Path(args.selected_config).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(args.selected_config), selected.encode())
    print(f"selected trial {best}: valid {record['best_valid_score']:.4f}, test "
          f"{json.dumps(record.get('test_result', {}))}\n{selected}", end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
