"""A SASRec-style encoder over fused item embeddings: the collaborative half of hybrid prompting.

Items are represented by an id embedding plus a projection of their frozen MLLM fusion embedding
(part 1 of MLLM-SRec), so items with few interactions still carry content. ``item_input`` switches
that representation for the controls that show what the content adds: ``id`` (SASRec's id embedding
alone), ``id+fused`` (the design), ``fused`` (content alone, no id embedding: cold items are no
different from warm ones) and ``shuffled`` (id + fused rows permuted across items: the same capacity
and embedding statistics, no content). The encoder gives a user
state (last position of a causal transformer) and item states; ``user_state @ item_states.T`` is a
full-catalogue score, trained with cross-entropy like SASRec. It serves twice: its states enter the
LLM prompt as soft tokens (as LLaRA does with SASRec embeddings), and its scores are the cheap first
stage of full ranking (retrieve top-K, let the LLM rerank).

``id_init`` chooses where the id embedding starts: SASRec's random normal draw, or (``content``) the item content's
principal components, so items that read alike start close and the id embedding can refine that rather than learn it
from interactions alone (the "LLM-initialised embeddings" idea of Harte et al., RecSys 2023).
"""

import torch
from recbole.model.layers import TransformerEncoder
from torch import nn


ITEM_INPUTS = ("id", "id+fused", "fused", "shuffled")
"""Values of ``encoder_item_input``: what represents an item in the encoder (see the module docstring)."""

ID_INITS = ("random", "content")
"""Values of ``encoder_id_init``: where the id embedding starts (see the module docstring)."""


def reads_ids_only(config):
    """Whether the encoder ``config`` describes reads no item content: ids alone (``encoder_item_input: id``) from a
    random start (``encoder_id_init: random``), SASRec's function."""
    return config["encoder_item_input"] == "id" and (config["encoder_id_init"] or "random") == "random"


def content_components(content, size, scale):
    """``[n_items size]``: rows 1.. of ``content`` projected on its first ``size`` principal components (an exact SVD
    of the centred rows: no random draw), scaled so their standard deviation is ``scale``; row 0 (padding) zero. With
    fewer components than ``size`` (few items or a narrow content), the last columns are zero."""
    rows = content[1:].double()
    rows = rows - rows.mean(0, keepdim=True)
    _, _, basis = torch.linalg.svd(rows, full_matrices=False)  # [rank F]
    projected = rows @ basis[:size].T  # [n_items-1 k]
    projected = projected * (scale / projected.std().clamp(min=1e-12))
    out = torch.zeros(len(content), size, dtype=torch.float32)
    out[1:, :projected.size(1)] = projected.float()
    return out


def shuffled_rows(embeddings, seed):
    """``embeddings`` with rows 1.. permuted by a generator seeded by ``seed`` (row 0, padding, stays)."""
    generator = torch.Generator().manual_seed(int(seed))
    order = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(len(embeddings) - 1, generator=generator)])
    return embeddings[order]


