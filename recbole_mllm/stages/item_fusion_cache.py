"""The item-fusion stage's cache: what keys it (the plan of a configuration) and how it is read.

Kept apart from the stage that builds it (``item_fusion.py``) so that readers, the models first, can
find and read a cache without importing anything that generates. A plan needs of its backend only
``identity`` and ``supports_images``: a loaded backend, or the weight-free description of
``backend_identity.describe_backend``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch

from recbole_mllm.data.utils import histories_or_dataset
from recbole_mllm.mllm.base import GenerationConfig, MultimodalLM
from recbole_mllm.stages.cache import StageCache
from recbole_mllm.stages.backend_identity import BackendIdentity, describe_backend
from recbole_mllm.stages.common import (RECBOLE_DATASET_DEFAULTS, STAGE_DEFAULTS, config_value, dataset_location, declared,
                                         generation_config)
from recbole_mllm.stages.items import ItemTable, check_image_paths, fingerprint, read_item_file
from recbole_mllm.stages.prompts import PromptTemplate, load_prompt

logger = logging.getLogger(__name__)

STAGE = "item_fusion"

DEFAULTS = {
    **STAGE_DEFAULTS,
    **declared("item_fusion_prompt", "item_fusion_max_new_tokens", "item_text_fields", "item_image_field",
               "item_image_dir", "item_fusion_items"),
    **{key: RECBOLE_DATASET_DEFAULTS[key] for key in ("data_path", "ITEM_ID_FIELD", "field_separator", "seq_separator",
                                                      "encoding")},
}

ITEM_TEXT_FORMAT = 1
"""Version of :func:`render_item_text`'s rules (in the manifest: changing the rules makes a new cache)."""

_NONE_MEANS_NONE = {"item_text_fields", "item_image_field", "mllm_dtype"}
"""Keys where an explicit None is a choice (every field, no image, backend's dtype), not 'use the default'."""

_PROMPT_FIELDS = {"system": [], "image": ["item_text"], "text_only": ["item_text"], "field": ["label", "value"]}

ITEM_SCOPES = ("all", "interacted")
"""Values of ``item_fusion_items`` (see :func:`fused_items`)."""


def setting(config: Mapping, key: str):
    """``config[key]`` for a dict or a RecBole ``Config``; missing (or None, for most keys) is the default."""
    return config_value(config, key, DEFAULTS, _NONE_MEANS_NONE)


def text_fields(config: Mapping, table: ItemTable) -> list[tuple[str, str]]:
    """The ``(label, field)`` pairs written into each item's description, checked against the file."""
    image_field = setting(config, "item_image_field")
    wanted = setting(config, "item_text_fields")
    if wanted is None:
        pairs = [(f, f) for f in table.field_types if f not in (table.id_field, image_field)]
    elif isinstance(wanted, Mapping):
        pairs = [(str(label), str(field)) for label, field in wanted.items()]
    else:
        pairs = [(str(f), str(f)) for f in ([wanted] if isinstance(wanted, str) else wanted)]
    found = [(label, field) for label, field in pairs if field in table.field_types]
    if not found:
        raise ValueError(f"{table.path} has none of the item text fields {[f for _, f in pairs]} "
                         f"(item_text_fields); its fields are {list(table.field_types)}")
    absent = [field for _, field in pairs if field not in table.field_types]
    if absent:
        logger.warning(f"{table.path} lacks the item text field(s) {absent}; using {[f for _, f in found]}")
    return [(label.replace("_", " ").capitalize() if label == field else label, field) for label, field in found]


def render_item_text(row: Mapping, fields: Sequence[tuple[str, str]], table: ItemTable,
                     template: PromptTemplate, seq_separator: str) -> str:
    """One ``[field]`` line per non-empty field, in the configured order.

    Sequence fields are re-joined with spaces, and ``_`` reads as a space: the dataset scripts write a
    multi-word label (an Amazon category ``Skin Care``) as one token ``Skin_Care``.
    """
    lines = []
    for label, field in fields:
        value = row[field].strip()
        if table.field_types[field].endswith("seq"):
            value = " ".join(v for v in value.split(seq_separator) if v)
        value = " ".join(value.replace("_", " ").split())
        if value:
            lines.append(template.render("field", label=label, value=value))
    return "\n".join(lines)


def fused_items(config: Mapping, table: ItemTable, histories: Optional[Mapping] = None) -> list:
    """The item tokens item fusion summarises, the cache's keys: every row of the ``.item`` file (``item_fusion_items:
    all``; one cache serves every filter and split), or the items of the users' histories after RecBole's filters
    (``interacted``; ``histories`` as ``data.user_histories`` gives them, None builds the dataset). The same items give
    the same cache either way."""
    scope = setting(config, "item_fusion_items")
    if scope not in ITEM_SCOPES:
        raise ValueError(f"item_fusion_items: {scope!r} is none of {', '.join(ITEM_SCOPES)}")
    if scope == "all":
        return list(table.rows)
    items = {item for history in histories_or_dataset(config, histories).values() for item in history.items}
    unknown = sorted(items - set(table.rows))
    if unknown:
        raise ValueError(f"{len(unknown)} item(s) of the histories are not in {table.path}, e.g. {unknown[:5]}")
    return [token for token in table.rows if token in items]


