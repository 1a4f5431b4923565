"""What the plugin's models read before they are built: stage caches, the backend, item images, aligned with
RecBole's internal ids. Read only; every file a model depends on is opened here, never in its constructor.

The caches are built before the model (``quick_start.run`` calls ``stages.prepare.prepare_stages`` for the
model's ``required_stages``; the stage commands build them too). A model never generates: a missing cache
is a ``StageCacheError`` naming the command that builds it. Nothing here imports a stage runner.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


from recbole_mllm.data import create_dataset, needed_positions, user_histories
from recbole_mllm.model.item_content import check_item_content, read_item_content
from recbole_mllm.model.item_images import encode_item_images
from recbole_mllm.stages.backend_identity import describe_backend
from recbole_mllm.stages.cache import StageCacheError
from recbole_mllm.stages.common import config_value, load_backend
from recbole_mllm.stages.item_fusion_cache import DEFAULTS as ITEM_DEFAULTS
from recbole_mllm.stages.item_fusion_cache import item_fusion_cache, load_item_fusion, text_fields
from recbole_mllm.stages.items import check_image_paths, read_item_file
from recbole_mllm.stages.prompts import load_prompt
from recbole_mllm.stages.user_profile_cache import load_user_summaries, user_profile_cache
from recbole_mllm.stages.user_text import user_profiles

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
    item_embeddings: object  # [n_items, d] the encoder's item content (encoder_item_content), row 0 ([PAD]) zero
    histories: dict  # user token -> UserHistory (time-ordered items and timestamps, as RecBole orders them)
    profiles: list  # per internal user id
    user_summaries: dict  # (uid, t) -> preference summary used for a target at position t
    cache_keys: dict  # stage -> cache folder name (the hash of everything its output depends on)
    template: object  # the ranker's prompt template (model/mllmsrec/prompts/ranker_<v>.txt)
    images: Optional[tuple]  # (features, logits, has_image) of encode_item_images, or None (images off or unusable)


def _read(config, read):
    """``read()``, with a missing cache's error saying who builds it: never the model."""
    try:
        return read()
    except StageCacheError as error:
        raise StageCacheError(f"{error}\nModels read stage caches and never build them: run the command above with "
                              f"this run's settings, or train through run_recbole_mllm.py (quick_start.run), which "
                              f"builds missing stages first (run_missing_stages: True)") from None


def read_encoder_item_content(config, dataset, histories=None):
    """The encoder's item content ``[n_items, d]`` in RecBole's item-id order (row 0, padding, zero): the item-fusion
    embeddings, or another encoder of the same items (``encoder_item_content``, ``model/item_content.py``).

    The cache is found by the backend's identity alone (``describe_backend``): no LLM weights are loaded. ``histories``
    (the un-split ones) give its items under ``item_fusion_items: interacted``; None rebuilds the dataset then.
    """
    item_tokens = [str(t) for t in dataset.field2id_token[dataset.iid_field]]
    summaries, embeddings = _read(config, lambda: load_item_fusion(config, item_tokens, describe_backend(config),
                                                                   histories))
    if check_item_content(config) == "fused":
        return embeddings
    table = _item_table(config)
    return read_item_content(config, item_tokens, embeddings, summaries, table, text_fields(config, table),
                             *_image_location(config))


def _item_table(config):
    """The .item file, its image names checked to lie inside the image folder (before anything is read or loaded)."""
    table = read_item_file(Path(config["data_path"]), config["dataset"], config["ITEM_ID_FIELD"],
                           config["field_separator"] or "\t", config["encoding"] or "utf-8")
    check_image_paths(table, *_image_location(config))
    return table


def _image_location(config):
    """``(image field or None, image folder)`` of the items."""
    return (config_value(config, "item_image_field", ITEM_DEFAULTS, {"item_image_field"}),
            Path(config["data_path"]) / config_value(config, "item_image_dir", ITEM_DEFAULTS))


def read_stage_inputs(config, dataset, prompt, histories=None) -> StageInputs:
    """Everything the ranker reads from the stages, with the backend it ranks with; ``dataset`` is RecBole's
    (split) training dataset, ``prompt`` the ranker's template version or file (``MLLMSRecSettings.prompt``),
    ``histories`` the un-split ones (``data.user_histories`` of the whole dataset; None rebuilds the dataset to read
    them)."""
    table = _item_table(config)
    backend = load_backend(config)
    item_tokens = [str(t) for t in dataset.field2id_token[dataset.iid_field]]
    user_tokens = [str(t) for t in dataset.field2id_token[dataset.uid_field]]
    if histories is None:  # un-split histories (the model only receives the train split)
        histories = user_histories(create_dataset(config))
    summaries, embeddings = _read(config, lambda: load_item_fusion(config, item_tokens, backend, histories))
    image_field, image_dir = _image_location(config)
    fields = text_fields(config, table)
    embeddings = read_item_content(config, item_tokens, embeddings, summaries, table, fields,
                                   image_field, image_dir)  # what the encoder reads (the fused embeddings by default)

    requests = [(token, t) for token, history in histories.items() for t in needed_positions(len(history.items), config)]
    texts = _read(config, lambda: load_user_summaries(config, requests, backend, histories))
    uid = {token: i for i, token in enumerate(user_tokens)}
    user_summaries = {(uid[token], t): text for (token, t), text in zip(requests, texts)}
    profile_by_token = user_profiles(config)
    profiles = [profile_by_token.get(token, "unknown") for token in user_tokens]
    cache_keys = {"item_fusion": item_fusion_cache(config, backend, histories).path.name,
                  "user_profile": user_profile_cache(config, backend, histories).path.name}
    images = None
    if config["ranker_use_images"] and getattr(backend, "projector", None) is None:
        logger.warning(f"ranker_use_images: the {backend.identity.backend} backend has no image projector the ranker "
                       f"can use yet, so target images are left out of its prompts (text only)")
    elif config["ranker_use_images"]:
        images = encode_item_images(backend, item_tokens, table, image_field, image_dir)
        images = images if images[0] is not None else None
    return StageInputs(backend, item_tokens, user_tokens, {t: i for i, t in enumerate(item_tokens)}, table,
                       fields, image_field, image_dir,
                       summaries, embeddings, histories, profiles, user_summaries, cache_keys,
                       load_prompt("ranker", prompt), images)

