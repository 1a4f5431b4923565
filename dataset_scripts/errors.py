"""Bad inputs: a file a converter cannot use ends the run in one line, a malformed line is skipped and counted.

A name that comes from raw data is never let out of its folder as a path (:func:`contained_path`).
"""

import os
import sys
from pathlib import Path, PureWindowsPath


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
