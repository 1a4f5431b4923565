"""Multimodal item fusion, part 1 of MLLM-SRec: one summary text and one embedding per item.

Wang et al., "Leveraging multimodal large language model for multimodal sequential
recommendation", Scientific Reports 2025 (Fig. 3, left). A multimodal LLM reads each item's image
with its text (visual question answering) and writes a short summary that keeps what matters for
taste and leaves out visual noise; the summary is embedded with the same model. Both are computed
once per item and kept in a :class:`~recbole_mllm.stages.cache.StageCache` keyed by the raw item
token of the ``.item`` file. This module builds the cache; what keys it and how it is read live in
``item_fusion_cache.py``, so readers never import the stage.

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
    item_fusion_items (str): ``all`` (every row of the ``.item`` file) or ``interacted`` (the items left in the
        users' histories after RecBole's filters; the command line then builds the dataset to find them).
    stage_batch_size (int or None): requests per generation / embedding batch (None: 512 on a GPU, 16 on a CPU).
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
from typing import Mapping, Optional, Sequence

from recbole_mllm.mllm.base import ChatRequest, MultimodalLM
from recbole_mllm.stages.cache import ShardOutput, StageCache
from recbole_mllm.stages.common import load_backend, stage_config, stage_main
from recbole_mllm.stages.item_fusion_cache import (DEFAULTS, STAGE, ItemFusionPlan, item_fusion_plan, item_images,
                                                   render_item_text, setting)
from recbole_mllm.stages.items import image_path, open_image

logger = logging.getLogger(__name__)

def _shard_compute(config: Mapping, plan: ItemFusionPlan, backend: MultimodalLM):
    """The function that turns one shard's item tokens into summaries, embeddings and metadata."""
    table, template = plan.table, plan.template
    image_field = setting(config, "item_image_field")
    seq_separator = setting(config, "seq_separator")
    generation = plan.generation
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


def run_item_fusion(config: Mapping, backend: Optional[MultimodalLM] = None, progress: bool = True,
                    histories: Optional[Mapping] = None) -> StageCache:
    """Build (or finish, or just verify) the item fusion cache of ``config``; returns it, complete.

    Idempotent: shards already done are kept, so calling it again costs only the checksum checks. ``histories``
    (``data.user_histories``) give the items under ``item_fusion_items: interacted``; None builds the dataset.
    """
    item_images(config)  # an image name outside the image folder is refused before the model loads
    backend = backend if backend is not None else load_backend(config)
    plan = item_fusion_plan(config, backend, histories)
    cache = plan.cache.build(_shard_compute(config, plan, backend), progress=progress)
    if cache.is_complete():
        stats = cache.summary()
        logger.info(f"{STAGE}: {stats['n_records']} items in {cache.path}; images: {stats['meta_counts'].get('image')}; "
                    f"summaries: {stats['meta_counts'].get('summary')}")
    return cache


def main(argv: Optional[Sequence[str]] = None) -> None:
    stage_main(argv, stage_config, run_item_fusion, __doc__, DEFAULTS)


if __name__ == "__main__":
    main()
