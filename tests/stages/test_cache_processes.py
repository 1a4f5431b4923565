"""StageCache across real processes: killed with SIGKILL at many points, and a gloo process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from recbole_mllm.stages.cache import StageCache
from stage_doubles import fake_compute, gloo_worker

HERE = Path(__file__).parent
KEYS = [f"item{i}" for i in range(17)]
MANIFEST = {"model": {"name": "m"}}

# The child builds the cache and SIGKILLs itself at one point: before the n-th os.replace (temp file
# complete, not renamed), after it, before the n-th fsync, half-way through writing a temp file, or in
# the n-th compute call.
CHILD = r"""
import os, signal, sys
from recbole_mllm.stages import cache as cache_mod
from stage_doubles import fake_compute
root, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
seen = [0]

def hit():
    seen[0] += 1
    return seen[0] == n

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def wrap(name, after=False):
    original = getattr(os, name)
    def wrapper(*args, **kwargs):
        if not after and hit():
            die()
        out = original(*args, **kwargs)
        if after and hit():
            die()
        return out
    setattr(os, name, wrapper)

compute = fake_compute
if mode == "replace":
    wrap("replace")
elif mode == "after-replace":
    wrap("replace", after=True)
elif mode == "fsync":
    wrap("fsync")
elif mode == "compute":
    def compute(keys):
        if hit():
            die()
        return fake_compute(keys)
elif mode == "half-temp":
    original = cache_mod.atomic_write
    def half(path, data):
        if hit():
            with open(path.with_name(path.name + ".tmp" + str(os.getpid())), "wb") as f:
                f.write(data[: len(data) // 2])
            die()
        original(path, data)
    cache_mod.atomic_write = half
cache_mod.StageCache(root, "demo", {"model": {"name": "m"}}, [f"item{i}" for i in range(17)], shard_size=4).build(compute, progress=False)
"""


def make(root):
    return StageCache(root, "demo", MANIFEST, KEYS, shard_size=4)


@pytest.mark.parametrize("mode, n", [("compute", 1), ("compute", 3), ("replace", 1), ("replace", 3), ("replace", 7),
                                     ("after-replace", 2), ("after-replace", 4), ("fsync", 5), ("half-temp", 2),
                                     ("half-temp", 6)])
def test_sigkill_at_any_point_then_resume_is_byte_identical(tmp_path, tree, mode, n):
    reference = make(tmp_path / "ref").build(fake_compute, progress=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "run"), mode, str(n)], env=env,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    cache = make(tmp_path / "run")
    assert not cache.is_complete()
    cache.build(fake_compute, progress=False)
    assert tree(cache.path) == tree(reference.path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gloo_process_group_splits_and_merges(tmp_path, tree):
    reference = make(tmp_path / "ref").build(fake_compute, progress=False)
    mp.spawn(gloo_worker, args=(2, _free_port(), str(tmp_path / "run"), MANIFEST, KEYS, 4), nprocs=2, join=True)
    cache = make(tmp_path / "run")
    assert cache.is_complete()
    assert tree(cache.path) == tree(reference.path)


# Two runs of this on one cache folder at once: each shard's keys are logged by the run that computes it.
RACER = r"""
import sys, time
from recbole_mllm.stages.cache import StageCache
from stage_doubles import fake_compute
root, log = sys.argv[1], sys.argv[2]

def slow(keys):
    with open(log, "a") as f:
        f.write(keys[0] + "\n")
    time.sleep(0.2)
    return fake_compute(keys)

cache = StageCache(root, "demo", {"model": {"name": "m"}}, [f"item{i}" for i in range(17)], shard_size=4).build(slow, progress=False)
sys.exit(0 if cache.is_complete() else 1)
"""


def test_two_concurrent_runs_compute_each_shard_once(tmp_path, tree):
    reference = make(tmp_path / "ref").build(fake_compute, progress=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "computed.txt"
    runs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / "run"), str(log)], env=env,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=120), run.stderr.read()) for run in runs]
    assert [code for code, _ in results] == [0, 0], results
    computed = log.read_text().split()
    assert sorted(computed) == sorted(shard[0] for shard in make(tmp_path / "run").shards)  # each once
    assert tree(make(tmp_path / "run").path) == tree(reference.path)
