"""Stage caches made ready before a model is built: verified, built when missing and allowed, or an error.

A plugin model names the stages whose caches it reads in its ``required_stages`` class attribute
(RecBole's baselines have none), or per run in a ``stages_for(config)`` class method (FusedSASRec on ids alone
reads none). ``quick_start.run`` calls :func:`prepare_stages` after the split and before the model, so the model only ever reads caches: data flows dataset -> stages -> model. With
``run_missing_stages: True`` a missing stage runs here, with its progress bars; with False the error
names the command that builds it (to build caches ahead of a long job, e.g. with
``torchrun --nproc_per_node=8 -m recbole_mllm.stages.item_fusion ...``).
"""

from __future__ import annotations

import logging
from typing import Mapping, Optional, Sequence

from recbole_mllm import distributed
from recbole_mllm.data.utils import histories_or_dataset
from recbole_mllm.stages.backend_identity import describe_backend
from recbole_mllm.stages.cache import StageCache, StageCacheError
from recbole_mllm.stages.common import load_backend
from recbole_mllm.stages.item_fusion import run_item_fusion
from recbole_mllm.stages.item_fusion_cache import item_fusion_cache
from recbole_mllm.stages.user_profile import run_user_profile
from recbole_mllm.stages.user_profile_cache import user_profile_cache

logger = logging.getLogger(__name__)

STAGES = ("item_fusion", "user_profile")
"""Every stage, in the order they run: user summaries read the fused item summaries."""


def required_stages(model_class, config=None) -> tuple:
    """The stages whose caches ``model_class`` reads (its ``required_stages``, or what its ``stages_for(config)`` says
    a run of ``config`` reads; none for other models)."""
    stages_for = getattr(model_class, "stages_for", None)
    stages = tuple(stages_for(config) if stages_for is not None and config is not None
                   else getattr(model_class, "required_stages", ()))
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown:
        raise ValueError(f"{model_class.__name__}.required_stages names unknown stages {unknown}; known: {list(STAGES)}")
    return stages


def _cache(stage: str, config: Mapping, backend, histories) -> StageCache:
    if stage == "item_fusion":
        return item_fusion_cache(config, backend, histories)
    return user_profile_cache(config, backend, histories)


def _run(stage: str, config: Mapping, backend, histories) -> StageCache:
    if stage == "item_fusion":
        return run_item_fusion(config, backend, histories=histories)
    return run_user_profile(config, backend, histories)


def prepare_stages(config: Mapping, stages: Sequence[str], histories: Optional[Mapping] = None) -> None:
    """Make every cache of ``stages`` complete for ``config``, or raise a ``StageCacheError`` naming its command.

    ``histories`` (``data.histories.user_histories`` of the dataset before its split) spares building the
    dataset again for the user stage (and for item fusion under ``item_fusion_items: interacted``). The caches are found by the backend's identity alone, so a run whose
    caches are built never loads the backend here.
    """
    stages = [stage for stage in STAGES if stage in stages]
    if not stages:
        return
    described = describe_backend(config)
    if "user_profile" in stages:
        histories = histories_or_dataset(config, histories)
    backend = None
    for stage in stages:
        cache = _cache(stage, config, described, histories)
        if distributed.broadcast(cache.is_complete()):  # rank 0's answer: every rank builds, or none does
            logger.info(f"{stage}: cache {cache.path} is complete")
            continue
        if not config["run_missing_stages"]:
            raise StageCacheError(f"the {stage} cache this run reads is not built (expected {cache.path}); build it "
                                  f"with `{cache.command}` and this run's other --key=value settings, or set "
                                  f"run_missing_stages: True.{cache.describe_other_caches()}")
        logger.info(f"{stage}: cache missing or incomplete, running the stage now")
        backend = backend or load_backend(config)
        built = _run(stage, config, backend, histories)
        if built.path != cache.path:  # the described identity must be the loaded backend's, or readers miss it
            raise StageCacheError(f"{stage}: the stage built {built.path}, but readers look for {cache.path}: "
                                  f"backend_identity.describe_backend disagrees with the loaded backend's identity")
        if not built.is_complete():
            raise StageCacheError(f"{stage}: the cache {built.path} is still incomplete after the stage ran "
                                  f"(another process holds shards of it?); run `{cache.command}` to finish it")
