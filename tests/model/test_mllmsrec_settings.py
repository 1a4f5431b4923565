"""MLLMSRec's settings: one dataclass read once from the config, its defaults only in the model YAML."""

import pytest
import yaml
from dataclasses import fields

from recbole_mllm.model.mllmsrec.settings import MLLMSRecSettings
from recbole_mllm.properties_path import properties_dir

TRAINER_KEYS = {"eval_batch_size", "epochs", "train_batch_size", "ranker_train_batch_size", "ranker_train_rows_per_forward",
                "learning_rate", "clip_grad_norm", "stopping_step", "gradient_accumulation_steps", "enable_amp",
                "report_first_stage"}
"""RecBole's trainer keys (and MLLMSRecTrainer's) the model YAML sets for MLLMSRec's joint epochs."""
ENCODER_TRAINING_KEYS = {"encoder_warmup_epochs", "encoder_warmup_cache", "encoder_warmup_stopping_step",
                         "encoder_warmup_batch_size", "encoder_frozen_after_warmup"}
"""The trainer's warm-up keys."""


def _declared():
    return yaml.safe_load((properties_dir() / "model" / "MLLMSRec.yaml").read_text())


def test_every_model_key_of_the_yaml_is_a_setting_and_no_setting_has_a_second_default():
    names = {f.name for f in fields(MLLMSRecSettings)}
    assert names == set(_declared()) - TRAINER_KEYS - ENCODER_TRAINING_KEYS
    assert all(f.default is f.default_factory for f in fields(MLLMSRecSettings))  # both MISSING: no default here
    assert all(f.metadata.get("help") for f in fields(MLLMSRecSettings))


def test_the_yaml_defaults_make_valid_settings():
    settings = MLLMSRecSettings.from_config(_declared())
    assert settings.lora_target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert settings.switches == [True, True, True, True, True, False]


@pytest.mark.parametrize("change, message", [
    ({"lora_target_modules": []}, "lora_target_modules"),
    ({"ranker_hard_negatives": 10, "ranker_train_negatives": 9}, "ranker_hard_negatives"),
    ({"ranker_scoring": "pairwise"}, "ranker_scoring"),
    ({"ranker_scoring": "listwise", "rerank_top_k": 53}, "rerank_top_k"),
    ({"ranker_scoring": "listwise", "ranker_residual": True}, "ranker_residual"),
])
def test_inconsistent_settings_are_one_error_naming_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        MLLMSRecSettings.from_config({**_declared(), **change})


def test_a_key_missing_from_the_config_is_an_error_not_a_silent_default():
    config = _declared()
    del config["rerank_top_k"]
    with pytest.raises(KeyError, match="rerank_top_k"):
        MLLMSRecSettings.from_config(config)


def test_an_unset_eval_batch_follows_the_device_and_a_value_wins():
    settings = MLLMSRecSettings.from_config(_declared())
    assert settings.ranker_eval_batch_size is None
    assert settings.candidates_per_forward("cuda") == 512 and settings.candidates_per_forward("cpu") == 32
    assert MLLMSRecSettings.from_config({**_declared(), "ranker_eval_batch_size": 7}).candidates_per_forward("cpu") == 7


@pytest.mark.parametrize("scoring, prompt", [("pointwise", "v2"), ("listwise", "list_v1")])
def test_an_unset_prompt_is_the_scorings_own_and_a_value_wins(scoring, prompt):
    def prompt_of(value):
        return MLLMSRecSettings.from_config({**_declared(), "ranker_scoring": scoring, "ranker_prompt": value}).prompt

    assert (prompt_of(None), prompt_of("v3")) == (prompt, "v3")


def test_an_unset_prompt_of_shuffled_lists_does_not_call_them_the_encoders_order():
    from recbole_mllm.stages.prompts import load_prompt

    settings = MLLMSRecSettings.from_config({**_declared(), "ranker_scoring": "listwise", "ranker_list_order": "shuffled",
                                             "ranker_prompt": None})
    assert settings.prompt == "list_shuffled_v1"
    shuffled, ordered = (load_prompt("ranker", name).sections for name in ("list_shuffled_v1", "list_v1"))
    assert "no particular order" in shuffled["user"] and "most likely first" not in shuffled["user"]
    assert {k: v for k, v in shuffled.items() if k != "user"} == {k: v for k, v in ordered.items() if k != "user"}
