"""Per-user evaluation records: RecBole's own rec.topk rows, user ids, targets and the slice features."""

from types import SimpleNamespace

import numpy as np
import pytest
from recbole.evaluator.metrics import NDCG

from recbole_mllm.evaluation import user_item_statistics
from recbole_mllm.quick_start import run


def test_records_hold_recbole_rows_for_every_test_user(tiny_data, tmp_path):
    result = run("SASRec", "tiny", config_dict=tiny_data)
    inter = np.loadtxt(tmp_path / "data" / "tiny" / "tiny.inter", dtype=str, skiprows=1)
    last_item = {}
    for user, item, _, time in sorted(inter.tolist(), key=lambda row: float(row[3])):
        last_item[user] = item  # each user's test target: the latest interaction
    config = result["config"]
    for protocol, record in result["per_user"].items():
        users = record["user_id"]
        assert len(users) == len(set(users.tolist())) == len(last_item)  # one row per user, every user once
        # the per-user NDCG@10 of RecBole's metric class averages to the reported test result
        ndcg = NDCG(config).metric_info(record["topk"][:, :-1].astype(bool), record["topk"][:, -1])
        assert ndcg[:, 9].mean() == pytest.approx(result["test_result"][protocol]["ndcg@10"], abs=1e-4)
        assert record["target_train_count"].shape == record["history_length"].shape == users.shape
    assert result["seed"] == 2020 and result["valid_metric"] == "ndcg@10"


def test_targets_are_the_users_last_items(tiny_data):
    from recbole_mllm.config import Config
    from recbole_mllm.data import create_dataset

    result = run("GRU4Rec", "tiny", config_dict=tiny_data)
    dataset = create_dataset(Config("GRU4Rec", "tiny", config_dict=tiny_data))
    feat = dataset.inter_feat
    order = np.lexsort((np.asarray(feat["timestamp"]), np.asarray(feat["user_id"])))
    uids, iids = np.asarray(feat["user_id"])[order], np.asarray(feat["item_id"])[order]
    last = {int(u): int(i) for u, i in zip(uids, iids)}  # later rows overwrite earlier ones
    for record in result["per_user"].values():
        assert {int(u): int(i) for u, i in zip(record["user_id"], record["target_item"])} == last


def _fake_dataset(rows, user_num, item_num):
    uids, iids, times = (np.array(column) for column in zip(*rows))
    return SimpleNamespace(inter_feat={"u": uids, "i": iids, "t": times}, uid_field="u", iid_field="i",
                           time_field="t", user_num=user_num, item_num=item_num)


def _split(mode):
    return {"eval_args": {"split": {"LS": mode}}}


def test_item_training_counts_exclude_the_held_out_items():
    # user 1: items 1, 2, 3, 4 in time order (the file lists them shuffled); user 2: items 2, 1, 5
    rows = [(1, 3, 30.0), (1, 1, 10.0), (2, 2, 5.0), (1, 4, 40.0), (1, 2, 20.0), (2, 1, 6.0), (2, 5, 7.0)]
    counts, history = user_item_statistics(_fake_dataset(rows, user_num=3, item_num=6), _split("valid_and_test"))
    # training interactions: user 1 -> 1, 2 (3 is valid, 4 test); user 2 -> 2, 1 (5 test: RecBole's split keeps
    # one of a three-item user's two rows for training, so it holds out no valid row; see data.split)
    assert counts.tolist() == [0, 2, 2, 0, 0, 0]
    assert history.tolist() == [0, 3, 2]  # interactions before the test item
    counts_one, _ = user_item_statistics(_fake_dataset(rows, user_num=3, item_num=6), _split("test_only"))
    assert counts_one.tolist() == [0, 2, 2, 1, 0, 0]
