"""The training rows ``train_positions: all`` keeps: one per window of ``MAX_ITEM_LIST_LENGTH`` targets.

RecBole's sequential dataset gives one training row per prefix of each history; a model that takes its
loss at every position of a row (``train_positions.py``) needs only the rows whose windows cover
each training target once: each user's last row and every L-th row before it.
"""

import numpy as np

from recbole_mllm.data.dataloader import row_subset, subset_loader


def window_rows(user_ids, max_length):
    """Which training rows ``train_positions: all`` keeps: a boolean mask over rows.

    ``user_ids``: each row's user, rows of a user contiguous and in time order (as RecBole builds them).
    Keeps each user's last row and every ``max_length``-th row before it, so the kept rows' windows cover
    each training target exactly once.
    """
    user_ids = np.asarray(user_ids)
    if len(user_ids) == 0:
        return np.zeros(0, dtype=bool)
    starts = np.flatnonzero(np.r_[True, user_ids[1:] != user_ids[:-1]])
    if len(np.unique(user_ids[starts])) != len(starts):
        raise ValueError("train_positions: all needs each user's training rows together, in time order")
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(user_ids)]))
    rank = np.arange(len(user_ids)) - starts[group]  # position of the row among its user's rows
    size = np.diff(np.r_[starts, len(user_ids)])[group]
    return (size - 1 - rank) % max_length == 0


def _window_indices(dataset, max_length):
    return np.flatnonzero(window_rows(dataset.inter_feat[dataset.uid_field].numpy(), max_length))


def select_window_rows(train_dataset, max_length):
    """``train_dataset`` (RecBole's augmented training rows) reduced to the rows of :func:`window_rows`."""
    return row_subset(train_dataset, _window_indices(train_dataset, max_length))


def window_loader(config, train_data, batch_size):
    """A loader of ``train_data``'s window rows (:func:`window_rows`), ``batch_size`` windows per batch."""
    return subset_loader(config, train_data, _window_indices(train_data._dataset, config["MAX_ITEM_LIST_LENGTH"]),
                         batch_size)
