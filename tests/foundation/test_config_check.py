"""Unknown config keys and values of the wrong type fail in ``Config``, in one line naming the key."""

import re
import subprocess
import sys

import pytest

from recbole_mllm.config import Config, properties_dir
from recbole_mllm.config_check import ConfigKeyError, check_config, known_keys
from recbole_mllm.search_space import load_search_space
from tests.conftest import REPO_ROOT


def test_unknown_command_line_key_names_the_closest_known_key(tiny_data):
    with pytest.raises(ConfigKeyError) as error:
        Config("SASRec", "tiny", config_dict=tiny_data, cmd_args=["--learning_rat=0.5"])
    assert str(error.value) == ("unknown config key 'learning_rat' (from the command line); "
                                "did you mean 'learning_rate'?")


def test_unknown_key_without_a_close_one_has_no_suggestion(tiny_data):
    with pytest.raises(ConfigKeyError, match=r"^unknown config key 'zqxw' \(from the command line\)$"):
        Config("SASRec", "tiny", config_dict=tiny_data, cmd_args=["--zqxw=1"])


def test_unknown_file_key_names_the_file(tiny_data, tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("epochs: 2\n")
    second.write_text("stoping_step: 3\n")
    with pytest.raises(ConfigKeyError, match=rf"'stoping_step' \(from {second}\); did you mean 'stopping_step'"):
        Config("SASRec", "tiny", [str(first), str(second)], tiny_data)


def test_unknown_config_dict_key(tiny_data):
    with pytest.raises(ConfigKeyError, match=r"'hiden_size' \(from config_dict\); did you mean 'hidden_size'"):
        Config("SASRec", "tiny", config_dict=dict(tiny_data, hiden_size=8))


def test_unknown_key_in_a_per_model_section_even_of_another_model(tiny_data, tmp_path):
    config_file = tmp_path / "models.yaml"
    config_file.write_text("per_model:\n  BERT4Rec: {n_layer: 2}\n")
    with pytest.raises(ConfigKeyError, match=rf"'n_layer' \(from per_model section 'BERT4Rec' of {config_file}\)"):
        Config("SASRec", "tiny", [str(config_file)], tiny_data)
    with pytest.raises(ConfigKeyError, match=r"'epoch' \(from per_model section 'SASRec' of config_dict\)"):
        Config("SASRec", "tiny", config_dict=dict(tiny_data, per_model={"SASRec": {"epoch": 2}}))


@pytest.mark.parametrize("arg, message", [
    ("--rerank_top_k=abc", "config key 'rerank_top_k' expects int ≥ 1, got 'abc' (str) (from the command line)"),
    ("--epochs=True", "config key 'epochs' expects int ≥ 0, got True (bool) (from the command line)"),
    ("--reproducibility=3", "config key 'reproducibility' expects bool, got 3 (int) (from the command line)"),
    ("--test_protocols=uni100",
     "config key 'test_protocols' expects list or None, got 'uni100' (str) (from the command line)"),
    ("--learning_rate=fast", "config key 'learning_rate' expects float > 0, got 'fast' (str) (from the command line)"),
    ("--stage_batch_size=-3",
     "config key 'stage_batch_size' expects int ≥ 1 or None, got -3 (int) (from the command line)"),
    ("--learning_rate=0", "config key 'learning_rate' expects float > 0, got 0 (int) (from the command line)"),
    ("--user_window_size=0", "config key 'user_window_size' expects int ≥ 1, got 0 (int) (from the command line)"),
    ("--rerank_top_k=0", "config key 'rerank_top_k' expects int ≥ 1, got 0 (int) (from the command line)"),
    ("--lr_warmup_steps=-1", "config key 'lr_warmup_steps' expects int ≥ 0, got -1 (int) (from the command line)"),
    ("--train_positions=every",
     "config key 'train_positions' expects str (one of last, all), got 'every' (str) (from the command line)"),
])
def test_wrong_types(tiny_data, arg, message):
    with pytest.raises(ConfigKeyError) as error:
        Config("SASRec", "tiny", config_dict=tiny_data, cmd_args=[arg])
    assert str(error.value) == message


def test_float_takes_an_int_and_none_is_fine_where_the_default_is_none(tiny_data):
    config = Config("SASRec", "tiny", config_dict=dict(tiny_data, item_image_field=None),
                    cmd_args=["--learning_rate=1", "--run_label=None", "--gpu_id=1"])
    assert config["learning_rate"] == 1 and config["run_label"] is None and config["item_image_field"] is None
    with pytest.raises(ConfigKeyError, match="'epochs' expects int ≥ 0, got None"):  # declared 300: None is no int
        Config("SASRec", "tiny", config_dict=tiny_data, cmd_args=["--epochs=None"])


def test_ranges_and_choices_are_read_from_the_type_comments():
    from recbole_mllm.config_check import _parse_type

    assert _parse_type("int ≥ 1 or None") == (["int"], True, [("≥", 1.0)], [])
    assert _parse_type("float > 0") == (["float"], False, [(">", 0.0)], [])
    assert _parse_type("str: unix_s | unix_ms | none") == (["str"], False, [], ["unix_s", "unix_ms", "none"])
    assert _parse_type("int between 1 and 2") is None  # words that name no type: not checked
    known = known_keys()
    assert known["stage_batch_size"].accepts(None) and known["stage_batch_size"].accepts(1)
    assert not known["stage_batch_size"].accepts(0) and known["stage_no_repeat_ngram_size"].accepts(0)
    assert known["encoder_item_content"].accepts("minilm+image") and not known["encoder_item_content"].accepts("clip")
    assert known["epochs"].accepts(0) and not known["epochs"].accepts(-1)


def test_the_stages_check_ranges_before_anything_loads():
    from recbole_mllm.stages.common import stage_config

    with pytest.raises(ConfigKeyError, match=r"'stage_shard_size' expects int ≥ 1, got 0"):
        stage_config(["--dataset=ml-100k", "--stage_shard_size=0"])


@pytest.mark.parametrize("key, value", [("encoder_item_input", "ids"), ("encoder_id_init", "pca"),
                                        ("encoder_warmup_batch_size", 0)])
def test_encoder_choices_fail_before_any_stage_runs(key, value):
    """The encoder's strings are checked with the config, not when the model is built after the LLM stages."""
    with pytest.raises(ConfigKeyError, match=f"'{key}' expects"):
        check_config([(key, value, "command line")])


def test_keys_recbole_and_the_stages_declare_are_known():
    known = known_keys()
    assert {"reg_weight", "n_layers", "stage_shard_size", "user_shard_size", "per_model",
            "check_config_keys", "local_rank", "dataset", "model"} <= set(known)
    assert known["rerank_top_k"].types == ["int"] and known["topk"].accepts(10) and known["topk"].accepts([5])
    assert "ml-100k" not in known  # RecBole's dataset download addresses are no keys


@pytest.mark.parametrize("path", sorted(p.relative_to(properties_dir()).as_posix()
                                        for p in properties_dir().rglob("*.yaml") if p.parent.name != "tuning"))
def test_every_shipped_yaml_key_is_known_and_of_its_declared_type(path, tiny_data):
    """Each shipped YAML passes the check as a user's config file, per_model sections included."""
    Config("SASRec", "tiny", [str(properties_dir() / path)], tiny_data)


@pytest.mark.parametrize("path", sorted(p.name for p in (properties_dir() / "tuning").glob("*.yaml")))
def test_every_search_space_value_is_of_its_keys_type(path):
    space = load_search_space(properties_dir() / "tuning" / path)
    for space_type, entries in space.items():
        for name, values in entries.items():
            options = values if space_type == "choice" else [{name: value} for value in values]
            check_config([(key, value, path) for option in options
                          for key, value in (option.items() if isinstance(option, dict) else [(name, option)])])


def test_check_config_keys_false_lets_a_custom_key_through(tiny_data, tmp_path):
    config = Config("SASRec", "tiny", config_dict=dict(tiny_data, check_config_keys=False, my_alpha="x"),
                    cmd_args=["--rerank_top_k=abc"])
    assert config["my_alpha"] == "x" and config["rerank_top_k"] == "abc"
    config_file = tmp_path / "custom.yaml"
    config_file.write_text("check_config_keys: False\nmy_beta: 2\n")
    assert Config("SASRec", "tiny", [str(config_file)], tiny_data)["my_beta"] == 2


@pytest.mark.parametrize("model, arg, key", [("SASRec", "--learning_rat=0.5", "'learning_rat'"),
                                             ("MLLMSRec", "--rerank_top_k=abc", "'rerank_top_k'")])
def test_run_recbole_mllm_fails_in_config_with_one_line(tmp_path, model, arg, key):
    """Run from an empty folder: nothing (no log, no dataset download, no checkpoint) is written before it fails."""
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "run_recbole_mllm.py"), f"--model={model}",
                           "--dataset=ml-100k", arg], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and key in last
    assert "Traceback" not in proc.stderr and not any(tmp_path.iterdir())


