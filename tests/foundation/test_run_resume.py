"""A training run stopped with its machine resumes from its last finished epoch (``run_state``,
``trainer.ResumableTraining``) and ends as the same run uninterrupted would: the same best epoch, validation and test
metrics, exactly, on the CPU."""

import logging
import shutil
from pathlib import Path

import pytest
from recbole.trainer import Trainer

from recbole_mllm import run_state
from recbole_mllm.config import Config
from recbole_mllm.quick_start import run


class Interrupted(Exception):
    """The machine taken back."""


def interrupt_at(monkeypatch, trainer_class, stop_epoch=None):
    """``trainer_class``'s training epochs raise when epoch ``stop_epoch`` of ``fit``'s loop starts; returns the list
    of the loop's epochs trained (MLLMSRec's warm-up epochs, which pass their own loss, are neither counted nor
    stopped)."""
    trained, train_epoch = [], trainer_class._train_epoch

    def stopping(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if loss_func is None:
            if epoch_idx == stop_epoch:
                raise Interrupted(f"stopped at epoch {epoch_idx}")
            trained.append(epoch_idx)
        return train_epoch(self, train_data, epoch_idx, loss_func, show_progress)

    monkeypatch.setattr(trainer_class, "_train_epoch", stopping)
    return trained


def rerun(monkeypatch, caplog, model, config_dict, trainer_class=Trainer):
    """``model`` run on the tiny dataset with the loop's epochs counted: ``(its record, the epochs it trained, its
    "resumed" log lines)``; the count goes on over later runs of the test."""
    trained = interrupt_at(monkeypatch, trainer_class)
    with caplog.at_level(logging.INFO):
        result = run(model, "tiny", config_dict=config_dict)
    return result, trained, resumed_lines(caplog)


def interrupted(monkeypatch, model, config_dict, stop_epoch, trainer_class=Trainer):
    """``model`` run on the tiny dataset and stopped as epoch ``stop_epoch`` of its loop starts."""
    with monkeypatch.context() as patch:
        interrupt_at(patch, trainer_class, stop_epoch)
        with pytest.raises(Interrupted):
            run(model, "tiny", config_dict=config_dict)


def assert_same_run(result, reference):
    assert result["best_valid_score"] == reference["best_valid_score"]
    assert result["best_valid_result"] == reference["best_valid_result"]
    assert result["test_result"] == reference["test_result"]
    assert result["epochs"] == reference["epochs"]


def resumed_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("resumed ")]


def lose_checkpoints(config_dict):
    """RecBole's checkpoints are on the machine that was taken back."""
    for checkpoint in Path(config_dict["checkpoint_dir"]).glob("*.pth"):
        checkpoint.unlink()


def state_files(config_dict):
    return sorted((Path(config_dict["stage_cache_dir"]) / "run_state").glob("*.pth"))


@pytest.fixture
def sasrec(tiny_data, tmp_path):
    """Three epochs of SASRec with its learning-rate warm-up and dropout under way, its run state under tmp_path."""
    return dict(tiny_data, epochs=3, lr_warmup_steps=5, stopping_min_steps=0,
                stage_cache_dir=str(tmp_path / "stage_cache"), resume_training=True)


def test_an_interrupted_run_resumes_at_its_next_epoch_and_ends_as_if_never_stopped(sasrec, tmp_path, monkeypatch,
                                                                                     caplog):
    """Stopped as its third epoch starts, the rerun on the next machine (the data and the stage caches carried to other
    paths, RecBole's checkpoints lost) trains that epoch only; its learning-rate ramp, step counts, best epoch and
    random generators (shuffling, dropout) go on where they were."""
    reference = run("SASRec", "tiny", config_dict=dict(sasrec, stage_cache_dir=str(tmp_path / "elsewhere")))
    interrupted(monkeypatch, "SASRec", sasrec, stop_epoch=2)
    next_machine = tmp_path / "next_machine"
    moved = dict(sasrec, data_path=str(next_machine / "data"), stage_cache_dir=str(next_machine / "stage_cache"),
                 checkpoint_dir=str(next_machine / "saved"))
    shutil.copytree(sasrec["data_path"], moved["data_path"])
    shutil.copytree(sasrec["stage_cache_dir"], moved["stage_cache_dir"])
    result, trained, resumed = rerun(monkeypatch, caplog, "SASRec", moved)
    assert trained == [2]
    assert len(resumed) == 1 and "epoch 2 of 3 done" in resumed[0]
    assert_same_run(result, reference)


def test_a_finished_run_is_tested_again_without_training(sasrec, monkeypatch, caplog):
    """Its best epoch's weights come from the run state (RecBole's checkpoint was on the lost machine)."""
    first = run("SASRec", "tiny", config_dict=sasrec)
    lose_checkpoints(sasrec)
    again, trained, resumed = rerun(monkeypatch, caplog, "SASRec", sasrec)
    assert trained == [] and "epoch 3 of 3 done" in resumed[0]
    assert_same_run(again, first)


