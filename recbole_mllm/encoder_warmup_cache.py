"""``encoder_warmup_cache``: a warmed-up encoder kept under ``<stage_cache_dir>/encoder_warmup/<hash>.pth`` and reused.

Runs that differ only in the ranker (the ablation ladder) then share one warm-up, also when they start at once: the
warm-up runs under a lock beside its file, and a run that waited for it reuses the result; an unfinished warm-up keeps
its progress beside it (:func:`progress_path`). ``MLLMSRecTrainer`` warms up; this module names, saves and loads the
files (the lock beside them: ``distributed.file_lock``).
"""

import inspect
import sys
from pathlib import Path

import torch

from recbole_mllm import compat, train_positions
from recbole_mllm.data import windows
from recbole_mllm.fileio import atomic_output, canonical_json, sha256_bytes

WARMUP_KEYS = ("seed", "learning_rate", "learner", "weight_decay", "clip_grad_norm", "train_batch_size",
               "gradient_accumulation_steps", "enable_amp", "mllm_dtype", "encoder_warmup_epochs",
               "encoder_warmup_stopping_step", "stopping_min_steps", "lr_warmup_steps", "mask_history", "valid_metric",
               "eval_args", "hidden_size", "inner_size", "n_layers", "n_heads", "hidden_dropout_prob",
               "attn_dropout_prob", "hidden_act", "layer_norm_eps", "initializer_range", "MAX_ITEM_LIST_LENGTH",
               "metrics", "topk", "encoder_item_input", "train_positions", "encoder_warmup_batch_size",
               "encoder_item_content", "item_content_text_model", "encoder_id_init")
"""Config keys a warmed-up encoder depends on (with the stage caches it reads, the resolved dtype, the device type,
whether it validated and its code: see :func:`cache_path`); the ranker switches are not among them."""


def after_warmup(function):
    """Marks a trainer function that runs only after the warm-up (the fusion choice, the LLM's rows, reports): its
    source is left out of :func:`code_sha256`, so editing it keeps the cached warm-ups (on ML-1M each is minutes of
    GPU time). A test runs a warm-up with every marked function raising."""
    function.after_warmup = True
    return function


def after_warmup_functions(module):
    """The functions and methods of ``module`` marked :func:`after_warmup`."""
    found = []
    for value in vars(module).values():
        if inspect.isclass(value) and value.__module__ == module.__name__:
            found += [v for v in vars(value).values() if getattr(v, "after_warmup", None) is True]
        elif getattr(value, "after_warmup", None) is True:
            found.append(value)
    return found


def code_sha256(model, trainer_module):
    """Hash of the code a warm-up runs: the encoder's module, the model's ``encoder_loss``, the trainer's module but
    its :func:`after_warmup` functions, the window rows and their loss, and this module.

    A hash of the source rather than a hand-bumped format constant: a constant changes only when someone remembers
    to bump it, the hash whenever that code changes. An unrelated edit there costs one warm-up rerun, never a stale
    encoder; a new trainer function is in the hash until it is marked.
    """
    trainer_source = inspect.getsource(trainer_module)
    for function in after_warmup_functions(trainer_module):
        trainer_source = trainer_source.replace(inspect.getsource(function), "")
    sources = [inspect.getsource(inspect.getmodule(type(model.encoder))), inspect.getsource(type(model).encoder_loss),
               trainer_source, inspect.getsource(train_positions), inspect.getsource(windows),
               inspect.getsource(sys.modules[__name__])]
    return sha256_bytes("\n".join(sources).encode())


def cache_path(config, model, device_type, code, validated):
    """``<stage_cache_dir>/encoder_warmup/<hash>.pth``.

    The hash covers every input of a warm-up: the stage caches and the backend's resolved dtype
    (``model.warmup_inputs()``), the dataset, ``WARMUP_KEYS``, the device type (bf16 autocast on GPU, float32 on CPU),
    the ``code`` (:func:`code_sha256`) and ``validated``: an unvalidated warm-up runs every epoch and keeps the last
    encoder, a validated one keeps the best, so one never stands in for the other.
    """
    identity = {**model.warmup_inputs(), "dataset": config["dataset"], "config": {k: config[k] for k in WARMUP_KEYS},
                "device": device_type, "code": code, "validated": bool(validated)}
    key = sha256_bytes(canonical_json(identity).encode())[:16]
    return Path(config["stage_cache_dir"]) / "encoder_warmup" / f"{key}.pth"


def progress_path(path):
    """``<hash>.progress.pth`` beside the warm-up's file: the warm-up's last finished epoch while it runs, so one stopped
    with its machine goes on there (``resume_training``); written and read under the same lock, removed once the
    warm-up is saved."""
    return path.with_name(f"{path.stem}.progress.pth")


def load(path, device):
    """``{"encoder": state, "best_score": float, "epochs": int}`` (plain tensors: weights-only loading)."""
    return compat.load_weights(path, map_location=device)


def save(path, encoder_state, best_score, epochs):
    """Written atomically, so a reader never sees half a file."""
    with atomic_output(path) as f:
        torch.save({"encoder": encoder_state, "best_score": best_score or float("nan"), "epochs": epochs}, f)
