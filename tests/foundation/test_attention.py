"""``transformer_attention: sdpa`` computes RecBole's self-attention: same outputs and gradients without dropout."""

import pytest
import torch
from recbole.model.layers import MultiHeadAttention, TransformerEncoder

from recbole_mllm.attention import use_attention


def _mask(lengths, length, bidirectional=False):
    """RecBole's additive mask (``SequentialRecommender.get_attention_mask``) for left-aligned sequences."""
    seq = torch.stack([torch.arange(length) < n for n in lengths])  # [B L] True where an item sits
    mask = seq.unsqueeze(1).unsqueeze(2)
    if not bidirectional:
        mask = torch.tril(mask.expand(-1, -1, length, -1))
    return torch.where(mask, 0.0, -10000.0)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_sdpa_equals_recbole_attention_outputs_and_gradients(bidirectional):
    torch.manual_seed(0)
    encoder = TransformerEncoder(n_layers=2, n_heads=2, hidden_size=16, inner_size=32, hidden_dropout_prob=0.0,
                                 attn_dropout_prob=0.0, hidden_act="gelu", layer_norm_eps=1e-12)
    x = torch.randn(3, 7, 16)
    mask = _mask([7, 4, 1], 7, bidirectional)

    def run():
        encoder.zero_grad()
        out = encoder(x, mask, output_all_encoded_layers=False)[-1]
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in encoder.parameters()]

    eager_out, eager_grads = run()
    assert use_attention(encoder, "sdpa") == 2
    sdpa_out, sdpa_grads = run()
    assert torch.allclose(sdpa_out, eager_out, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(sdpa_grads, eager_grads))
    assert not torch.equal(sdpa_out, encoder(x, _mask([2, 2, 2], 7, bidirectional))[-1])  # the mask is used
    use_attention(encoder, "eager")
    assert "forward" not in vars(encoder.layer[0].multi_head_attention)  # RecBole's own forward again


def test_sdpa_applies_attention_dropout_in_training_only():
    torch.manual_seed(0)
    layer = MultiHeadAttention(n_heads=2, hidden_size=16, hidden_dropout_prob=0.0, attn_dropout_prob=0.5,
                               layer_norm_eps=1e-12)
    use_attention(layer, "sdpa")
    x, mask = torch.randn(2, 5, 16), _mask([5, 5], 5, bidirectional=True)
    layer.eval()
    assert torch.equal(layer(x, mask), layer(x, mask))
    layer.train()
    assert not torch.equal(layer(x, mask), layer(x, mask))


def test_an_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="transformer_attention: 'flash' is none of eager, sdpa"):
        use_attention(torch.nn.Linear(2, 2), "flash")


def test_a_run_builds_its_transformer_with_the_configured_attention(tiny_data):
    from recbole_mllm.config import Config
    from recbole_mllm.data import create_dataset
    from recbole_mllm.quick_start import split_and_build_model

    for implementation, patched in (("eager", False), ("sdpa", True)):
        config = Config("SASRec", "tiny", config_dict={**tiny_data, "transformer_attention": implementation})
        model = split_and_build_model(config, create_dataset(config))[0]
        layers = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
        assert layers and all(("forward" in vars(layer)) == patched for layer in layers)
