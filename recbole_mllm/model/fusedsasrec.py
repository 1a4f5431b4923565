r"""FusedSASRec
################################################
MLLMSRec's first stage trained alone: a SASRec-style encoder whose items are represented by an id
embedding plus a projection of their MLLM-fused summary embedding (``stages/item_fusion.py``).

It is what MLLMSRec's encoder warm-up trains, as a RecBole model of its own, so that the encoder can be
tuned with the same budget as the baselines (``python -m recbole_mllm.tuning --model=FusedSASRec``) and
compared with them, and so that ``encoder_item_input`` (``id``, ``id+fused``, ``fused``, ``shuffled``)
measures what the multimodal content adds at equal capacity and tuning.

MLLMSRec subclasses it: its first stage is this model by construction.

NOTE: RecBole's SASRec with ``loss_type: CE`` (cross-entropy over all items) and SASRec's key names
(``hidden_dropout_prob``, ``attn_dropout_prob``, ``hidden_act``, ``layer_norm_eps``, ``initializer_range``; the
defaults are FusedSASRec.yaml's: both dropouts 0.2, where RecBole's SASRec.yaml has 0.5); with
``encoder_item_input: id`` it computes SASRec's function from SASRec's initial weights (tests/model/test_fusedsasrec.py).
"""

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType

from recbole_mllm.model.sequence_encoder import FusedSequenceEncoder, reads_ids_only
from recbole_mllm.model.stage_inputs import read_encoder_item_content


class FusedSASRec(SequentialRecommender):
    input_type = InputType.POINTWISE
    required_stages = ("item_fusion",)  # the cache quick_start prepares before building the model
    renamed_keys = {"dropout_prob": ("hidden_dropout_prob", "attn_dropout_prob")}  # config_check: setting one is an error

    @classmethod
    def stages_for(cls, config):
        """The stages this run reads: none when its encoder reads ids alone from SASRec's start (SASRec's function),
        so that control needs no MLLM and no stage cache."""
        return () if reads_ids_only(config) else cls.required_stages

    @classmethod
    def prepare(cls, config, dataset, histories=None):
        """The constructor's prepared parts, read from the stage caches before the model is built
        (``quick_start.build_model``): ``{"item_content": [n_items F]}``, the encoder's item content (one zero column
        when the encoder reads ids alone: it never reads it)."""
        if reads_ids_only(config):
            return {"item_content": torch.zeros(len(dataset.field2id_token[dataset.iid_field]), 1)}
        return {"item_content": read_encoder_item_content(config, dataset, histories)}

    def __init__(self, config, dataset, item_content=None):
        """``item_content``: the encoder's item content ``[n_items F]`` (``prepare``); the constructor opens no file."""
        super().__init__(config, dataset)
        if item_content is None:
            raise ValueError(f"{type(self).__name__} is built from prepared parts: "
                             f"recbole_mllm.quick_start.build_model(config, dataset), or {type(self).__name__}"
                             f"(config, dataset, **{type(self).__name__}.prepare(config, dataset))")
        self.encoder = FusedSequenceEncoder.from_config(config, item_content, self.max_seq_length)

    def forward(self, item_seq, item_seq_len):
        return self.encoder(item_seq, item_seq_len)  # [B H]

    def calculate_loss(self, interaction):
        return self.encoder.cross_entropy(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN],
                                          interaction[self.POS_ITEM_ID])

    def predict(self, interaction):
        user_states = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])  # [B H]
        return (user_states * self.encoder.item_states(interaction[self.ITEM_ID])).sum(-1)  # [B]

    def full_sort_predict(self, interaction):
        user_states = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return self.encoder.full_scores(user_states)  # [B n_items]

    # train_positions: all (recbole_mllm/train_positions.py) scores every position's state against every item
    def sequence_states(self, item_seq):
        return self.encoder.sequence_states(item_seq)  # [B L H]

    def item_states(self):
        return self.encoder.item_states()  # [n_items H]
