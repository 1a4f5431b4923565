"""Dataset creation and splitting for every model the plugin runs (baselines included).

Differs from ``recbole.data`` in four deliberate ways:

* a dataset is always built from its atomic files; a pickled ``saved/<dataset>-<Class>.pth`` is
  never silently reused (RecBole reuses it even when the files behind it changed);
* a missing dataset is a clear error naming the file it looked for, and a malformed line of its atomic files
  one naming the file and the line (``atomic_check.py``);
* the test split gets one dataloader per protocol in ``test_protocols`` (e.g. ``uni100`` and
  ``full``), with sampled candidates fixed per (seed, user) so all models see the same ones;
* full ranking masks each user's history before the target (``mask_history``, the field's protocol) for
  sequential models too, which RecBole does only for general ones.

Which of a user's positions the split holds out is ``split.py``'s rule, shared with the stages and the model.
"""

import importlib
import os
from logging import getLogger

import numpy as np
from recbole.data.utils import create_samplers, get_dataloader
from recbole.utils import ModelType, set_color

from recbole_mllm.data.atomic_check import check_atomic_files
from recbole_mllm.data.dataloader import FixedCandidateEvalDataLoader, HistoryMaskedFullSortEvalDataLoader, seeded
from recbole_mllm.data.histories import internal_histories, user_histories
from recbole_mllm.data.split import user_split
from recbole_mllm.data.windows import select_window_rows

_DATASET_CLASS_BY_TYPE = {
    ModelType.GENERAL: "Dataset",
    ModelType.SEQUENTIAL: "SequentialDataset",
    ModelType.CONTEXT: "Dataset",
    ModelType.KNOWLEDGE: "KnowledgeBasedDataset",
    ModelType.TRADITIONAL: "Dataset",
    ModelType.DECISIONTREE: "Dataset",
}


def create_dataset(config):
    """Build ``config['dataset']`` from its atomic files with RecBole's dataset class for the model."""
    inter_file = os.path.join(config["data_path"], f"{config['dataset']}.inter")
    if not os.path.isfile(inter_file):
        raise FileNotFoundError(
            f"Dataset '{config['dataset']}' not found: no file {inter_file}. Build it with a script in "
            f"dataset_scripts/ (see dataset_scripts/README.md) and pass --data_path=<its output folder>."
        )
    check_atomic_files(config)  # a malformed line is named (file:line) before RecBole reads the files
    dataset_module = importlib.import_module("recbole.data.dataset")
    class_name = config["model"] + "Dataset"
    if not hasattr(dataset_module, class_name):
        class_name = _DATASET_CLASS_BY_TYPE[config["MODEL_TYPE"]]
    dataset = getattr(dataset_module, class_name)(config)
    getLogger().info(dataset)
    return dataset


FULL_PROTOCOLS = ("full", "full_unmasked")
"""Full-ranking protocols: ``full`` masks each user's history when ``mask_history`` is on (the field's protocol),
``full_unmasked`` never does (RecBole's sequential full ranking, for continuity with unmasked numbers)."""


def histories_or_dataset(config, histories):
    """``histories``, or those of ``create_dataset(config)`` (``data.user_histories``) when None (``config`` is then a
    RecBole ``Config``)."""
    return histories if histories is not None else user_histories(create_dataset(config))


def parse_protocol(mode):
    """Evaluation mode (``full``, ``full_unmasked`` or ``uni<N>``) -> negative-sampling args, or None for full ranking."""
    if mode in FULL_PROTOCOLS:
        return None
    if not (mode.startswith("uni") and mode[3:].isdigit()):
        raise ValueError(f"Unknown evaluation protocol '{mode}': use 'full', 'full_unmasked' or 'uni<N>' (e.g. uni100).")
    return {"distribution": "uniform", "sample_num": int(mode[3:])}


def histories_before_targets(histories, config, phase):
    """Per internal user id, the items before the user's target in ``phase`` (``valid`` or ``test``) under the
    configured leave-one-out split (``data.split``): what full ranking masks under ``mask_history``."""
    before = []
    for history in histories:
        part = getattr(user_split(len(history), config), phase)
        before.append(history[:part.start] if len(part) else history[:0])
    return before


