"""Users' time-ordered histories, read from a RecBole dataset before its split.

The stages summarise them and the model finds positions in them, so both read the same order:
RecBole's own (see :func:`user_histories`).
"""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class UserHistory:
    """One user's interactions in RecBole's order: raw item tokens and their timestamps."""

    items: list
    timestamps: list


def user_histories(dataset) -> dict:
    """``{raw user token: UserHistory}`` of a RecBole dataset as ``create_dataset(config)`` returns it.

    The order is RecBole's: ``SequentialDataset.data_augmentation`` sorts stably by the float32
    timestamp (RecBole stores float fields as float32, so interactions less than a float32 step apart
    keep their file order), then by user; the leave-one-out split keeps that order. Pass the dataset
    before ``build()``: a built sequential dataset holds augmented rows, not the histories.
    """
    feat = dataset.inter_feat
    columns = list(feat.columns) if hasattr(feat, "columns") else list(feat.interaction)
    list_field = f"{dataset.iid_field}{dataset.config['LIST_SUFFIX'] or '_list'}"
    if list_field in columns:
        raise ValueError("user_histories needs the dataset before build() (create_dataset(config)): this one holds "
                         f"augmented sequences ({list_field}), not the users' histories")
    if not dataset.time_field or dataset.time_field not in columns:
        raise ValueError("user histories need interaction timestamps: set TIME_FIELD and load it (load_col)")
    uids = np.asarray(feat[dataset.uid_field])
    if uids.size == 0:
        return {}
    times = np.asarray(feat[dataset.time_field], dtype=np.float64)
    order = np.argsort(times.astype(np.float32), kind="stable")
    order = order[np.argsort(uids[order], kind="stable")]
    uids, times = uids[order], times[order]
    items = np.asarray(dataset.field2id_token[dataset.iid_field])[np.asarray(feat[dataset.iid_field])[order]]
    user_tokens = dataset.field2id_token[dataset.uid_field]
    bounds = np.flatnonzero(np.diff(uids)) + 1
    histories = {}
    for lo, hi in zip([0, *bounds], [*bounds, len(uids)]):
        histories[str(user_tokens[uids[lo]])] = UserHistory([str(i) for i in items[lo:hi]],
                                                            [float(t) for t in times[lo:hi]])
    return histories


def internal_histories(dataset):
    """Per internal user id, its internal item ids in RecBole's time order (:func:`user_histories`' order): the
    whole history, evaluation targets included. Pass the dataset before ``build()``."""
    feat = dataset.inter_feat
    uids = np.asarray(feat[dataset.uid_field])
    iids = np.asarray(feat[dataset.iid_field])
    order = np.arange(len(uids))
    if dataset.time_field and dataset.time_field in feat:
        order = np.argsort(np.asarray(feat[dataset.time_field]).astype(np.float32), kind="stable")
    order = order[np.argsort(uids[order], kind="stable")]
    bounds = np.searchsorted(uids[order], np.arange(dataset.user_num + 1))
    return [iids[order[bounds[u]:bounds[u + 1]]] for u in range(dataset.user_num)]
