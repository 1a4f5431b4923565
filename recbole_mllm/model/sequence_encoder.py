"""A SASRec-style encoder over fused item embeddings: the collaborative half of hybrid prompting.

Items are represented by an id embedding plus a projection of their frozen MLLM fusion embedding
(part 1 of MLLM-SRec), so items with few interactions still carry content. The encoder gives a user
state (last position of a causal transformer) and item states; ``user_state @ item_states.T`` is a
full-catalogue score, trained with cross-entropy like SASRec. It serves twice: its states enter the
LLM prompt as soft tokens (as LLaRA does with SASRec embeddings), and its scores are the cheap first
stage of full ranking (retrieve top-K, let the LLM rerank).
"""

import torch
from recbole.model.layers import TransformerEncoder
from torch import nn


class FusedSequenceEncoder(nn.Module):
    def __init__(self, fused_embeddings, hidden_size, n_layers, n_heads, inner_size, dropout, max_seq_length):
        super().__init__()
        n_items, fused_dim = fused_embeddings.shape
        self.register_buffer("fused", fused_embeddings.float(), persistent=False)  # rebuilt from the stage cache
        self.item_embedding = nn.Embedding(n_items, hidden_size, padding_idx=0)
        self.fused_projection = nn.Linear(fused_dim, hidden_size)
        self.position_embedding = nn.Embedding(max_seq_length, hidden_size)
        self.transformer = TransformerEncoder(n_layers=n_layers, n_heads=n_heads, hidden_size=hidden_size,
                                              inner_size=inner_size, hidden_dropout_prob=dropout,
                                              attn_dropout_prob=dropout, hidden_act="gelu", layer_norm_eps=1e-12)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(dropout)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def item_states(self, items=None):
        """Item representations ``[..., hidden]`` (all items when ``items`` is None)."""
        if items is None:
            return self.item_embedding.weight + self.fused_projection(self.fused)
        return self.item_embedding(items) + self.fused_projection(self.fused[items])

    def forward(self, item_seq, item_seq_len):
        """User states ``[B hidden]`` from left-aligned item sequences ``[B L]`` and their lengths ``[B]``."""
        positions = torch.arange(item_seq.size(1), device=item_seq.device).unsqueeze(0)
        hidden = self.dropout(self.layer_norm(self.item_states(item_seq) + self.position_embedding(positions)))
        padding = (item_seq > 0).unsqueeze(1).unsqueeze(2)  # [B 1 1 L]
        causal = torch.tril(torch.ones(item_seq.size(1), item_seq.size(1), dtype=torch.bool, device=item_seq.device))
        mask = torch.where(padding & causal, 0.0, -10000.0)  # [B 1 L L]
        output = self.transformer(hidden, mask, output_all_encoded_layers=False)[-1]  # [B L H]
        last = (item_seq_len - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, output.size(-1))
        return output.gather(1, last).squeeze(1)  # [B H]

    def full_scores(self, user_states):
        """Scores of every item ``[B n_items]``."""
        return user_states @ self.item_states().T
