"""Multimodal item fusion, part 1 of MLLM-SRec: one summary text and one embedding per item.

Wang et al., "Leveraging multimodal large language model for multimodal sequential
recommendation", Scientific Reports 2025 (Fig. 3, left). A multimodal LLM reads each item's image
with its text (visual question answering) and writes a short summary that keeps what matters for
taste and leaves out visual noise; the summary is embedded with the same model. Both are computed
once per item and kept in a :class:`~recbole_mllm.stages.cache.StageCache` keyed by the raw item
token of the ``.item`` file.

NOTE (deviations and choices): the paper does not publish its prompt; ours is
``prompts/item_fusion_v1.txt``. Decoding is greedy, so a summary is reproducible. An item whose
image is missing or unreadable is summarised from its text alone (counted in ``complete.json``
under ``meta_counts.image``, warned once per run; why a file was unreadable is the record's
``meta["image_error"]``) rather than failing the run; an empty generation
falls back to the item text (``meta_counts.summary``).

Command line (``torchrun --nproc_per_node=N -m ...`` splits the shards over N processes)::

    python -m recbole_mllm.stages.item_fusion --dataset=ml-1m-mm [--config_files="a.yaml b.yaml"] [--key=value ...]

Config keys (a RecBole-style mapping: ``config[key]``, missing or None means the default):
    mllm (str): backend name or Hugging Face id / folder, loaded by ``recbole_mllm.mllm.load_mllm``.
    mllm_dtype (str): weights dtype for the backend; None lets the backend choose (bf16 on GPU).
    stage_cache_dir (str): root folder of all stage caches; default ``saved/stage_cache``, beside
        RecBole's ``saved/`` checkpoints (not next to the data, which may be read-only, e.g. ml-100k).
    item_fusion_prompt (str): template version (``v1`` -> ``prompts/item_fusion_v1.txt``) or a .txt path.
    item_fusion_max_new_tokens (int): longest summary, in tokens.
    stage_batch_size (int): requests per generation / embedding batch.
    stage_no_repeat_ngram_size (int): greedy decoding never repeats an n-gram of this size (0: off).
    stage_shard_size (int): items per cache shard (the unit of resume and of multi-process work).
    item_text_fields (list | dict | None): ``.item`` fields written into the prompt, as a list of field
        names or a ``{label: field}`` mapping (``{Title: movie_title, Year: release_year, Genres: class}``
        for RecBole's ml-100k); None: every field but the item id and the image field.
    item_image_field (str | None): ``.item`` field holding the image file name (relative to
        ``item_image_dir``); None or a field the file lacks: text only.
    item_image_dir (str): image folder, relative to the dataset folder (``data_path``).
    dataset, data_path, ITEM_ID_FIELD, field_separator, seq_separator, encoding: as in RecBole;
        ``data_path`` is the *resolved* dataset folder holding ``<dataset>.item`` (what RecBole's
        ``Config`` leaves in ``config['data_path']``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from recbole_mllm.mllm.base import ChatRequest, GenerationConfig, MultimodalLM
from recbole_mllm.stages.cache import ShardOutput, StageCache
from recbole_mllm.stages.common import (STAGE_DEFAULTS, config_value, dataset_location, load_backend,
                                        stage_config, stage_main)
from recbole_mllm.stages.items import ItemTable, fingerprint, image_path, open_image, read_item_file
from recbole_mllm.stages.prompts import PromptTemplate, load_prompt

logger = logging.getLogger(__name__)

STAGE = "item_fusion"

DEFAULTS = {
    **STAGE_DEFAULTS,
    "item_fusion_prompt": "v1",
    "item_fusion_max_new_tokens": 96,
    "item_text_fields": None,
    "item_image_field": "image",
    "item_image_dir": "images",
    "data_path": "dataset/",
    "ITEM_ID_FIELD": "item_id",
    "field_separator": "\t",
    "seq_separator": " ",
    "encoding": "utf-8",
}

ITEM_TEXT_FORMAT = 1
"""Version of :func:`render_item_text`'s rules (in the manifest: changing the rules makes a new cache)."""

_NONE_MEANS_NONE = {"item_text_fields", "item_image_field", "mllm_dtype"}
"""Keys where an explicit None is a choice (every field, no image, backend's dtype), not 'use the default'."""

_PROMPT_FIELDS = {"system": [], "image": ["item_text"], "text_only": ["item_text"], "field": ["label", "value"]}


def _get(config: Mapping, key: str):
    """``config[key]`` for a dict or a RecBole ``Config``; missing (or None, for most keys) is the default."""
    return config_value(config, key, DEFAULTS, _NONE_MEANS_NONE)


def text_fields(config: Mapping, table: ItemTable) -> list[tuple[str, str]]:
    """The ``(label, field)`` pairs written into each item's description, checked against the file."""
    image_field = _get(config, "item_image_field")
    wanted = _get(config, "item_text_fields")
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


def _generation_config(config: Mapping) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=int(_get(config, "item_fusion_max_new_tokens")),
                            batch_size=int(_get(config, "stage_batch_size")), do_sample=False,
                            no_repeat_ngram_size=int(_get(config, "stage_no_repeat_ngram_size")))


@dataclass
class _Plan:
    """What one configuration reads and where it writes: the item rows, prompt pieces and the cache."""

    cache: StageCache
    table: ItemTable
    fields: list
    template: PromptTemplate
    image_dir: Path


