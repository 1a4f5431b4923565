"""``train_positions: all``: window rows cover every training target once, and the loss at every position equals
RecBole's last-position loss averaged over the prefix rows it replaces (no dropout, windows as long as histories).
Each model's policy is declared on its class or registered, a subclass inherits it, and the trainer takes the loss:
the model is never patched."""

from collections import Counter

import numpy as np
import pytest
import torch

from recbole_mllm.config import Config
from recbole_mllm.data import create_dataset
from recbole_mllm.data.windows import window_rows
from recbole_mllm.quick_start import run, split_and_build_model
from recbole_mllm.train_positions import all_positions_loss, check_train_positions
from recbole_mllm.utils import get_model


def test_window_rows_keep_each_users_last_row_and_every_lth_before_it():
    users = [1, 1, 1, 1, 1, 2, 2, 3]  # user 1: 5 rows, user 2: 2 rows, user 3: 1 row
    assert window_rows(users, 2).tolist() == [True, False, True, False, True, False, True, True]
    assert window_rows(users, 10).tolist() == [False, False, False, False, True, False, True, True]
    assert window_rows([], 3).tolist() == []


def test_window_rows_refuse_rows_of_a_user_that_are_not_together():
    with pytest.raises(ValueError, match="each user's training rows together"):
        window_rows([1, 1, 2, 1], 2)


def _train_rows(tiny_data, model, **keys):
    config = Config(model, "tiny", config_dict={**tiny_data, **keys})
    _, train_data, _, _ = split_and_build_model(config, create_dataset(config))
    return config, train_data


def _targets(train_data, every_position):
    """(user, target) of every prediction the rows train: the row's target, or every next item in the row."""
    feat = train_data._dataset.inter_feat
    seqs, lengths = feat["item_id_list"].numpy(), feat["item_length"].numpy()
    pairs = Counter()
    for user, seq, n, target in zip(feat["user_id"].numpy(), seqs, lengths, feat["item_id"].numpy()):
        pairs.update((user, item) for item in [*(seq[1:n] if every_position else []), target])
    return pairs


@pytest.mark.parametrize("length", [3, 4, 50])
def test_window_rows_cover_every_training_target_exactly_once(tiny_data, length):
    _, prefixes = _train_rows(tiny_data, "SASRec", MAX_ITEM_LIST_LENGTH=length)
    _, windows = _train_rows(tiny_data, "SASRec", MAX_ITEM_LIST_LENGTH=length, train_positions="all")
    assert len(windows._dataset) < len(prefixes._dataset)
    assert _targets(windows, every_position=True) == _targets(prefixes, every_position=False)


@pytest.mark.parametrize("model_name", ["SASRec", "GRU4Rec", "FusedSASRec"])
def test_the_loss_at_every_position_is_the_mean_prefix_loss(tiny_data, stage_setup, model_name):
    dropout = {"dropout_prob": 0.0} if model_name == "GRU4Rec" else {"hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0}
    keys = {**stage_setup, "MAX_ITEM_LIST_LENGTH": 20, **dropout, "train_batch_size": 4096}
    config, prefixes = _train_rows(tiny_data, model_name, **keys, train_positions="last")  # histories (<= 12) fit in one window each
    model = split_and_build_model(config, create_dataset(config))[0].eval()
    _, windows = _train_rows(tiny_data, model_name, **keys, train_positions="all")
    prefix_batch, window_batch = next(iter(prefixes)), next(iter(windows))
    assert len(window_batch) == len(np.unique(prefix_batch["user_id"].numpy()))  # one row per user
    with torch.no_grad():
        expected = model.calculate_loss(prefix_batch)  # RecBole's loss: mean over prefix rows
        got = all_positions_loss(model, window_batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_name", ["SASRec", "BERT4Rec"])
def test_a_run_trains_on_every_position_and_tests_as_before(tiny_data, model_name):
    result = run(model_name, "tiny", config_dict={**tiny_data, "train_positions": "all", "epochs": 2})
    assert result["config"]["train_positions"] == "all" and result["epochs"] == 2
    for metrics in result["test_result"].values():
        assert 0.0 <= metrics["ndcg@10"] <= metrics["hit@10"] <= 1.0


@pytest.mark.parametrize("model_name, keys, message", [
    ("SASRec", {"train_positions": "every"}, "train_positions: 'every' is none of last, all"),
    ("NARM", {"train_positions": "all"}, "train_positions: all supports SASRec, GRU4Rec, FusedSASRec, MLLMSRec, BERT4Rec; NARM"),
    ("SASRec", {"train_positions": "all", "loss_type": "BPR"}, "cross-entropy"),
])
def test_bad_settings_fail_before_the_split(model_name, keys, message):
    with pytest.raises(ValueError, match=message):
        check_train_positions(get_model(model_name), {"loss_type": "CE", **keys})


def test_each_model_has_its_declared_or_registered_policy_and_a_subclass_inherits_it():
    from recbole.model.sequential_recommender import BERT4Rec, NARM, SASRec

    from recbole_mllm.model import FusedSASRec, MLLMSRec
    from recbole_mllm.train_positions import positions_policy

    class Child(SASRec):
        pass

    assert positions_policy(Child) is positions_policy(SASRec) and positions_policy(SASRec).sequence_states
    assert positions_policy(BERT4Rec).sequence_states is None  # rows only: its own loss
    assert positions_policy(NARM) is None
    fused, mllm = positions_policy(FusedSASRec), positions_policy(MLLMSRec)
    assert fused.sequence_states is FusedSASRec.sequence_states and not fused.warmup_only
    assert mllm.sequence_states is FusedSASRec.sequence_states and mllm.warmup_only


@pytest.mark.parametrize("value", ["last", "all"])
def test_the_trainer_takes_the_loss_at_every_position_and_leaves_the_model_as_it_is(tiny_data, monkeypatch, value):
    from functools import partial

    from recbole.trainer import Trainer

    from recbole_mllm.utils import get_trainer

    config = Config("SASRec", "tiny", config_dict={**tiny_data, "train_positions": value})
    model, train_data, _, _ = split_and_build_model(config, create_dataset(config))
    assert "calculate_loss" not in vars(model)  # the model's own loss, never patched
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    seen = []
    monkeypatch.setattr(Trainer, "_train_epoch", lambda self, data, epoch, loss_func=None, show_progress=False:
                        seen.append(loss_func) or 0.0)
    trainer._train_epoch(train_data, 0)
    trainer._train_epoch(train_data, 1, loss_func=model.calculate_loss)  # a loss the caller gives is kept
    own, given = seen
    if value == "all":
        assert isinstance(own, partial) and own.func is all_positions_loss and own.args == (model,)
    else:
        assert own is None  # RecBole's trainer then calls model.calculate_loss
    assert given == model.calculate_loss