class FusedSequenceEncoder(nn.Module):
    """RecBole SASRec's layers, arguments and initialisation over the item representation ``item_input`` names. With
    ``id`` its modules are SASRec's, created and initialised in SASRec's order, so from one seed both draw the same
    weights and compute the same function (``tests/model/test_fusedsasrec.py``). ``attn_dropout_prob`` None:
    ``hidden_dropout_prob``."""

    def __init__(self, fused_embeddings, hidden_size, n_layers, n_heads, inner_size, hidden_dropout_prob, max_seq_length,
                 item_input="id+fused", shuffle_seed=0, attn_dropout_prob=None, hidden_act="gelu", layer_norm_eps=1e-12,
                 initializer_range=0.02, id_init="random"):
        super().__init__()
        if item_input not in ITEM_INPUTS:
            raise ValueError(f"encoder_item_input must be one of {ITEM_INPUTS}; got {item_input!r}")
        if id_init not in ID_INITS:
            raise ValueError(f"encoder_id_init must be one of {ID_INITS}; got {id_init!r}")
        if id_init == "content" and item_input == "fused":
            raise ValueError("encoder_id_init: content initialises the id embedding, and encoder_item_input: fused has "
                             "none; use id, id+fused or shuffled")
        attn_dropout_prob = hidden_dropout_prob if attn_dropout_prob is None else attn_dropout_prob
        self.initializer_range = initializer_range
        n_items, fused_dim = fused_embeddings.shape
        if item_input == "shuffled":
            fused_embeddings = shuffled_rows(fused_embeddings, shuffle_seed)
        self.register_buffer("fused", fused_embeddings.float(), persistent=False)  # rebuilt from the stage cache
        self.item_embedding = nn.Embedding(n_items, hidden_size, padding_idx=0) if item_input != "fused" else None
        self.fused_projection = nn.Linear(fused_dim, hidden_size) if item_input != "id" else None
        self.position_embedding = nn.Embedding(max_seq_length, hidden_size)
        self.transformer = TransformerEncoder(n_layers=n_layers, n_heads=n_heads, hidden_size=hidden_size,
                                              inner_size=inner_size, hidden_dropout_prob=hidden_dropout_prob,
                                              attn_dropout_prob=attn_dropout_prob, hidden_act=hidden_act,
                                              layer_norm_eps=layer_norm_eps)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(hidden_dropout_prob)
        self.apply(self._init_weights)
        if id_init == "content":
            with torch.no_grad():
                self.item_embedding.weight.copy_(content_components(self.fused, hidden_size, initializer_range))

    @classmethod
    def from_config(cls, config, fused_embeddings, max_seq_length):
        """The encoder the config describes: SASRec's keys (``hidden_size``, ``n_layers``, ``n_heads``, ``inner_size``,
        ``hidden_dropout_prob``, ``attn_dropout_prob``, ``hidden_act``, ``layer_norm_eps``, ``initializer_range``),
        ``encoder_item_input`` and ``encoder_id_init``."""
        return cls(fused_embeddings, config["hidden_size"], config["n_layers"], config["n_heads"], config["inner_size"],
                   config["hidden_dropout_prob"], max_seq_length, config["encoder_item_input"], config["seed"],
                   attn_dropout_prob=config["attn_dropout_prob"], hidden_act=config["hidden_act"],
                   layer_norm_eps=config["layer_norm_eps"], initializer_range=config["initializer_range"],
                   id_init=config["encoder_id_init"])

    def _init_weights(self, module):
        """SASRec's initialisation: normal weights of std ``initializer_range``, zero biases."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def item_states(self, items=None):
        """Item representations ``[..., hidden]`` (all items when ``items`` is None), in float32 (see ``forward``)."""
        with torch.autocast(self.position_embedding.weight.device.type, enabled=False):
            return self._item_states(items)

    def _item_states(self, items):
        states = 0
        if self.item_embedding is not None:
            states = self.item_embedding.weight if items is None else self.item_embedding(items)
        if self.fused_projection is not None:
            states = states + self.fused_projection(self.fused if items is None else self.fused[items])
        return states

    def sequence_states(self, item_seq):
        """States ``[B L hidden]`` at every position of left-aligned item sequences ``[B L]`` (causal), in float32
        (see ``forward``)."""
        with torch.autocast(item_seq.device.type, enabled=False):
            return self._sequence_states(item_seq)

    def _sequence_states(self, item_seq):
        positions = torch.arange(item_seq.size(1), device=item_seq.device).unsqueeze(0)
        hidden = self.dropout(self.layer_norm(self.item_states(item_seq) + self.position_embedding(positions)))
        padding = (item_seq > 0).unsqueeze(1).unsqueeze(2)  # [B 1 1 L]
        causal = torch.tril(torch.ones(item_seq.size(1), item_seq.size(1), dtype=torch.bool, device=item_seq.device))
        mask = torch.where(padding & causal, 0.0, -10000.0)  # [B 1 L L]
        return self.transformer(hidden, mask, output_all_encoded_layers=False)[-1]  # [B L H]

    def forward(self, item_seq, item_seq_len):
        """User states ``[B hidden]``: the state at each sequence's last item (``item_seq_len`` ``[B]``).

        Always float32, also inside an LLM's bfloat16 autocast: the encoder is the first stage, and its scores must be
        those FusedSASRec computes (in float32, under RecBole's trainer), whichever model runs it.
        """
        output = self.sequence_states(item_seq)
        last = (item_seq_len - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, output.size(-1))
        return output.gather(1, last).squeeze(1)  # [B H]

    def full_scores(self, user_states):
        """Scores of every item ``[B n_items]``, in float32."""
        with torch.autocast(user_states.device.type, enabled=False):
            return user_states.float() @ self.item_states().T

    def cross_entropy(self, item_seq, item_seq_len, targets):
        """SASRec's CE loss: cross-entropy over every item of each sequence's next item ``targets`` ``[B]``."""
        return nn.functional.cross_entropy(self.full_scores(self(item_seq, item_seq_len)), targets)
