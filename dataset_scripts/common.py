"""What the dataset scripts share: RecBole atomic files, image normalisation, idempotent builds.

The MovieLens and Amazon converters differ only in how they read their raw files; everything they
write goes through here, so both produce the same shape:

    <output>/<name>/<name>.inter   user_id:token  item_id:token  rating:float  timestamp:float
    <output>/<name>/<name>.item    item_id:token  <text fields>  image:token
    <output>/<name>/<name>.user    (MovieLens only) demographics
    <output>/<name>/images/<item_id>.jpg   RGB JPEG, one per item that has a usable image
    <output>/<name>/stats.json, missing_images.txt, .fingerprint

Why the details matter:
- RecBole reads atomic files with ``pandas.read_csv(sep='\\t', engine='python')``: a tab or newline
  inside a value breaks the row, and a value that starts with ``"`` is parsed as a quoted field. Text
  is therefore cleaned of control characters and written with csv quoting, which read_csv undoes.
- ``token_seq`` values are split on ``seq_separator`` (a space): text fields are stored as words
  joined by single spaces (``' '.join(tokens)`` gives the text back) and multi-word labels such as
  Amazon categories become one token with ``_`` for the inner spaces (see :func:`label_token`).
- RecBole silently drops interactions whose item (or user) is missing from ``.item`` (``.user``) and
  counts every ``.item`` row in ``item_num``: the converters write exactly the interacted items.
- A build is skipped when ``.fingerprint`` matches the inputs, the arguments and this code, so a
  second run does nothing; any change rebuilds (no cache whose key misses a parameter).
"""

import argparse
import csv
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path, PureWindowsPath

from PIL import Image
from tqdm import tqdm

from recbole_mllm.utils import atomic_output

RECBOLE_BUNDLED = ("ml-100k",)  # RecBole sets data_path to its own copy of these (Config._set_default_parameters)
INTER_FIELDS = [("user_id", "token"), ("item_id", "token"), ("rating", "float"), ("timestamp", "float")]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
JPEG_QUALITY = 95
FINGERPRINT_FILE = ".fingerprint"
TIE_SEED = 2020  # --tie-seed's default
DUPLICATE_CHOICES = {
    "drop": "keep one (MovieLens: of identical rating lines; Amazon: of a user's reviews of one item, the earliest)",
    "keep": "keep every one as an interaction of its own",
}

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # tabs, newlines, C0/C1 controls (a latin-1 0x85 is NEL)
_SPACES = re.compile(r"\s+")


# ---------------------------------------------------------------------------------- input errors
class InputError(Exception):
    """An input file that cannot be used: reported as one line ``error: <file>: <problem>``, exit status 2."""

    def __init__(self, file, problem):
        super().__init__(f"{file}: {problem}")


def describe_os_error(error):
    """``No such file or directory`` and the like, without the errno and path Python prepends."""
    return error.strerror or str(error) or type(error).__name__


# magic bytes of the compressions and archives someone may hand in instead of what a script reads
_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd",
          b"PK\x03\x04": "zip", b"7z\xbc\xaf\x27\x1c": "7z"}


def compression_of(path):
    """The compression or archive format ``path`` holds, by its first bytes; None for plain data."""
    with open(path, "rb") as f:
        head = f.read(8)
    return next((kind for magic, kind in _MAGIC.items() if head.startswith(magic)), None)


