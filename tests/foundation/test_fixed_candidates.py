"""Sampled evaluation candidates depend on (seed, phase, user) only."""

import numpy as np

from recbole_mllm.config import Config
from recbole_mllm.data import create_dataset, data_preparation


def _candidates(tiny_data, **overrides):
    config = Config("SASRec", "tiny", config_dict=dict(tiny_data, **overrides))
    _, _, test_data = data_preparation(config, create_dataset(config))
    loader = test_data["uni100"]
    dataset = loader._dataset
    blocks = {}
    for interaction, row_idx, positive_u, positive_i in loader:
        users = interaction[dataset.uid_field].numpy()
        items = interaction[dataset.iid_field].numpy()
        for row in np.unique(row_idx.numpy()):
            rows = row_idx.numpy() == row
            blocks[int(users[rows][0])] = (items[rows].tolist(), interaction[dataset.item_id_list_field][rows][0])
    return blocks


def test_candidates_do_not_depend_on_batching_or_global_rng(tiny_data):
    first = _candidates(tiny_data)
    np.random.seed(12345)
    np.random.random(1000)  # a model that consumed randomness before evaluation
    second = _candidates(tiny_data, eval_batch_size=202)
    assert {u: c for u, (c, _) in first.items()} == {u: c for u, (c, _) in second.items()}


def test_blocks_hold_target_then_unseen_negatives(tiny_data):
    blocks = _candidates(tiny_data)
    for items, history in blocks.values():
        target, negatives = items[0], items[1:]
        # tiny has 30 items, so fewer than 100 unseen exist: RecBole samples with replacement
        assert len(negatives) == 100
        assert target not in negatives
        assert not set(negatives) & set(history.tolist())


def test_other_seed_gives_other_candidates(tiny_data):
    a = {u: c for u, (c, _) in _candidates(tiny_data).items()}
    b = {u: c for u, (c, _) in _candidates(tiny_data, seed=7).items()}
    assert a != b


def test_a_user_who_rated_every_item_is_refused_before_training(tiny_data, tmp_path):
    import pytest

    from tests.conftest import write_tiny_dataset

    inter = write_tiny_dataset(tmp_path / "data") / "tiny.inter"
    every = [f"u3\ti{i}\t4\t{2_000_000 + i}" for i in range(1, 31)]  # u3 now rated all 30 items
    inter.write_text(inter.read_text() + "\n".join(every) + "\n")
    config = Config("SASRec", "tiny", config_dict=tiny_data)
    with pytest.raises(ValueError, match=r"^uni100 \(test_protocols, eval_args\): user u3 interacted with all 30 items"):
        data_preparation(config, create_dataset(config))
    config = Config("SASRec", "tiny", config_dict=dict(tiny_data, test_protocols=["full"]))
    assert list(data_preparation(config, create_dataset(config))[2]) == ["full"]  # full ranking needs no unseen item
