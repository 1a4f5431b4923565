"""Where converted weights live, and content hashes of weight files that are cheap to ask for twice.

Every stage cache keys on the model's weight hash, so the hash is asked for on every run. Hashing a
multi-GB checkpoint each time would dominate a short run, so each file's sha256 is remembered in a
small JSON file keyed by the file's absolute path, size and mtime: touching or replacing the file
invalidates the entry, an unchanged file is never read again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from recbole_mllm.fileio import atomic_write, sha256_file

HOME_ENV = "RECBOLE_MLLM_HOME"

# Files whose content changes what a Hugging Face model folder produces: weights, configs, tokenizer,
# processor and chat template.
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model", ".txt", ".jinja")


def cache_home() -> Path:
    """``$RECBOLE_MLLM_HOME`` or ``~/.cache/recbole_mllm``; read at call time, never at import."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "recbole_mllm")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of one file, remembered under ``<home>/hashes`` by (path, size, mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    record = cache_home() / "hashes" / (hashlib.sha1(str(path).encode()).hexdigest() + ".json")
    try:
        cached = json.loads(record.read_text())
        if all(cached.get(k) == v for k, v in key.items()):
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    sha = sha256_file(path)
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(record, json.dumps({**key, "sha256": sha}).encode())
    except OSError:  # a read-only home only costs a re-hash next time
        pass
    return sha


def combined_sha256(files: Iterable[str | os.PathLike], extra: dict | None = None) -> str:
    """One sha256 over several files (by name and content) plus JSON-able settings that change outputs.

    Where the files are installed does not count (entries are sorted by name and content, not by path), so a stage
    cache built on one machine is found on another with the same packages.
    """
    digest = hashlib.sha256()
    for entry in sorted(f"{Path(p).name}:{file_sha256(p)}\n" for p in files):
        digest.update(entry.encode())
    if extra:
        digest.update(json.dumps(extra, sort_keys=True).encode())
    return digest.hexdigest()


def model_files(folder: str | os.PathLike) -> list[Path]:
    """The files of a Hugging Face model folder that change its outputs (see ``MODEL_FILE_SUFFIXES``)."""
    folder = Path(folder)
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    if not any(p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf") for p in files):
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin, *.gguf, ...) in model folder {folder}")
    return files


def local_model_folder(name_or_path: str | os.PathLike) -> Path:
    """The folder holding a model's files: the path itself, or the hub cache snapshot of a hub id."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), local_files_only=True))


def publish_dir(tmp_dir: Path, final_dir: Path) -> Path:
    """Rename a fully written temp folder into place; if another process won the race, keep theirs.

    ``mkdtemp`` folders (and some writers' files) are private; the published folder gets the usual
    umask permissions so a shared cache home serves every user.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in [tmp_dir, *tmp_dir.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    try:
        os.rename(tmp_dir, final_dir)
    except OSError:
        if not final_dir.is_dir():
            raise
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return final_dir
