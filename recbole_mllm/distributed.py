"""Data-parallel runs under ``torchrun``: RecBole's own distributed path, started from torchrun's environment.

``torchrun --nproc_per_node=2 run_recbole_mllm.py --model=... --dataset=...`` runs one process per GPU (or per
CPU process with gloo). What RecBole already does is kept: ``DistributedSampler`` in every loader (each rank
trains on and evaluates a share of the rows and users, the global batch unchanged) and DDP gradient averaging
(``Trainer.set_reduce_hook``). This module adds what RecBole lacks for it: starting from torchrun's variables
rather than its own ``nproc``/``ip``/``port`` launcher, gloo on CPUs (RecBole hard-codes NCCL and
``device_ids``), the helpers the plugin's records need (per-user records gathered on every rank), and the
trainer mixin :class:`DataParallel` (``data_parallel``): DDP on either device, checkpoints written by rank 0
under one name, one early-stopping decision for all ranks.
"""

from __future__ import annotations

import atexit
import gc
import os
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from filelock import FileLock


LONG_WAIT = timedelta(hours=24)
"""The process groups' timeout: at the stage caches' barriers fast ranks wait for slow ones' shards."""


def launched() -> bool:
    """Whether this process is one of several started by ``torchrun`` (or any launcher setting its variables)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ


def active() -> bool:
    """Whether a process group of more than one process is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def start(use_gpu: bool) -> dict:
    """Start the process group (NCCL on GPUs, gloo on CPUs) and return RecBole's distributed config keys.

    Rank 0 logs and shows progress; the others stay quiet, as RecBole's own launcher arranges.
    """
    local_rank = int(os.environ["LOCAL_RANK"])
    use_gpu = use_gpu and torch.cuda.is_available()
    if use_gpu:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_gpu else "gloo", timeout=LONG_WAIT)
        atexit.register(_end)
    rank = dist.get_rank()
    keys = {"single_spec": False, "local_rank": local_rank, "world_size": dist.get_world_size(),
            "nproc": int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())), "offset": rank - local_rank,
            "device": torch.device("cuda", local_rank) if use_gpu else torch.device("cpu")}
    if rank != 0:
        keys.update(state="error", show_progress=False, verbose=False)
    return keys


def _end() -> None:
    """Destroy the process group ``start`` made before the interpreter tears down: left to the interpreter's exit, its
    backend's threads can be destroyed while still running, and the process aborts ("terminate called without an
    active exception") after the run's work is done. Unreachable objects are collected first (a finished trainer's
    DDP reducer, its pending work and tensors, left in reference cycles), so none of them is freed while the interpreter
    is being finalized, where freeing a tensor's Python reference from a backend thread aborts the process too."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size when a process group is up, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Rank 0, or the only process."""
    return rank_and_world()[0] == 0


def barrier() -> None:
    if active():
        dist.barrier()


@contextmanager
def main_first():
    """Rank 0 runs the block before the other ranks do: RecBole creates folders by checking, then creating
    (``ensure_dir``), so two ranks doing it at once can fail with ``FileExistsError``."""
    if is_main():
        yield
    barrier()
    if not is_main():
        yield


def broadcast(obj):
    """Rank 0's ``obj`` on every rank (a picklable object); ``obj`` itself without a process group."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def file_lock(path: Path):
    """The lock beside ``path``, held while one process makes a file the others then reuse (a warmed-up encoder, a
    run's state); none under torchrun, where the ranks do that work together (a lock would keep one waiting on the
    others' steps)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return nullcontext() if active() else FileLock(f"{path}.lock")


def file_exists(path: Path) -> bool:
    """Whether ``path`` is a file: rank 0's answer on every rank, so all ranks reuse it or none does."""
    return broadcast(Path(path).is_file())


def gather(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank; ``[obj]`` without a process group."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def ddp(model, device):
    """``model`` wrapped for gradient averaging: ``device_ids`` on a GPU, none on a CPU (which DDP requires), and
    buffers not broadcast each step (the plugin's are constants: image features, fused embeddings)."""
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def check_gathered_metrics(metrics):
    """Under torchrun only ``rec.topk`` rows are gathered across ranks (``PerUserCollector``): a metric that needs
    other rows (GAUC, AUC, ShannonEntropy, ...) would be each rank's own share, and differ between ranks."""
    from recbole.evaluator.register import metric_information

    others = [m for m in metrics if set(metric_information[m.lower()]) - {"rec.topk"}]
    if others:
        raise ValueError(f"metrics {others} need more than the top-k rows that torchrun runs gather across ranks; "
                         f"run them in one process, or keep to top-k metrics (Hit, NDCG, MRR, Recall, Precision, MAP)")


class DataParallel:
    """Mixin of :func:`data_parallel`: RecBole's DDP wrapping, on a CPU too, and one checkpoint name for every rank.

    RecBole's ``AbstractTrainer`` wraps the model with ``device_ids=[local_rank]``, which DDP refuses for a CPU
    module; and each rank names its checkpoint by its own clock, so ranks could look for different files.
    """

    def __init__(self, config, model):
        Path(config["checkpoint_dir"]).mkdir(parents=True, exist_ok=True)  # RecBole's check-then-create races between ranks
        check_gathered_metrics(config["metrics"])
        config["single_spec"] = True  # skip RecBole's wrapping (device_ids on a CPU module) ...
        try:
            super().__init__(config, model)
        finally:
            config["single_spec"] = False
        self.distributed_model = ddp(self.model, self.device)  # ... and wrap as DDP wants on either device
        self.saved_model_file = broadcast(self.saved_model_file)

    def _map_reduce(self, result, num_sample):
        """The metrics as they are: ``PerUserCollector`` already evaluated every rank's users on every rank
        (RecBole's reduction would average the ranks' means, weighted by a count of batches)."""
        return result

    def _valid_epoch(self, valid_data, show_progress=False):
        """Rank 0's validation on every rank: early stopping and the best epoch are then one decision, never a
        rank leaving ``fit`` while another still trains (a hang in the next collective)."""
        return broadcast(super()._valid_epoch(valid_data, show_progress=show_progress))

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        """Written by global rank 0 only (RecBole lets the first process of every node write the same file)."""
        if is_main():
            super()._save_checkpoint(epoch, verbose=verbose, **kwargs)


def data_parallel(trainer_class):
    """``trainer_class`` itself, or under ``torchrun`` (a process group of several ranks) it with :class:`DataParallel`."""
    if not active():
        return trainer_class
    return type(trainer_class.__name__, (DataParallel, trainer_class), {"__doc__": trainer_class.__doc__})
