"""Tuning: the shipped search spaces, the fixed trial list, trials as separate runs, selection on validation."""

import json
import subprocess
import sys

import pytest
import yaml

from recbole_mllm.search_space import load_search_space, search_space_file, space_keys
from recbole_mllm.tuning import Search, build_parser, main, sample_trials
from tests.conftest import REPO_ROOT

TUNED_MODELS = ("SASRec", "BERT4Rec", "GRU4Rec", "FusedSASRec")


@pytest.mark.parametrize("model", TUNED_MODELS)
def test_every_model_ships_a_space_of_the_same_size(model):
    space = load_search_space(search_space_file(model))
    sizes = [len(options) for options in space["choice"].values()]
    assert sorted(sizes) == [1, 1, 2, 2, 2, 2, 3], sizes  # the same five settings, 48 combinations, for every model
    assert space["choice"]["train_positions"] == ["all"] and space["choice"]["train_batch_size"] == [128]  # one regime
    assert {"learning_rate", "MAX_ITEM_LIST_LENGTH", "hidden_size"} <= set(space_keys(space))
    trials = sample_trials(space, 8)
    assert len(trials) == len({json.dumps(t, sort_keys=True) for t in trials}) == 8  # 8 distinct settings
    assert trials == sample_trials(space, 8)  # the same list every time


def test_mapping_options_set_their_keys_together(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("choice:\n  width: [{hidden_size: 8, inner_size: 16}, {hidden_size: 4, inner_size: 8}]\n"
                    "  learning_rate: [0.1]\n")
    trials = sample_trials(load_search_space(path), 5)
    assert sorted(t["hidden_size"] for t in trials) == [4, 8]  # only two distinct settings exist
    assert all(t["inner_size"] == 2 * t["hidden_size"] and t["learning_rate"] == 0.1 for t in trials)


def test_bad_space_is_one_error_naming_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("choise:\n  learning_rate: [0.1]\n")
    with pytest.raises(ValueError, match="bad.yaml: unknown search-space type 'choise'"):
        load_search_space(path)


def _space(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("choice:\n  learning_rate: [0.0001, 0.01]\n")
    return path


def test_two_trials_run_select_on_validation_and_resume(tiny_data, tmp_path):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(dict(tiny_data, epochs=2)))
    args = ["--model=SASRec", "--dataset=tiny", f"--space={_space(tmp_path)}", "--trials=2",
            f"--config_files={tmp_path / 'tiny.yaml'}",
            f"--tuning_dir={tmp_path / 'tuning'}", f"--selected_config={tmp_path / 'SASRec.yaml'}"]
    assert main([*args, "--trial=1"]) == 0  # one trial, as one process of a parallel search
    folder = tmp_path / "tuning" / "tiny" / "SASRec"
    assert (folder / "trial-1" / "record.json").is_file() and not (folder / "trial-0").exists()
    assert not (folder / "selected.yaml").exists()  # nothing is selected while a trial is missing
    assert main(args) == 0  # runs trial 0 only, then selects
    records = [json.loads((folder / f"trial-{i}" / "record.json").read_text()) for i in range(2)]
    best = max(range(2), key=lambda i: records[i]["best_valid_score"])
    selected = yaml.safe_load((tmp_path / "SASRec.yaml").read_text())
    assert selected == {"learning_rate": records[best]["hyper_parameters"]["learning_rate"]}
    assert (folder / "selected.yaml").read_text() == (tmp_path / "SASRec.yaml").read_text()
    assert f"| {best} (selected) |" in (folder / "tuning.md").read_text()
    mtime = (folder / "trial-0" / "record.json").stat().st_mtime
    assert main(args) == 0 and (folder / "trial-0" / "record.json").stat().st_mtime == mtime


def test_another_search_in_the_same_folder_is_refused(tiny_data, tmp_path):
    Search(tmp_path / "t", "SASRec", "tiny", _space(tmp_path), 2, ["--epochs=2"])
    Search(tmp_path / "t", "SASRec", "tiny", _space(tmp_path), 2, ["--epochs=2", "--gpu_id=1"])  # placement only
    with pytest.raises(ValueError, match="holds another search"):
        Search(tmp_path / "t", "SASRec", "tiny", _space(tmp_path), 2, ["--epochs=3"])


def test_a_tuned_key_on_the_command_line_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--learning_rate is tuned by"):
        Search(tmp_path / "t", "SASRec", "tiny", _space(tmp_path), 2, ["--learning_rate=0.1"])


def test_a_search_under_torchrun_is_refused(monkeypatch, capsys):
    from recbole_mllm import tuning

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert tuning.main(["--model=SASRec", "--dataset=tiny"]) == 2
    assert "run the search as one process, not under torchrun" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--trials=0"], "--trials must be at least 1; got 0"), (["--trials=-3"], "--trials must be at least 1; got -3"),
    (["--trials=2", "--trial=2"], "--trial must be between 0 and 1 (--trials=2); got 2"),
    (["--jobs=0"], "--jobs must be at least 1; got 0"), (["--space=nowhere.yaml"], "no search space nowhere.yaml: pass --space=<file>")])