def check_input_file(path, option):
    """Raise :class:`InputError` unless ``path`` (given as ``option``) is an existing, readable file."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, f"does not exist ({option})")
    if not path.is_file():
        raise InputError(path, f"is not a file ({option})")
    if not os.access(path, os.R_OK):
        raise InputError(path, f"is not readable: permission denied ({option})")


def contained_path(folder, name, what):
    """``folder/name`` with ``folder`` resolved, for a ``name`` that comes from raw data; else :class:`InputError`.

    ``name`` must be one plain file name: not empty, ``.`` or ``..``, no ``/`` or ``\\`` (on any platform),
    no drive (``C:``), no NUL. So ``../../etc/passwd``, ``/etc/passwd`` or ``a/b`` can never make a script open or
    write a file outside ``folder``. ``what`` names the record and field in the error (``item 'B01', field item_id``).
    A symbolic link that the user put into ``folder`` is the user's choice and is not looked through.
    """
    text = str(name)
    bad = (not text or text in (".", "..") or "\0" in text or "/" in text or "\\" in text
           or PureWindowsPath(text).drive or Path(text).is_absolute())
    base = Path(folder).resolve()
    path = base / text
    if bad or path.parent != base:
        raise InputError(what, f"{text!r} is not a plain file name (a path separator, '..', an absolute path or a "
                               f"drive); refused as a file in {base}")
    return path


def run_main(main, argv=None):
    """Run a converter's ``main``; a bad input ends in one line on stderr and exit status 2.

    ``--debug`` lets the exception through, traceback included.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return main(argv)
    except (InputError, OSError) as error:
        if "--debug" in argv:
            raise
        named = isinstance(error, OSError) and error.filename is not None
        message = f"{error.filename}: {describe_os_error(error)}" if named else str(error)
        print(f"error: {message} (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


# ----------------------------------------------------------------------------------------- text
def clean_text(value):
    """One line of text: control characters become spaces, runs of white space one space."""
    if value is None:
        return ""
    return _SPACES.sub(" ", _CONTROL.sub(" ", str(value))).strip()


def label_token(value):
    """A multi-word label (``Skin Care``) as one token_seq token (``Skin_Care``)."""
    return clean_text(value).replace(" ", "_")


def decode_bytes(data):
    """Text of a raw file: UTF-8 when it is valid UTF-8, else latin-1 (the MovieLens releases).

    Latin-1 text with accented letters is practically never valid UTF-8, so trying UTF-8 first
    reads both the original GroupLens files and re-encoded copies correctly; latin-1 maps every
    byte, so nothing is dropped. Returns ``(text, encoding)``.
    """
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "latin-1"


def text_lines(text):
    """``(line_number, line)`` pairs; splits on ``\\n`` only (``str.splitlines`` also splits on NEL)."""
    for number, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if line.strip():
            yield number, line


class LineErrors:
    """Counts malformed input lines per file and keeps the first few for the report."""

    def __init__(self, keep=5):
        self.keep = keep
        self.counts = {}
        self.examples = []

    def add(self, file, line_number, reason):
        self.counts[file] = self.counts.get(file, 0) + 1
        if self.counts[file] <= self.keep:
            self.examples.append(f"{file}:{line_number}: {reason}")

    @property
    def total(self):
        return sum(self.counts.values())

    def report(self):
        for file, count in self.counts.items():
            print(f"warning: {count:,} malformed line(s) skipped in {file}", file=sys.stderr)
        for example in self.examples:
            print(f"  {example}", file=sys.stderr)


# ---------------------------------------------------------------------------------- atomic files
def write_atomic_file(path, fields, rows):
    """Write a RecBole atomic file: header ``name:type``, tab separated, csv quoting where needed.

    ``fields`` is a list of ``(name, type)``; ``rows`` an iterable of sequences in that order.
    Written through ``atomic_output``, so an interrupted run never leaves a half file behind.
    """
    with atomic_output(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quotechar='"', quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writerow([f"{name}:{ftype}" for name, ftype in fields])
        writer.writerows(rows)


def tie_key(seed, user, item):
    """Where an interaction goes among the same user's interactions of the same timestamp: a seeded hash.

    The scripts write each user's interactions ordered by ``(user, timestamp, tie_key(seed, user, item))``, and
    RecBole and the plugin keep the file's order among equal timestamps (stable sorts), so this decides which of
    a user's same-second items is the leave-one-out test target. Item ids would leak: MovieLens ids follow the
    release years that the titles show. blake2b of the text ``seed, user, item``: the same on every run and
    platform (Python's ``hash()`` of a string is salted per process). A 63-bit integer.
    """
    digest = hashlib.blake2b(f"{seed}\t{user}\t{item}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def repeated_pairs(users, items):
    """How many interactions repeat an earlier (user, item) pair (0 when every pair is unique)."""
    pairs = list(zip(users, items))
    return len(pairs) - len(set(pairs))


def number(value):
    """A rating or timestamp as RecBole float text without a spurious ``.0``."""
    number = float(value)  # "4.0" (ml-20m and later) as "4", like "4"
    return str(int(number)) if number.is_integer() else repr(number)


# ----------------------------------------------------------------------------------------- images
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


# ------------------------------------------------------------------------------- the dataset's yaml
DATASET_YAML = """\
# {name}: {description}
# Written by dataset_scripts/{script} beside the atomic files. The plugin reads it for --dataset={name}
# --data_path=<this folder's parent> when it ships no properties/dataset/{name}.yaml (--config_files override it).
# {interactions:,} interactions, {users:,} users, {items:,} items.
# repeated (user, item) pairs kept: {repeated} of {interactions} interactions
#   (interactions whose item the user had before; at 0, masking a user's earlier items in full ranking hides no target)
# a user's same-timestamp interactions: ordered by a seeded hash of (user, item), not by item id (--tie-seed {tie_seed})

# Atomic File Format
field_separator: "\\t"           # (str) Separator of different columns in atomic files.
seq_separator: " "              # (str) Separator inside token_seq fields: title words, labels (inner spaces as _).

# Basic Information
USER_ID_FIELD: user_id          # (str) Field name of user ID feature.
ITEM_ID_FIELD: item_id          # (str) Field name of item ID feature.
RATING_FIELD: rating            # (str) Field name of rating feature.
TIME_FIELD: timestamp           # (str) Field name of timestamp feature (Unix seconds).

# Selectively Loading
load_col:                       # (dict) The suffix of atomic files: (list) field names to be loaded.
{load_col}
# Filtering: done by the script (if at all), so RecBole keeps every interaction it finds.
rm_dup_inter: ~                 # (str) Whether to remove duplicated user-item interactions.
val_interval: ~                 # (dict) Filter inter by values in {{value field (str): interval (str)}}.
filter_inter_by_user_or_item: True    # (bool) Whether or not to filter inter by user or item (all are present).
user_inter_num_interval: "[0,inf)"    # (str) User interval for filtering inter, such as [A,B] / [A,B) / (A,B) / (A,B].
item_inter_num_interval: "[0,inf)"    # (str) Item interval for filtering inter, such as [A,B] / [A,B) / (A,B) / (A,B].

# Preprocessing
normalize_all: False            # (bool) Whether or not to normalize all the float like fields (False keeps timestamps in seconds).

# Prompt fields (the plugin's models)
item_title_field: title         # (str) .item field with the item's title.
item_category_field: {category:<10} # (str) .item field with the item's categories.
item_image_field: image         # (str) .item field with the image file name under images/.
"""


def write_dataset_yaml(build, script, description, files, category_field, stats):
    """``<name>.yaml`` beside the atomic files: the RecBole keys that load them, so a dataset built under a
    name the plugin ships no YAML for still loads its timestamps, text and images (not RecBole's ids-only default).

    ``files``: ``{suffix: fields}`` of the atomic files written (fields as ``(name, type)``). The repeated (user,
    item) pairs and the tie seed go in as comments (``stats``' ``repeated_pairs``, ``tie_seed``): the YAML's keys
    are checked against the declared ones, and neither is a setting.
    """
    load_col = "".join(f"    {suffix}: [{', '.join(n for n, _ in fields)}]\n" for suffix, fields in files.items())
    text = DATASET_YAML.format(name=build.name, description=description, script=script, load_col=load_col,
                               category=category_field, interactions=stats["interactions"], users=stats["users"],
                               items=stats["items"], repeated=stats["repeated_pairs"], tie_seed=stats["tie_seed"])
    with atomic_output(build.dir / f"{build.name}.yaml", "w", encoding="utf-8") as f:
        f.write(text)


# -------------------------------------------------------------------------------------- statistics
def dataset_stats(name, inter_users, inter_items, item_images, missing, errors):
    """The numbers every build prints and stores.

    ``inter_users``/``inter_items``: the user and item of each interaction; ``item_images``: each
    ``.item`` id to its image file or ''; ``missing``: the missing_images.txt entries; ``errors``:
    the :class:`LineErrors` of the raw files.
    """
    inter_users, inter_items = list(inter_users), list(inter_items)
    n_inter = len(inter_users)
    n_users, n_items = len(set(inter_users)), len(set(inter_items))
    return {
        "dataset": name,
        "users": n_users,
        "items": len(item_images),
        "interactions": n_inter,
        "density": n_inter / (n_users * n_items) if n_users and n_items else 0.0,
        "items_with_image": sum(1 for image in item_images.values() if image),
        "items_without_image": sum(1 for image in item_images.values() if not image),
        "rated_items": n_items,
        "rated_items_with_image": sum(1 for item in set(inter_items) if item_images.get(item)),
        "missing_images": len(missing),
        "malformed_lines": errors.counts,
        "repeated_pairs": repeated_pairs(inter_users, inter_items),
    }


def print_stats(stats):
    print(
        f"{stats['dataset']}: {stats['users']:,} users, {stats['items']:,} items, "
        f"{stats['interactions']:,} interactions, density {stats['density']:.4%}"
    )
    print(
        f"images: {stats['items_with_image']:,} items with an image, {stats['items_without_image']:,} text-only; "
        f"{stats['rated_items_with_image']:,} of {stats['rated_items']:,} rated items have one"
    )
    if "duplicates_choice" in stats:
        choice = stats["duplicates_choice"]
        print(f"duplicates: {stats['duplicates']:,} {'dropped' if choice == 'drop' else 'kept'} (--duplicates {choice})")
    if "repeated_pairs" in stats:
        repeated = stats["repeated_pairs"]
        print(f"repeated (user, item) pairs kept: {repeated:,} of {stats['interactions']:,} interactions"
              + (" (masking a user's earlier items can hide such a target)" if repeated else ""))
    for key, title in (("dropped", "dropped"), ("orphaned", "kept without a match")):
        counts = stats.get(key) or {}
        print(f"{title}: " + (", ".join(f"{n:,} {what}" for what, n in counts.items()) if any(counts.values()) else "none"))


def row_counts(**counts):
    """``{"malformed lines": 3, ...}`` from ``malformed_lines=3, ...``: the wording print_stats shows."""
    return {name.replace("_", " "): int(n) for name, n in counts.items()}


# --------------------------------------------------------------------------------- idempotent build
def _describe_path(path):
    """What identifies an input's content cheaply: size and mtime of the file or of every file below."""
    path = Path(path).resolve()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return [str(path), [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]]
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def fingerprint(arguments, inputs, code_files):
    """Digest of the arguments, the inputs (sizes, mtimes) and the converter's source code."""
    digest = hashlib.sha256()
    code = [Path(__file__), *map(Path, code_files)]
    digest.update(json.dumps(sorted(arguments.items()), default=str).encode())
    digest.update(json.dumps([_describe_path(p) for p in inputs if p is not None]).encode())
    for path in code:
        digest.update(path.read_bytes())
    return digest.hexdigest()


class Build:
    """One dataset folder, ``<output>/<name>``, rebuilt only when its fingerprint changes."""

    def __init__(self, output, name, fingerprint_value, outputs):
        self.dir = Path(output) / name
        self.name = name
        self.fingerprint = fingerprint_value
        self.outputs = [self.dir / o for o in (*outputs, "stats.json", "missing_images.txt")]

    def up_to_date(self):
        marker = self.dir / FINGERPRINT_FILE
        return (
            marker.is_file()
            and marker.read_text().strip() == self.fingerprint
            and all(path.exists() for path in self.outputs)
        )

    def begin(self):
        """Invalidate the folder first: an interrupted build is never taken for a finished one."""
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / FINGERPRINT_FILE).unlink(missing_ok=True)

    def finish(self, stats):
        with open(self.dir / "stats.json", "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=2, ensure_ascii=False)
            f.write("\n")
        (self.dir / FINGERPRINT_FILE).write_text(self.fingerprint + "\n")

    def stored_stats(self):
        return json.loads((self.dir / "stats.json").read_text(encoding="utf-8"))


def argument_parser(doc, example_name, images_help):
    """A parser described by the script's docstring, with the arguments every converter has."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)
    parser.add_argument(
        "--output",
        required=True,
        type=Path,
        help="output root: the dataset goes to <output>/<name>/ (RecBole's data_path)",
    )
    parser.add_argument(
        "--name", required=True, help=f"dataset name, e.g. {example_name} (file prefix; properties/dataset/<name>.yaml)"
    )
    parser.add_argument("--images", type=Path, default=None, help=images_help)
    parser.add_argument("--force", action="store_true", help="rebuild even when the output is up to date")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    parser.add_argument(
        "--duplicates",
        choices=DUPLICATE_CHOICES,
        default="drop",
        help=f"repeated interactions: {'; '.join(f'{k}: {v}' for k, v in DUPLICATE_CHOICES.items())} "
        "(counted in the summary either way)",
    )
    parser.add_argument(
        "--tie-seed", "--tie_seed", dest="tie_seed", type=int, default=TIE_SEED,
        help="a user's interactions with the same timestamp are ordered by a hash of (this seed, user, item), not by "
        "item id: the last one is the leave-one-out test target, and item ids can tell something about the item "
        "(MovieLens ids follow release years, which titles show); 42%% of ML-1M users' last two ratings share a second",
    )
    return parser


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help``: the script's docstring as written, then every option with its default (if it has one)."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def run_script(args, inputs, script, convert, ignored=()):
    """The converters' main: fingerprint what shapes the output, then convert or report "up to date".

    Every argument except ``--output``, ``--force`` and ``ignored`` (settings that cannot change the
    result, such as the number of download workers) is part of the fingerprint.
    """
    if args.images is not None and not args.images.is_dir():
        raise InputError(args.images, "is not a folder (--images)")
    if args.name in RECBOLE_BUNDLED:
        raise InputError(args.name, "is a dataset RecBole bundles and reads from its own copy whatever --data_path says "
                                    f"(--name); choose another, e.g. {args.name}-mm")
    settings = {
        k: v.resolve() if isinstance(v, Path) else v
        for k, v in vars(args).items()
        if k not in {"output", "force", "debug", *ignored}
    }
    outputs = [f"{args.name}.inter", f"{args.name}.item", f"{args.name}.yaml", "images"]
    build = Build(args.output, args.name, fingerprint(settings, inputs, [script]), outputs)
    return run_build(build, lambda b: convert(args, b), args.force)


def run_build(build, convert, force=False):
    """Convert unless ``build`` is up to date; print the statistics either way and return them.

    ``convert(build)`` writes the files into ``build.dir`` and returns the statistics. The result
    carries ``"rebuilt": False`` when there was nothing to do.
    """
    if build.up_to_date() and not force:
        print(f"{build.dir} is up to date (same inputs, arguments and code): nothing to do; --force rebuilds")
        stats = build.stored_stats()
        print_stats(stats)
        return {**stats, "rebuilt": False}
    build.begin()
    stats = convert(build)
    build.finish(stats)
    print_stats(stats)
    print(f"wrote {build.dir}")
    return {**stats, "rebuilt": True}
