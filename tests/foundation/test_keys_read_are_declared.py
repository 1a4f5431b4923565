"""Every config key the plugin's code reads (``config["key"]``) is declared in a properties YAML or RecBole's."""

import re
from pathlib import Path

from recbole_mllm.config_check import known_keys

PACKAGE = Path(__file__).resolve().parents[2] / "recbole_mllm"
READ = re.compile(r"""config\[["']([A-Za-z_][A-Za-z0-9_]*)["']\]""")


def test_every_key_the_code_reads_is_declared():
    read = {(key, path.relative_to(PACKAGE).as_posix())
            for path in PACKAGE.rglob("*.py") for key in READ.findall(path.read_text(encoding="utf-8"))}
    assert len(read) > 50  # the scan finds the reads (it would pass vacuously on a wrong pattern)
    known = known_keys()
    undeclared = sorted((key, where) for key, where in read if key not in known)
    assert not undeclared, f"read but declared in no YAML: {undeclared}"
