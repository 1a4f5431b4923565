"""Which config keys exist and what type each has, so a misspelt key or a wrong value fails at start-up.

RecBole ignores a key it does not know (``--learning_rat=0.5`` trains with the default rate) and reads a
value of the wrong type only when it first uses it, minutes later. The known keys are those the YAML files
declare: RecBole's ``properties/`` (every model's, since one ``--key`` of a multi-model command applies to
every model) and the plugin's (the stages' keys in ``stages.yaml``), plus the few keys RecBole reads that none
of its files declares. The files are read as text, so no stage module (nor torch) is imported to check a key.
A key's types are those the ``# (type) meaning.`` comments of its declarations name (a float key takes an int;
an int key no bool; None only where a declaration's default is ``~`` or its type says None); a key no comment
types, or one typed in words that name no type, is not type-checked. A number's type may carry a range
(``(int ≥ 1)``, ``(float > 0 or None)``) and a string's its choices (``(str: last | all)``), checked as well.
``check_config_keys: False`` turns the check off (a custom model with keys of its own).

A model class may also name keys it reads under other names now (``renamed_keys``: ``{old: (new, ...)}``, e.g.
FusedSASRec's one ``dropout_prob`` became SASRec's two dropouts): setting an old key for that model is an error naming
the new ones (:func:`check_renamed_keys`), whatever ``check_config_keys`` says, since another model may still declare it.
"""

import difflib
import functools
import operator
import re
from pathlib import Path

import recbole
import yaml

from recbole_mllm.properties_path import properties_dir
from recbole_mllm.search_space import load_search_space, space_keys

RECBOLE_RUNTIME_KEYS = ("model", "dataset", "local_rank", "nproc", "world_size", "offset", "ip",
                        "port", "device", "single_spec", "MODEL_TYPE", "MODEL_INPUT_TYPE", "eval_type",
                        "valid_neg_sample_args", "test_neg_sample_args", "encoding")
"""Keys RecBole reads or sets at run time that none of its YAML files declares (a distributed run passes the
rank ones in ``config_dict``; its dataset reads the atomic files in ``encoding``, as the stages do)."""

_TYPES = {"int": (int,), "float": (float, int), "str": (str,), "bool": (bool,), "list": (list, tuple),
          "tuple": (tuple,), "dict": (dict,)}
"""What a declared type accepts: a float key takes an int, a list key the tuple ``--key=1,2`` reads as."""
_SYNONYMS = {"string": "str"}
_NONE_WORDS = ("none", "optional")
_DECLARATION = re.compile(r"^([A-Za-z_]\w*)\s*:.*?#\s*\(([^)]*)\)")
_BOUND = re.compile(r"^(int|float)\s*(≥|>=|>|≤|<=|<)\s*(-?\d+(?:\.\d+)?)$")
_OPERATORS = {"≥": operator.ge, ">=": operator.ge, ">": operator.gt, "≤": operator.le, "<=": operator.le,
              "<": operator.lt}


class ConfigKeyError(ValueError):
    """An unknown config key or a value of the wrong type, in one line naming the key and where it came from."""


class Declaration:
    """A known key: the types its declarations allow (empty: not checked), whether None is allowed, and the
    range of its numbers and the choices of its strings (any declaration's)."""

    def __init__(self):
        self.types, self.none_ok, self.untyped = [], False, False
        self.bounds, self.choices = [], []  # [(symbol, number)], [allowed string]

    def declare(self, type_text, default):
        """Add one file's declaration: its ``(type)`` comment (None: no comment) and its default value.
        Files that type a key differently (one model's ``reg_weight`` is a float, another's a list) allow
        either type: a value one of them accepts is never rejected."""
        self.none_ok = self.none_ok or default is None
        if type_text is None:
            return
        parsed = _parse_type(type_text)
        if parsed is None:
            self.untyped = True
        else:
            names, none_ok, bounds, choices = parsed
            self.types += [name for name in names if name not in self.types]
            self.none_ok = self.none_ok or none_ok
            self.bounds += [b for b in bounds if b not in self.bounds]
            self.choices += [c for c in choices if c not in self.choices]

    def accepts(self, value):
        if value is None and self.none_ok:
            return True
        if self.untyped or not self.types:
            return True
        if isinstance(value, bool) and "bool" not in self.types:  # True is an int to Python, not to a config
            return False
        if not any(isinstance(value, _TYPES[name]) for name in self.types):
            return False
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return all(_OPERATORS[symbol](value, number) for symbol, number in self.bounds)
        return not (isinstance(value, str) and self.choices) or value in self.choices

    def expected(self):
        words = []
        for name in self.types:
            if name in ("int", "float") and self.bounds:
                name += " " + " and ".join(f"{symbol} {number:g}" for symbol, number in self.bounds)
            elif name == "str" and self.choices:
                name += " (one of " + ", ".join(self.choices) + ")"
            words.append(name)
        return " or ".join(words + (["None"] if self.none_ok else []))


