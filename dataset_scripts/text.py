"""Raw text as RecBole's atomic files can hold it: decoded, on one line, a multi-word label as one token.

RecBole splits a row on tabs and newlines and a ``token_seq`` value on spaces, so control characters become
spaces and a label's inner spaces become ``_``.
"""

import html
import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # tabs, newlines, C0/C1 controls (a latin-1 0x85 is NEL)
_SPACES = re.compile(r"\s+")
_TAG = re.compile(r"<[^>]+>")
_LITERAL_ESCAPE = re.compile(r"\\[nrt]")  # a backslash and n, r or t written out, as some product dumps hold them


def clean_text(value):
    """One line of text: control characters become spaces, runs of white space one space."""
    if value is None:
        return ""
    return _SPACES.sub(" ", _CONTROL.sub(" ", str(value))).strip()


def markup_text(value):
    """One line of product text: HTML entities decoded, tags and written-out ``\\n``/``\\t``/``\\r`` removed (as spaces),
    then :func:`clean_text`. A list or tuple is joined with spaces first."""
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value if v)
    if not value:
        return ""
    return clean_text(_TAG.sub(" ", html.unescape(_LITERAL_ESCAPE.sub(" ", str(value)))))


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