def _plan(config: Mapping, backend: MultimodalLM) -> _Plan:
    dataset, dataset_dir = dataset_location(config)
    table = read_item_file(dataset_dir, dataset, id_field=_get(config, "ITEM_ID_FIELD"),
                           field_separator=_get(config, "field_separator"), encoding=_get(config, "encoding"))
    template = load_prompt(STAGE, _get(config, "item_fusion_prompt")).require(_PROMPT_FIELDS)
    fields = text_fields(config, table)
    image_field = _get(config, "item_image_field")
    image_dir = dataset_dir / _get(config, "item_image_dir")
    if image_field and image_field not in table.field_types:
        logger.info(f"{table.path} has no image field {image_field!r} (item_image_field): items are summarised from text")
    generation = _generation_config(config)
    manifest = {
        "model": backend.identity.as_dict(),
        "prompt": template.identity(),
        "generation": {**generation.as_dict(), "batch_size": generation.batch_size},
        "embedding": {"input": "summary", "batch_size": generation.batch_size},
        "dataset": {"name": dataset, **fingerprint(table, image_field, image_dir)},
        "params": {"text_fields": [list(p) for p in fields], "text_format": ITEM_TEXT_FORMAT, "image_field": image_field,
                   "image_dir": str(_get(config, "item_image_dir")), "images_seen": bool(backend.supports_images),
                   "id_field": table.id_field, "seq_separator": _get(config, "seq_separator"),
                   "field_separator": _get(config, "field_separator"), "encoding": _get(config, "encoding")},
    }
    cache = StageCache(_get(config, "stage_cache_dir"), STAGE, manifest, keys=list(table.rows),
                       shard_size=int(_get(config, "stage_shard_size")),
                       command=f"python -m recbole_mllm.stages.{STAGE} --dataset={dataset}")
    return _Plan(cache, table, fields, template, image_dir)


def item_fusion_cache(config: Mapping, backend: MultimodalLM) -> StageCache:
    """The cache for this configuration and backend, built or not (nothing is generated here)."""
    return _plan(config, backend).cache


def _shard_compute(config: Mapping, plan: _Plan, backend: MultimodalLM):
    """The function that turns one shard's item tokens into summaries, embeddings and metadata."""
    table, template = plan.table, plan.template
    image_field = _get(config, "item_image_field")
    seq_separator = _get(config, "seq_separator")
    generation = _generation_config(config)
    warned = []

    def compute(tokens: list[str]) -> ShardOutput:
        requests, metas, item_texts = [], [], []
        for token in tokens:
            item_text = render_item_text(table.rows[token], plan.fields, table, template, seq_separator)
            path = image_path(table, token, image_field, plan.image_dir)
            image, status, reason = open_image(path) if backend.supports_images else (None, "not_supported", "")
            if status in ("missing", "unreadable") and not warned:
                warned.append(token)
                logger.warning(f"{STAGE}: the image of item {token} ({path}) is {status}{f' ({reason})' if reason else ''}; "
                               f"such items are summarised from their text only (counted in complete.json, "
                               f"meta_counts.image; the reason is each record's meta.image_error)")
            section = "image" if image is not None else "text_only"
            requests.append(ChatRequest(prompt=template.render(section, item_text=item_text),
                                        image=image, system=template.render("system") or None))
            metas.append({"image": status, **({"image_error": reason} if reason else {})})
            item_texts.append(item_text)
        summaries = [s.strip() for s in backend.generate(requests, generation, progress=False)]
        for meta, summary in zip(metas, summaries):
            meta["summary"] = "generated" if summary else "item_text"
        summaries = [s or text for s, text in zip(summaries, item_texts)]
        embeddings = backend.embed(summaries, batch_size=generation.batch_size)
        return ShardOutput(summaries, embeddings, metas)

    return compute


def run_item_fusion(config: Mapping, backend: Optional[MultimodalLM] = None, progress: bool = True) -> StageCache:
    """Build (or finish, or just verify) the item fusion cache of ``config``; returns it, complete.

    Idempotent: shards already done are kept, so calling it again costs only the checksum checks.
    """
    backend = backend if backend is not None else load_backend(config)
    plan = _plan(config, backend)
    cache = plan.cache.build(_shard_compute(config, plan, backend), progress=progress)
    if cache.is_complete():
        stats = cache.summary()
        logger.info(f"{STAGE}: {stats['n_records']} items in {cache.path}; images: {stats['meta_counts'].get('image')}; "
                    f"summaries: {stats['meta_counts'].get('summary')}")
    return cache


def load_item_fusion(config: Mapping, item_tokens: Sequence[str],
                     backend: Optional[MultimodalLM] = None) -> tuple[list[str], torch.Tensor]:
    """Summaries and embeddings ``[len(item_tokens), H]`` aligned with ``item_tokens``.

    Pass ``dataset.field2id_token[ITEM_ID_FIELD]`` to get rows indexed by RecBole's item ids; its
    ``[PAD]`` entry gets an empty text and a zero vector. Raises ``StageCacheError`` naming the
    command to run when the cache for this configuration is not built.
    """
    backend = backend if backend is not None else load_backend(config)
    item_tokens = [str(t) for t in item_tokens]  # numpy str_ from field2id_token
    real = [t for t in item_tokens if t != "[PAD]"]
    texts, embeddings, _ = item_fusion_cache(config, backend).load_aligned(real)
    row = {token: i for i, token in enumerate(real)}
    out = torch.zeros(len(item_tokens), embeddings.shape[1])
    for i, token in enumerate(item_tokens):
        if token in row:
            out[i] = embeddings[row[token]]
    return [texts[row[t]] if t in row else "" for t in item_tokens], out


def main(argv: Optional[Sequence[str]] = None) -> None:
    stage_main(argv, stage_config, run_item_fusion, __doc__, DEFAULTS)


if __name__ == "__main__":
    main()