def test_bad_options_are_one_line_and_write_nothing(tmp_path, capsys, argv, message):
    assert main(["--model=SASRec", "--dataset=tiny", f"--tuning_dir={tmp_path / 't'}", *argv]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "t").exists()
    with pytest.raises(ValueError, match="--trials must be at least 1"):  # library callers too
        Search(tmp_path / "t", "SASRec", "tiny", search_space_file("SASRec"), 0, [])
    assert not (tmp_path / "t").exists()


def test_another_search_is_one_line(tiny_data, tmp_path, capsys):
    Search(tmp_path / "t" / "tiny" / "SASRec", "SASRec", "tiny", search_space_file("SASRec"), 2, [])
    argv = ["--model=SASRec", "--dataset=tiny", f"--tuning_dir={tmp_path / 't'}", "--trials=3",
            f"--data_path={tiny_data['data_path']}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds another search" in err
    with pytest.raises(ValueError, match="holds another search"):
        main([*argv, "--debug"])


def test_help_lists_the_options():
    proc = subprocess.run([sys.executable, "-m", "recbole_mllm.tuning", "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--trials" in proc.stdout and "--trial " in proc.stdout


def test_trials_cover_every_option_about_equally_often():
    space = load_search_space(search_space_file("SASRec"))
    trials = sample_trials(space, 8)
    assert sorted(t["hidden_dropout_prob"] for t in trials) == [0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.3, 0.3]
    assert sorted(t["MAX_ITEM_LIST_LENGTH"] for t in trials) == [50] * 4 + [200] * 4
    assert all(t["attn_dropout_prob"] == t["hidden_dropout_prob"] for t in trials)


def test_ranges_are_stratified(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("uniform:\n  dropout_prob: [0.0, 0.5]\nloguniform:\n  learning_rate: [-9.2, -4.6]\n")
    trials = sample_trials(load_search_space(path), 5)
    assert sorted(int(t["dropout_prob"] / 0.1) for t in trials) == [0, 1, 2, 3, 4]  # one draw in each fifth
    assert all(1e-4 < t["learning_rate"] < 1.01e-2 for t in trials)


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "properties" / "tuned").glob("*/*.yaml")), ids=lambda p: p.stem)
def test_shipped_tuned_configs_set_only_their_space_keys_and_are_commented(path):
    settings = yaml.safe_load(path.read_text())
    assert set(settings) <= set(space_keys(load_search_space(search_space_file(path.stem))))
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            assert "# (" in line, f"{path.name}: '{line}' is not commented as '# (type) meaning.'"


def test_jobs_run_trials_as_parallel_processes_then_select(tiny_data, tmp_path):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(dict(tiny_data, epochs=2)))
    args = ["--model=SASRec", "--dataset=tiny", f"--space={_space(tmp_path)}", "--trials=2",
            f"--config_files={tmp_path / 'tiny.yaml'}", f"--tuning_dir={tmp_path / 'tuning'}", "--jobs=2"]
    assert main(args) == 0
    folder = tmp_path / "tuning" / "tiny" / "SASRec"
    for i in range(2):
        assert (folder / f"trial-{i}" / "record.json").is_file()
        assert "trial" in (folder / f"trial-{i}" / "log.txt").read_text()  # each process wrote its own log
    assert (folder / "selected.yaml").is_file()


def test_a_failed_trial_process_names_its_log(tiny_data, tmp_path):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(dict(tiny_data, epochs=2)))
    args = ["--model=SASRec", "--dataset=tiny", f"--space={_space(tmp_path)}", "--trials=2",
            f"--config_files={tmp_path / 'tiny.yaml'}", f"--tuning_dir={tmp_path / 'tuning'}", "--jobs=2",
            "--data_path=/nonexistent"]  # a placement key: the search is valid, every trial process fails
    with pytest.raises(RuntimeError, match=r"trials \[0, 1\] failed; their output: .*trial-0/log.txt"):
        main(args)


def test_a_trial_of_a_plugin_model_prepares_its_stages_before_the_model(tiny_data, tmp_path, monkeypatch):
    """Each trial is a quick_start.run, so it builds (or checks) the stage caches its model reads first."""
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_data))
    asked = []

    def stop(config, stages, histories=None):
        asked.append(tuple(stages))
        raise RuntimeError("stages asked for")

    monkeypatch.setattr("recbole_mllm.quick_start.prepare_stages", stop)
    search = Search(tmp_path / "t", "FusedSASRec", "tiny", _space(tmp_path), 2, [])
    with pytest.raises(RuntimeError, match="stages asked for"):
        search.run_trial(0, [str(tmp_path / "tiny.yaml")], [])
    assert asked == [("item_fusion",)]


def test_a_trials_gpu_id_stays_a_config_override():
    """argparse would read --gpu_id=1 as an abbreviation of --gpu_ids and put every trial on GPU 0."""
    args, overrides = build_parser().parse_known_args(["--model=SASRec", "--dataset=d", "--trial=0", "--gpu_id=1"])
    assert overrides == ["--gpu_id=1"] and args.gpu_ids is None