def check_sampled_protocols(config, dataset, user_items):
    """A sampled protocol (``uniN``) draws unseen items for every user: a user who interacted with every item has
    none, so such a dataset is refused here, before training, naming the protocol and the first such user."""
    modes = [config["eval_args"]["mode"]["valid"], *(config["test_protocols"] or [config["eval_args"]["mode"]["test"]])]
    sampled = [mode for mode in dict.fromkeys(modes) if parse_protocol(mode) is not None]
    for uid, items in enumerate(user_items):
        if sampled and uid and len(np.unique(items)) >= dataset.item_num - 1:
            raise ValueError(f"{sampled[0]} (test_protocols, eval_args): user "
                             f"{dataset.id2token(dataset.uid_field, uid)} interacted with all {dataset.item_num - 1} "
                             "items, so no unseen candidate is left to sample; test under full, or drop that user")


def unreachable_targets(histories, config, phase):
    """``(targets the user interacted with before, targets)`` of ``phase``: a masked full ranking can never hit the
    first (a dataset that repeats (user, item) pairs)."""
    repeated = total = 0
    for history in histories:
        part = getattr(user_split(len(history), config), phase)
        if len(part):
            total += 1
            repeated += int(history[part.start] in history[:part.start])
    return repeated, total


def _eval_dataloader(config, dataset, sampler, mode, histories, phase):
    neg_sample_args = parse_protocol(mode)
    if neg_sample_args is not None:
        return FixedCandidateEvalDataLoader(config, dataset, sampler, neg_sample_args, config["seed"], histories)
    masked = mode == "full" and bool(config["mask_history"])
    if masked:
        repeated, total = unreachable_targets(histories, config, phase)
        if repeated:
            getLogger().warning(f"mask_history: {repeated} of {total} {phase} targets were interacted with before by "
                                f"their user, so masked full ranking can never hit them (the dataset repeats (user, "
                                f"item) pairs; --mask_history=False ranks seen items too)")
    return HistoryMaskedFullSortEvalDataLoader(config, dataset, sampler,
                                               histories_before_targets(histories, config, phase) if masked else None)


def data_preparation(config, dataset, window_rows=False):
    """Split ``dataset`` and return ``(train_data, valid_data, {protocol: test_data})``.

    ``window_rows``: train on one row per window of ``MAX_ITEM_LIST_LENGTH`` targets (``data/windows.py``)
    rather than RecBole's row per prefix; ``quick_start`` asks for it under ``train_positions: all``.
    """
    histories = internal_histories(dataset)  # whole histories, in time order
    check_sampled_protocols(config, dataset, histories)
    built_datasets = dataset.build()
    train_dataset, valid_dataset, test_dataset = built_datasets
    train_sampler, valid_sampler, test_sampler = create_samplers(config, dataset, built_datasets)
    if window_rows:  # one row per window, the loss at every position (data/windows.py)
        train_dataset = select_window_rows(train_dataset, config["MAX_ITEM_LIST_LENGTH"])
    train_data = seeded(get_dataloader(config, "train")(config, train_dataset, train_sampler, shuffle=config["shuffle"]),
                        config)
    valid_data = _eval_dataloader(config, valid_dataset, valid_sampler, config["eval_args"]["mode"]["valid"], histories,
                                  "valid")
    test_protocols = config["test_protocols"] or [config["eval_args"]["mode"]["test"]]
    test_data = {mode: _eval_dataloader(config, test_dataset, test_sampler, mode, histories, "test")
                 for mode in test_protocols}
    getLogger().info(
        set_color("[Evaluation]: ", "pink") + f"valid={config['eval_args']['mode']['valid']} "
        f"test={list(test_data)} split={config['eval_args']['split']} order={config['eval_args']['order']} "
        f"mask_history={bool(config['mask_history'])}"
    )
    return train_data, valid_data, test_data
