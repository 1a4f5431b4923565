"""Config layering and model resolution."""

import sys

import pytest
import yaml

from recbole_mllm.config import Config, properties_dir
from recbole_mllm.utils import get_model


def test_plugin_overall_yaml_overrides_recbole_defaults(tiny_data):
    config = Config("SASRec", "tiny", config_dict=tiny_data)
    plugin = yaml.safe_load((properties_dir() / "overall.yaml").read_text())
    assert config["valid_metric"] == plugin["valid_metric"] == "NDCG@10"  # RecBole's default is MRR@10
    assert config["topk"] == [5, 10, 20]
    assert config["eval_args"]["split"] == {"LS": "valid_and_test"}
    assert config["test_protocols"] == ["uni100", "full"]
    assert config["loss_type"] == "CE"  # RecBole's SASRec.yaml still applies under the plugin layer


def test_precedence_file_then_dict_then_command_line(tiny_data, tmp_path):
    config_file = tmp_path / "user.yaml"
    config_file.write_text("learning_rate: 0.5\nstopping_step: 3\ntopk: [1]\n")
    config = Config("SASRec", "tiny", [str(config_file)], dict(tiny_data, learning_rate=0.25, stopping_step=4),
                    cmd_args=["--learning_rate=0.125"])
    assert config["learning_rate"] == 0.125  # command line beats dict and file
    assert config["stopping_step"] == 4  # dict beats file
    assert config["topk"] == [1]  # file beats the plugin's overall.yaml


def test_command_line_is_not_read_from_sys_argv(tiny_data, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["prog", "--learning_rate=9.0"])
    assert Config("SASRec", "tiny", config_dict=tiny_data)["learning_rate"] != 9.0


def test_malformed_command_line_argument_is_an_error(tiny_data):
    with pytest.raises(ValueError, match="--key=value"):
        Config("SASRec", "tiny", config_dict=tiny_data, cmd_args=["--learning_rate"])


def test_baselines_resolve_to_recbole():
    assert get_model("SASRec").__module__ == "recbole.model.sequential_recommender.sasrec"
    assert get_model("BERT4Rec").__module__ == "recbole.model.sequential_recommender.bert4rec"


def test_plugin_model_shadows_recbole(tmp_path, monkeypatch):
    """A model module in recbole_mllm.model wins over RecBole's model of the same name."""
    import recbole_mllm.model

    (tmp_path / "gru4rec.py").write_text(
        "from recbole.model.sequential_recommender.gru4rec import GRU4Rec as _Base\n"
        "class GRU4Rec(_Base):\n    plugin = True\n"
    )
    monkeypatch.setattr(recbole_mllm.model, "__path__", [*recbole_mllm.model.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "recbole_mllm.model.gru4rec", raising=False)
    assert getattr(get_model("GRU4Rec"), "plugin", False) is True


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown model 'SASRecc'"):
        get_model("SASRecc")


def test_resolving_a_recbole_model_leaves_anomaly_detection_off():
    """Importing RecBole's sequential models runs sine.py, which turns it on for the whole process."""
    import torch

    get_model("SASRec")
    assert not torch.is_anomaly_enabled()


def test_per_model_sections_give_each_model_its_own_keys(tiny_data, tmp_path):
    config_file = tmp_path / "compare.yaml"
    config_file.write_text("epochs: 7\nstopping_step: 3\nper_model:\n  SASRec: {epochs: 40}\n  GRU4Rec: {learning_rate: 0.01}\n")
    data = {k: v for k, v in tiny_data.items() if k != "epochs"}
    sasrec = Config("SASRec", "tiny", [str(config_file)], data)
    gru4rec = Config("GRU4Rec", "tiny", [str(config_file)], data)
    assert (sasrec["epochs"], sasrec["learning_rate"], sasrec["stopping_step"]) == (40, 0.001, 3)
    assert (gru4rec["epochs"], gru4rec["learning_rate"], gru4rec["stopping_step"]) == (7, 0.01, 3)
    assert sasrec["per_model"] is None
    # a shared key of a higher layer (dict, command line) still wins over a file's per-model key
    assert Config("SASRec", "tiny", [str(config_file)], data, cmd_args=["--epochs=2"])["epochs"] == 2
    assert Config("SASRec", "tiny", [str(config_file)], dict(data, epochs=3))["epochs"] == 3
    # and a dict's own per_model section wins over its shared keys
    assert Config("SASRec", "tiny", None, dict(data, epochs=3, per_model={"SASRec": {"epochs": 5}}))["epochs"] == 5


def test_malformed_per_model_section_is_an_error(tiny_data):
    with pytest.raises(ValueError, match="per_model must map model names"):
        Config("SASRec", "tiny", config_dict=dict(tiny_data, per_model={"SASRec": 3}))
    with pytest.raises(ValueError, match="per_model must map model names"):
        Config("SASRec", "tiny", config_dict=dict(tiny_data, per_model=["SASRec"]))


def test_plugin_models_read_the_stage_keys_and_baselines_do_not(tiny_data):
    stages = yaml.safe_load((properties_dir() / "stages.yaml").read_text())
    fused = Config("FusedSASRec", "tiny", config_dict=tiny_data)
    assert all(fused[key] == value for key, value in stages.items())
    assert Config("SASRec", "tiny", config_dict=tiny_data)["stage_batch_size"] is None


def test_command_line_and_dict_values_are_never_run(tiny_data, tmp_path):
    marker = tmp_path / "pwned"
    code = f"__import__('os').system('touch {marker}')"
    config = Config("SASRec", "tiny", config_dict=dict(tiny_data, dataset_save_path=code),
                    cmd_args=[f"--run_label={code}", "--topk=[3]", "--learning_rate=1e-3"])
    assert config["run_label"] == code and config["dataset_save_path"] == code and not marker.exists()
    assert config["topk"] == [3] and config["learning_rate"] == 0.001  # literals are still read as values


def test_gpu_ids_must_name_gpus_the_host_has(tmp_path, caplog):
    """``--gpu_id=7`` on a host with one GPU is an error naming the GPUs it has; on a CPU-only host a warning when the
    user gave an id, nothing for the default; the GPUs are counted from their device files, not by starting CUDA."""
    import logging

    from recbole_mllm.config import check_gpu_ids, host_gpu_count
    from recbole_mllm.config_check import ConfigKeyError

    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "nvidia-caps"):
        (tmp_path / name).touch()
    assert host_gpu_count(str(tmp_path)) == 2 and host_gpu_count(str(tmp_path / "none")) == 0
    with pytest.raises(ConfigKeyError, match=r"'gpu_id' names GPU 7, but this host has 1 \(ids 0 to 0\)"):
        check_gpu_ids("7", True, gpus=1)
    with pytest.raises(ConfigKeyError, match="names GPU 2"):
        check_gpu_ids((0, 2), True, gpus=2)
    check_gpu_ids("0,1", True, gpus=2)
    with caplog.at_level(logging.WARNING):
        check_gpu_ids("0", False, gpus=0)
        assert not caplog.records
        check_gpu_ids("3", True, gpus=0)
    assert "this host has no GPU; running on the CPU" in caplog.text