def _parse_type(text):
    """``(type names, none_ok, bounds, choices)`` of a comment's type (``int``, ``list of int``, ``str or None``,
    ``str, optional``, ``int ≥ 1``, ``str: last | all``); None when a word of it is not a type (the key is then
    not checked)."""
    text, colon, choice_text = text.partition(":")
    choices = [c.strip() for c in choice_text.split("|") if c.strip()] if colon else []
    names, none_ok, bounds = [], False, []
    for word in re.split(r"\s+or\s+|,|\|", text.strip().lower()):
        word = word.strip().split(" of ")[0].strip()
        bound = _BOUND.match(word)
        if bound:
            word = bound.group(1)
            bounds.append((bound.group(2), float(bound.group(3))))
        word = _SYNONYMS.get(word, word)
        if word in _NONE_WORDS:
            none_ok = True
        elif word in _TYPES:
            names.append(word)
        else:
            return None
    return (names, none_ok, bounds, choices) if names else None


def _declare_file(declarations, path):
    """Every top-level key of the YAML ``path``, with the type its comment gives and its default."""
    text = Path(path).read_text(encoding="utf-8")
    values = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    comments = dict(m.groups() for m in map(_DECLARATION.match, text.splitlines()) if m)
    for key, value in values.items():
        declarations.setdefault(key, Declaration()).declare(comments.get(key), value)


@functools.lru_cache(maxsize=None)
def known_keys():
    """``{key: Declaration}`` of every key a user may set, built once per process from the declaring files."""
    declarations = {}
    for path in sorted((Path(recbole.__file__).parent / "properties").rglob("*.yaml")):
        if path.name not in ("url.yaml", "kg_url.yaml"):  # dataset download addresses, not config keys
            _declare_file(declarations, path)
    for path in sorted(properties_dir().rglob("*.yaml")):
        if path.parent.name == "tuning":
            for key in space_keys(load_search_space(path)):
                declarations.setdefault(key, Declaration())
        else:
            _declare_file(declarations, path)
    for key in (*RECBOLE_RUNTIME_KEYS, "per_model"):
        declarations.setdefault(key, Declaration())
    return declarations


def check_config(given):
    """Raise :class:`ConfigKeyError` for the first unknown key or wrong-typed value of ``given``, a list of
    ``(key, value, origin)`` with origin in words (``the command line``, a file name)."""
    known = known_keys()
    for key, value, origin in given:
        declaration = known.get(key)
        if declaration is None:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigKeyError(f"unknown config key '{key}' (from {origin}){hint}")
        if not declaration.accepts(value):
            raise ConfigKeyError(f"config key '{key}' expects {declaration.expected()}, got {value!r} "
                                 f"({type(value).__name__}) (from {origin})")


def check_renamed_keys(model_class, given):
    """Raise :class:`ConfigKeyError` for a key of ``given`` (``(key, value, origin)`` set for this model) that
    ``model_class`` reads under other names (its ``renamed_keys``), naming them."""
    renamed = getattr(model_class, "renamed_keys", None) or {}
    for key, _, origin in given:
        if key in renamed:
            raise ConfigKeyError(f"config key '{key}' (from {origin}) is not read by {model_class.__name__}: set "
                                 f"{' and '.join(renamed[key])} instead (a key for another model of the command goes "
                                 f"in its per_model section)")
