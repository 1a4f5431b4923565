"""A sequence file (one user per line: the user id, then the item ids in order), plus item titles, to a RecBole dataset.

The field's common release format (S3-Rec, P5, GRAM: ``user_sequence.txt``), where a user's items come in
chronological order and the times themselves are gone:

    A1YJEY40YUW4SE B004756YJA B004ZT0SSG B0020YLEYK 7806397051 B002WLWX82
    A60XNB876KYML B0009P4PZC B009HULFLW B00BZ1QN2C

Ids are separated by white space. The timestamp written for an interaction is the item's position in the user's
sequence (0, 1, 2, ...; counted again after ``--duplicates drop`` and ``--k-core``), so RecBole keeps the order and
nothing pretends to be a date: the written ``<name>.yaml`` sets ``user_time_format: none``, and the prompts say
"interaction 3", never a month.

Titles (``--titles``, optional) come from a table with a header row: csv, tab separated (``.tsv``, or a header with a
tab) or JSON lines (``.jsonl``/``.json``, one object per line), the columns named by ``--title-id-column`` and
``--title-column``. Titles are cleaned like Amazon titles (``text.markup_text``): HTML entities decoded, tags and
written-out ``\\n``/``\\t`` removed, white space collapsed. An item without a title keeps its interactions, with an
empty title.

Such a release is a finished benchmark: a line without items, a user listed twice, a title row with the wrong number
of fields or without an id end the run (one line naming the file and line, exit status 2) instead of being skipped,
since a skipped line would silently change the users everyone compares on.

Usage (idempotent: a second run with the same inputs and arguments does nothing):

    python dataset_scripts/sequences.py --sequences raw/user_sequence.txt --titles raw/beauty_titles.csv \\
        --output dataset --name amazon-beauty-seq

Written to ``<output>/<name>/`` (see atomic_files.py): ``.inter`` (``user_id item_id timestamp``, no rating),
``.item`` (``item_id title``), ``<name>.yaml``, ``stats.json``; no images.
"""

import csv
import json
from pathlib import Path

import pandas as pd

if __package__:
    from .atomic_files import write_atomic_file, write_dataset_yaml
    from .cli import argument_parser, run_main, run_script
    from .errors import InputError, LineErrors, check_input_file, compression_of
    from .interactions import k_core
    from .stats import dataset_stats, row_counts
    from .text import clean_text, decode_bytes, markup_text, text_lines
else:  # run as a script: python dataset_scripts/sequences.py
    from atomic_files import write_atomic_file, write_dataset_yaml
    from cli import argument_parser, run_main, run_script
    from errors import InputError, LineErrors, check_input_file, compression_of
    from interactions import k_core
    from stats import dataset_stats, row_counts
    from text import clean_text, decode_bytes, markup_text, text_lines

INTER_FIELDS = [("user_id", "token"), ("item_id", "token"), ("timestamp", "float")]
ITEM_FIELDS = [("item_id", "token"), ("title", "token_seq")]


def read_text(path):
    """The text of a plain (uncompressed) input file, UTF-8 else latin-1."""
    kind = compression_of(path)
    if kind is not None:
        raise InputError(path, f"is {kind}-compressed; give the plain text file")
    return decode_bytes(Path(path).read_bytes())[0]


def read_sequences(path):
    """``[(user, [item, ...]), ...]`` in file order; a line without items or a repeated user is an InputError."""
    sequences, first_line = [], {}
    for line_number, line in text_lines(read_text(path)):
        user, *items = line.split()
        where = f"{path}:{line_number}"
        if not items:
            raise InputError(where, f"user {user!r} has no items (a line is: user id, then item ids, white space "
                                    "separated)")
        if user in first_line:
            raise InputError(where, f"user {user!r} is listed again (first on line {first_line[user]})")
        first_line[user] = line_number
        sequences.append((user, items))
    if not sequences:
        raise InputError(path, "holds no sequence (--sequences)")
    return sequences


def sequence_interactions(sequences, duplicates, k):
    """DataFrame ``user_id item_id timestamp``: repeats dropped (or kept), the k-core, then positions 0, 1, 2, ...

    ``counts``: ``duplicates`` (repeated (user, item) pairs in the file, dropped or kept) and ``removed_by_k_core``.
    """
    inter = pd.DataFrame([(user, item) for user, items in sequences for item in items], columns=["user_id", "item_id"])
    repeated = inter.duplicated(["user_id", "item_id"], keep="first")
    counts = {"duplicates": int(repeated.sum())}
    if duplicates == "drop":
        inter = inter[~repeated]
    before = len(inter)
    inter = k_core(inter, k)
    counts["removed_by_k_core"] = before - len(inter)
    inter = inter.assign(timestamp=inter.groupby("user_id", sort=False).cumcount())
    return inter.reset_index(drop=True), counts


