"""History-masked full ranking (``mask_history``): what is masked, for every model, and what it changes."""

import logging

import numpy as np
import pytest

from recbole_mllm.config import Config
from recbole_mllm.data import create_dataset, data_preparation
from recbole_mllm.quick_start import protocol_fingerprint, run
from tests.foundation.test_split import HISTORIES, MODES, _config

PROTOCOLS = ["full", "full_unmasked"]


def _masked_pairs(loader):
    """``{user id: set of masked items}`` of every batch of a full-ranking loader (None: nothing masked)."""
    pairs = {}
    for interaction, history_index, _, _ in loader:
        if history_index is None:
            return None
        users = interaction[loader.uid_field].numpy()
        for user in users:
            pairs.setdefault(int(user), set())
        for row, item in zip(history_index[0].tolist(), history_index[1].tolist()):
            pairs[int(users[row])].add(item)
    return pairs


@pytest.mark.parametrize("mode", MODES)
def test_full_ranking_masks_exactly_the_items_before_each_target(tmp_path, mode):
    """Each evaluated user's masked items are the items of its own input (the whole history before its target: the
    histories are shorter than MAX_ITEM_LIST_LENGTH), repeats and a target seen before included."""
    config = _config(tmp_path, mode)
    config["test_protocols"] = PROTOCOLS
    dataset = create_dataset(config)
    valid_data, test_data = data_preparation(config, dataset)[1:]
    item_id = {str(token): i for i, token in enumerate(dataset.field2id_token[dataset.iid_field])}
    user_id = {str(token): u for u, token in enumerate(dataset.field2id_token[dataset.uid_field])}
    for loader in (valid_data, test_data["full"]):
        masked = _masked_pairs(loader)
        list_field = loader._dataset.item_id_list_field
        for interaction, _, _, _ in loader:
            for user, length, items in zip(interaction[loader.uid_field].tolist(),
                                           interaction[loader._dataset.item_list_length_field].tolist(),
                                           interaction[list_field].tolist()):
                assert masked[user] == set(items[:length])
        assert loader.masks_history
    assert not _masked_pairs(test_data["full_unmasked"]) and not test_data["full_unmasked"].masks_history
    # the test targets of "loop", "again" and "back" were seen before by their user: never hittable
    for user in ("loop", "again", "back"):
        target = item_id[HISTORIES[user][-1]]
        if user_id[user] in _masked_pairs(test_data["full"]):
            assert target in _masked_pairs(test_data["full"])[user_id[user]]


def test_a_masked_run_counts_the_targets_it_cannot_hit(tmp_path, caplog):
    config = _config(tmp_path, "valid_and_test")
    with caplog.at_level(logging.WARNING):
        data_preparation(config, create_dataset(config))
    assert any("test targets were interacted with before by their user" in r.getMessage() and "3 of 6" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_mask_history_off_masks_nothing_in_full_ranking(tmp_path):
    config = _config(tmp_path, "valid_and_test")
    config["mask_history"] = False
    valid_data, test_data = data_preparation(config, create_dataset(config))[1:]
    assert _masked_pairs(valid_data) is None and _masked_pairs(test_data["full"]) is None


def test_masked_and_unmasked_full_ranking_never_share_a_fingerprint(tiny_data):
    config = Config("SASRec", "tiny", config_dict=dict(tiny_data, test_protocols=PROTOCOLS + ["uni100"]))
    _, _, test_data = data_preparation(config, create_dataset(config))
    fingerprints = {p: protocol_fingerprint(loader) for p, loader in test_data.items()}
    assert len(set(fingerprints.values())) == 3
    config_off = Config("SASRec", "tiny", config_dict=dict(tiny_data, test_protocols=PROTOCOLS + ["uni100"],
                                                           mask_history=False))
    _, _, test_off = data_preparation(config_off, create_dataset(config_off))
    assert protocol_fingerprint(test_off["full"]) == fingerprints["full_unmasked"]
    assert protocol_fingerprint(test_off["uni100"]) == fingerprints["uni100"]  # sampled candidates are unseen anyway


def test_a_baseline_ranks_its_target_no_lower_once_history_is_masked(tiny_data):
    """SASRec under RecBole's trainer: masking seen items (none is a target in tiny) can only lift each user's target,
    and the masked run's top-k never holds an item the user had seen (its ranks are RecBole's own rec.topk rows)."""
    result = run("SASRec", "tiny", config_dict=dict(tiny_data, test_protocols=PROTOCOLS, epochs=2))
    masked, unmasked = result["per_user"]["full"], result["per_user"]["full_unmasked"]
    assert list(masked["user_id"]) == list(unmasked["user_id"])
    hits_masked, hits_unmasked = masked["topk"][:, :-1], unmasked["topk"][:, :-1]
    first = lambda hits: np.where(hits.any(1), hits.argmax(1), hits.shape[1])  # noqa: E731 (0-based rank, or beyond)
    assert (first(hits_masked) <= first(hits_unmasked)).all()
    assert (first(hits_masked) < first(hits_unmasked)).any()
    assert result["fingerprints"]["full"] != result["fingerprints"]["full_unmasked"]
