"""Versioned prompt templates for the LLM stages, shipped as package data.

Prompt wording changes what a stage produces, so it lives in files, one per version
(``<stage>_<version>.txt``, e.g. ``item_fusion_v1.txt``), never in code branches: the stages' templates here,
the ranker's beside its model (:data:`FOLDERS`). A template
file is a few ``[section]`` blocks (lines before the first one are comments); each block is a
``str.format`` string whose ``{placeholders}`` the stage fills. The template's name and the sha256 of
its text go into the stage cache manifest, so editing a template, or naming a new version, builds a
new cache instead of reusing summaries written with other wording. A path to a ``.txt`` file of the
same format works in place of a version, for trying a prompt without touching the package.
"""

from __future__ import annotations

import hashlib
import re
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

_SECTION = re.compile(r"^\[([a-z_]+)\]\s*$")

FOLDERS = {"ranker": ("model", "mllmsrec", "prompts")}
"""Where a stage's templates live when not in this folder, as a path inside ``recbole_mllm``. A template's name and
the hash of its whole text, comments included, are its identity, so a moved template is never edited: the
ranker's still name their module as it was when they were written."""


@dataclass(frozen=True)
class PromptTemplate:
    """The sections of one template version and the hash that identifies its exact text."""

    name: str
    sections: dict
    sha256: str

    def render(self, section: str, **values) -> str:
        if section not in self.sections:
            raise KeyError(f"prompt template {self.name!r} has no [{section}] section "
                           f"(it has {sorted(self.sections)})")
        return self.sections[section].format(**values)

    def identity(self) -> dict:
        """The manifest entry: what makes two templates produce the same prompts."""
        return {"name": self.name, "sha256": self.sha256}

    def require(self, placeholders: dict) -> "PromptTemplate":
        """Check that each section named in ``placeholders`` exists and uses exactly those fields."""
        for section, fields in placeholders.items():
            if section not in self.sections:
                raise ValueError(f"prompt template {self.name!r} lacks the [{section}] section")
            used = {f for _, f, _, _ in string.Formatter().parse(self.sections[section]) if f is not None}
            if used != set(fields):
                raise ValueError(f"[{section}] of prompt template {self.name!r} uses {sorted(used)}; "
                                 f"it must use exactly {sorted(fields)}")
        return self


def parse_template(name: str, text: str) -> PromptTemplate:
    sections: dict = {}
    current = None
    for line in text.splitlines():
        match = _SECTION.match(line)
        if match:
            current = match.group(1)
            if current in sections:
                raise ValueError(f"prompt template {name!r} repeats the [{current}] section")
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    if not sections:
        raise ValueError(f"prompt template {name!r} has no [section] lines")
    return PromptTemplate(name=name, sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
                          sections={k: "\n".join(v).strip("\n") for k, v in sections.items()})


def _folder(stage: str):
    """The folder of ``stage``'s templates (read as package data, so an installed wheel finds them too)."""
    if stage not in FOLDERS:
        return resources.files(__name__)
    folder = resources.files("recbole_mllm")
    for part in FOLDERS[stage]:
        folder = folder / part
    return folder


def load_prompt(stage: str, version: str) -> PromptTemplate:
    """The template ``<stage>_<version>.txt`` of the package (:data:`FOLDERS`), or the file ``version`` if it is a
    path."""
    version = str(version)
    if version.endswith(".txt"):
        path = Path(version)
        if not path.is_file():
            raise FileNotFoundError(f"prompt template file {path} does not exist")
        return parse_template(path.stem, path.read_text(encoding="utf-8"))
    name = f"{stage}_{version}"
    folder = _folder(stage)
    resource = folder / f"{name}.txt"
    if not resource.is_file():
        known = sorted(p.name[len(stage) + 1:-4] for p in folder.iterdir()
                       if p.name.startswith(f"{stage}_") and p.name.endswith(".txt"))
        raise ValueError(f"no prompt template {name!r}; versions of {stage!r}: {known}")
    return parse_template(name, resource.read_text(encoding="utf-8"))
