"""Idempotent builds: a dataset folder is rebuilt only when what it was built from changes.

A build is skipped when ``.fingerprint`` matches the inputs, the arguments and the code, so a second run
does nothing; any change rebuilds (no cache whose key misses a parameter).
"""

import hashlib
import json
from pathlib import Path

if __package__:
    from .stats import print_stats
else:  # run as a script: python dataset_scripts/<script>.py
    from stats import print_stats

FINGERPRINT_FILE = ".fingerprint"
CONVERTERS = ("amazon.py", "movielens.py", "sequences.py")  # each build hashes its own converter's source, not the others'


def shared_code():
    """The modules every converter runs (this folder's, the converters aside): part of each build's fingerprint."""
    return sorted(p for p in Path(__file__).parent.glob("*.py") if p.name not in CONVERTERS)


def _describe_path(path):
    """What identifies an input's content cheaply: size and mtime of the file or of every file below."""
    path = Path(path).resolve()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return [str(path), [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]]
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def fingerprint(arguments, inputs, code_files):
    """Digest of the arguments, the inputs (sizes, mtimes) and the code (the shared modules and the converter's)."""
    digest = hashlib.sha256()
    code = [*shared_code(), *map(Path, code_files)]
    digest.update(json.dumps(sorted(arguments.items()), default=str).encode())
    digest.update(json.dumps([_describe_path(p) for p in inputs if p is not None]).encode())
    for path in code:
        digest.update(path.read_bytes())
    return digest.hexdigest()


class Build:
    """One dataset folder, ``<output>/<name>``, rebuilt only when its fingerprint changes."""

    def __init__(self, output, name, fingerprint_value, outputs):
        self.dir = Path(output) / name
        self.name = name
        self.fingerprint = fingerprint_value
        self.outputs = [self.dir / o for o in (*outputs, "stats.json")]

    def up_to_date(self):
        marker = self.dir / FINGERPRINT_FILE
        return (
            marker.is_file()
            and marker.read_text().strip() == self.fingerprint
            and all(path.exists() for path in self.outputs)
        )

    def begin(self):
        """Invalidate the folder first: an interrupted build is never taken for a finished one."""
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / FINGERPRINT_FILE).unlink(missing_ok=True)

    def finish(self, stats):
        with open(self.dir / "stats.json", "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=2, ensure_ascii=False)
            f.write("\n")
        (self.dir / FINGERPRINT_FILE).write_text(self.fingerprint + "\n")

    def stored_stats(self):
        return json.loads((self.dir / "stats.json").read_text(encoding="utf-8"))


def run_build(build, convert, force=False):
    """Convert unless ``build`` is up to date; print the statistics either way and return them.

    ``convert(build)`` writes the files into ``build.dir`` and returns the statistics. The result
    carries ``"rebuilt": False`` when there was nothing to do.
    """
    if build.up_to_date() and not force:
        print(f"{build.dir} is up to date (same inputs, arguments and code): nothing to do; --force rebuilds")
        stats = build.stored_stats()
        print_stats(stats)
        return {**stats, "rebuilt": False}
    build.begin()
    stats = convert(build)
    build.finish(stats)
    print_stats(stats)
    print(f"wrote {build.dir}")
    return {**stats, "rebuilt": True}
