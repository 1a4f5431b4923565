"""The data layer's split rules (``data.split``) against RecBole's own leave-one-out split, every mode."""

import numpy as np
import pytest

from recbole_mllm.config import Config
from recbole_mllm.data import create_dataset, held_out_count, needed_positions, user_histories, user_split

MODES = ("valid_and_test", "valid_only", "test_only")

# per user, its items in time order: every short length RecBole treats specially, and users who repeat items
HISTORIES = {"one": ["a"], "two": ["a", "b"], "three": ["a", "b", "c"], "four": ["a", "b", "c", "d"],
             "loop": ["a", "b", "a", "c", "b", "a"], "again": ["c", "c", "c", "c", "c"],
             "long": [f"{x}" for x in "abcdefghijkl"], "back": ["d", "e", "f", "g", "d"]}


def _config(tmp_path, mode):
    folder = tmp_path / "split"
    folder.mkdir(exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    lines += [f"{user}\t{item}\t{1000 + 10 * t}" for user, items in HISTORIES.items() for t, item in enumerate(items)]
    (folder / "split.inter").write_text("\n".join(lines) + "\n")
    eval_args = {"split": {"LS": mode}, "order": "TO", "group_by": "user", "mode": "full"}
    return Config("SASRec", "split", config_dict={"data_path": str(tmp_path), "MAX_ITEM_LIST_LENGTH": 50,
                                                 "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
                                                 "eval_args": eval_args, "test_protocols": None})


def _rows(part, dataset):
    """``{user token: [(t, input items, target)]}`` of one built part (``t`` = the input's length)."""
    feat, tokens = part.inter_feat, dataset.field2id_token[dataset.uid_field]
    out = {}
    for u, length, items, target in zip(feat[dataset.uid_field].tolist(), feat["item_length"].tolist(),
                                        feat[f"{dataset.iid_field}_list"].tolist(), feat[dataset.iid_field].tolist()):
        out.setdefault(str(tokens[u]), []).append((length, items[:length], target))
    return out


@pytest.mark.parametrize("mode", MODES)
def test_user_split_is_recboles_split(tmp_path, mode):
    config = _config(tmp_path, mode)
    dataset = create_dataset(config)
    histories = user_histories(dataset)
    parts = dict(zip(("train", "valid", "test"), (_rows(p, dataset) for p in dataset.build())))
    item_id = {str(token): i for i, token in enumerate(dataset.field2id_token[dataset.iid_field])}
    for user, items in HISTORIES.items():
        assert histories[user].items == items
        split = user_split(len(items), config)
        for name in ("train", "valid", "test"):
            assert [t for t, _, _ in parts[name].get(user, [])] == list(getattr(split, name)), (mode, user, name)
        # training items: every item a training row shows, as input or as target (repeats included)
        shown = {i for _, inputs, target in parts["train"].get(user, []) for i in [*inputs, target]}
        assert shown == {item_id[i] for i in items[:split.first_held_out]} or len(items) < 2, (mode, user)


def test_needed_positions_follow_recboles_leave_one_out():
    config = {"llm_train_targets_per_user": 2}
    assert needed_positions(10, config) == [6, 7, 8, 9]      # train 6, 7; valid 8; test 9
    assert needed_positions(4, config) == [1, 2, 3]          # only one training target exists
    assert needed_positions(3, config) == [1, 2]             # RecBole: no valid row, test at 2
    assert needed_positions(2, config) == [1]                # RecBole: one training row
    assert needed_positions(1, config) == []
    assert needed_positions(10, {"llm_train_targets_per_user": 0}) == [8, 9]
    assert needed_positions(10, {"eval_args": {"split": {"LS": "valid_only"}}}) == [7, 8, 9]
    assert needed_positions(10, {"eval_args": {"split": {"LS": "test_only"}}}) == [7, 8, 9]
    with pytest.raises(ValueError, match="leave-one-out"):
        needed_positions(10, {"eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}}})


def test_held_out_count_follows_the_split():
    assert held_out_count({"eval_args": {"split": {"LS": "valid_and_test"}}}) == 2
    assert held_out_count({"eval_args": {"split": {"LS": "test_only"}}}) == 1
    with pytest.raises(ValueError, match="leave-one-out"):
        held_out_count({"eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}}})


def test_short_histories_hold_out_fewer_rows():
    config = {"eval_args": {"split": {"LS": "valid_and_test"}}}
    three = user_split(3, config)  # two rows: RecBole keeps one for training and tests the other
    assert (list(three.train), list(three.valid), list(three.test), three.first_held_out) == ([1], [], [2], 2)
    assert user_split(2, config).first_held_out == 2 and not user_split(2, config).test
    assert np.array_equal(np.asarray([user_split(n, config).first_held_out for n in range(2, 8)]), [2, 2, 2, 3, 4, 5])
