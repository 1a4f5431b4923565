"""User stage: the window rule, its edge cases, which summaries are built, and the no-leakage property."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recbole_mllm.data import UserHistory
from recbole_mllm.stages.user_profile import run_user_profile
from recbole_mllm.stages.user_profile_cache import WindowRule, open_user_summaries, summary_key, summary_keys
from user_profile_doubles import T0, EchoBackend, build_items, shown_items, toy_config, write_items

EARLY = [f"e{i}" for i in range(6)]
LATE = [f"late{i}" for i in range(4)]
DAY = 86400.0


def history(items, gap=3 * DAY) -> UserHistory:
    return UserHistory(list(items), [T0 + gap * k for k in range(len(items))])


@pytest.fixture(scope="module")
def items_ready(tmp_path_factory):
    """One toy .item with every token the tests use, and its item fusion cache (built once)."""
    root = tmp_path_factory.mktemp("windows")
    write_items(root / "toy", "toy", EARLY + LATE + [f"i{k}" for k in range(30)])
    build_items(toy_config(root), EchoBackend())
    return root


def run(root, histories, **overrides):
    """Run the stage on ``histories``; returns the backend (requests seen) and the loaded summaries."""
    config = toy_config(Path(root), **overrides)
    backend = EchoBackend()
    run_user_profile(config, backend, histories, progress=False)
    return backend, open_user_summaries(config, backend, histories)


def test_summary_key_table():
    # t: earlier interactions -> c: items covered by the summary used at t
    assert [summary_key(t, 3, 3) for t in range(10)] == [0, 1, 2, 3, 3, 3, 6, 6, 6, 9]
    assert [summary_key(t, 3, 3, partial_first=False) for t in range(7)] == [0, 0, 0, 3, 3, 3, 6]
    assert [summary_key(t, 2, 3) for t in range(2, 12)] == [2, 2, 2, 5, 5, 5, 8, 8, 8, 11]   # S > W
    assert [summary_key(t, 4, 2) for t in range(4, 10)] == [4, 4, 6, 6, 8, 8]               # S < W
    assert all(summary_key(t, w, s) <= t for t in range(40) for w in range(1, 6) for s in range(1, 6))


def test_chain_windows_and_bounds():
    assert WindowRule(2, 3).windows(11) == [(0, 2), (3, 5), (6, 8), (9, 11)]         # S > W skips 2, 5, 8
    assert WindowRule(4, 2, max_windows=2).windows(8) == [(2, 6), (4, 8)]            # last M windows only
    assert WindowRule(4, 2, max_windows=2).windows(6) == [(0, 4), (2, 6)]
    assert WindowRule(5, 5).windows(3) == [(0, 3)]                                   # partial first window
    with pytest.raises(ValueError, match="no summary covers exactly 7"):
        WindowRule(5, 5).windows(7)
    with pytest.raises(ValueError, match="no summary covers exactly 3"):
        WindowRule(5, 5, partial_first=False).windows(3)
    for bad in ({"size": 0, "step": 1}, {"size": 2, "step": 0}, {"size": 2, "step": 1, "max_windows": -1},
                {"size": True, "step": 1}, {"size": 2.0, "step": 1}):
        with pytest.raises(ValueError, match="must be an integer"):
            WindowRule(**bad)


def test_history_shorter_than_window(items_ready):
    histories = {"a": history(["e0", "e1", "e2"])}                   # n = 3 < W = 5: t = 1, 2 needed
    backend, summaries = run(items_ready, histories, user_window_size=5, user_window_step=5)
    assert sorted(shown_items(r.prompt) for r in backend.requests) == [["e0"], ["e0", "e1"]]
    assert summaries.texts([("a", 2)])[0].endswith("saw e0,e1") and summaries.texts([("a", 1)])[0].endswith("saw e0")
    assert summaries.texts([("a", 0)]) == [summaries.empty_text] and "nothing is known" in summaries.empty_text

    backend, summaries = run(items_ready, histories, user_window_size=5, user_window_step=5,
                             user_window_partial_first=False)
    assert backend.requests == [] and summaries.records == {}
    assert summaries.texts([("a", 1), ("a", 2)]) == [summaries.empty_text] * 2
    assert summaries.embeddings([("a", 2)]).equal(EchoBackend().embed([summaries.empty_text]))


def test_step_larger_than_window_skips_items(items_ready):
    items = [f"i{k}" for k in range(12)]
    backend, summaries = run(items_ready, {"a": history(items)}, user_window_size=2, user_window_step=3,
                             user_summary_max_windows=0)
    # t = 8, 9 (train), 10 (valid), 11 (test) -> c = 8, 8, 8, 11: one chain of four windows
    assert sorted(summaries.records) == [("a", 8), ("a", 11)]
    assert [shown_items(r.prompt) for r in backend.requests] == [["i0", "i1"], ["i3", "i4"], ["i6", "i7"], ["i9", "i10"]]
    assert backend.generate_calls == 4
    assert summaries.texts([("a", 10)])[0].endswith("saw i6,i7") and summaries.texts([("a", 11)])[0].endswith("saw i9,i10")


def test_overlapping_windows_and_max_windows(items_ready):
    items = [f"i{k}" for k in range(10)]
    backend, summaries = run(items_ready, {"a": history(items)}, user_window_size=4, user_window_step=2,
                             user_summary_max_windows=2)
    # t = 6, 7, 8, 9 -> c = 6, 6, 8, 8; each chain holds the last two windows before its c
    assert sorted(summaries.records) == [("a", 6), ("a", 8)]
    shown = sorted(shown_items(r.prompt) for r in backend.requests)
    assert shown == [["i0", "i1", "i2", "i3"], ["i2", "i3", "i4", "i5"], ["i2", "i3", "i4", "i5"], ["i4", "i5", "i6", "i7"]]
    assert backend.generate_calls == 2  # two steps, both chains in each batch
    assert {r.meta["chain_windows"] for r in summaries.records.values()} == {2}
    first_steps = [r for r in backend.requests if "Summary of the user's preferences" not in r.prompt]
    assert len(first_steps) == 2  # each chain starts without an earlier summary

    backend, summaries = run(items_ready, {"a": history(items)}, user_window_size=4, user_window_step=2,
                             user_summary_max_windows=0)
    assert [shown_items(r.prompt) for r in backend.requests] == [
        ["i0", "i1", "i2", "i3"], ["i2", "i3", "i4", "i5"], ["i4", "i5", "i6", "i7"]]  # one shared chain


def test_only_needed_summaries_are_generated(items_ready):
    histories = {"u1": history([f"i{k}" for k in range(25)]), "u2": history(["e0", "e1"]), "u3": history(["e2"]),
                 "u4": history([f"i{k}" for k in range(7)]), "u5": history([f"i{k}" for k in range(13)])}
    config = dict(user_window_size=3, user_window_step=3, user_summary_max_windows=3, user_shard_size=2)
    # u1: t 21..24 -> c 21, 24: chains of windows 5-7 and 6-8 (3 + 3); u2: t 1 -> c 1 (partial, 1);
    # u3: none; u4: t 3..6 -> c 3, 6: one chain (2); u5: t 9..12 -> c 9, 12: chains 1-3 and 2-4 (3 + 3)
    assert summary_keys(histories, toy_config(items_ready, **config)) == [
        ("u1", 21), ("u1", 24), ("u2", 1), ("u4", 3), ("u4", 6), ("u5", 9), ("u5", 12)]
    backend, summaries = run(items_ready, histories, **config)
    assert len(backend.requests) == 3 + 3 + 1 + 2 + 3 + 3
    # shards of two users: (u1, u2) -> 3 steps, (u4, u5) -> 3 steps; one generate call per step
    assert backend.generate_calls == 6
    assert len(summaries.records) == 7
    with pytest.raises(KeyError, match="no user summary for user 'u1' at position 12.*llm_train_targets_per_user"):
        summaries.texts([("u1", 12)])


# ---------------------------------------------------------------------------------------- property
GAPS = st.sampled_from([0.0, 20.0, 3600.0, DAY, 15 * DAY, 70 * DAY, 800 * DAY])


def timed(items_and_gaps, start):
    times, now = [], start
    for _, gap in items_and_gaps:
        now += gap
        times.append(now)
    return [i for i, _ in items_and_gaps], times


@st.composite
def prefix_and_two_futures(draw):
    """A shared prefix of t interactions and two arbitrary continuations (changed, added, removed items)."""
    prefix = draw(st.lists(st.tuples(st.sampled_from(EARLY), GAPS), min_size=1, max_size=11))
    futures = [draw(st.lists(st.tuples(st.sampled_from(EARLY + LATE), GAPS), min_size=1, max_size=6)) for _ in range(2)]
    others = [draw(st.lists(st.tuples(st.sampled_from(EARLY + LATE), GAPS), min_size=0, max_size=8)) for _ in range(2)]
    rule = dict(user_window_size=draw(st.integers(1, 4)), user_window_step=draw(st.integers(1, 5)),
                user_summary_max_windows=draw(st.integers(0, 3)), user_window_partial_first=draw(st.booleans()))
    return prefix, futures, others, rule


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=prefix_and_two_futures())
def test_later_interactions_never_change_the_summary_used_at_t(items_ready, case):
    prefix, futures, others, rule = case
    t = len(prefix)
    results = []
    for future, other in zip(futures, others):
        items, times = timed(prefix + future, T0)
        histories = {"user": UserHistory(items, times)}
        if other:
            histories["other"] = UserHistory(*timed(other, T0 + 5 * DAY))
        # every position is needed (N covers the whole history); other histories land in other cache folders
        _, summaries = run(items_ready, histories, llm_train_targets_per_user=100, **rule)
        requests = [("user", s) for s in range(t + 1)]
        results.append((summaries.texts(requests), summaries.embeddings(requests)))
        for text in results[-1][0]:
            assert "late" not in text  # the prefix holds early items only: nothing after t was shown
    (texts_a, emb_a), (texts_b, emb_b) = results
    assert texts_a == texts_b
    assert emb_a.equal(emb_b)