@dataclass
class ItemFusionPlan:
    """What one configuration reads and where it writes: the item rows, prompt pieces, decoding and the cache."""

    cache: StageCache
    table: ItemTable
    fields: list
    template: PromptTemplate
    image_dir: Path
    generation: GenerationConfig  # the decoding the cache is keyed with


def item_images(config: Mapping) -> tuple[ItemTable, Optional[str], Path]:
    """``(.item table, image field, image folder)`` of ``config``, every image name checked to lie inside the
    folder (``UnsafePathError`` otherwise); nothing is opened but the .item file."""
    dataset, dataset_dir = dataset_location(config)
    table = read_item_file(dataset_dir, dataset, id_field=setting(config, "ITEM_ID_FIELD"),
                           field_separator=setting(config, "field_separator"), encoding=setting(config, "encoding"))
    image_field, image_dir = setting(config, "item_image_field"), dataset_dir / setting(config, "item_image_dir")
    if image_field and image_field not in table.field_types and image_field != DEFAULTS["item_image_field"]:
        # the default's name missing means a text-only dataset; a name the user chose is a mistake worth a stop
        raise ValueError(f"{table.path} has no field {image_field!r} (item_image_field); its fields are "
                         f"{list(table.field_types)} (item_image_field: ~ summarises items from text alone)")
    check_image_paths(table, image_field, image_dir)
    return table, image_field, image_dir


def item_fusion_plan(config: Mapping, backend: Union[MultimodalLM, BackendIdentity],
                     histories: Optional[Mapping] = None) -> ItemFusionPlan:
    """The plan of ``config``: its item rows, prompt and cache (``backend`` gives the identity; nothing loads);
    ``histories`` give the items under ``item_fusion_items: interacted`` (:func:`fused_items`)."""
    dataset, dataset_dir = dataset_location(config)
    table, image_field, image_dir = item_images(config)
    template = load_prompt(STAGE, setting(config, "item_fusion_prompt")).require(_PROMPT_FIELDS)
    fields = text_fields(config, table)
    if image_field and image_field not in table.field_types:
        logger.info(f"{table.path} has no image field {image_field!r} (item_image_field): items are summarised from text")
    generation = generation_config(config, "item_fusion_max_new_tokens")
    manifest = {
        "model": backend.identity.as_dict(),
        "prompt": template.identity(),
        "generation": {**generation.as_dict(), "batch_size": generation.batch_size},
        "embedding": {"input": "summary", "batch_size": generation.batch_size},
        "dataset": {"name": dataset, **fingerprint(table, image_field, image_dir)},
        "params": {"text_fields": [list(p) for p in fields], "text_format": ITEM_TEXT_FORMAT, "image_field": image_field,
                   "image_dir": str(setting(config, "item_image_dir")), "images_seen": bool(backend.supports_images),
                   "id_field": table.id_field, "seq_separator": setting(config, "seq_separator"),
                   "field_separator": setting(config, "field_separator"), "encoding": setting(config, "encoding")},
    }
    cache = StageCache(setting(config, "stage_cache_dir"), STAGE, manifest, keys=fused_items(config, table, histories),
                       shard_size=int(setting(config, "stage_shard_size")),
                       command=f"python -m recbole_mllm.stages.{STAGE} --dataset={dataset}")
    return ItemFusionPlan(cache, table, fields, template, image_dir, generation)


def item_fusion_cache(config: Mapping, backend: Union[MultimodalLM, BackendIdentity],
                      histories: Optional[Mapping] = None) -> StageCache:
    """The cache for this configuration and backend, built or not (nothing is generated here); ``histories`` as for
    :func:`item_fusion_plan`."""
    return item_fusion_plan(config, backend, histories).cache


def load_item_fusion(config: Mapping, item_tokens: Sequence[str],
                     backend: Union[MultimodalLM, BackendIdentity, None] = None,
                     histories: Optional[Mapping] = None) -> tuple[list[str], torch.Tensor]:
    """Summaries and embeddings ``[len(item_tokens), H]`` aligned with ``item_tokens``.

    Pass ``dataset.field2id_token[ITEM_ID_FIELD]`` to get rows indexed by RecBole's item ids; its
    ``[PAD]`` entry gets an empty text and a zero vector. Raises ``StageCacheError`` naming the
    command to run when the cache for this configuration is not built; ``histories`` as for :func:`item_fusion_plan`.
    """
    backend = backend if backend is not None else describe_backend(config)  # a key needs no weights
    item_tokens = [str(t) for t in item_tokens]  # numpy str_ from field2id_token
    real = [t for t in item_tokens if t != "[PAD]"]
    cache = item_fusion_cache(config, backend, histories)
    outside = sorted(set(real) - set(cache.keys)) if setting(config, "item_fusion_items") != "all" else []
    if outside:  # an item RecBole loads from the .item file without any interaction
        raise ValueError(f"{len(outside)} item(s) asked for are not among the items item fusion summarises "
                         f"(item_fusion_items: {setting(config, 'item_fusion_items')}), e.g. {outside[:5]}; "
                         f"item_fusion_items: all summarises every row of the .item file")
    texts, embeddings, _ = cache.load_aligned(real)
    row = {token: i for i, token in enumerate(real)}
    out = torch.zeros(len(item_tokens), embeddings.shape[1])
    for i, token in enumerate(item_tokens):
        if token in row:
            out[i] = embeddings[row[token]]
    return [texts[row[t]] if t in row else "" for t in item_tokens], out


