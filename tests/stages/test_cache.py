"""StageCache: content addressing, shards, resume, corruption, several ranks."""

from __future__ import annotations

import json
import logging
import threading

import pytest
import torch

from recbole_mllm.stages.cache import StageCache, StageCacheError
from stage_doubles import Interrupt, fake_compute

MANIFEST = {"model": {"name": "m", "weights_sha256": "w1"}, "prompt": {"name": "p_v1", "sha256": "t1"},
            "generation": {"max_new_tokens": 8}, "dataset": {"item_file_sha256": "d1"}}
KEYS = [f"{i:04d}" for i in range(23)] + ["a b", "Ünïcode", "tt0114709"]  # raw tokens, kept as written


def make(root, manifest=MANIFEST, keys=KEYS, shard_size=5, **kw):
    return StageCache(root, "demo", manifest, keys, shard_size=shard_size, command="make-demo --x=1", **kw)


class Counting:
    """fake_compute that records which shards it was asked for, and can stop after some shards."""

    def __init__(self, stop_after: int = -1):
        self.calls, self.stop_after = [], stop_after

    def __call__(self, keys):
        if len(self.calls) == self.stop_after:
            raise Interrupt("stopped")
        self.calls.append(list(keys))
        return fake_compute(keys)


def test_roundtrip_raw_keys_and_contents(tmp_path):
    cache = make(tmp_path).build(fake_compute, progress=False)
    records = cache.load()
    assert sorted(records) == sorted(KEYS)
    expected = fake_compute(["0007"])
    assert records["0007"].text == expected.texts[0] == "text for '0007'"
    assert torch.equal(records["0007"].embedding, expected.embeddings[0])
    assert records["Ünïcode"].meta == {"even": False, "kind": "fake"}
    texts, emb, metas = cache.load_aligned(["a b", "0000", "a b"])
    assert texts == ["text for 'a b'", "text for '0000'", "text for 'a b'"]
    assert emb.shape == (3, 8) and torch.equal(emb[0], emb[2]) and not torch.equal(emb[0], emb[1])
    with pytest.raises(KeyError, match="'7'"):
        cache.load_aligned(["7"])  # an internal-id-looking key is not a raw token of this cache
    files = sorted(p.name for p in cache.path.iterdir())
    assert files[:3] == ["complete.json", "manifest.json", "shard-00000.index.json"] and len(files) == 2 + 6 * 3
    shard0 = json.loads((cache.path / "shard-00000.json").read_text(encoding="utf-8"))
    assert shard0["keys"] == sorted(KEYS)[:5]
    summary = cache.summary()
    assert summary["n_records"] == len(KEYS) and summary["n_shards"] == 6 and summary["embedding_dim"] == 8
    assert summary["meta_counts"]["kind"] == {"fake": len(KEYS)}
    assert sum(summary["meta_counts"]["even"].values()) == len(KEYS)


@pytest.mark.parametrize("path, value", [
    (("model", "weights_sha256"), "w2"), (("prompt", "name"), "p_v2"), (("prompt", "sha256"), "t2"),
    (("generation", "max_new_tokens"), 9), (("dataset", "item_file_sha256"), "d2"), (("extra",), 1)])
def test_any_manifest_change_is_a_new_folder(tmp_path, path, value):
    base = make(tmp_path)
    changed = json.loads(json.dumps(MANIFEST))
    target = changed
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    other = make(tmp_path, manifest=changed)
    assert other.path != base.path and other.path.parent == base.path.parent


def test_key_set_and_layout_are_part_of_the_key(tmp_path):
    base = make(tmp_path)
    assert make(tmp_path, keys=KEYS[:-1]).path != base.path
    assert make(tmp_path, shard_size=6).path != base.path
    reordered = dict(reversed(list(MANIFEST.items())))
    assert make(tmp_path, manifest=reordered, keys=list(reversed(KEYS))).path == base.path
    base.build(fake_compute, progress=False)
    written = json.loads((base.path / "manifest.json").read_text(encoding="utf-8"))
    assert written["model"] == MANIFEST["model"] and written["keys"]["n"] == len(KEYS)
    assert written["cache"]["shard_size"] == 5 and written["stage"] == "demo"


def test_interrupted_build_resumes_to_identical_bytes(tmp_path, tree):
    reference = make(tmp_path / "a").build(fake_compute, progress=False)
    stopped = Counting(stop_after=3)
    with pytest.raises(Interrupt):
        make(tmp_path / "b").build(stopped, progress=False)
    with pytest.raises(StageCacheError, match="incomplete.*make-demo --x=1"):
        make(tmp_path / "b").load()
    resumed = Counting()
    cache = make(tmp_path / "b").build(resumed, progress=False)
    assert [c[0] for c in resumed.calls] == [cache.shards[i][0] for i in (3, 4, 5)]  # only what was left
    assert tree(cache.path) == tree(reference.path)
    again = Counting()
    make(tmp_path / "b").build(again, progress=False)
    assert again.calls == [] and tree(cache.path) == tree(reference.path)


