"""Items as the LLM stages see them: raw rows of a RecBole ``.item`` atomic file and their images
(and the same reader for other atomic files, e.g. ``.user``).

The stages work on raw tokens and raw text, before RecBole remaps ids or filters anything, so that
their caches do not depend on the split or the filtering settings. The file is read the way RecBole
reads it (``<field>:<type>`` header, ``field_separator``, pandas' python engine), except that every
value stays the exact string of the file (RecBole would turn ``NA`` or an empty cell into NaN).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd
from PIL import Image

from recbole_mllm.fileio import canonical_json, sha256_file


@dataclass
class AtomicTable:
    """The rows of an atomic file (``.item``, ``.user``): ``rows[raw token][field] = raw string``, in file order."""

    path: Path
    id_field: str
    field_types: dict  # field name -> RecBole type ("token", "token_seq", "float", ...)
    rows: dict


ItemTable = AtomicTable
"""The table of ``<dataset>.item`` (the name the item stage uses)."""


def read_atomic_file(path, id_field: str, field_separator: str = "\t", encoding: str = "utf-8", kind: str = "item",
                     id_key: str = "ITEM_ID_FIELD") -> AtomicTable:
    """Read the atomic file ``path`` keyed by ``id_field``; duplicate tokens are an error (RecBole would keep both).

    ``kind`` (``item``, ``user``) and ``id_key`` (the config key naming the id field) word the errors.
    """
    path = Path(path)
    frame = pd.read_csv(path, delimiter=field_separator, dtype=str, encoding=encoding, engine="python",
                        keep_default_na=False, na_filter=False)
    field_types = {}
    for column in frame.columns:
        name, _, ftype = str(column).partition(":")
        field_types[name] = ftype
    frame.columns = list(field_types)
    if id_field not in field_types:
        raise ValueError(f"{path} has no {kind} id field {id_field!r} ({id_key}); its fields are {list(field_types)}")
    duplicated = frame[id_field][frame[id_field].duplicated()].tolist()
    if duplicated:
        raise ValueError(f"{path} lists {len(duplicated)} {kind} token(s) more than once, e.g. {duplicated[:5]}")
    rows = {row[id_field]: row for row in frame.to_dict(orient="records")}
    return AtomicTable(path=path, id_field=id_field, field_types=field_types, rows=rows)


def read_item_file(dataset_dir, dataset: str, id_field: str = "item_id", field_separator: str = "\t",
                   encoding: str = "utf-8") -> ItemTable:
    """Read ``<dataset_dir>/<dataset>.item``; duplicate item tokens are an error (RecBole would keep both)."""
    path = Path(dataset_dir) / f"{dataset}.item"
    if not path.is_file():
        raise FileNotFoundError(f"the item file {path} does not exist: the item stages need the dataset's .item atomic file")
    return read_atomic_file(path, id_field, field_separator, encoding)


def load_image(path: Optional[Path]) -> tuple[Optional[Image.Image], str]:
    """Open an item image fully, as RGB. Returns ``(image, "used")`` or ``(None, why)``; see :func:`open_image`."""
    return open_image(path)[:2]


def open_image(path: Optional[Path]) -> tuple[Optional[Image.Image], str, str]:
    """Open an item image fully, as RGB: ``(image, "used", "")`` or ``(None, status, reason)``.

    ``status`` is ``"absent"`` (the item names no image), ``"missing"`` (the file does not exist) or
    ``"unreadable"`` (zero bytes, truncated, not an image): the caller then falls back to text.
    ``reason`` says what was wrong with an unreadable file, with its name but not its folder (it is
    stored in caches, which must not depend on where the dataset lies).
    """
    if path is None:
        return None, "absent", ""
    if not path.is_file():
        return None, "missing", ""
    try:
        if path.stat().st_size == 0:
            return None, "unreadable", "empty file"
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later inside a batch
            return image.convert("RGB"), "used", ""
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        reason = f"{type(error).__name__}: {error}".replace(str(path), path.name)
        return None, "unreadable", reason


class UnsafePathError(ValueError):
    """A file a dataset names that resolves outside its declared folder (``..``, an absolute path, a link out)."""


def contained_path(folder: Path, name: str, what: str) -> Path:
    """``folder / name`` when it resolves inside ``folder`` (links followed), else ``UnsafePathError`` naming ``what``.

    A dataset is input from elsewhere: a name such as ``../../etc/passwd`` or ``/etc/hostname`` must never be
    read, hashed into a cache key or shown to a model.
    """
    path = Path(folder) / name
    root = Path(folder).resolve()
    if not path.resolve().is_relative_to(root):
        raise UnsafePathError(f"{what} names {name!r}, which resolves outside its folder {folder}; refused "
                              "(a dataset's files must lie inside the folder it declares)")
    return path


def image_path(table: ItemTable, token: str, image_field: Optional[str], image_dir: Path) -> Optional[Path]:
    """Where the image of item ``token`` is, or None when the dataset names none for it.

    Raises ``UnsafePathError`` (naming the file, the item and the field) for a name outside ``image_dir``.
    """
    if not image_field or image_field not in table.field_types:
        return None
    name = table.rows[token][image_field].strip()
    if not name:
        return None
    return contained_path(image_dir, name, f"{table.path}: item {token!r}, field {image_field!r} (item_image_dir)")


def check_image_paths(table: ItemTable, image_field: Optional[str], image_dir: Path) -> None:
    """Raise ``UnsafePathError`` for the first item whose image name resolves outside ``image_dir``; nothing is read."""
    for token in table.rows:
        image_path(table, token, image_field, image_dir)


def fingerprint(table: ItemTable, image_field: Optional[str], image_dir: Path) -> dict:
    """Hashes of everything the item stage reads from disk: the ``.item`` file and every named image.

    Image files are hashed by content (a poster replaced under the same name is a new input); a
    named but missing image hashes as missing, so adding it later also changes the fingerprint.
    """
    check_image_paths(table, image_field, image_dir)  # the first unsafe name in file order, before any is hashed
    images = hashlib.sha256()
    for token in sorted(table.rows):
        path = image_path(table, token, image_field, image_dir)
        if path is not None:
            digest = sha256_file(path) if path.is_file() else "missing"
            images.update(canonical_json([token, table.rows[token][image_field].strip(), digest]).encode("utf-8"))
    return {"item_file": table.path.name, "item_file_sha256": sha256_file(table.path),
            "images_sha256": images.hexdigest()}
