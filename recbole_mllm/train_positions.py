"""``train_positions: all``: sequential models trained on every position of a window (the SASRec paper's loss).

Why: RecBole trains a sequential model on one row per prefix of each history (a user with ``n``
interactions gives ``n - 1`` rows, each up to ``MAX_ITEM_LIST_LENGTH`` = L items long) with the loss at
the row's last position only. A causal model already computes a prediction at every position of a row,
so with ``all`` the training set keeps one row per window of L targets (each user's last training row,
then every L-th row before it) and the loss is taken at every position: each training target is still
predicted once per epoch, from about L times fewer rows (ML-1M, L = 200: 8,619 rows instead of 982,089).
This is how SASRec (Kang & McAuley, 2018) and the SASRec+/eSASRec benchmarks train; one difference from
RecBole's rows is that a target early in a window sees fewer earlier items than its sliding prefix would.

The rows are ``data/windows.py``'s; here is the loss, and which model takes which part of the policy:

* a model with sequence states (SASRec, GRU4Rec, FusedSASRec): cross-entropy over all items at every
  non-padding position (the next item inside the row, the row's target at its last position);
* a model whose own loss already covers every position of a row (BERT4Rec's masked items): the rows only;
* a model that trains on windows in its encoder warm-up alone (MLLMSRec, whose joint epochs keep RecBole's rows
  since the LLM trains on chosen positions of them: ``MLLMSRecTrainer``, ``encoder_warmup_batch_size``).

Each model says which: the plugin's models on their class (``sequence_states``/``item_states`` methods,
``train_positions_rows_only``, ``train_positions_warmup_only``), RecBole's, whose classes are not ours, registered
at the end of this module. A subclass inherits its parent's policy; no generic code names a model. The trainer
takes the loss through :class:`AllPositionsLoss` (one of ``trainer.TRAINING_POLICIES``); the model's own
``calculate_loss`` is left as it is.

``train_positions: last`` (the default) keeps RecBole's rows and each model's own loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import AbstractRecommender
from recbole.model.sequential_recommender.bert4rec import BERT4Rec
from recbole.model.sequential_recommender.gru4rec import GRU4Rec
from recbole.model.sequential_recommender.sasrec import SASRec

from recbole_mllm import compat

compat.disable_anomaly_detection()  # importing RecBole's sequential models ran sine.py, which turns it on

TRAIN_POSITIONS = ("last", "all")
"""Values of ``train_positions`` (``properties/overall.yaml``)."""

DECLARATIONS = ("sequence_states", "train_positions_rows_only", "train_positions_warmup_only")
"""What a model class may declare about ``all`` (a class that defines one of them has a policy)."""


@dataclass(frozen=True)
class PositionsPolicy:
    """What ``train_positions: all`` does with one model class."""

    sequence_states: Optional[Callable] = None  # (model, item_seq) -> [B L H]; None: its own loss, on window rows
    item_states: Optional[Callable] = None  # model -> [n_items H], what the states are scored against
    warmup_only: bool = False  # windows and the loss serve its encoder warm-up alone; its training rows stay RecBole's

    @classmethod
    def declared_by(cls, model_class):
        """The policy a model class declares on itself (or inherits)."""
        if getattr(model_class, "train_positions_rows_only", False):
            return cls()
        return cls(model_class.sequence_states, model_class.item_states,
                   bool(getattr(model_class, "train_positions_warmup_only", False)))


_REGISTERED = {}
"""Policies of classes that cannot declare their own (RecBole's), by class."""


def register_sequence_states(*model_classes, item_states=lambda model: model.item_embedding.weight):
    """Decorator: ``states(model, item_seq) -> [B L H]`` is how ``all`` reads ``model_classes`` and their subclasses;
    ``item_states(model) -> [n_items H]``: what their states are scored against (RecBole's item embeddings)."""
    def register(states):
        for model_class in model_classes:
            _REGISTERED[model_class] = PositionsPolicy(states, item_states)
        return states
    return register


def register_rows_only(*model_classes):
    """``model_classes`` (and their subclasses) take the window rows with their own loss."""
    for model_class in model_classes:
        _REGISTERED[model_class] = PositionsPolicy()


def positions_policy(model_class):
    """The policy of the nearest class in ``model_class``'s MRO that declares one or has one registered; None when
    none does (the model trains on RecBole's rows only)."""
    for cls in model_class.__mro__:
        if cls in _REGISTERED:
            return _REGISTERED[cls]
        if any(name in vars(cls) for name in DECLARATIONS):
            return PositionsPolicy.declared_by(model_class)
    return None


def supported_models():
    """Names of the models that take ``all``: RecBole's registered here and the plugin's declaring it (loaded by
    ``utils.get_model`` before any check), those with sequence states first (for the error message)."""
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    plugin = [cls for cls in subclasses(AbstractRecommender) if cls.__module__.startswith("recbole_mllm.")
              and any(name in vars(cls) for name in DECLARATIONS)]
    known = list(dict.fromkeys([*_REGISTERED, *plugin]))
    return [cls.__name__ for cls in sorted(known, key=lambda cls: positions_policy(cls).sequence_states is None)]


def check_train_positions(model_class, config):
    """One error, before any data are split, when ``train_positions`` is unknown or the model cannot use it."""
    value = config["train_positions"]
    if value not in TRAIN_POSITIONS:
        raise ValueError(f"train_positions: {value!r} is none of {', '.join(TRAIN_POSITIONS)}")
    if value != "all":
        return
    policy = positions_policy(model_class)
    if policy is None:
        raise ValueError(f"train_positions: all supports {', '.join(supported_models())}; {model_class.__name__} "
                         f"trains on RecBole's rows (train_positions: last)")
    if policy.sequence_states is not None and config["loss_type"] not in (None, "CE"):
        raise ValueError(f"train_positions: all trains with cross-entropy (loss_type: CE); got {config['loss_type']}")


def trains_on_windows(model_class, config):
    """Whether the model's training loader serves window rows (``all``, except for a warm-up-only model)."""
    policy = positions_policy(model_class)
    return config["train_positions"] == "all" and not (policy is not None and policy.warmup_only)


def trains_every_position(model_class, config):
    """Whether the trainer replaces the model's loss by :func:`all_positions_loss` (``all``, sequence states, not
    warm-up only)."""
    policy = positions_policy(model_class)
    return (config["train_positions"] == "all" and policy is not None and policy.sequence_states is not None
            and not policy.warmup_only)


def all_positions_loss(model, interaction):
    """Mean cross-entropy over all items at every non-padding position of each row."""
    policy = positions_policy(type(model))
    item_seq, lengths = interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]
    targets = torch.cat([item_seq[:, 1:], torch.zeros_like(item_seq[:, :1])], dim=1)  # next item in the row
    targets.scatter_(1, (lengths - 1).unsqueeze(1), interaction[model.POS_ITEM_ID].unsqueeze(1))  # row's target last
    filled = torch.arange(item_seq.size(1), device=item_seq.device).unsqueeze(0) < lengths.unsqueeze(1)
    states = policy.sequence_states(model, item_seq)[filled]  # [positions H]
    return F.cross_entropy(states @ policy.item_states(model).T, targets[filled])


