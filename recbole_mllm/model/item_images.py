"""Vision features of every item's image, computed once before a model is built (the ranker's target images,
``encoder_item_content: image``)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from recbole_mllm.stages.items import image_path, load_image

logger = logging.getLogger(__name__)


@torch.no_grad()
def encode_item_images(backend, item_tokens, table, image_field, image_dir: Path, batch_size=64):
    """Vision features of every item image (``backend.encode_images``), the input of ``backend.projector``.

    Returns ``(features, logits, has_image)``, rows indexed by internal item id; rows of items without a
    usable image stay 0, and ``features``/``logits`` are None when no item has one. Shapes per backend:
    the offline default gives pooled features ``[n_items, 1280]`` and ImageNet logits ``[n_items, 1000]``;
    a Hugging Face VLM gives each item's image tokens ``[n_items, n, H]`` (``n`` the same for every item,
    ``H`` the LLM's hidden size) and logits ``[n_items, 0]``. Float tensors on the CPU in the dtype the
    backend returns (float32, or the VLM's own dtype, e.g. bfloat16 on a GPU: the values it would splice in).
    """
    if image_field is None:
        return None, None, torch.zeros(len(item_tokens), dtype=torch.bool)
    paths = [image_path(table, str(t), image_field, image_dir) if str(t) in table.rows else None for t in item_tokens]
    index = [i for i, p in enumerate(paths) if p is not None]
    features = logits = None
    has_image = torch.zeros(len(item_tokens), dtype=torch.bool)
    for start in tqdm(range(0, len(index), batch_size), desc="item images", unit="batch"):
        chunk = index[start:start + batch_size]
        loaded = [(i, load_image(paths[i])[0]) for i in chunk]
        loaded = [(i, img) for i, img in loaded if img is not None]
        if not loaded:
            continue
        f, l = backend.encode_images([img for _, img in loaded])
        if features is None:
            features = torch.zeros(len(item_tokens), *f.shape[1:], dtype=f.dtype)
            logits = torch.zeros(len(item_tokens), *l.shape[1:], dtype=l.dtype)
        rows = torch.tensor([i for i, _ in loaded])
        features[rows], logits[rows] = f.cpu(), l.cpu()
        has_image[rows] = True
    logger.info(f"item images: {int(has_image.sum())} of {len(item_tokens) - 1} items have a usable image")
    return features, logits, has_image