CORRUPTIONS = {
    "truncated tensors": lambda p: p.with_suffix(".safetensors").write_bytes(p.with_suffix(".safetensors").read_bytes()[:40]),
    "flipped byte in records": lambda p: p.write_bytes(p.read_bytes().replace(b"text for", b"text fur", 1)),
    "flipped byte in tensors": lambda p: _flip_last_byte(p.with_suffix(".safetensors")),
    "deleted index": lambda p: p.with_name("shard-00002.index.json").unlink(),
    "garbage index": lambda p: p.with_name("shard-00002.index.json").write_bytes(b"{not json"),
    "deleted records": lambda p: p.unlink(),
}


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_shard_is_detected_and_redone(tmp_path, tree, caplog, corruption):
    cache = make(tmp_path).build(fake_compute, progress=False)
    before = tree(cache.path)
    CORRUPTIONS[corruption](cache.path / "shard-00002.json")
    assert tree(cache.path) != before
    with pytest.raises(StageCacheError, match="shard-00002|incomplete"):
        make(tmp_path).load()
    redo = Counting()
    with caplog.at_level(logging.WARNING):
        make(tmp_path).build(redo, progress=False)
    assert [c[0] for c in redo.calls] == [cache.shards[2][0]]
    assert any("shard-00002" in r.getMessage() and "redoing" in r.getMessage() for r in caplog.records)
    assert tree(cache.path) == before


def test_missing_and_stale_cache_errors_name_the_command_and_the_difference(tmp_path):
    with pytest.raises(StageCacheError, match=r"no demo cache.*make-demo --x=1"):
        make(tmp_path).load()
    make(tmp_path).build(fake_compute, progress=False)
    stale = json.loads(json.dumps(MANIFEST))
    stale["model"]["weights_sha256"] = "w2"
    with pytest.raises(StageCacheError, match=r"differs in .*model\.weights_sha256") as err:
        make(tmp_path, manifest=stale).load()
    assert "prompt" not in str(err.value).split("differs in")[1]


def test_ranks_split_shards_and_rank0_merges(tmp_path, tree):
    reference = make(tmp_path / "one").build(fake_compute, progress=False)
    odd = Counting()
    part = make(tmp_path / "two").build(odd, progress=False, rank=1, world_size=2)
    assert [c[0] for c in odd.calls] == [part.shards[i][0] for i in (1, 3, 5)]
    assert not part.is_complete()
    even = Counting()
    make(tmp_path / "two").build(even, progress=False, rank=0, world_size=2)
    assert [c[0] for c in even.calls] == [part.shards[i][0] for i in (0, 2, 4)]
    assert tree(part.path) == tree(reference.path)


def test_group_by_first_keeps_groups_in_one_shard(tmp_path):
    keys = [(u, n) for u in ("u1", "u10", "u2", "u3", "u4") for n in (3, 12, 7)]
    cache = StageCache(tmp_path, "profiles", {}, keys, shard_size=2, group_by_first=True)
    assert [len(s) for s in cache.shards] == [6, 6, 3]
    assert cache.shards[0] == [("u1", 3), ("u1", 7), ("u1", 12), ("u10", 3), ("u10", 7), ("u10", 12)]
    cache.build(fake_compute, progress=False)
    assert cache.load()[("u2", 12)].text == "text for ('u2', 12)"


@pytest.mark.parametrize("keys, error", [(["a", "a"], ValueError), ([1.5], TypeError), ([True], TypeError),
                                         (["a", 1], TypeError), ([()], TypeError)])
def test_bad_keys_are_rejected(tmp_path, keys, error):
    with pytest.raises(error):
        make(tmp_path, keys=keys)


def test_compute_with_wrong_shapes_is_an_error(tmp_path):
    def short(keys):
        out = fake_compute(keys)
        return out._replace(texts=out.texts[:-1])

    with pytest.raises(ValueError, match="shard-00000"):
        make(tmp_path).build(short, progress=False)


def test_a_shard_another_run_holds_is_waited_for_not_recomputed(tmp_path, tree):
    reference = make(tmp_path / "ref").build(fake_compute, progress=False)
    cache = make(tmp_path / "run")
    other_run_done = threading.Event()
    others = len(cache.shards) - 1

    class LastOtherShardSignals(Counting):
        def __call__(self, keys):
            out = super().__call__(keys)
            if len(self.calls) == others:
                other_run_done.set()
            return out

    def other_run():  # holds shard 1's lock until the main run has done every other shard, then writes it
        with make(tmp_path / "run")._lock(1):
            started.set()
            other_run_done.wait(timeout=60)
            cache._write_shard(1, fake_compute(cache.shards[1]))

    started = threading.Event()
    cache.path.mkdir(parents=True)
    thread = threading.Thread(target=other_run)
    thread.start()
    started.wait(timeout=60)
    compute = LastOtherShardSignals()
    cache.build(compute, progress=False)
    thread.join()
    assert cache.shards[1] not in compute.calls and len(compute.calls) == others
    assert cache.is_complete() and tree(cache.path) == tree(reference.path)
