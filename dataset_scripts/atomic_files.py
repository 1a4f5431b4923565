"""The files RecBole reads, written alike by every converter: the atomic files and the ``<name>.yaml`` that loads them.

    <output>/<name>/<name>.inter   user_id:token  item_id:token  rating:float  timestamp:float
    <output>/<name>/<name>.item    item_id:token  <text fields>  image:token
    <output>/<name>/<name>.user    (MovieLens only) demographics
    <output>/<name>/<name>.yaml    the RecBole keys that load them

Beside them: ``images/<item_id>.jpg`` (``images.py``), ``stats.json`` (``stats.py``), ``missing_images.txt``
(``images.py``) and ``.fingerprint`` (``fingerprint.py``).

Why the details matter:
- RecBole reads atomic files with ``pandas.read_csv(sep='\\t', engine='python')``: a tab or newline
  inside a value breaks the row, and a value that starts with ``"`` is parsed as a quoted field. Text
  is therefore cleaned of control characters (``text.py``) and written with csv quoting, which read_csv undoes.
- ``token_seq`` values are split on ``seq_separator`` (a space): text fields are stored as words
  joined by single spaces (``' '.join(tokens)`` gives the text back) and multi-word labels such as
  Amazon categories become one token with ``_`` for the inner spaces (``text.label_token``).
- RecBole silently drops interactions whose item (or user) is missing from ``.item`` (``.user``) and
  counts every ``.item`` row in ``item_num``: the converters write exactly the interacted items.
"""

import csv
import hashlib

from recbole_mllm.fileio import atomic_output

INTER_FIELDS = [("user_id", "token"), ("item_id", "token"), ("rating", "float"), ("timestamp", "float")]
TIE_SEED = 2020  # --tie-seed's default


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


def number(value):
    """A rating or timestamp as RecBole float text without a spurious ``.0``."""
    number = float(value)  # "4.0" (ml-20m and later) as "4", like "4"
    return str(int(number)) if number.is_integer() else repr(number)


DATASET_YAML = """\
# {name}: {description}
# Written by dataset_scripts/{script} beside the atomic files. The plugin reads it for --dataset={name}
# --data_path=<this folder's parent> when it ships no properties/dataset/{name}.yaml (--config_files override it).
# {interactions:,} interactions, {users:,} users, {items:,} items.
# repeated (user, item) pairs kept: {repeated} of {interactions} interactions
#   (interactions whose item the user had before; at 0, masking a user's earlier items in full ranking hides no target)
{ties}
# Atomic File Format
field_separator: "\\t"           # (str) Separator of different columns in atomic files.
seq_separator: " "              # (str) Separator inside token_seq fields: title words, labels (inner spaces as _).

# Basic Information
USER_ID_FIELD: user_id          # (str) Field name of user ID feature.
ITEM_ID_FIELD: item_id          # (str) Field name of item ID feature.
RATING_FIELD: {rating:<17} # (str) Field name of rating feature{rating_note}.
TIME_FIELD: timestamp           # (str) Field name of timestamp feature ({time_meaning}).

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
item_category_field: {category:<10} # (str) .item field with the item's categories{category_note}.
item_image_field: {image:<13} # (str) .item field with the image file name under images/{image_note}.
{time_format}"""


POSITIONS_TIME_FORMAT = (
    "user_time_format: none          # (str: unix_s | unix_ms | none) The timestamps are positions, not Unix times: "
    "prompts say 'interaction 3', never a date.\n"
)


def write_dataset_yaml(build, script, description, files, category_field, stats, positions=False):
    """``<name>.yaml`` beside the atomic files: the RecBole keys that load them, so a dataset built under a
    name the plugin ships no YAML for still loads its timestamps, text and images (not RecBole's ids-only default).

    ``files``: ``{suffix: fields}`` of the atomic files written (fields as ``(name, type)``); without a ``rating``
    or ``image`` field the YAML names none (``~``), and ``category_field=None`` names no category field.
    ``positions``: the timestamps are each item's position in its user's sequence, so the YAML sets the plugin's
    ``user_time_format: none`` (no dates in prompts). The repeated (user, item) pairs and the tie seed (where
    ``stats`` has one) go in as comments (``stats``' ``repeated_pairs``, ``tie_seed``): the YAML's keys are checked
    against the declared ones, and neither is a setting.
    """
    fields = {suffix: [n for n, _ in columns] for suffix, columns in files.items()}
    load_col = "".join(f"    {suffix}: [{', '.join(names)}]\n" for suffix, names in fields.items())
    rating, image = "rating" in fields["inter"], "image" in fields["item"]
    ties = ("# a user's same-timestamp interactions: ordered by a seeded hash of (user, item), not by item id "
            f"(--tie-seed {stats['tie_seed']})\n") if "tie_seed" in stats else ""
    text = DATASET_YAML.format(
        name=build.name, description=description, script=script, load_col=load_col, ties=ties,
        rating="rating", rating_note="" if rating else "; none loaded: the source has no ratings",
        time_meaning="the item's position in the user's sequence: 0, 1, 2, ..." if positions else "Unix seconds",
        category=category_field or "~", category_note="" if category_field else " (none: the source has none)",
        image="image" if image else "~", image_note="" if image else " (none: the source has no images)",
        time_format=POSITIONS_TIME_FORMAT if positions else "", interactions=stats["interactions"],
        users=stats["users"], items=stats["items"], repeated=stats["repeated_pairs"])
    with atomic_output(build.dir / f"{build.name}.yaml", "w", encoding="utf-8") as f:
        f.write(text)
