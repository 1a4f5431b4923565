"""A content-addressed, sharded, resumable on-disk cache for the LLM stages.

The item-fusion and user-profile stages run a (multimodal) LLM once per key and keep, per key, the
generated text, a float embedding of it and a little metadata. Those runs are long (hours on a large
dataset), so the cache is built to be trusted and resumed:

* **Content-addressed.** The folder is ``<root>/<stage>/<key_hash>/`` where ``key_hash`` is the
  sha256 of the canonical JSON of a manifest holding everything that changes the output (model
  identity with its weight hash, prompt template name and text hash, generation settings, dataset
  fingerprint, stage parameters, the key set and the shard layout). A change of any of them lands
  in another folder, so an old cache is never silently reused; a reader that finds no folder for its
  configuration gets an error naming the command that builds it and how the caches that do exist
  differ from what it asked for.
* **Keyed by raw tokens.** Keys are strings (a raw item token from the ``.item`` file), ints, or
  tuples of them (``(raw user token, number of history items covered)``), never RecBole's remapped
  ids, which change with filtering.
* **Deterministic shards.** The sorted key list is cut into shards of ``shard_size`` keys (or of
  ``shard_size`` groups of keys sharing their first element, so a user's recurrent chain of
  summaries stays in one shard). A shard is computed in one piece, never batched with another
  shard, so recomputing it gives the same inputs in the same batches. Each shard is three files,
  each written atomically (temp file, fsync, ``os.replace``): ``shard-NNNNN.safetensors`` (the
  ``embeddings`` tensor ``[n, H]`` float32), ``shard-NNNNN.json`` (keys, texts, metadata) and, last,
  ``shard-NNNNN.index.json`` with the sha256 of the other two. A shard is done when its index exists
  and the checksums and keys match; anything else (missing, partial, truncated, flipped bytes) is
  redone with a warning naming the shard.
* **Byte-identical resume.** No file in the folder holds a timestamp, a pid or a host name, and every
  JSON file is written with sorted keys, so a run killed at any point and resumed leaves exactly the
  bytes of an uninterrupted run (given a backend that is deterministic for the same batch, as greedy
  decoding on one kind of device is).
* **Concurrent runs.** Each shard is computed under its own lock file (``filelock``, in the folder
  ``<key_hash>.locks`` beside the cache): a second run on the same cache skips the shards the first
  one holds, waits for them at the end and takes over any whose run died, so every shard is
  computed once.
* **Several processes.** Under ``torchrun`` (an initialised ``torch.distributed`` process group)
  rank ``r`` of ``w`` computes the shards ``i`` with ``i % w == r``; after a barrier rank 0 checks
  every shard and writes ``complete.json`` (record count, embedding size, each shard's index
  checksum, counts of the metadata values), then a second barrier releases all ranks.

Layout of a finished cache::

    <root>/<stage>/<key_hash>/manifest.json         what the cache holds (hash of it = folder name)
                              shard-00000.safetensors
                              shard-00000.json
                              shard-00000.index.json
                              ...
                              complete.json         written last, by rank 0
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Optional, Sequence, Union

import torch
from filelock import FileLock, Timeout
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm import tqdm

from recbole_mllm import distributed
from recbole_mllm.fileio import atomic_write, canonical_json, sha256_bytes, sha256_file

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Version of this on-disk layout; part of every manifest, so a layout change never reads old files."""

Key = Union[str, int, tuple]


class Record(NamedTuple):
    """What the cache holds for one key."""

    text: str
    embedding: torch.Tensor  # [H] float32
    meta: dict


class ShardOutput(NamedTuple):
    """What a stage's compute function returns for the keys of one shard, in the same order."""

    texts: list[str]
    embeddings: torch.Tensor  # [n H]
    metas: list[dict]


class StageCacheError(RuntimeError):
    """The cache asked for is missing, incomplete or damaged; the message says how to build it."""


def _json_bytes(obj, indent: Optional[int] = 1) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=indent, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def _to_json_key(key: Key):
    return list(key) if isinstance(key, tuple) else key


def _from_json_key(key) -> Key:
    return tuple(key) if isinstance(key, list) else key


def _check_key(key) -> None:
    parts = key if isinstance(key, tuple) else (key,)
    if not parts or not all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in parts):
        raise TypeError(f"cache keys are str, int or non-empty tuples of them (raw tokens, counts); got {key!r}")


