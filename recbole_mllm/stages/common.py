"""What the LLM stages share: config lookup with defaults, the backend loader, the torchrun process group.

Every stage reads a RecBole-style mapping (a ``dict`` or a RecBole ``Config``: ``key in config`` and
``config[key]``) where a missing key, or None for most keys, means the stage's default.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Collection, Iterator, Mapping, Optional, Sequence

import torch

from recbole_mllm import distributed
from recbole_mllm.cli import config_file_list, exit_on_help, input_error, safe_cmd_args
from recbole_mllm.mllm.base import GenerationConfig, MultimodalLM
from recbole_mllm.properties_path import declared as declared_in
from recbole_mllm.properties_path import recbole_declared
from recbole_mllm.stages.cache import StageCacheError

def declared(*keys):
    """``{key: default}`` of ``keys`` from ``properties/stages.yaml``, where the stage keys are declared once with their
    types and help (a key it lacks is a KeyError at import)."""
    return declared_in("stages.yaml", *keys)


RECBOLE_DATASET_DEFAULTS = {**recbole_declared("data_path", "USER_ID_FIELD", "ITEM_ID_FIELD", "field_separator",
                                               "seq_separator"),
                            "encoding": "utf-8"}  # RecBole declares no encoding (None: the locale's); files are UTF-8
"""RecBole's dataset keys the stages read, with RecBole's defaults (the stages also run on plain dicts)."""


STAGE_DEFAULTS = declared("mllm", "mllm_dtype", "stage_cache_dir", "stage_batch_size", "stage_shard_size",
                          "stage_no_repeat_ngram_size")
"""Keys every stage reads (the model, where caches live, batch and shard sizes); see item_fusion's docstring."""


GPU_STAGE_BATCH_SIZE, CPU_STAGE_BATCH_SIZE = 512, 16
"""``stage_batch_size: None`` on a GPU and on a CPU. A 135M backend generated 6.7 items/s at batch 16 and 98 at 512 on an
H200 (docs/performance.md); a CPU gains little from wide batches and a laptop's memory bounds them."""


def config_value(config: Mapping, key: str, defaults: Mapping, none_means_none: Collection[str] = ()):
    """``config[key]``; missing (or None, unless ``key`` is in ``none_means_none``) gives ``defaults[key]``."""
    if key in config and (config[key] is not None or key in none_means_none):
        return config[key]
    return defaults.get(key)


def dataset_location(config: Mapping) -> tuple[str, Path]:
    """The dataset name and its resolved folder (``data_path``: the one holding ``<dataset>.item``)."""
    if "dataset" not in config or not config["dataset"]:
        raise ValueError("the config names no dataset (key 'dataset')")
    return str(config["dataset"]), Path(config_value(config, "data_path", {"data_path": "dataset/"}))


def backend_device(config: Mapping) -> torch.device:
    """The device a backend runs on: ``config['device']``, else a GPU when there is one; its rank's GPU under torchrun."""
    device = config["device"] if "device" in config and config["device"] is not None else None
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def stage_batch_size(config: Mapping) -> int:
    """``stage_batch_size``, or when it is None the default of the device the stages run on (part of each cache key)."""
    value = config_value(config, "stage_batch_size", STAGE_DEFAULTS)
    if value is not None:
        return int(value)
    return GPU_STAGE_BATCH_SIZE if backend_device(config).type == "cuda" else CPU_STAGE_BATCH_SIZE


def generation_config(config: Mapping, max_new_tokens_key: str) -> GenerationConfig:
    """Greedy decoding with the stage's length key and the shared batch and n-gram settings (part of each cache key)."""
    return GenerationConfig(max_new_tokens=int(config_value(config, max_new_tokens_key, declared(max_new_tokens_key))),
                            batch_size=stage_batch_size(config), do_sample=False,
                            no_repeat_ngram_size=int(config_value(config, "stage_no_repeat_ngram_size", STAGE_DEFAULTS)))


def load_backend(config: Mapping) -> MultimodalLM:
    """The backend named by ``config['mllm']``, on :func:`backend_device`."""
    from recbole_mllm.mllm import load_mllm  # deferred: backends import heavy libraries

    return load_mllm(config_value(config, "mllm", STAGE_DEFAULTS),
                     device=backend_device(config), dtype=config_value(config, "mllm_dtype", STAGE_DEFAULTS, {"mllm_dtype"}))


@contextmanager
def process_group_if_launched() -> Iterator[None]:
    """Under ``torchrun`` (WORLD_SIZE > 1) start a gloo group for the cache's barriers, and end it after, unless
    one is up already (the plugin ``Config`` starts it: ``recbole_mllm.distributed``)."""
    started = False
    if distributed.launched() and not torch.distributed.is_initialized():
        # gloo is enough for the two barriers; the long timeout lets fast ranks wait for slow ones
        torch.distributed.init_process_group(backend="gloo", timeout=distributed.LONG_WAIT)
        started = True
    try:
        yield
    finally:
        if started:
            torch.distributed.destroy_process_group()


def stage_main(argv: Optional[Sequence[str]], make_config: Callable, run: Callable, doc: str = "",
               defaults: Optional[Mapping] = None) -> None:
    """A stage's ``main``: config from ``--key=value`` arguments, the run (one rank of several under
    torchrun), and the cache folder printed on stdout.

    ``--help`` prints ``doc`` and ``defaults`` (the keys the stage reads). Exit status: 0 with the cache
    complete; 1 when the run ends with it incomplete (e.g. shards another process has not finished);
    2 on a bad argument, input or model, reported on one line (``--debug`` shows the traceback).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    exit_on_help(argv, doc, defaults)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = make_config(argv)
        with process_group_if_launched():
            cache = run(config)
    except (ValueError, OSError, StageCacheError) as error:
        raise SystemExit(input_error(error, debug)) from None
    if torch.cuda.is_available():  # this rank's GPU: the default device is cuda:0 on every rank
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        peak = torch.cuda.max_memory_allocated(rank) / 2**30
        logging.getLogger(__name__).info(f"rank {rank}: peak GPU memory {peak:.2f} GiB (cuda:{rank})")
    if not cache.is_complete():
        print(f"error: the cache {cache.path} is incomplete; run the stage again to finish it", file=sys.stderr)
        raise SystemExit(1)
    print(cache.path)


def stage_config(argv: Sequence[str]):
    """The plugin ``Config`` from ``--dataset=... [--model=MLLMSRec] [--config_files="a.yaml b.yaml"] --key=value``.

    The model defaults to MLLMSRec, so a stage run from the command line reads ``MLLMSRec.yaml`` and the
    dataset yaml exactly as the model will, and builds the cache the model looks for. Values are read
    with :func:`~recbole_mllm.cli.parse_cli_value` (literals only, never run).
    """
    from recbole_mllm.config import Config

    dataset, model, files, overrides = None, "MLLMSRec", None, []
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"arguments are --key=value (or --help); got {arg!r}")
        key, value = arg[2:].split("=", 1)
        if key == "dataset":
            dataset = value
        elif key == "model":
            model = value
        elif key == "config_files":
            files = config_file_list(value)
        else:
            overrides.append(arg)
    if not dataset:
        raise ValueError("name the dataset: --dataset=<name>")
    # under torchrun, Config starts the process group and gives each rank its GPU (recbole_mllm.distributed)
    return Config(model=model, dataset=dataset, config_file_list=files, cmd_args=safe_cmd_args(overrides))
