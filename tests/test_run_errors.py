"""run_recbole_mllm.py: every input error is one line on stderr and exit status 2, before any training."""

import importlib.util

import pytest

from tests.conftest import REPO_ROOT, write_tiny_dataset

_spec = importlib.util.spec_from_file_location("run_recbole_mllm", REPO_ROOT / "run_recbole_mllm.py")
run_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_script)


def _fails_in_one_line(capsys, argv, *expected):
    assert run_script.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and err[-1].endswith("(--debug shows the traceback)"), err[-3:]
    assert all(text in err[-1] for text in expected), err[-1]
    assert not any("Traceback" in line for line in err)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """The working folder is tmp_path (RecBole writes log/ there); returns the tiny dataset's arguments."""
    monkeypatch.chdir(tmp_path)
    write_tiny_dataset(tmp_path / "data")
    return ["--dataset=tiny", f"--data_path={tmp_path / 'data'}", "--epochs=1", "--show_progress=False",
            "--load_col={'inter': ['user_id', 'item_id', 'rating', 'timestamp']}",
            f"--checkpoint_dir={tmp_path / 'saved'}", f"--output_dir={tmp_path / 'outputs'}"]


def test_missing_dataset_and_config_file(in_tmp, tmp_path, capsys):
    _fails_in_one_line(capsys, ["--model=SASRec", "--dataset=nothere", f"--data_path={tmp_path}"],
                       "nothere.inter")
    _fails_in_one_line(capsys, ["--model=SASRec", *in_tmp, "--config_files=missing.yaml"],
                       "the config file missing.yaml does not exist (--config_files)")


def test_unknown_or_no_model(in_tmp, capsys):
    _fails_in_one_line(capsys, ["--model=NoSuchRec", *in_tmp], "Unknown model 'NoSuchRec'")
    _fails_in_one_line(capsys, ["--model=,", *in_tmp], "--model names no model (',')")


def test_a_yaml_tag_that_would_run_code(in_tmp, tmp_path, capsys):
    (tmp_path / "evil.yaml").write_text("epochs: !!python/object/apply:os.system ['touch pwned']\n")
    _fails_in_one_line(capsys, ["--model=SASRec", *in_tmp, f"--config_files={tmp_path / 'evil.yaml'}"],
                       f"{tmp_path / 'evil.yaml'}: ", "python/object")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("line, why", [("u1\ti3", "2 fields, but the header has 4"),
                                       ("u1\ti3\t4\tyesterday", "field 'timestamp' is 'yesterday', not a number"),
                                       ("u1\ti3\t4\t\udcff", "is not utf-8")])
def test_a_corrupt_inter_file_names_the_line(in_tmp, tmp_path, capsys, line, why):
    inter = tmp_path / "data" / "tiny" / "tiny.inter"
    lines = inter.read_text().splitlines()
    inter.write_bytes("\n".join(lines[:3] + [line] + lines[3:]).encode("utf-8", "surrogateescape") + b"\n")
    _fails_in_one_line(capsys, ["--model=SASRec", *in_tmp], f"tiny.inter:4: ", why)
    with pytest.raises(ValueError, match="tiny.inter:4: "):
        run_script.main(["--model=SASRec", *in_tmp, "--debug"])


def test_a_hub_model_that_cannot_be_read_offline(in_tmp, capsys, monkeypatch, tmp_path):
    """An MLLM named by a hub id, with the hub unreachable (HF_HUB_OFFLINE): one line naming it, before any training."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import, maybe before this test
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # an empty hub cache
    _fails_in_one_line(capsys, ["--model=MLLMSRec", *in_tmp, "--mllm=NoSuchOrg/no-such-vlm",
                                f"--stage_cache_dir={tmp_path / 'stage_cache'}", "--item_image_field=~"],
                       "unknown model 'NoSuchOrg/no-such-vlm'", "HF_HUB_OFFLINE")


@pytest.mark.parametrize("model, bad, why", [
    ("SASRec", "--test_protocols=['uni']", "Unknown evaluation protocol 'uni'"),
    ("MLLMSRec", "--late_fusion_grid=[-1]", "late_fusion_grid: a list of weights >= 0"),
    ("SASRec,MLLMSRec", "--late_fusion_grid=[-1]", "late_fusion_grid: a list of weights >= 0"),
])
def test_settings_are_refused_before_the_dataset_loads(in_tmp, capsys, monkeypatch, model, bad, why):
    """The last model's mistake is found before the first model trains, and before any dataset is read."""
    def no_loading(config):
        raise AssertionError("the dataset was loaded before the settings were checked")
    monkeypatch.setattr("recbole_mllm.quick_start.create_dataset", no_loading)
    _fails_in_one_line(capsys, [f"--model={model}", *in_tmp, bad], why)
