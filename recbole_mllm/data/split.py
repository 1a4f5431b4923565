"""Leave-one-out split rules, user by user, exactly as RecBole's sequential split applies them.

RecBole turns a user's ``n`` time-ordered interactions into one row per target position ``t`` in
``[1, n)`` (``t`` = the number of earlier interactions; the row's input is the items before ``t``).
Leave-one-out (``eval_args.split: {LS: mode}``) then holds out the user's last rows: two for
``valid_and_test``, one for ``valid_only`` and ``test_only``, yet always fewer than the user's rows, so a
short history keeps one training row (``Dataset._split_index_by_leave_one_out``: a user with 3
interactions has a test row and no valid row under ``valid_and_test``). The rules work on positions,
never on item ids, so a user who repeats an item is split like any other.

The stages (which summaries exist), the model (training items, the rows that train the LLM) and the
per-user records all read these rules, so they can never disagree.
"""

from dataclasses import dataclass

import numpy as np

from recbole_mllm.properties_path import declared

HELD_OUT_PARTS = {"valid_and_test": ("valid", "test"), "valid_only": ("valid",), "test_only": ("test",)}
"""The parts each leave-one-out mode holds out, in time order (RecBole fills the last ones first)."""

LLM_TRAIN_TARGETS_PER_USER = declared("stages.yaml", "llm_train_targets_per_user")["llm_train_targets_per_user"]
"""Default of ``llm_train_targets_per_user`` (declared in ``properties/stages.yaml``), for configs without the plugin's
stage keys (a baseline's): the last training targets of each user the LLM trains on."""


def split_mode(config):
    """The configured leave-one-out mode; any other split is an error (the rules below are leave-one-out's)."""
    eval_args = config["eval_args"] if "eval_args" in config and config["eval_args"] else {}
    split = eval_args.get("split") or {"LS": "valid_and_test"}
    if list(split) != ["LS"] or split["LS"] not in HELD_OUT_PARTS:
        raise ValueError(f"leave-one-out splits only (eval_args.split LS: valid_and_test, valid_only or test_only); "
                         f"got {split}")
    return split["LS"]


def held_out_count(config):
    """How many last rows per user the configured split holds out when the history is long enough (2 or 1)."""
    return len(HELD_OUT_PARTS[split_mode(config)])


def held_out_rows(n, config):
    """Rows held out of a user with ``n`` interactions: ``held_out_count`` but fewer than the user's ``n - 1`` rows.

    ``n`` may be an int or an array of them (one per user).
    """
    return np.minimum(held_out_count(config), np.maximum(np.asarray(n) - 2, 0))


@dataclass(frozen=True)
class UserSplit:
    """Target positions of one user's rows in each part of the split (an empty range: no such row)."""

    train: range
    valid: range
    test: range

    @property
    def first_held_out(self):
        """Items before this position are training items: the first item and every training target."""
        return self.train.stop


def user_split(n, config):
    """The :class:`UserSplit` of a user with ``n`` interactions."""
    first = max(n - int(held_out_rows(n, config)), 1)
    parts = dict.fromkeys(("valid", "test"), range(n, n))
    held = HELD_OUT_PARTS[split_mode(config)]
    for offset, part in enumerate(held[len(held) - (n - first):] if n > first else ()):
        parts[part] = range(first + offset, first + offset + 1)
    return UserSplit(train=range(1, first), **parts)


def _llm_train_targets(config):
    if "llm_train_targets_per_user" in config and config["llm_train_targets_per_user"] is not None:
        return int(config["llm_train_targets_per_user"])
    return LLM_TRAIN_TARGETS_PER_USER


def llm_train_positions(n, config):
    """Training positions the LLM trains on: the user's last ``llm_train_targets_per_user`` training targets."""
    train = user_split(n, config).train
    return range(max(train.start, train.stop - _llm_train_targets(config)), train.stop)


def needed_positions(n, config):
    """Positions ``t`` of a user with ``n`` interactions the LLM trains or is evaluated on, in order.

    The LLM's training positions, then the held-out ones (valid and test): the positions the user-profile
    stage builds a summary for and the model asks a summary of.
    """
    split = user_split(n, config)
    return [*llm_train_positions(n, config), *split.valid, *split.test]
