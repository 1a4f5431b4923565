"""phase_timing: where a run's wall time goes, per phase, in every run record."""

import pytest

from recbole_mllm import phase_timing
from recbole_mllm.phase_timing import PhaseTimer
from recbole_mllm.quick_start import run


@pytest.fixture
def clock(monkeypatch):
    """A clock the test moves by hand: ``clock.now += seconds``."""
    class Clock:
        now = 100.0
    monkeypatch.setattr(phase_timing.time, "perf_counter", lambda: Clock.now)
    return Clock


def test_a_phase_inside_another_counts_towards_the_outer_one_and_repeats_add_up(clock):
    timer = PhaseTimer()
    with timer.phase("warmup"):
        clock.now += 2
        with timer.phase("train"):  # the warm-up's own epochs are warm-up time
            clock.now += 3
    with timer.phase("train"):
        clock.now += 4
    with timer.phase("train"):
        clock.now += 1
    assert timer.seconds == {"warmup": 5, "train": 5}


def test_phases_go_to_the_active_timer_and_to_none_outside_a_run(clock):
    with phase_timing.phase("train"):  # no run: nothing is timed, nothing fails
        clock.now += 9
    timer = PhaseTimer()
    with timer.active():
        with phase_timing.phase("dataset"):
            clock.now += 1.5
        with phase_timing.phase("train"):
            clock.now += 6
        with phase_timing.phase("valid"):
            clock.now += 2
    with phase_timing.phase("test"):  # the run is over
        clock.now += 5
    assert timer.account(12.0) == {"dataset": 1.5, "train": 6, "valid": 2, "other": 2.5, "total": 12}
    assert phase_timing.describe({"train": 6.0, "total": 12.0}) == "train 6.0 s, total 12.0 s"


def test_a_phase_that_raises_is_still_counted_and_closed(clock):
    timer = PhaseTimer()
    with pytest.raises(RuntimeError):
        with timer.phase("stages"):
            clock.now += 7
            raise RuntimeError("stage failed")
    with timer.phase("model"):  # not swallowed by a phase left open
        clock.now += 1
    assert timer.seconds == {"stages": 7, "model": 1}


def test_a_baseline_runs_record_accounts_for_its_wall_time(tiny_data):
    phases = run("SASRec", "tiny", config_dict=tiny_data)["phase_seconds"]
    assert {"dataset", "split", "stages", "build_model", "train", "valid", "test", "other", "total"} <= set(phases)
    assert all(seconds >= 0 for seconds in phases.values())
    assert sum(seconds for name, seconds in phases.items() if name != "total") == pytest.approx(phases["total"], abs=0.6)
