"""RecBole's multi-head self-attention, optionally through PyTorch's fused ``scaled_dot_product_attention``.

Why: RecBole's ``MultiHeadAttention`` materialises ``[batch, heads, L, L]`` scores in float32 and runs the
scale, mask, softmax and dropout as separate kernels. At history length 200 that is what bounds an
SASRec or BERT4Rec epoch on a GPU (``benchmarks/train_step.py``, docs/performance.md). SDPA computes the
same function in fused kernels: the same parameters, the same additive mask, dropout on the attention
weights as RecBole's ``attn_dropout``. A model's state dict does not change and, without dropout, neither
do its outputs (up to float rounding; tests). With dropout the random masks are drawn differently, so a
training run's numbers differ by chance only.

``transformer_attention`` (``properties/overall.yaml``) chooses per run, for every RecBole transformer in
the model (SASRec, BERT4Rec, the encoder of FusedSASRec and MLLMSRec): ``eager`` keeps RecBole's code,
``sdpa`` switches to the fused kernel.
"""

from types import MethodType

import torch.nn.functional as F
from recbole.model.layers import MultiHeadAttention

IMPLEMENTATIONS = ("eager", "sdpa")


def sdpa_forward(self, input_tensor, attention_mask):
    """``MultiHeadAttention.forward`` with the attention itself in one ``scaled_dot_product_attention`` call."""
    batch, length, _ = input_tensor.shape

    def heads(x):  # [B L H] -> [B heads L head_size]
        return x.view(batch, length, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    context = F.scaled_dot_product_attention(
        heads(self.query(input_tensor)), heads(self.key(input_tensor)), heads(self.value(input_tensor)),
        attn_mask=attention_mask.to(input_tensor.dtype),  # RecBole's additive 0 / -10000 mask, [B 1 L L]
        dropout_p=self.attn_dropout.p if self.training else 0.0)
    hidden_states = self.dense(context.transpose(1, 2).reshape(batch, length, self.all_head_size))
    hidden_states = self.out_dropout(hidden_states)
    return self.LayerNorm(hidden_states + input_tensor)


def use_attention(model, implementation):
    """Run every RecBole ``MultiHeadAttention`` in ``model`` with ``implementation``; returns how many it set."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"transformer_attention: {implementation!r} is none of {', '.join(IMPLEMENTATIONS)}")
    layers = [module for module in model.modules() if isinstance(module, MultiHeadAttention)]
    for layer in layers:
        if implementation == "sdpa":
            layer.forward = MethodType(sdpa_forward, layer)
        else:
            layer.__dict__.pop("forward", None)  # back to the class's (RecBole's) forward
    return len(layers)