def title_rows(path):
    """``(line_number, {column: value})`` of a csv, tsv or JSON lines table with a header; a bad row is an error."""
    if Path(path).suffix in (".jsonl", ".json"):
        for line_number, line in text_lines(read_text(path)):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                raise InputError(f"{path}:{line_number}", "is not a JSON object (--titles)")
            yield line_number, record
        return
    text = read_text(path)
    header_line = text.split("\n", 1)[0]
    delimiter = "\t" if Path(path).suffix == ".tsv" or "\t" in header_line else ","
    reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter)
    header = next(reader, None)
    if not header:
        raise InputError(path, "is empty: a header row is expected (--titles)")
    try:
        for row in reader:
            if not any(field.strip() for field in row):
                continue
            if len(row) != len(header):
                raise InputError(f"{path}:{reader.line_num}", f"{len(row)} fields, the header has {len(header)}")
            yield reader.line_num, dict(zip(header, row))
    except csv.Error as error:
        raise InputError(f"{path}:{reader.line_num}", f"malformed csv ({error})") from None


def read_titles(path, id_column, title_column, wanted):
    """``({item: title}, counts)`` for the ``wanted`` items; the first row of an item wins.

    ``counts``: title rows of other items and repeated rows of one item.
    """
    titles, counts = {}, {"title_rows_of_other_items": 0, "repeated_title_rows": 0}
    for line_number, row in title_rows(path):
        for column, option in ((id_column, "--title-id-column"), (title_column, "--title-column")):
            if column not in row:
                raise InputError(f"{path}:{line_number}", f"has no column {column!r} ({option}); it has "
                                                          f"{sorted(row)}")
        item = clean_text(row[id_column])
        if not item:
            raise InputError(f"{path}:{line_number}", f"empty item id (column {id_column!r})")
        if item in titles:
            counts["repeated_title_rows"] += 1
        elif item not in wanted:
            counts["title_rows_of_other_items"] += 1
        else:
            titles[item] = markup_text(row[title_column])
    return titles, counts


def convert(args, build):
    inter, counts = sequence_interactions(read_sequences(args.sequences), args.duplicates, args.k_core)
    if inter.empty:
        raise InputError(args.sequences, "no interaction is left after --k-core")
    items = sorted(set(inter["item_id"]))
    titles, title_counts = {}, {"title_rows_of_other_items": 0, "repeated_title_rows": 0}
    if args.titles is not None:
        titles, title_counts = read_titles(args.titles, args.title_id_column, args.title_column, set(items))

    name = build.name
    write_atomic_file(build.dir / f"{name}.inter", INTER_FIELDS,
                      zip(inter["user_id"], inter["item_id"], inter["timestamp"]))
    write_atomic_file(build.dir / f"{name}.item", ITEM_FIELDS, ((item, titles.get(item, "")) for item in items))

    stats = dataset_stats(name, inter["user_id"], inter["item_id"], dict.fromkeys(items, ""), {}, LineErrors())
    with_title = sum(1 for item in items if titles.get(item))
    stats.update(counts, **title_counts, duplicates_choice=args.duplicates, timestamps="positions",
                 items_with_title=with_title, items_without_title=len(items) - with_title)
    stats["dropped"] = row_counts(interactions_removed_by_k_core=counts["removed_by_k_core"], **title_counts)
    stats["orphaned"] = row_counts(items_without_title=stats["items_without_title"])
    write_dataset_yaml(build, "sequences.py", "a sequence file (items in order, no times or ratings) with item titles.",
                       {"inter": INTER_FIELDS, "item": ITEM_FIELDS}, None, stats, positions=True)
    return stats


def parse_args(argv=None):
    parser = argument_parser(__doc__, "amazon-beauty-seq", ties=False)
    parser.add_argument("--sequences", required=True, type=Path,
                        help="sequence file: a user id, then the user's item ids in order, one user per line")
    parser.add_argument("--titles", type=Path, default=None,
                        help="item titles: csv, tsv or JSON lines with a header (default: none, titles stay empty)")
    parser.add_argument("--title-id-column", default="item_id", help="the titles' column with the item id")
    parser.add_argument("--title-column", default="title", help="the titles' column with the title")
    parser.add_argument("--k-core", type=int, default=0,
                        help="keep users and items with at least this many interactions, iteratively (<=1: off; "
                             "releases are filtered already)")
    return parser.parse_args(argv)


def main(argv=None):
    """Build the dataset (or find it up to date); returns the statistics, ``rebuilt`` among them.

    A missing or unreadable input, or a malformed line of it, ends in one line ``error: <file>[:<line>]: <problem>``
    and exit status 2.
    """
    return run_main(_main, argv)


def _main(argv):
    args = parse_args(argv)
    check_input_file(args.sequences, "--sequences")
    if args.titles is not None:
        check_input_file(args.titles, "--titles")
    return run_script(args, [args.sequences, args.titles], __file__, convert)


if __name__ == "__main__":
    main()
