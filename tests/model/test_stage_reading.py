"""The models only read stage caches: the model package reaches no stage runner, a missing cache is an error
naming its command (nothing generated), and FusedSASRec finds the item-fusion cache without loading weights."""

from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from recbole_mllm.config import Config
from recbole_mllm.data import create_dataset, data_preparation
from recbole_mllm.quick_start import build_model, run
from recbole_mllm.stages.backend_identity import describe_backend
from recbole_mllm.stages.cache import StageCacheError
from recbole_mllm.stages.common import load_backend
from recbole_mllm.stages.item_fusion_cache import item_fusion_cache, load_item_fusion
from recbole_mllm.stages.prepare import prepare_stages
from recbole_mllm.utils import get_model
from tests.conftest import TINY_MODEL, tiny_loading

os.environ["HF_HUB_OFFLINE"] = "1"

RUNNER_MODULES = {"recbole_mllm.stages.item_fusion", "recbole_mllm.stages.user_profile", "recbole_mllm.stages.prepare"}
RUNNERS = {"run_item_fusion", "run_user_profile", "prepare_stages"}
MODEL_PACKAGE = Path(importlib.util.find_spec("recbole_mllm.model").origin).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(MODEL_PACKAGE.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(name: str) -> tuple[set, set]:
    """The plugin modules ``name`` imports anywhere in its source (deferred imports too), and the names it imports
    or defines."""
    spec = importlib.util.find_spec(name)
    package = name if spec.submodule_search_locations else name.rpartition(".")[0]
    modules, names = set(), set()
    for node in ast.walk(ast.parse(Path(spec.origin).read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parents = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parents + ([node.module] if node.module else []))
            modules.add(base)
            names |= {alias.name for alias in node.names}
            if base.startswith("recbole_mllm") and importlib.util.find_spec(base).submodule_search_locations:
                modules |= {f"{base}.{alias.name}" for alias in node.names  # `from package import module`
                            if importlib.util.find_spec(f"{base}.{alias.name}")}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
    plugin = {m for m in modules if m.startswith("recbole_mllm")}
    for module in list(plugin):  # importing a module runs its packages' __init__ first
        parts = module.split(".")
        plugin |= {".".join(parts[:k]) for k in range(1, len(parts))}
    return plugin, names


def _reachable(start: list) -> dict:
    """``{module: names}`` of every plugin module reachable by imports from ``start``."""
    seen, todo = {}, list(start)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        modules, names = _imports(name)
        seen[name] = names
        todo += modules
    return seen


def test_the_model_package_reaches_no_stage_runner():
    models = [_module_name(p) for p in sorted(MODEL_PACKAGE.rglob("*.py"))]
    reached = _reachable(models)
    assert "recbole_mllm.stages.item_fusion_cache" in reached  # the check sees the readers it should
    assert not RUNNER_MODULES & set(reached), sorted(RUNNER_MODULES & set(reached))
    assert not {module: RUNNERS & names for module, names in reached.items() if RUNNERS & names}
    assert RUNNER_MODULES <= set(_reachable(["recbole_mllm.quick_start"]))  # and would see a runner


@pytest.fixture(scope="module")
def shared(stage_setup):
    return {**stage_setup, **tiny_loading(), **TINY_MODEL, "item_text_fields": ["title", "genres"],
            "item_fusion_max_new_tokens": 4, "user_summary_max_new_tokens": 4, "user_window_size": 4,
            "user_window_step": 4, "lora_target_modules": ["q_proj", "v_proj"]}


def _config_and_train(model, settings):
    config = Config(model, "tiny", config_dict=settings)
    return config, data_preparation(config, create_dataset(config))[0]._dataset


@pytest.mark.parametrize("model", ["MLLMSRec", "FusedSASRec"])
def test_a_model_with_a_missing_cache_fails_naming_the_stage_and_generates_nothing(model, shared, tmp_path,
                                                                                  monkeypatch):
    from recbole_mllm.mllm.hf_chat import HFChatBackend

    monkeypatch.setattr(HFChatBackend, "generate", lambda *a, **k: pytest.fail("a model must never generate"))
    config, train = _config_and_train(model, {**shared, "stage_cache_dir": str(tmp_path / "caches")})
    assert config["run_missing_stages"]  # even where stages may run, the model does not run them
    with pytest.raises(StageCacheError, match=r"(?s)python -m recbole_mllm\.stages\.item_fusion --dataset=tiny.*"
                                              r"never build them"):
        build_model(config, train)
    assert not (tmp_path / "caches").exists()


def test_mllmsrec_without_user_summaries_names_the_user_stage(shared, tmp_path):
    config, train = _config_and_train("MLLMSRec", {**shared, "stage_cache_dir": str(tmp_path / "caches")})
    prepare_stages(config, ("item_fusion",))
    with pytest.raises(StageCacheError, match=r"python -m recbole_mllm\.stages\.user_profile --dataset=tiny"):
        build_model(config, train)


def test_fusedsasrec_reads_the_stages_cache_without_loading_weights(shared, tmp_path, monkeypatch):
    config, train = _config_and_train("FusedSASRec", {**shared, "stage_cache_dir": str(tmp_path / "caches")})
    backend = load_backend(config)
    prepare_stages(config, ("item_fusion",))  # runs the stage with a loaded backend
    tokens = [str(t) for t in train.field2id_token[train.iid_field]]
    expected = load_item_fusion(config, tokens, backend)[1]
    assert item_fusion_cache(config, describe_backend(config)).path == item_fusion_cache(config, backend).path
    monkeypatch.setattr("recbole_mllm.mllm.load_mllm", lambda *a, **k: pytest.fail("no weights just for a cache key"))
    model = build_model(config, train)
    torch.testing.assert_close(model.encoder.fused, expected)


def test_quick_start_prepares_stages_before_the_model(shared, tmp_path, monkeypatch):
    settings = {**shared, "stage_cache_dir": str(tmp_path / "caches"), "run_missing_stages": False,
                "checkpoint_dir": str(tmp_path / "saved"), "output_dir": str(tmp_path / "outputs")}
    monkeypatch.setattr(get_model("FusedSASRec"), "__init__", lambda *a, **k: pytest.fail("built before its stages"))
    with pytest.raises(StageCacheError, match=r"(?s)python -m recbole_mllm\.stages\.item_fusion --dataset=tiny.*"
                                              r"run_missing_stages: True"):
        run("FusedSASRec", "tiny", config_dict=settings)
