"""Load (or build) what MLLMSRec reads from the two LLM stages, aligned with RecBole's internal ids.

When a stage cache is missing, ``run_missing_stages: True`` runs the stage here (with its progress
bars); ``False`` raises an error naming the stage command to run, so a long run on a cluster can
build the caches first (``torchrun ... -m recbole_mllm.stages.item_fusion``) and never by surprise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from recbole_mllm.data import create_dataset, needed_positions, user_histories
from recbole_mllm.stages import item_fusion, user_profile
from recbole_mllm.stages.cache import StageCacheError
from recbole_mllm.stages.common import config_value, load_backend
from recbole_mllm.stages.items import read_item_file

logger = logging.getLogger(__name__)


@dataclass
class StageInputs:
    backend: object
    item_tokens: list
    user_tokens: list
    item_token2id: dict
    item_table: object
    text_fields: list
    image_field: object  # .item field naming the image file, or None
    image_dir: Path
    item_summaries: list
    item_embeddings: object  # [n_items, H] float tensor, row 0 ([PAD]) zero
    histories: dict  # user token -> UserHistory (time-ordered items and timestamps, as RecBole orders them)
    profiles: list  # per internal user id
    user_summaries: dict  # (uid, t) -> preference summary used for a target at position t
    cache_keys: dict  # stage -> cache folder name (the hash of everything its output depends on)


def _load_or_run(config, stage, load, run):
    try:
        return load()
    except StageCacheError as error:
        if not config["run_missing_stages"]:
            raise StageCacheError(f"{error}\nBuild it with: python -m recbole_mllm.stages.{stage} "
                                  f"--dataset={config['dataset']} (or set run_missing_stages: True)") from None
        logger.info(f"{stage}: cache missing or incomplete, running the stage now")
        run()
        return load()


def load_fused_item_embeddings(config, dataset):
    """The item-fusion embeddings ``[n_items, H]`` in RecBole's item-id order (row 0, padding, zero).

    Runs the item-fusion stage first when its cache is missing and ``run_missing_stages`` allows it.
    """
    backend = load_backend(config)
    item_tokens = [str(t) for t in dataset.field2id_token[dataset.iid_field]]
    _, embeddings = _load_or_run(
        config, "item_fusion", lambda: item_fusion.load_item_fusion(config, item_tokens, backend),
        lambda: item_fusion.run_item_fusion(config, backend))
    return embeddings


def load_stage_inputs(config, dataset, llm_targets_per_user) -> StageInputs:
    """Everything the ranker needs from the stages; ``dataset`` is RecBole's (split) training dataset."""
    backend = load_backend(config)
    item_tokens = [str(t) for t in dataset.field2id_token[dataset.iid_field]]
    user_tokens = [str(t) for t in dataset.field2id_token[dataset.uid_field]]
    data_dir = Path(config["data_path"])
    table = read_item_file(data_dir, config["dataset"], dataset.iid_field, config["field_separator"] or "\t",
                           config["encoding"] or "utf-8")
    summaries, embeddings = _load_or_run(
        config, "item_fusion", lambda: item_fusion.load_item_fusion(config, item_tokens, backend),
        lambda: item_fusion.run_item_fusion(config, backend))

    full_dataset = create_dataset(config)  # the un-split histories (the model only receives the train split)
    histories = user_histories(full_dataset)
    requests = [(token, t) for token, history in histories.items()
                for t in needed_positions(len(history.items), config)]
    texts = _load_or_run(
        config, "user_profile", lambda: user_profile.load_user_summaries(config, requests, backend, histories),
        lambda: user_profile.run_user_profile(config, backend, histories))
    uid = {token: i for i, token in enumerate(user_tokens)}
    user_summaries = {(uid[token], t): text for (token, t), text in zip(requests, texts)}
    profile_by_token = user_profile.user_profiles(config)
    profiles = [profile_by_token.get(token, "unknown") for token in user_tokens]
    cache_keys = {"item_fusion": item_fusion.item_fusion_cache(config, backend).path.name,
                  "user_profile": user_profile.user_profile_cache(config, backend, histories).path.name}
    return StageInputs(backend, item_tokens, user_tokens, {t: i for i, t in enumerate(item_tokens)}, table,
                       item_fusion.text_fields(config, table),
                       config_value(config, "item_image_field", item_fusion.DEFAULTS, {"item_image_field"}),
                       data_dir / config_value(config, "item_image_dir", item_fusion.DEFAULTS),
                       summaries, embeddings, histories, profiles, user_summaries, cache_keys)