def test_a_model_yaml_layers_over_its_base_classes(tiny_data):
    """MLLMSRec subclasses FusedSASRec, so its config reads FusedSASRec.yaml below MLLMSRec.yaml: the encoder's keys are
    declared once, and their defaults are the constants the encoder used before it read SASRec's keys."""
    encoder = yaml.safe_load((properties_dir() / "model" / "FusedSASRec.yaml").read_text())
    ranker = yaml.safe_load((properties_dir() / "model" / "MLLMSRec.yaml").read_text())
    assert not set(encoder) & set(ranker)
    for model in ("FusedSASRec", "MLLMSRec"):
        config = Config(model, "tiny", config_dict={"data_path": tiny_data["data_path"]})
        assert all(config[key] == value for key, value in encoder.items()), model
        assert (config["hidden_dropout_prob"], config["attn_dropout_prob"], config["hidden_act"], config["layer_norm_eps"],
                config["initializer_range"]) == (0.2, 0.2, "gelu", 1e-12, 0.02)
    assert Config("MLLMSRec", "tiny", config_dict=tiny_data)["rerank_top_k"] == ranker["rerank_top_k"]


def test_a_closed_interval_given_as_a_list_becomes_recboles_interval_string(tiny_data, tmp_path):
    """RecBole's command-line parser evaluates "[20,22]" into a list, which its dataset filter cannot read."""
    config = Config("SASRec", "tiny", config_dict=tiny_data, cmd_args=["--user_inter_num_interval=[20,22]"])
    assert config["user_inter_num_interval"] == "[20,22]"
    config_file = tmp_path / "filters.yaml"
    config_file.write_text("item_inter_num_interval: [1, 5]\nper_model:\n  SASRec:\n    user_inter_num_interval: [3,9]\n")
    config = Config("SASRec", "tiny", [str(config_file)], tiny_data)
    assert config["item_inter_num_interval"] == "[1,5]" and config["user_inter_num_interval"] == "[3,9]"
    half_open = Config("SASRec", "tiny", config_dict=tiny_data, cmd_args=["--user_inter_num_interval=[20,inf)"])
    assert half_open["user_inter_num_interval"] == "[20,inf)"  # already a string: unchanged
    by_value = Config("SASRec", "tiny", config_dict=tiny_data, cmd_args=["--val_interval={'rating':[3,5]}"])
    assert by_value["val_interval"] == {"rating": "[3,5]"}
