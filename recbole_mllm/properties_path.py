"""Where the plugin's YAML declarations (``properties/``) are read from.

Apart from ``config`` so that the config check, the search spaces and the stages find the files without importing
``Config`` (and RecBole's) and without an import circle.
"""

import importlib.util
from pathlib import Path


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
