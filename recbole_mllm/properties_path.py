"""Where the plugin's YAML declarations (``properties/``) are read from, and the defaults they (and RecBole's own
YAML files) declare.

Apart from ``config`` so that the config check, the search spaces, the stages and the split rules find the files
without importing ``Config`` (and RecBole's) and without an import circle. A default is declared once, in a YAML
file; code that needs it outside a RecBole ``Config`` reads it from there.
"""

import functools
import importlib.util
from pathlib import Path

import yaml


def properties_dir():
    """Folder of the plugin's YAML files: ``properties/`` of the checkout this package is imported from (so a
    second worktree on ``PYTHONPATH`` reads its own files, not those an editable install maps), else the
    installed package data."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "setup.py").is_file() and (checkout / "properties" / "overall.yaml").is_file():
        return checkout / "properties"
    spec = importlib.util.find_spec("recbole_mllm.properties")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent / "properties"


@functools.lru_cache(maxsize=None)
def _declarations(path):
    return yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}


def declared(file_name, *keys):
    """``{key: default}`` of ``keys`` as ``properties/<file_name>`` declares them (a key it lacks is a KeyError)."""
    values = _declarations(str(properties_dir() / file_name))
    return {key: values[key] for key in keys}


def recbole_declared(*keys):
    """``{key: default}`` of ``keys`` as RecBole's own ``properties/overall.yaml`` or ``properties/dataset/sample.yaml``
    declares them (found without importing RecBole)."""
    root = Path(list(importlib.util.find_spec("recbole").submodule_search_locations)[0]) / "properties"
    values = {**_declarations(str(root / "overall.yaml")), **_declarations(str(root / "dataset" / "sample.yaml"))}
    return {key: values[key] for key in keys}