def test_an_early_stopped_run_stays_stopped(sasrec, monkeypatch, caplog):
    """Validation that never improves after the first epoch stops the run after its third (patience 1); resumed, it
    trains no more of its ten epochs."""
    stopping = dict(sasrec, epochs=10, stopping_step=1)
    scores = iter([0.5, 0.4, 0.3, 0.2])
    valid_epoch = Trainer._valid_epoch
    monkeypatch.setattr(Trainer, "_valid_epoch",
                        lambda self, data, show_progress=False: (next(scores), valid_epoch(self, data, show_progress)[1]))
    first = run("SASRec", "tiny", config_dict=stopping)
    assert first["epochs"] == 3  # its best epoch is the first: the test must read that epoch's weights
    lose_checkpoints(stopping)
    again, trained, resumed = rerun(monkeypatch, caplog, "SASRec", stopping)
    assert trained == [] and "stopped early" in resumed[0]
    assert_same_run(again, first)


def test_a_changed_training_key_starts_over(sasrec, monkeypatch, caplog):
    run("SASRec", "tiny", config_dict=sasrec)
    _, trained, resumed = rerun(monkeypatch, caplog, "SASRec", dict(sasrec, learning_rate=0.002))
    assert trained == [0, 1, 2] and not resumed
    assert len(state_files(sasrec)) == 2


def test_resume_training_false_starts_over_and_writes_its_own_state(sasrec, monkeypatch, caplog):
    run("SASRec", "tiny", config_dict=sasrec)
    _, trained, resumed = rerun(monkeypatch, caplog, "SASRec", dict(sasrec, resume_training=False))
    assert trained == [0, 1, 2] and not resumed
    assert len(state_files(sasrec)) == 1  # the same run: the switch is not part of its key


def test_the_key_ignores_where_files_go_and_what_is_shown_but_not_what_is_trained(sasrec, tmp_path):
    def key(**changes):
        return run_state.run_key(Config("SASRec", "tiny", config_dict=dict(sasrec, **changes)), model=None)

    assert key() == key(checkpoint_dir=str(tmp_path / "other"), stage_cache_dir=str(tmp_path / "other"),
                        show_progress=True, eval_batch_size=7, test_protocols=["full"], resume_training=False)
    assert len({key(), key(learning_rate=0.002), key(seed=1), key(hidden_size=16), key(train_batch_size=32)}) == 5


def test_the_key_covers_the_datasets_content(sasrec):
    config = Config("SASRec", "tiny", config_dict=sasrec)
    before = run_state.run_key(config, model=None)
    inter = Path(config["data_path"]) / "tiny.inter"
    inter.write_text(inter.read_text().replace("\ti1\t", "\ti2\t", 1))
    assert run_state.run_key(config, model=None) != before


def test_an_unreadable_state_is_a_one_line_error_naming_the_file(sasrec):
    run("SASRec", "tiny", config_dict=sasrec)
    (path,) = state_files(sasrec)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(run_state.RunStateError, match=f"cannot read the run state {path}.*resume_training=False") as error:
        run("SASRec", "tiny", config_dict=sasrec)
    assert "\n" not in str(error.value)


def test_a_run_waits_while_an_identical_run_holds_its_state(sasrec, monkeypatch):
    """Two identical runs started together take turns: the second trains nothing before the first lets go."""
    import threading

    from filelock import FileLock

    from recbole_mllm.data import create_dataset
    from recbole_mllm.quick_start import split_and_build_model
    from recbole_mllm.utils import get_trainer

    config = Config("SASRec", "tiny", config_dict=sasrec)
    model, train_data, valid_data, _ = split_and_build_model(config, create_dataset(config))
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    path = run_state.state_path(config, model)
    path.parent.mkdir(parents=True)
    trained = interrupt_at(monkeypatch, Trainer)
    holder = FileLock(f"{path}.lock")
    holder.acquire()  # the first run is training
    waiting = threading.Thread(target=trainer.fit, args=(train_data, valid_data), kwargs={"saved": False})
    waiting.start()
    waiting.join(timeout=2.0)
    assert waiting.is_alive() and trained == []
    holder.release()
    waiting.join(timeout=60)
    assert not waiting.is_alive() and trained == [0, 1, 2] and path.is_file()


def test_a_run_that_starts_over_makes_its_state_folder(sasrec):
    run("SASRec", "tiny", config_dict=dict(sasrec, resume_training=False))
    assert len(state_files(sasrec)) == 1


def test_a_state_written_by_another_number_of_processes_is_a_one_line_error_naming_the_file():
    """Each rank resumes its own generators: a state of two ranks read by one process names the file and the fix."""
    with pytest.raises(run_state.RunStateError, match=r"state\.pth was written by 2 process\(es\) and is resumed by 1"):
        run_state.rank_rng([{}, {}], "state.pth")
    assert run_state.rank_rng([{"torch": 1}], "state.pth") == {"torch": 1}
