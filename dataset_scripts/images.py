"""Item images: each usable one becomes ``images/<item_id>.jpg``, an RGB JPEG; each unusable one a line saying why.

Every file is checked with Pillow before it is used, so a model never meets a truncated or unreadable image.
"""

import re
import shutil
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from recbole_mllm.fileio import atomic_output

if __package__:
    from .errors import InputError, contained_path
    from .text import clean_text
else:  # run as a script: python dataset_scripts/<script>.py
    from errors import InputError, contained_path
    from text import clean_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
JPEG_QUALITY = 95


def find_images(folder):
    """``{file stem: path}`` of the image files in ``folder`` (``<item_id>.jpg`` and the like)."""
    found = {}
    if folder is None:
        return found
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            found.setdefault(path.stem, path)
    return found


def _to_rgb(image):
    """RGB copy of any Pillow image; transparency is composited on white, not dropped to black."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def is_clean_jpeg(path):
    """True when ``path`` is a complete, decodable RGB JPEG (what :func:`normalise_image` writes)."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.format == "JPEG" and image.mode == "RGB"
    except Exception:  # noqa: BLE001 - Pillow raises many types for bad files; any means "not clean"
        return False


def normalise_image(src, dst):
    """Check ``src`` with Pillow (verify, then a full decode) and write it to ``dst`` as RGB JPEG.

    A file that already is a clean RGB JPEG is copied byte for byte; CMYK, palette, grayscale and
    alpha images are converted. Returns ``None`` on success, else the reason the image is unusable
    (nothing is written then). Pillow signals bad files with OSError, SyntaxError, ValueError,
    DecompressionBombError and others, so every exception counts as "unusable", with its message.
    """
    src, dst = Path(src), Path(dst)
    try:
        if src.stat().st_size == 0:
            return "empty file"
        with Image.open(src) as image:
            image.verify()  # structure checks (PNG CRCs, ...); the image is unusable afterwards
        with Image.open(src) as image, atomic_output(dst) as out:
            image.load()  # full decode: catches truncated JPEGs that verify() lets through
            if image.format == "JPEG" and image.mode == "RGB":
                with open(src, "rb") as original:
                    shutil.copyfileobj(original, out)
            else:
                _to_rgb(image).save(out, "JPEG", quality=JPEG_QUALITY)
        return None
    except Exception as error:  # noqa: BLE001 - see docstring
        return f"unreadable image ({type(error).__name__}: {error})"


def normalise_images(sources, images_dir):
    """Normalise ``{item_id: source path}`` into ``images_dir/<item_id>.jpg``.

    Returns ``({item_id: file name}, {item_id: reason})``. Output files of items not in ``sources``
    are removed, so a rebuild with other inputs leaves no stale image behind.
    """
    paths = image_paths(images_dir, sources)
    images_dir.mkdir(parents=True, exist_ok=True)
    done, failed = {}, {}
    for item_id, src in tqdm(sorted(sources.items()), desc="images", unit="img", disable=None):
        reason = normalise_image(src, paths[item_id])
        if reason is None:
            done[item_id] = paths[item_id].name
        else:
            failed[item_id] = f"{reason}: {src.name}"
    remove_stale_images(images_dir, keep=set(done.values()))
    return done, failed


def image_file_name(item_id):
    """File name of an item's image: the item id with anything outside ``[A-Za-z0-9._-]`` as ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", item_id) + ".jpg"


def image_paths(images_dir, item_ids):
    """``{item_id: images_dir/<file name>}``: where each item's image goes, checked before anything is opened.

    An item id is a name from raw data: one that is not a plain file name (``../../etc/passwd``, ``/abs``, ``a/b``; see
    :func:`contained_path`) ends the run with an :class:`InputError` naming the item and the field, and so do two ids
    that :func:`image_file_name` turns into the same file (``a+b`` and ``a_b``), which would share one image.
    """
    paths, owner = {}, {}
    for item_id in sorted(item_ids):
        contained_path(images_dir, item_id, f"item {item_id!r}, field item_id (its image file's name)")
        path = contained_path(images_dir, image_file_name(item_id), f"item {item_id!r}, field item_id")
        if path.name in owner:
            raise InputError(f"items {owner[path.name]!r} and {item_id!r}, field item_id",
                             f"both name the image file {path.name} (characters outside [A-Za-z0-9._-] become _)")
        owner[path.name] = item_id
        paths[item_id] = path
    return paths


def remove_stale_images(images_dir, keep):
    for path in images_dir.iterdir():
        if path.is_file() and path.name not in keep:
            path.unlink()


def write_missing_images(path, missing):
    """``missing_images.txt``: one ``<item_id>\\t<reason>`` line per item left without an image."""
    lines = [f"{item_id}\t{clean_text(reason)}\n" for item_id, reason in sorted(missing.items())]
    path.write_text("".join(lines), encoding="utf-8")
