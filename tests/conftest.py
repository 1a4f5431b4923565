"""Shared fixtures: a tiny sequential dataset in RecBole atomic files and a tiny random LLM, made by the tests
themselves."""

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

TINY_MODEL = {"hidden_size": 8, "inner_size": 16, "n_layers": 1, "n_heads": 1, "MAX_ITEM_LIST_LENGTH": 10}
"""A sequential model small enough to train on the tiny dataset in seconds."""


def tiny_loading():
    """What every run on the tiny dataset sets: its ``.inter`` columns, no progress bars, the CPU (a fresh dict each
    time, since a run may change the one it is given)."""
    return {"load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]}, "show_progress": False,
            "use_gpu": False}


def shared_data_dir():
    """``../shared/data`` beside the checkout (or $RECBOLE_MLLM_SHARED_DATA); None when absent."""
    candidate = Path(os.environ.get("RECBOLE_MLLM_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    return candidate if candidate.is_dir() else None


def write_tiny_dataset(root, name="tiny", n_users=40, n_items=30, per_user=12, seed=0):
    """Users walk through items with a drift (item i tends to follow i-1), so models can learn something."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(1, n_users + 1):
        start = int(rng.integers(1, n_items + 1))
        items = [(start + k + int(rng.integers(0, 2))) % n_items + 1 for k in range(per_user)]
        for t, i in enumerate(dict.fromkeys(items)):
            lines.append(f"u{u}\ti{i}\t{int(rng.integers(1, 6))}\t{1_000_000 + 3600 * t + u}")
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n")
    item_lines = ["item_id:token\ttitle:token_seq\tgenres:token_seq"]  # titles unique, never substrings of each other
    item_lines += [f"i{i}\tFilm{i}x\t{'Drama' if i % 2 else 'Comedy'}{' Action' if i % 3 == 0 else ''}"
                   for i in range(1, n_items + 1)]
    (folder / f"{name}.item").write_text("\n".join(item_lines) + "\n")
    user_lines = ["user_id:token\tage:token\tgender:token"]
    user_lines += [f"u{u}\t{18 + u % 40}\t{'F' if u % 2 else 'M'}" for u in range(1, n_users + 1)]
    (folder / f"{name}.user").write_text("\n".join(user_lines) + "\n")
    return folder


@pytest.fixture(scope="session", autouse=True)
def recbole_mllm_home(tmp_path_factory):
    """Weight-hash records and converted weights go to a temporary ``RECBOLE_MLLM_HOME``, never to the
    user's ``~/.cache/recbole_mllm``; a ``RECBOLE_MLLM_HOME`` set before the run is kept (a developer
    reusing converted weights across runs). Yields ``(home, explicitly_set)``."""
    if os.environ.get("RECBOLE_MLLM_HOME"):
        yield Path(os.environ["RECBOLE_MLLM_HOME"]), True
        return
    with pytest.MonkeyPatch.context() as patch:
        home = tmp_path_factory.mktemp("recbole_mllm_home")
        patch.setenv("RECBOLE_MLLM_HOME", str(home))
        yield home, False


@pytest.fixture(scope="session", autouse=True)
def working_folder(tmp_path_factory):
    """The tests run in a temporary working folder: RecBole writes ``log/``, ``log_tensorboard/`` and ``saved/``
    into the current folder, which must never be the checkout. Yields that folder."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("cwd")
        patch.chdir(folder)
        yield folder


@pytest.fixture
def tiny_data(tmp_path):
    """Config dict that points RecBole at a fresh tiny dataset and keeps every output under tmp_path."""
    write_tiny_dataset(tmp_path / "data")
    return {"data_path": str(tmp_path / "data"), "checkpoint_dir": str(tmp_path / "saved"),
            "output_dir": str(tmp_path / "outputs"), "epochs": 1, "train_batch_size": 64, **tiny_loading(), **TINY_MODEL}


@pytest.fixture(scope="module")
def stage_setup(tmp_path_factory):
    """Config keys of a tiny random LLM, the tiny dataset and a stage cache folder, shared by one test module's runs
    (the caches are keyed by content, so the module's tests may share them)."""
    from tests.mllm.mllm_tiny import build_tiny_causal  # transformers: imported by the modules that use it only

    os.environ["HF_HUB_OFFLINE"] = "1"  # the LLM is a local folder: never ask the hub
    root = tmp_path_factory.mktemp("stage_setup")
    write_tiny_dataset(root / "data")
    return {"mllm": str(build_tiny_causal(root / "llm")), "data_path": str(root / "data"),
            "stage_cache_dir": str(root / "stage_cache"), "item_image_field": None, "stage_batch_size": 8,
            "item_fusion_max_new_tokens": 6}