class StageCache:
    """The cache of one stage for one configuration and one key set.

    Args:
        root: the folder holding every stage's caches (config key ``stage_cache_dir``).
        stage: the stage name (``item_fusion``, ``user_profile``); also the first path component.
        manifest: everything, besides the keys and the shard layout, that changes the output; must be
            JSON-serialisable (tuples become lists). The cache adds ``stage``, ``cache`` (format and
            layout) and ``keys`` (count and sha256 of the sorted key list) before hashing.
        keys: every key the stage produces a record for; sorted here, duplicates are an error.
        shard_size: keys (or groups, see ``group_by_first``) per shard.
        group_by_first: keys are tuples and all keys with the same first element go to one shard,
            ``shard_size`` such groups per shard (a user's chain of window summaries is computed
            inside one shard).
        command: the command line that builds this cache, quoted in every "not built" error.
    """

    def __init__(self, root: Union[str, Path], stage: str, manifest: dict, keys: Iterable[Key],
                 shard_size: int = 256, group_by_first: bool = False, command: Optional[str] = None):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        keys = list(keys)
        for key in keys:
            _check_key(key)
            if group_by_first and not isinstance(key, tuple):
                raise TypeError(f"group_by_first needs tuple keys; got {key!r}")
        try:
            self.keys: list[Key] = sorted(keys)
        except TypeError as e:
            raise TypeError(f"cache keys of stage {stage!r} must all have the same shape to be sorted: {e}") from None
        duplicates = [a for a, b in zip(self.keys, self.keys[1:]) if a == b]
        if duplicates:
            raise ValueError(f"duplicate keys for stage {stage!r}: {duplicates[:5]}")

        self.stage = stage
        self.command = command or f"python -m recbole_mllm.stages.{stage} --dataset=<dataset>"
        self.shard_size = shard_size
        self.group_by_first = group_by_first
        self.manifest = json.loads(canonical_json({
            **manifest,
            "stage": stage,
            "cache": {"format": CACHE_FORMAT, "shard_size": shard_size,
                      "shard_unit": "first_element" if group_by_first else "key"},
            "keys": {"n": len(self.keys),
                     "sha256": sha256_bytes(canonical_json([_to_json_key(k) for k in self.keys]).encode())},
        }))
        self.key_hash = sha256_bytes(canonical_json(self.manifest).encode())[:16]
        self.root = Path(root)
        self.path = self.root / stage / self.key_hash
        self.shards: list[list[Key]] = self._cut_shards()

    def _cut_shards(self) -> list[list[Key]]:
        if not self.group_by_first:
            return [self.keys[i:i + self.shard_size] for i in range(0, len(self.keys), self.shard_size)]
        groups: list[list[Key]] = []
        for key in self.keys:  # sorted, so each group is contiguous
            if groups and groups[-1][0][0] == key[0]:
                groups[-1].append(key)
            else:
                groups.append([key])
        return [[key for group in groups[i:i + self.shard_size] for key in group]
                for i in range(0, len(groups), self.shard_size)]

    # ------------------------------------------------------------------ file names and checks
    def _files(self, index: int) -> tuple[Path, Path, Path]:
        stem = f"shard-{index:05d}"
        return (self.path / f"{stem}.safetensors", self.path / f"{stem}.json", self.path / f"{stem}.index.json")

    def _shard_problem(self, index: int) -> Optional[str]:
        """Why shard ``index`` is not done ('missing' when none of its files exist), or None if done."""
        tensors, records, index_file = self._files(index)
        if not index_file.exists():
            return "partial (no index)" if tensors.exists() or records.exists() else "missing"
        try:
            checksums = json.loads(index_file.read_bytes())["files"]
            for path in (tensors, records):
                if not path.exists():
                    return f"{path.name} is missing"
                if sha256_file(path) != checksums[path.name]:
                    return f"{path.name} does not match its checksum"
            stored_keys = [_from_json_key(k) for k in json.loads(records.read_bytes())["keys"]]
        except (ValueError, KeyError, TypeError) as e:
            return f"unreadable ({type(e).__name__}: {e})"
        if stored_keys != self.shards[index]:
            return "holds other keys than its slice of the key list"
        return None

    def is_complete(self) -> bool:
        """Whether ``complete.json`` exists and every shard's index still matches it (cheap check)."""
        marker = self.path / "complete.json"
        if not marker.exists():
            return False
        try:
            expected = json.loads(marker.read_bytes())["shards"]
        except (ValueError, KeyError):
            return False
        index_files = [self._files(i)[2] for i in range(len(self.shards))]
        return len(expected) == len(index_files) and all(
            path.exists() and sha256_file(path) == expected.get(path.name) for path in index_files)

    # ------------------------------------------------------------------ building
    def build(self, compute: Callable[[list[Key]], ShardOutput], progress: bool = True,
              rank: Optional[int] = None, world_size: Optional[int] = None) -> "StageCache":
        """Compute every shard this process owns that is not done yet, then (rank 0) mark completion.

        Args:
            compute: maps the keys of one shard to their texts, embeddings ``[n, H]`` and metadata.
            progress: show a tqdm bar (items/s, ETA) on rank 0.
            rank, world_size: override the process group's values (a launcher without
                ``torch.distributed``); without a process group rank 0 finalises only if every shard
                is already done, so running once more with one process merges the parts.
        """
        group_rank, group_world = distributed.rank_and_world()
        rank = group_rank if rank is None else rank
        world_size = group_world if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")

        self.path.mkdir(parents=True, exist_ok=True)
        self._write_manifest()
        mine = [i for i in range(len(self.shards)) if i % world_size == rank]

        todo = []
        for i in mine:
            problem = self._shard_problem(i)
            if problem is not None:
                if problem != "missing":
                    logger.warning(f"{self.stage}: shard {self._files(i)[1].stem} in {self.path} is {problem}; redoing it")
                todo.append(i)
        done_items = sum(len(self.shards[i]) for i in mine if i not in todo)
        bar = tqdm(total=sum(len(self.shards[i]) for i in mine), initial=done_items, unit="item",
                   desc=self.stage, disable=not progress or rank != 0, dynamic_ncols=True)
        with bar:
            # first pass: shards no other run holds; second pass: wait for the others' shards, then
            # take over those whose run died (a dead process's lock is released by the kernel)
            held_elsewhere = self._build_shards(todo, compute, bar, wait=False)
            if held_elsewhere:
                logger.info(f"{self.stage}: {len(held_elsewhere)} shard(s) are being computed by another run on "
                            f"{self.path}; waiting for them")
                self._build_shards(held_elsewhere, compute, bar, wait=True)

        distributed.barrier()
        if rank == 0:
            with self._lock("finalise"):  # a concurrent run may be finalising (and removing temp files) too
                self._finalise()
        distributed.barrier()
        return self

    def _lock(self, part: Union[int, str]) -> FileLock:
        """The lock of shard ``part`` (or of a named step), beside the cache folder (which stays byte-identical)."""
        folder = self.path.with_name(f"{self.key_hash}.locks")
        folder.mkdir(exist_ok=True)
        return FileLock(folder / f"{self._files(part)[1].stem if isinstance(part, int) else part}.lock")

    def _build_shards(self, todo: Sequence[int], compute, bar, wait: bool) -> list[int]:
        """Compute each shard of ``todo`` under its lock, unless it is done by the time the lock is ours.

        Concurrent runs on one cache (two shells, two jobs) so compute each shard once. Returns the
        shards skipped because another run held their lock (only with ``wait=False``).
        """
        skipped = []
        for n, i in enumerate(todo, 1):
            lock = self._lock(i)
            try:
                lock.acquire(timeout=-1 if wait else 0)
            except Timeout:
                skipped.append(i)
                continue
            try:
                self._remove_temp_files([i])  # left by a killed run: nobody else writes this shard now
                if self._shard_problem(i) is not None:
                    bar.set_postfix_str(f"shard {i + 1}/{len(self.shards)} ({n}/{len(todo)} to do)")
                    (self.path / "complete.json").unlink(missing_ok=True)
                    self._write_shard(i, compute(list(self.shards[i])))
            finally:
                lock.release()
            bar.update(len(self.shards[i]))
        return skipped

    def _write_manifest(self) -> None:
        path = self.path / "manifest.json"
        data = _json_bytes(self.manifest, indent=2)
        if path.exists():
            if path.read_bytes() == data:
                return
            if json.loads(path.read_bytes()) != self.manifest:
                raise StageCacheError(f"{path} holds another manifest than the one hashed to {self.key_hash}; "
                                      f"move the folder away and rebuild")
        atomic_write(path, data)

    def _remove_temp_files(self, shards: Sequence[int]) -> None:
        """Temp files left by a killed run (only those of this rank's shards: other ranks may be writing)."""
        for i in shards:
            for path in self._files(i):
                for tmp in self.path.glob(f"{path.name}.tmp*"):
                    tmp.unlink(missing_ok=True)

    def _write_shard(self, index: int, output: ShardOutput) -> None:
        keys = self.shards[index]
        texts, embeddings, metas = output
        name = self._files(index)[1].stem
        if len(texts) != len(keys) or len(metas) != len(keys) or embeddings.dim() != 2 or embeddings.shape[0] != len(keys):
            raise ValueError(f"{self.stage}: compute returned {len(texts)} texts, {len(metas)} metas and embeddings "
                             f"{tuple(embeddings.shape)} for the {len(keys)} keys of {name}")
        embeddings = embeddings.detach().to("cpu", torch.float32).contiguous()
        if not torch.isfinite(embeddings).all():
            raise ValueError(f"{self.stage}: non-finite embeddings in {name}")
        tensors, records, index_file = self._files(index)
        index_file.unlink(missing_ok=True)  # the shard is not done until its new index is written
        tensor_bytes = save_safetensors({"embeddings": embeddings})
        record_bytes = _json_bytes({"keys": [_to_json_key(k) for k in keys], "texts": list(texts),
                                    "meta": [dict(m) for m in metas]})
        atomic_write(tensors, tensor_bytes)
        atomic_write(records, record_bytes)
        atomic_write(index_file, _json_bytes({
            "files": {tensors.name: sha256_bytes(tensor_bytes), records.name: sha256_bytes(record_bytes)},
            "n": len(keys)}))

    def _finalise(self) -> None:
        unfinished = {self._files(i)[1].stem: p for i in range(len(self.shards)) if (p := self._shard_problem(i))}
        if unfinished:
            logger.warning(f"{self.stage}: {len(unfinished)} shard(s) not done yet ({dict(list(unfinished.items())[:3])}); "
                           f"run the stage again (one process is enough) to finish {self.path}")
            return
        for tmp in self.path.glob("*.tmp*"):  # every shard is done: no rank is writing any more
            tmp.unlink(missing_ok=True)
        meta_counts: dict[str, dict[str, int]] = {}
        dim = None
        for i in range(len(self.shards)):
            tensors, records, _ = self._files(i)
            dim = dim or load_safetensors(tensors.read_bytes())["embeddings"].shape[1]
            for meta in json.loads(records.read_bytes())["meta"]:
                for name, value in meta.items():
                    if isinstance(value, (str, bool, int)):
                        counts = meta_counts.setdefault(name, {})
                        counts[str(value)] = counts.get(str(value), 0) + 1
        atomic_write(self.path / "complete.json", _json_bytes({
            "n_records": len(self.keys), "n_shards": len(self.shards), "embedding_dim": dim,
            "meta_counts": meta_counts,
            "shards": {self._files(i)[2].name: sha256_file(self._files(i)[2]) for i in range(len(self.shards))},
        }))

    # ------------------------------------------------------------------ reading
    def summary(self) -> dict:
        """The contents of ``complete.json`` (record count, embedding size, metadata value counts)."""
        self._require_complete()
        return json.loads((self.path / "complete.json").read_bytes())

    def load(self) -> dict[Key, Record]:
        """Every record, checksum-verified: ``{key: Record(text, embedding [H], meta)}``."""
        self._require_complete()
        records: dict[Key, Record] = {}
        for i in range(len(self.shards)):
            problem = self._shard_problem(i)
            if problem is not None:
                raise StageCacheError(f"{self.stage} cache {self.path}: shard {self._files(i)[1].stem} is {problem}; "
                                      f"run `{self.command}` again to redo it")
            tensors, data, _ = self._files(i)
            embeddings = load_safetensors(tensors.read_bytes())["embeddings"]
            payload = json.loads(data.read_bytes())
            for j, key in enumerate(payload["keys"]):
                records[_from_json_key(key)] = Record(payload["texts"][j], embeddings[j], payload["meta"][j])
        return records

    def load_aligned(self, keys: Sequence[Key]) -> tuple[list[str], torch.Tensor, list[dict]]:
        """Texts, embeddings ``[len(keys), H]`` and metadata in the order of ``keys`` (e.g. RecBole ids)."""
        records = self.load()
        missing = [k for k in keys if k not in records]
        if missing:
            raise KeyError(f"{len(missing)} key(s) have no record in the {self.stage} cache {self.path}, "
                           f"e.g. {missing[:5]}")
        rows = [records[k] for k in keys]
        dim = next(iter(records.values())).embedding.shape[0] if records else 0
        embeddings = torch.stack([r.embedding for r in rows]) if rows else torch.zeros(0, dim)
        return [r.text for r in rows], embeddings, [r.meta for r in rows]

    def _require_complete(self) -> None:
        if self.is_complete():
            return
        if self.path.exists():
            raise StageCacheError(f"the {self.stage} cache {self.path} is incomplete (an interrupted or unfinished run); "
                                  f"run `{self.command}` to finish it (done shards are kept)")
        raise StageCacheError(f"no {self.stage} cache for this configuration (expected {self.path}); "
                              f"build it with `{self.command}`.{self.describe_other_caches()}")

    def describe_other_caches(self) -> str:
        """How the caches that do exist for this stage differ from the one asked for (stale ones), on one line."""
        parts = []
        for manifest_path in sorted((self.root / self.stage).glob("*/manifest.json")):
            if manifest_path.parent == self.path:
                continue
            try:
                other = json.loads(manifest_path.read_bytes())
            except ValueError:
                continue
            differs = sorted(k for k in set(_flatten(other)) | set(_flatten(self.manifest))
                             if _flatten(other).get(k) != _flatten(self.manifest).get(k))
            parts.append(f"{manifest_path.parent.name} differs in {', '.join(differs[:8])}"
                         + (" ..." if len(differs) > 8 else ""))
        return (" Existing caches of this stage (built for other settings): " + "; ".join(parts)) if parts else ""


def _flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: canonical_json(obj)}
