"""Helpers for the dataset script tests: images in every odd shape, decoding RecBole fields, shared data."""

import io
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def _jpeg_bytes(mode="RGB", size=(48, 64)):
    rng = random.Random(0)
    image = Image.new("RGB", size)
    image.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(size[0] * size[1])])
    out = io.BytesIO()
    image.convert(mode).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_image(path, kind):
    """Write an image of ``kind`` to ``path``; the broken kinds are what real dumps contain."""
    path = Path(path)
    if kind in ("rgb", "gray", "cmyk"):
        path.write_bytes(_jpeg_bytes({"rgb": "RGB", "gray": "L", "cmyk": "CMYK"}[kind]))
    elif kind == "rgba":  # left half fully transparent red: must come out white, not black
        image = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
        image.paste((255, 0, 0, 0), (0, 0, 16, 32))
        image.save(path, "PNG")
    elif kind == "la":
        Image.new("LA", (32, 32), (0, 0)).save(path, "PNG")
    elif kind == "palette":
        image = Image.new("P", (32, 32), 1)
        image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
        image.save(path, "PNG", transparency=0)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = _jpeg_bytes(size=(160, 160))
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(b"<html>not an image</html>" * 20)
    else:
        raise ValueError(kind)
    return path


def item_text(dataset, item_id, field):
    """The ``field`` of raw item ``item_id`` in a loaded RecBole Dataset, as text.

    A token field gives its token, a token_seq field its tokens joined by spaces (the documented way
    to get readable text back); ``''`` for a missing value ([PAD]).
    """
    feat = dataset.item_feat
    internal_id = dataset.token2id(dataset.iid_field, item_id)
    value = feat[field].values[np.flatnonzero(feat[dataset.iid_field].values == internal_id)[0]]
    tokens = dataset.field2id_token[field]
    ids = [int(v) for v in np.atleast_1d(value) if int(v) != 0]
    return " ".join(tokens[i] for i in ids)


def shared_ml1m():
    """The shared ML-1M folder (ml-1m.zip + posters/) or None.

    ``$RECBOLE_MLLM_SHARED_DATA`` may name the shared data folder or its ml-1m folder; by default
    it is ``../shared/data/ml-1m`` beside the repository.
    """
    root = os.environ.get("RECBOLE_MLLM_SHARED_DATA")
    candidates = [Path(root), Path(root) / "ml-1m"] if root else [REPO.parent / "shared" / "data" / "ml-1m"]
    return next((folder for folder in candidates if (folder / "ml-1m.zip").is_file()), None)
