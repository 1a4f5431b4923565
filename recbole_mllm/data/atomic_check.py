"""Atomic files (``.inter``, ``.item``, ``.user``) checked line by line before RecBole reads them.

RecBole's reader (pandas, python engine) keeps a line with too few fields as a row of NaNs, and ends a
non-numeric float or a byte outside the encoding in a long traceback that names neither the file nor the line.
``check_atomic_files`` names the first bad line instead: ``<file>:<line>: <why>``, one line.
"""

from pathlib import Path

from recbole.utils import FeatureType

SOURCES = ("inter", "user", "item")


class AtomicFileError(ValueError):
    """A malformed atomic file; the message is ``<file>:<line>: <why>``."""


def loaded_fields(config, source):
    """The fields RecBole loads from ``source``'s file (``load_col``/``unload_col``): None for all of them."""
    load_col, unload_col = config["load_col"], config["unload_col"] or {}
    if load_col is None:
        fields = None
    elif source not in load_col:
        fields = set()
    else:
        fields = None if load_col[source] == "*" else set(load_col[source])
    if source in unload_col and fields is not None:
        fields -= set(unload_col[source])
    return fields


def _header(path, line, separator):
    """``[(field, FeatureType)]`` of a header line."""
    fields = []
    for column in line.split(separator):
        name, colon, ftype = column.partition(":")
        types = [t.value for t in FeatureType]
        if not colon or ftype not in types:
            raise AtomicFileError(f"{path}:1: the header column {column!r} is not <field>:<type> with a type of "
                                  f"{', '.join(types)}")
        fields.append((name, FeatureType(ftype)))
    return fields


def _not_a_number(value, seq_separator, is_seq):
    """The first part of ``value`` that is not a number (``''`` is allowed: RecBole reads it as missing), or None."""
    for part in filter(None, value.split(seq_separator) if is_seq else [value]):
        try:
            float(part)
        except ValueError:
            return part
    return None


def check_atomic_file(path, separator="\t", seq_separator=" ", encoding="utf-8", fields=None):
    """Raise ``AtomicFileError`` for the first line of ``path`` that RecBole would misread.

    Checked: the encoding of every line, the header (``<field>:<type>``), the number of fields of every
    non-blank line, and that the values of the float fields among ``fields`` (None: all) are numbers.
    """
    path = Path(path)
    with open(path, "rb") as lines:
        header = None
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode(encoding).rstrip("\r\n")
            except UnicodeDecodeError as error:
                raise AtomicFileError(f"{path}:{number}: byte {raw[error.start:error.start + 1]!r} at column "
                                      f"{error.start + 1} is not {encoding} (encoding)") from None
            if header is None:
                header = _header(path, line, separator)
                floats = [(i, name, ftype == FeatureType.FLOAT_SEQ) for i, (name, ftype) in enumerate(header)
                          if ftype in (FeatureType.FLOAT, FeatureType.FLOAT_SEQ) and (fields is None or name in fields)]
                continue
            if not line.strip():
                continue
            values = line.split(separator)
            if len(values) != len(header):
                raise AtomicFileError(f"{path}:{number}: {len(values)} fields, but the header has {len(header)} "
                                      f"(field_separator {separator!r})")
            for i, name, is_seq in floats:
                bad = _not_a_number(values[i], seq_separator, is_seq)
                if bad is not None:
                    raise AtomicFileError(f"{path}:{number}: field {name!r} is {bad!r}, not a number "
                                          f"(its type is {header[i][1].value})")


def check_atomic_files(config):
    """Check every atomic file of ``config['dataset']`` that RecBole will read (``check_atomic_file``)."""
    folder = Path(config["data_path"])
    for source in SOURCES:
        path = folder / f"{config['dataset']}.{source}"
        fields = loaded_fields(config, source)
        if path.is_file() and fields != set():
            check_atomic_file(path, config["field_separator"] or "\t", config["seq_separator"] or " ",
                              config["encoding"] or "utf-8", fields)
