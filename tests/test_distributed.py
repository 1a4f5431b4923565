"""``torchrun --nproc_per_node=2`` (gloo, CPU): RecBole's distributed path through the plugin. Every rank ends training
with the same weights (DDP averaged the gradients), and an evaluation split over two ranks gives one process's
metrics, candidates and per-user records."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recbole_mllm.quick_start import run
from tests.conftest import REPO_ROOT, write_tiny_dataset
from tests.distributed_worker import TINY
from tests.mllm.mllm_tiny import build_tiny_causal


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    write_tiny_dataset(root / "data")
    llm = build_tiny_causal(root / "llm")
    out = root / "results.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(root)}  # torchelastic_* folders
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO_ROOT / "tests" / "distributed_worker.py"), str(root / "data"), str(llm), str(out)]
    done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root, json.loads(out.read_text())


def test_both_ranks_took_part(two_ranks):
    _, results = two_ranks
    assert {r["world_size"] for r in results.values()} == {2}


@pytest.mark.parametrize("name", ["sasrec", "mllmsrec"])
def test_every_rank_ends_training_with_the_same_weights(two_ranks, name):
    first, second = two_ranks[1][name]["checksums"]
    assert first.keys() == second.keys() and first
    for key in first:
        assert first[key] == pytest.approx(second[key], rel=1e-6, abs=1e-6), key


def test_an_evaluation_over_two_ranks_is_one_process_evaluation(two_ranks):
    root, results = two_ranks
    alone = run("SASRec", "tiny", config_dict={**TINY, "epochs": 0, "data_path": str(root / "data"),
                                               "checkpoint_dir": str(root / "alone")})
    split = results["untrained"]
    assert split["fingerprints"] == alone["fingerprints"]
    for protocol, metrics in alone["test_result"].items():
        assert split["test_result"][protocol] == pytest.approx({k: float(v) for k, v in metrics.items()}, abs=1e-9)
        users = alone["per_user"][protocol]["user_id"].tolist()
        assert split["users"][protocol] == users and len(set(users)) == len(users)  # every user once, in order


def test_a_stage_under_two_ranks_builds_each_shard_once_into_the_cache_one_process_reads(two_ranks):
    from recbole_mllm.stages.common import stage_config
    from recbole_mllm.stages.item_fusion_cache import item_fusion_cache
    from recbole_mllm.stages.backend_identity import describe_backend

    root, _ = two_ranks
    args = ["--dataset=tiny", f"--data_path={root / 'data'}", f"--mllm={root / 'llm'}", "--use_gpu=False",
            f"--stage_cache_dir={root / 'stage_ranks'}", "--item_image_field=None", "--item_text_fields=['title','genres']",
            "--stage_batch_size=8", "--item_fusion_max_new_tokens=6", "--stage_shard_size=8"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(root)}  # torchelastic_* folders
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "recbole_mllm.stages.item_fusion", *args], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    config = stage_config([a for a in args if not a.startswith("--use_gpu")] + ["--use_gpu=False"])
    cache = item_fusion_cache(config, describe_backend(config))
    assert cache.is_complete() and len(cache.load()) == 30 and len(cache.shards) == 4
    assert done.stdout.count(str(cache.path)) == 2  # both ranks print the folder one process reads (lines may interleave)


def test_metrics_needing_more_than_the_gathered_top_k_rows_are_refused_under_torchrun():
    from recbole_mllm.distributed import check_gathered_metrics

    check_gathered_metrics(["Hit", "NDCG", "MRR", "Recall", "Precision", "MAP"])
    with pytest.raises(ValueError, match=r"metrics \['GAUC', 'ShannonEntropy'\] need more than the top-k rows"):
        check_gathered_metrics(["NDCG", "GAUC", "ShannonEntropy"])


def test_the_distributed_sampler_of_a_training_loader_takes_the_runs_seed():
    from types import SimpleNamespace

    from torch.utils.data import RandomSampler
    from torch.utils.data.distributed import DistributedSampler

    from recbole_mllm.data.dataloader import seeded

    loader = SimpleNamespace(sampler=DistributedSampler(list(range(10)), num_replicas=2, rank=0))
    assert seeded(loader, {"seed": 2021}).sampler.seed == 2021  # RecBole's would stay 0 for every seed
    plain = SimpleNamespace(sampler=RandomSampler(range(3)))
    assert seeded(plain, {"seed": 2021}).sampler is plain.sampler


def test_the_run_state_keeps_each_ranks_random_generators(two_ranks):
    """Rank 0 writes the run state of a torchrun job, with every rank's generators (the ranks are seeded apart), so a
    resumed rank goes on with its own."""
    import torch

    from recbole_mllm import compat

    root, _ = two_ranks
    states = [compat.load_weights(path) for path in sorted(root.glob("results.json.cache/run_state/*.pth"))]
    assert len(states) == 2  # SASRec's and MLLMSRec's
    for state in states:
        first, second = state["rng"]
        assert not torch.equal(first["torch"], second["torch"])