@pytest.mark.parametrize("model", ["FusedSASRec", "MLLMSRec"])
def test_the_encoders_old_dropout_key_names_sasrecs_two(tiny_data, model, tmp_path):
    def message(origin):
        return re.escape(f"config key 'dropout_prob' (from {origin}) is not read by {model}: set hidden_dropout_prob and "
                         f"attn_dropout_prob instead (a key for another model of the command goes in its per_model section)")

    with pytest.raises(ConfigKeyError, match=message("config_dict")):
        Config(model, "tiny", config_dict=dict(tiny_data, dropout_prob=0.2))
    with pytest.raises(ConfigKeyError, match=message("the command line")):
        Config(model, "tiny", config_dict=tiny_data, cmd_args=["--dropout_prob=0.2"])
    config_file = tmp_path / "models.yaml"
    config_file.write_text(f"per_model:\n  {model}: {{dropout_prob: 0.2}}\n  GRU4Rec: {{dropout_prob: 0.3}}\n")
    with pytest.raises(ConfigKeyError, match=message(f"per_model section '{model}' of {config_file}")):
        Config(model, "tiny", [str(config_file)], tiny_data)
    config_file.write_text("per_model:\n  GRU4Rec: {dropout_prob: 0.3}\n")  # another model's key: not this model's
    assert Config(model, "tiny", [str(config_file)], tiny_data)["dropout_prob"] is None
    assert Config("GRU4Rec", "tiny", [str(config_file)], tiny_data)["dropout_prob"] == 0.3
