"""Hyper-parameter search spaces: ``properties/tuning/<Model>.yaml``, in RecBole's ``params_dict`` layout.

RecBole's ``HyperTuning`` reads a space as ``{type: {key: values}}`` with the types ``choice``,
``uniform``, ``quniform`` and ``loguniform``; the files here use that layout (YAML, so nothing is
``eval``-ed). One addition: a ``choice`` whose options are mappings sets several keys together (e.g.
``hidden_size`` with its ``inner_size``, or SASRec's two dropouts at one value), which keeps the
spaces of different models the same size even where their models name a setting differently.
"""

from pathlib import Path

import yaml

from recbole_mllm.properties_path import properties_dir

SPACE_TYPES = ("choice", "uniform", "quniform", "loguniform")


def search_space_file(model):
    """``properties/tuning/<model>.yaml`` (it may not exist)."""
    return properties_dir() / "tuning" / f"{model}.yaml"


def load_search_space(path):
    """The space in ``path``, validated: ``{type: {name: values}}``; a bad file is one error naming it."""
    path = Path(path)
    try:
        space = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: cannot read the search space ({error})") from None
    for space_type, entries in space.items():
        if space_type not in SPACE_TYPES:
            raise ValueError(f"{path}: unknown search-space type '{space_type}' (use {', '.join(SPACE_TYPES)})")
        if not isinstance(entries, dict):
            raise ValueError(f"{path}: '{space_type}' must map parameter names to values")
        for name, values in entries.items():
            if space_type == "choice" and not (isinstance(values, list) and values):
                raise ValueError(f"{path}: choice '{name}' needs a non-empty list of options")
            if space_type != "choice" and not (isinstance(values, list) and len(values) in (2, 3)):
                raise ValueError(f"{path}: {space_type} '{name}' needs [low, high] (quniform: [low, high, q])")
    return space


def space_keys(space):
    """Every config key a space sets (keys inside mapping options included), in file order."""
    keys = []
    for entries in space.values():
        for name, values in entries.items():
            options = values if isinstance(values, list) else []
            mapped = [key for option in options if isinstance(option, dict) for key in option]
            keys += list(dict.fromkeys(mapped)) if mapped else [name]
    return list(dict.fromkeys(keys))


def search_space_keys(model):
    """The keys of ``model``'s shipped search space, or ``[]`` when it ships none."""
    path = search_space_file(model)
    return space_keys(load_search_space(path)) if path.is_file() else []


def space_points(space):
    """Every setting of a ``choice``-only space, as flat ``{key: value}`` dicts (mapping options flattened)."""
    if set(space) - {"choice"}:
        raise ValueError("only a choice-only space has a finite list of settings")
    points = [{}]
    for name, options in space.get("choice", {}).items():
        points = [{**point, **(option if isinstance(option, dict) else {name: option})}
                  for point in points for option in options]
    return points
