"""Command-line ``--key=value`` values, read without running them, and ``--help`` for every command.

RecBole turns each command-line value into a Python object with ``eval``, so
``--x=__import__("os").system(...)`` would run. :func:`parse_cli_value` reads the same values
(numbers, ``None``, ``True``, lists, tuples, dicts, quoted strings) with ``ast.literal_eval``, which
only accepts literals; anything else stays the string it was typed as.
"""

from __future__ import annotations

import argparse
import ast
import sys
from typing import Mapping, Optional, Sequence

HELP_FLAGS = ("-h", "--help")
_KINDS = (str, int, float, bool, list, tuple, dict)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """argparse ``--help`` with the docstring kept as written and every option's default shown."""


def parse_cli_value(text: str):
    """The value of a ``--key=value`` string: a Python literal where it is one, else the string itself.

    Same results as RecBole's ``eval`` for every literal (``1e-3``, ``None``, ``[10, 20]``, ``'a b'``),
    ``true``/``false`` in any case as booleans (as RecBole does), and never runs code: a call, a name
    or an attribute (``__import__("os").system("id")``, ``ml-1m``) is returned as the string.
    """
    if not isinstance(text, str):
        return text
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        if text.strip().lower() in ("true", "false"):
            return text.strip().lower() == "true"
        return text
    # a set, bytes or complex literal stays text, as RecBole keeps it
    return value if value is None or isinstance(value, _KINDS) else text


def safe_cmd_args(args: Sequence[str]) -> list[str]:
    """``--key=value`` arguments with each value re-spelled as the literal :func:`parse_cli_value` read.

    RecBole's ``Config`` evaluates what it gets; the literal spelling (``repr``) gives it back the
    same value and nothing to run, whether ``Config`` uses ``eval`` or :func:`parse_cli_value`.
    An argument not of the form ``--key=value`` is passed on unchanged for ``Config`` to reject.
    """
    out = []
    for arg in args:
        key, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        out.append(f"--{key}={parse_cli_value(value)!r}" if key and sep else arg)
    return out


def split_own_keys(args: Sequence[str], defaults: Mapping) -> tuple[dict, list[str]]:
    """A script's own ``--key=value`` arguments (the keys of ``defaults``), read by :func:`parse_cli_value` with
    the defaults filled in, and the other arguments, for ``Config``: a script's keys are no config keys, and
    ``Config`` rejects a key it does not know."""
    own, rest = dict(defaults), []
    for arg in args:
        key, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if sep and key in defaults:
            own[key] = parse_cli_value(value)
        else:
            rest.append(arg)
    return own, rest


def config_file_list(value: Optional[str]) -> Optional[list[str]]:
    """``--config_files``: YAML paths separated by spaces or commas, as every command takes them (None: none)."""
    return value.replace(",", " ").split() if value else None


def wants_help(argv: Sequence[str]) -> bool:
    return any(arg in HELP_FLAGS for arg in argv)


def help_text(doc: str, defaults: Optional[Mapping] = None) -> str:
    """A command's ``--help``: its module docstring, then each config key it reads with its default."""
    text = (doc or "").strip() + "\n"
    if defaults:
        width = max(map(len, defaults))
        text += "\nKeys read (--key=value) and their defaults:\n"
        text += "".join(f"  {key:<{width}}  {defaults[key]!r}\n" for key in sorted(defaults))
    return text


def exit_on_help(argv: Sequence[str], doc: str, defaults: Optional[Mapping] = None) -> None:
    """Print :func:`help_text` and exit 0 when ``argv`` holds ``-h`` or ``--help``."""
    if wants_help(argv):
        sys.stdout.write(help_text(doc, defaults))
        raise SystemExit(0)


def one_line(error: BaseException) -> str:
    """An error's message on one line, for ``error: ...`` on stderr (a YAML parser's message spans several)."""
    return " ".join(str(error).split()) or type(error).__name__


def input_error(error: BaseException, debug: bool) -> int:
    """A command's answer to an input error: ``error: <message> (--debug shows the traceback)`` on one line of
    stderr and exit status 2; with ``debug`` the error is raised again, traceback and all."""
    if debug:
        raise error
    print(f"error: {one_line(error)} (--debug shows the traceback)", file=sys.stderr)
    return 2