class AllPositionsLoss:
    """Trainer mixin: under ``all`` a model with sequence states trains with :func:`all_positions_loss` (on the window
    rows ``quick_start`` asked ``data_preparation`` for) instead of its ``calculate_loss``; a loss the caller passes
    (MLLMSRec's warm-up) is kept."""

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if loss_func is None and trains_every_position(type(self.model), self.config):
            loss_func = partial(all_positions_loss, self.model)
        return super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)


# RecBole's models: their policies, in one place.

@register_sequence_states(SASRec)
def _sasrec_states(model, item_seq):
    """RecBole ``SASRec.forward`` without its last-position gather: ``[B L H]``."""
    positions = torch.arange(item_seq.size(1), device=item_seq.device).unsqueeze(0).expand_as(item_seq)
    hidden = model.dropout(model.LayerNorm(model.item_embedding(item_seq) + model.position_embedding(positions)))
    return model.trm_encoder(hidden, model.get_attention_mask(item_seq), output_all_encoded_layers=True)[-1]


@register_sequence_states(GRU4Rec)
def _gru4rec_states(model, item_seq):
    """RecBole ``GRU4Rec.forward`` without its last-position gather: ``[B L H]`` (padding sits after the items)."""
    output, _ = model.gru_layers(model.emb_dropout(model.item_embedding(item_seq)))
    return model.dense(output)


register_rows_only(BERT4Rec)  # its masked-item loss already covers every position of a row
