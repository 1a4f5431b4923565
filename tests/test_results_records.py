"""The run records kept in results/ stay readable by the comparison, pair (same candidates), and are described.

They are what later runs are compared with, so a change to the record format or the comparison that cannot read
them any more fails here rather than in the next GPU hold.
"""

import csv
import fnmatch
import re
from pathlib import Path

import pytest

from recbole_mllm.comparison.__main__ import main as compare

RESULTS = Path(__file__).resolve().parents[1] / "results"
DATASETS = sorted(p for p in RESULTS.iterdir() if p.is_dir()) if RESULTS.is_dir() else []


@pytest.mark.parametrize("dataset", DATASETS, ids=lambda p: p.name)
def test_kept_records_compare_with_paired_tests(dataset, tmp_path):
    assert compare([str(dataset), f"--output={tmp_path}"]) == 0  # refuses records of other candidates
    labels = {row["model"] for row in csv.DictReader((tmp_path / "comparison.csv").open())}
    if len(labels) > 1:  # a dataset with one model's records has nothing to pair yet
        rows = list(csv.DictReader((tmp_path / "comparison_pvalues.csv").open()))
        assert rows and all(row["p_value"] not in ("", None) for row in rows if row["protocol"] == "full")
    for llm in {label for label in labels if label.startswith("MLLMSRec") and "(" not in label}:
        assert {f"{llm} (first stage)", f"{llm} (LLM alone)"} <= labels  # what the LLM adds, from the same run


@pytest.mark.parametrize("dataset", DATASETS, ids=lambda p: p.name)
def test_every_kept_record_has_its_provenance(dataset):
    readme = (RESULTS / "README.md").read_text(encoding="utf-8")
    section = readme.split(f"## {dataset.name}\n", 1)
    assert len(section) == 2, f"results/README.md has no section '## {dataset.name}'"
    patterns = re.findall(r"^\| `([^`]+)` \|", section[1].split("\n## ", 1)[0], flags=re.MULTILINE)
    for folder in sorted(p.name for p in dataset.iterdir() if (p / "record.json").is_file()):
        assert any(fnmatch.fnmatch(folder, pattern) for pattern in patterns), \
            f"results/{dataset.name}/{folder}: no row of results/README.md says which commit, machine and command made it"
