"""The shipped ranker configurations (``properties/ranker/*.yaml``) layer over an encoder's tuned settings."""

import pytest
import yaml

from recbole_mllm.config import Config, properties_dir
from recbole_mllm.model.mllmsrec.settings import MLLMSRecSettings

TUNED = properties_dir() / "tuned" / "ml-1m-mm" / "FusedSASRec.yaml"


def _config(tmp_path, *files):
    return Config("MLLMSRec", "ml-1m-mm", config_file_list=[str(TUNED), *map(str, files)],
                  config_dict={"data_path": str(tmp_path)})


@pytest.mark.parametrize("name", ["paper_joint", "train_as_tested", "pointwise", "listwise", "listwise_sampled"])
def test_a_ranker_yaml_overrides_no_key_of_the_tuned_encoder(name):
    ranker = yaml.safe_load((properties_dir() / "ranker" / f"{name}.yaml").read_text())
    assert ranker and not set(ranker) & set(yaml.safe_load(TUNED.read_text()))


def test_the_defaults_train_the_llm_as_it_is_tested(tmp_path):
    config = _config(tmp_path)
    assert config["hidden_size"] == 128 and config["train_positions"] == "all"  # the encoder's tuned settings
    assert config["ranker_train_candidates"] == "top_k" and config["encoder_frozen_after_warmup"] is True
    assert (config["encoder_warmup_epochs"], config["encoder_warmup_stopping_step"]) == (300, 10)
    assert config["ranker_train_negatives"] == 9
    assert _config(tmp_path, properties_dir() / "ranker" / "train_as_tested.yaml")["eval_step"] == 2  # the screened run validated once


def test_paper_joint_restores_the_papers_joint_fine_tuning(tmp_path):
    config = _config(tmp_path, properties_dir() / "ranker" / "paper_joint.yaml")
    assert config["ranker_train_candidates"] == "sampled" and config["encoder_frozen_after_warmup"] is False
    assert (config["ranker_train_negatives"], config["ranker_hard_negatives"]) == (1, 1)
    assert (config["encoder_warmup_epochs"], config["encoder_warmup_stopping_step"]) == (20, 3)


def test_the_defaults_rank_list_wise_and_fuse_on_validation_as_listwise_yaml_writes_them(tmp_path):
    config = _config(tmp_path)
    defaults = MLLMSRecSettings.from_config(config)
    assert (defaults.ranker_scoring, defaults.ranker_prompt, defaults.prompt) == ("listwise", None, "list_v1")
    assert defaults.late_fusion_grid == (0, 0.3, 1, 3, 10) and config["epochs"] == 4
    assert defaults.first_stage_fallback_alpha == 0.05  # the LLM ranks the test only where validation says it adds
    written = _config(tmp_path, properties_dir() / "ranker" / "listwise.yaml")
    assert MLLMSRecSettings.from_config(written) == defaults and written["epochs"] == 4


@pytest.mark.parametrize("name", ["pointwise", "paper_joint", "train_as_tested"])
def test_the_pointwise_configurations_rank_pointwise_without_fusion(tmp_path, name):
    config = _config(tmp_path, properties_dir() / "ranker" / f"{name}.yaml")
    settings = MLLMSRecSettings.from_config(config)  # paper_joint's sampled lists: a list-wise ranker refuses them
    assert (settings.ranker_scoring, settings.prompt, settings.late_fusion_grid) == ("pointwise", "v2", None)
    assert config["epochs"] == 2


def test_listwise_sampled_trains_on_lists_as_long_as_the_tested_ones_in_a_random_order(tmp_path):
    settings = MLLMSRecSettings.from_config(_config(tmp_path, properties_dir() / "ranker" / "listwise_sampled.yaml"))
    assert (settings.ranker_scoring, settings.ranker_train_candidates, settings.ranker_list_order) == \
        ("listwise", "sampled", "shuffled")
    assert settings.ranker_train_negatives + 1 == settings.rerank_top_k and settings.ranker_hard_negatives == 0
    assert settings.prompt == "list_shuffled_v1" and settings.late_fusion_grid == (0, 0.3, 1, 3, 10)
