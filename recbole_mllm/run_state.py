"""``run_state``: a training run's state after its last finished epoch, kept under
``<stage_cache_dir>/run_state/<hash>.pth``, so a run stopped with its machine continues there on the next one.

The file holds all a run needs to go on as if never stopped: the epoch, the model and optimizer, the learning-rate
warm-up, the step and stopping counters, the best validation so far with the best epoch's weights (RecBole's own
checkpoint of that epoch is on the machine that was taken back), the loss history and every random generator's state.
The hash covers what decides a run's course (:func:`run_key`). The trainer mixin ``trainer.ResumableTraining`` writes
and reads it; this module names, saves and loads the file (the lock beside it: ``distributed.file_lock``).
"""

import functools
import json
import random
from pathlib import Path

import numpy as np
import torch

from recbole_mllm import compat, distributed
from recbole_mllm.fileio import atomic_output, canonical_json, sha256_bytes, sha256_file
from recbole_mllm.properties_path import declared

KEYS_NOT_IN_KEY = frozenset({
    # where files are read and written: the same run on another machine has other paths (the data's content is
    # hashed instead, see run_key)
    "data_path", "checkpoint_dir", "stage_cache_dir", "output_dir",
    # which device of the machine runs it, and the rank layout of this process
    "gpu_id", "device", "local_rank", "offset", "ip", "port", "nproc", "single_spec",
    # what is shown or logged, never what is trained
    "show_progress", "state", "log_wandb", "wandb_project", "loss_decimal_place", "run_label", "check_config_keys",
    # what happens after training: the test protocols, the comparison's slices; eval_batch_size batches the same
    # users (validation scores do not depend on it)
    "test_protocols", "eval_batch_size", "slice_cold_item_max", "slice_short_history_max",
    # the switch itself: the run it resumes is the same run
    "resume_training",
})
"""Config keys left out of a run's key, since they do not change what is trained. Every other resolved key is in it:
where unsure, a key is kept (a needless retrain costs time, a wrongly resumed run a wrong result)."""


@functools.lru_cache(maxsize=None)
def code_sha256():
    """Hash of the package's code: every ``.py`` and prompt template ``.txt`` under ``recbole_mllm/``, by path.

    The whole package rather than the trainer alone: a model, a loader or a loss changed since the state was written
    trains another run. Any edit costs a restart, never a state trained by other code.
    """
    root = Path(__file__).resolve().parent
    digest = []
    for path in sorted(p for pattern in ("*.py", "*.txt") for p in root.rglob(pattern) if "__pycache__" not in p.parts):
        digest.append(f"{path.relative_to(root).as_posix()}:{sha256_file(path)}")
    return sha256_bytes("\n".join(digest).encode())


def _data_sha256(config):
    """Hashes of the dataset's atomic files (``<data_path>/<dataset>.*``): the same name over other data is another run."""
    folder = Path(config["data_path"] or "")
    if not folder.is_dir():
        return {}
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.startswith(f"{config['dataset']}."))
    return {p.name: sha256_file(p) for p in files}


def _to_json(identity):
    """The identity's one spelling: ``canonical_json``, or with ``str`` for values JSON lacks (enums, devices, inf)."""
    try:
        return canonical_json(identity)
    except (TypeError, ValueError):
        return json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def run_key(config, model):
    """16 hex digits over the model, the dataset (its name and files), every resolved config value but
    :data:`KEYS_NOT_IN_KEY`, the package's code and, for a model with stage caches (``warmup_inputs``), their
    identities and the backend's dtype."""
    settings = {k: v for k, v in config.final_config_dict.items() if k not in KEYS_NOT_IN_KEY}
    identity = {"model": config["model"], "dataset": config["dataset"], "data": _data_sha256(config),
                "config": settings, "code": code_sha256()}
    if hasattr(model, "warmup_inputs"):
        identity["stage_inputs"] = model.warmup_inputs()
    return sha256_bytes(_to_json(identity).encode())[:16]


def state_path(config, model):
    """``<stage_cache_dir>/run_state/<run_key>.pth``; a RecBole baseline, which reads no stage, uses the folder
    ``stages.yaml`` declares, so that one command of several models keeps all of them in one place."""
    folder = config["stage_cache_dir"] or declared("stages.yaml", "stage_cache_dir")["stage_cache_dir"]
    return Path(folder) / "run_state" / f"{run_key(config, model)}.pth"


class RunStateError(RuntimeError):
    """A run state that cannot be read, in one line naming the file and how to start over."""


def load(path, device):
    try:
        return compat.load_weights(path, map_location=device)
    except Exception as error:  # a truncated copy, another format, a refused global: all end the same way
        raise RunStateError(f"cannot read the run state {path} ({type(error).__name__}: {error}); delete the file or "
                            f"run with --resume_training=False to start over") from None


def save(path, state):
    """Written atomically, so a run stopped while writing leaves the previous epoch's state."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as f:
        torch.save(state, f)


def rank_rng(states, path):
    """This rank's generators of a state written with one entry per rank; a state written by another number of
    processes is a one-line error (its loaders were split otherwise)."""
    rank, world = distributed.rank_and_world()
    if len(states) != world:
        raise RunStateError(f"{path} was written by {len(states)} process(es) and is resumed by {world}: resume with "
                            f"the same number of processes, delete the file or run with --resume_training=False")
    return states[rank]


def rng_states(loaders):
    """Every random generator a training epoch draws from: torch's (CPU, CUDA), numpy's, Python's and each loader's
    own shuffling generator (RecBole seeds one per loader). numpy's state as tensors, so weights-only loading reads it.
    The run state keeps a list of them, one per rank (the ranks of a torchrun job are seeded apart)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": random.getstate(),
            "loaders": [loader.generator.get_state() for loader in loaders if getattr(loader, "generator", None)]}


def set_rng_states(states, loaders):
    torch.set_rng_state(states["torch"].cpu())
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])
    numpy = states["numpy"]
    keys = numpy["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((numpy["name"], keys, numpy["position"], numpy["has_gauss"], numpy["cached_gaussian"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    generators = [loader.generator for loader in loaders if getattr(loader, "generator", None)]
    for generator, state in zip(generators, states["loaders"]):
        generator.set_state(state.cpu())
