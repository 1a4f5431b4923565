"""``train_positions: all``: sequential models trained on every position of a window (the SASRec paper's loss).

Why: RecBole trains a sequential model on one row per prefix of each history (a user with ``n``
interactions gives ``n - 1`` rows, each up to ``MAX_ITEM_LIST_LENGTH`` = L items long) with the loss at
the row's last position only. A causal model already computes a prediction at every position of a row,
so with ``all`` the training set keeps one row per window of L targets (each user's last training row,
then every L-th row before it) and the loss is taken at every position: each training target is still
predicted once per epoch, from about L times fewer rows (ML-1M, L = 200: 8,619 rows instead of 982,089).
This is how SASRec (Kang & McAuley, 2018) and the SASRec+/eSASRec benchmarks train; one difference from
RecBole's rows is that a target early in a window sees fewer earlier items than its sliding prefix would.

The rows are ``data/windows.py``'s; here is the loss:

* SASRec, GRU4Rec, FusedSASRec: cross-entropy over all items at every non-padding position (the next
  item inside the row, the row's target at its last position).
* BERT4Rec: rows only; its masked-item loss already covers every position of a row.
* MLLMSRec: its encoder warm-up trains on windows with the loss at every position (what FusedSASRec
  trains); its joint epochs keep RecBole's rows, since the LLM trains on chosen positions of them
  (``MLLMSRecTrainer``, ``encoder_warmup_batch_size``).

``train_positions: last`` (the default) keeps RecBole's rows and each model's own loss.
"""

import torch
import torch.nn.functional as F

TRAIN_POSITIONS = ("last", "all")
"""Values of ``train_positions`` (``properties/overall.yaml``)."""


def _sasrec_states(model, item_seq):
    """RecBole ``SASRec.forward`` without its last-position gather: ``[B L H]``."""
    positions = torch.arange(item_seq.size(1), device=item_seq.device).unsqueeze(0).expand_as(item_seq)
    hidden = model.dropout(model.LayerNorm(model.item_embedding(item_seq) + model.position_embedding(positions)))
    return model.trm_encoder(hidden, model.get_attention_mask(item_seq), output_all_encoded_layers=True)[-1]


def _gru4rec_states(model, item_seq):
    """RecBole ``GRU4Rec.forward`` without its last-position gather: ``[B L H]`` (padding sits after the items)."""
    output, _ = model.gru_layers(model.emb_dropout(model.item_embedding(item_seq)))
    return model.dense(output)


def _fusedsasrec_states(model, item_seq):
    return model.encoder.sequence_states(item_seq)


def _item_table(model):
    """The output item representations ``[n_items H]`` each model scores against."""
    return model.encoder.item_states() if hasattr(model, "encoder") else model.item_embedding.weight


_SEQUENCE_STATES = {"SASRec": _sasrec_states, "GRU4Rec": _gru4rec_states, "FusedSASRec": _fusedsasrec_states,
                    "MLLMSRec": _fusedsasrec_states}
ROWS_ONLY = ("BERT4Rec",)
"""Models whose own loss already covers every position of a row: ``all`` changes their rows only."""
WARMUP_ONLY = ("MLLMSRec",)
"""Models for which ``all`` applies to the encoder warm-up alone; their training rows stay RecBole's."""
SUPPORTED = (*_SEQUENCE_STATES, *ROWS_ONLY)


def check_train_positions(model_name, config):
    """One error, before any data are split, when ``train_positions`` is unknown or the model cannot use it."""
    value = config["train_positions"]
    if value not in TRAIN_POSITIONS:
        raise ValueError(f"train_positions: {value!r} is none of {', '.join(TRAIN_POSITIONS)}")
    if value == "all" and model_name not in SUPPORTED:
        raise ValueError(f"train_positions: all supports {', '.join(SUPPORTED)}; {model_name} trains on "
                         f"RecBole's rows (train_positions: last)")
    if value == "all" and model_name in _SEQUENCE_STATES and config["loss_type"] not in (None, "CE"):
        raise ValueError(f"train_positions: all trains with cross-entropy (loss_type: CE); got {config['loss_type']}")


def trains_on_windows(model_name, config):
    """Whether the model's training loader serves window rows (``all``, except for ``WARMUP_ONLY`` models)."""
    return config["train_positions"] == "all" and model_name not in WARMUP_ONLY


def all_positions_loss(model, interaction):
    """Mean cross-entropy over all items at every non-padding position of each row."""
    item_seq, lengths = interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]
    targets = torch.cat([item_seq[:, 1:], torch.zeros_like(item_seq[:, :1])], dim=1)  # next item in the row
    targets.scatter_(1, (lengths - 1).unsqueeze(1), interaction[model.POS_ITEM_ID].unsqueeze(1))  # row's target last
    filled = torch.arange(item_seq.size(1), device=item_seq.device).unsqueeze(0) < lengths.unsqueeze(1)
    states = _SEQUENCE_STATES[type(model).__name__](model, item_seq)[filled]  # [positions H]
    return F.cross_entropy(states @ _item_table(model).T, targets[filled])


def use_train_positions(model, config):
    """Give ``model`` the loss ``train_positions`` asks for (``all``: :func:`all_positions_loss`); returns it."""
    name = type(model).__name__
    if config["train_positions"] == "all" and name in _SEQUENCE_STATES and name not in WARMUP_ONLY:
        model.calculate_loss = lambda interaction: all_positions_loss(model, interaction)
    return model
