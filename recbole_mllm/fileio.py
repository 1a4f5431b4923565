"""Content hashes and all-or-nothing file writes: what every cache of the plugin stands on.

It imports nothing from the package (and nothing heavy), so any module may use it, the dataset scripts
too, without an import circle or loading RecBole.
"""

import hashlib
import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Union


def canonical_json(obj) -> str:
    """The one JSON spelling of ``obj`` that is hashed: sorted keys, no whitespace, UTF-8 kept."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Union[str, os.PathLike]) -> str:
    """Streamed sha256 of a file (dataset files and model weights of any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_output(path, mode="wb", **open_kwargs):
    """A file object to write ``path`` through, so that ``path`` holds either its old content or all of the new.

    The block writes a temp file beside ``path``; when it ends without error the file is flushed, fsynced and
    renamed over ``path`` (and the folder fsynced, so the rename is durable too); on an error it is removed.
    The temp name carries the pid and a random part, so processes writing the same file never share one, also
    on other hosts of a shared filesystem; a killed process leaves ``<name>.tmp<pid>-<hex>``, which the stage cache
    clears.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write(path, data: bytes) -> None:
    """Write ``data`` to ``path`` all or nothing (see :func:`atomic_output`)."""
    with atomic_output(path) as f:
        f.write(data)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
