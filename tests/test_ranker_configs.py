"""The shipped ranker configurations (``properties/ranker/*.yaml``) layer over an encoder's tuned settings."""

import yaml

from recbole_mllm.config import Config, properties_dir


def test_train_as_tested_overrides_only_ranker_keys_over_the_tuned_encoder(tmp_path):
    tuned = properties_dir() / "tuned" / "ml-1m-mm" / "FusedSASRec.yaml"
    ranker = properties_dir() / "ranker" / "train_as_tested.yaml"
    assert not set(yaml.safe_load(ranker.read_text())) & set(yaml.safe_load(tuned.read_text()))  # no encoder key
    config = Config("MLLMSRec", "ml-1m-mm", config_file_list=[str(tuned), str(ranker)],
                    config_dict={"data_path": str(tmp_path)})
    assert config["hidden_size"] == 128 and config["train_positions"] == "all"  # the encoder's tuned settings
    assert config["ranker_train_candidates"] == "top_k" and config["encoder_frozen_after_warmup"] is True
    assert config["encoder_warmup_stopping_step"] == 10 and config["ranker_train_negatives"] == 9
