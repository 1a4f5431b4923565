"""FusedSASRec (MLLMSRec's encoder alone) and the encoder's item-input controls, end to end on CPU."""

import os

import pytest
import torch

from recbole_mllm.config import Config
from recbole_mllm.data import create_dataset
from recbole_mllm.model.sequence_encoder import ITEM_INPUTS, FusedSequenceEncoder, content_components, shuffled_rows
from recbole_mllm.quick_start import run, split_and_build_model

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.mark.parametrize("item_input", ITEM_INPUTS)
def test_fusedsasrec_trains_and_tests_with_every_item_input(item_input, tiny_data, stage_setup):
    result = run("FusedSASRec", "tiny", config_dict={**tiny_data, **stage_setup, "encoder_item_input": item_input})
    assert set(result["test_result"]) == {"uni100", "full"}
    for metrics in result["test_result"].values():
        assert 0.0 <= metrics["ndcg@10"] <= metrics["hit@10"] <= 1.0
    assert result["config"]["encoder_item_input"] == item_input


def test_fusedsasrec_on_ids_needs_no_mllm_and_no_stage_cache(tiny_data, stage_setup, tmp_path):
    """The content control reads ids alone: it runs with an empty stage cache that it may not build, and no LLM."""
    settings = {**tiny_data, **stage_setup, "encoder_item_input": "id", "run_missing_stages": False,
                "stage_cache_dir": str(tmp_path / "empty"), "mllm": str(tmp_path / "no-llm-here")}
    result = run("FusedSASRec", "tiny", config_dict=settings)
    assert set(result["test_result"]) == {"uni100", "full"} and result["phase_seconds"]["stages"] < 1
    assert not (tmp_path / "empty" / "item_fusion").exists()  # only the run's own state (run_state/) is kept there


def _encoder(item_input, fused):
    torch.manual_seed(0)
    return FusedSequenceEncoder(fused, 8, 1, 1, 16, 0.0, 5, item_input=item_input, shuffle_seed=3).eval()


def test_item_inputs_use_what_they_say():
    fused = torch.randn(6, 4)
    fused[0] = 0
    id_only, both, content, shuffled = (_encoder(k, fused) for k in ("id", "id+fused", "fused", "shuffled"))
    assert id_only.fused_projection is None and content.item_embedding is None
    torch.testing.assert_close(id_only.item_states(), id_only.item_embedding.weight)
    torch.testing.assert_close(content.item_states(), content.fused_projection(fused))
    torch.testing.assert_close(both.item_states(), both.item_embedding.weight + both.fused_projection(fused))
    # shuffled: same rows, other items; padding stays zero; parameters as many as the design's
    assert not torch.equal(shuffled.fused, fused) and torch.equal(shuffled.fused[0], fused[0])
    assert sorted(map(tuple, shuffled.fused.tolist())) == sorted(map(tuple, fused.tolist()))
    assert sum(p.numel() for p in shuffled.parameters()) == sum(p.numel() for p in both.parameters())


def test_content_only_items_with_equal_content_are_equal():
    """Content alone: two items with the same fused row have the same state (no id to tell them apart)."""
    fused = torch.randn(6, 4)
    fused[5] = fused[4]
    states = _encoder("fused", fused).item_states()
    torch.testing.assert_close(states[4], states[5])
    assert not torch.equal(_encoder("id+fused", fused).item_states()[4], _encoder("id+fused", fused).item_states()[5])


def test_shuffle_is_fixed_by_its_seed():
    fused = torch.randn(20, 3)
    assert torch.equal(shuffled_rows(fused, 1), shuffled_rows(fused, 1))
    assert not torch.equal(shuffled_rows(fused, 1), shuffled_rows(fused, 2))


def test_unknown_item_input_is_an_error():
    with pytest.raises(ValueError, match="encoder_item_input must be one of"):
        FusedSequenceEncoder(torch.zeros(3, 2), 4, 1, 1, 8, 0.0, 5, item_input="ids")


def _pairwise_distances(rows):
    return torch.cdist(rows.double(), rows.double())


def test_content_init_keeps_the_contents_geometry():
    """``id_init: content``: with at least as many id dimensions as the centred content has directions, the id rows'
    pairwise distances are the content rows' times one constant (nothing of the content is lost), the components'
    standard deviation is ``initializer_range``, padding stays zero, and every other weight is the ``random`` draw."""
    fused = torch.randn(7, 4) @ torch.randn(4, 5)  # 6 items spanning 4 directions: 5 components, the last one ~0
    fused[0] = 0
    torch.manual_seed(0)
    random = FusedSequenceEncoder(fused, 8, 1, 1, 16, 0.0, 5, item_input="id", initializer_range=0.05)
    torch.manual_seed(0)
    content = FusedSequenceEncoder(fused, 8, 1, 1, 16, 0.0, 5, item_input="id", initializer_range=0.05, id_init="content")
    ids = content.item_embedding.weight.detach()
    assert torch.equal(ids[0], torch.zeros(8))
    torch.testing.assert_close(ids[1:, :5].std(), torch.tensor(0.05))  # the components'; the 3 columns past them: 0
    assert torch.equal(ids[:, 5:], torch.zeros(7, 3))
    ratio = _pairwise_distances(ids[1:]) / _pairwise_distances(fused[1:]).fill_diagonal_(1)
    off_diagonal = ratio[~torch.eye(6, dtype=torch.bool)]
    torch.testing.assert_close(off_diagonal, off_diagonal.mean().expand_as(off_diagonal), rtol=1e-4, atol=0)
    others = {k: v for k, v in random.state_dict().items() if k != "item_embedding.weight"}
    assert all(torch.equal(content.state_dict()[k], v) for k, v in others.items())


def test_content_init_follows_the_content_the_encoder_reads():
    """Narrower than the content: the leading components (most of the spread); under ``shuffled`` the permuted rows,
    so the no-content control stays content-free; an encoder with no id embedding refuses it."""
    fused = torch.randn(30, 6) * torch.tensor([5.0, 3.0, 1.0, 0.1, 0.1, 0.1])
    fused[0] = 0
    two = content_components(fused, 2, 1.0)
    assert two.shape == (30, 2) and torch.equal(two[0], torch.zeros(2))
    assert abs(torch.corrcoef(torch.stack([two[1:, 0], fused[1:, 0]]))[0, 1]) > 0.9  # the widest direction first
    wide = content_components(fused[:4], 8, 1.0)  # 3 items: 3 components (the last ~0 once centred), then zeros
    assert torch.equal(wide[:, 3:], torch.zeros(4, 5)) and wide[:, 2].abs().max() < 1e-6
    torch.manual_seed(0)
    shuffled = FusedSequenceEncoder(fused, 2, 1, 1, 16, 0.0, 5, item_input="shuffled", shuffle_seed=3, id_init="content")
    torch.testing.assert_close(shuffled.item_embedding.weight.detach(), content_components(shuffled_rows(fused, 3), 2, 0.02))
    assert not torch.allclose(shuffled.item_embedding.weight.detach(), content_components(fused, 2, 0.02))
    with pytest.raises(ValueError, match="encoder_item_input: fused has none"):
        FusedSequenceEncoder(fused, 2, 1, 1, 16, 0.0, 5, item_input="fused", id_init="content")
    with pytest.raises(ValueError, match="encoder_id_init must be one of"):
        FusedSequenceEncoder(fused, 2, 1, 1, 16, 0.0, 5, id_init="pca")


def test_fusedsasrec_with_content_init_starts_from_its_item_content(tiny_data, stage_setup):
    """Through the config: ``encoder_id_init: content`` builds the id embedding from the model's own item content."""
    settings = {**tiny_data, **stage_setup, "encoder_item_input": "id", "encoder_id_init": "content"}
    config, model, _ = _built("FusedSASRec", settings)
    expected = content_components(model.encoder.fused, config["hidden_size"], config["initializer_range"])
    torch.testing.assert_close(model.encoder.item_embedding.weight.detach(), expected)
    result = run("FusedSASRec", "tiny", config_dict=settings)
    assert result["config"]["encoder_id_init"] == "content"
    assert 0.0 <= result["test_result"]["full"]["ndcg@10"] <= 1.0


SASREC_SETTINGS = {"encoder_item_input": "id", "loss_type": "CE", "epochs": 4, "eval_step": 1, "seed": 7,
                   "hidden_dropout_prob": 0.2, "attn_dropout_prob": 0.1, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
                   "initializer_range": 0.02, "hidden_size": 64, "inner_size": 256, "n_layers": 2,
                   "train_positions": "last", "train_batch_size": 2048}
"""One setting for both models: SASRec's keys with values unlike either model's defaults where that is free (the
sizes and training rows, whose defaults differ between the two, set to SASRec's)."""


def _sasrec_name(name):
    """The name RecBole's SASRec gives the FusedSASRec parameter ``name``."""
    for ours, theirs in (("encoder.transformer.", "trm_encoder."), ("encoder.layer_norm.", "LayerNorm."), ("encoder.", "")):
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def _built(model_name, config_dict):
    config = Config(model_name, "tiny", config_dict=config_dict)
    return config, *split_and_build_model(config, create_dataset(config))[:2]


def test_fusedsasrec_of_ids_is_sasrec(tiny_data, stage_setup):
    """``encoder_item_input: id`` is RecBole's SASRec (``loss_type: CE``), exactly: no tolerance anywhere.

    The encoder creates SASRec's layers in SASRec's order and initialises them as SASRec does, so from the same seed
    both models draw the same initial weights; with SASRec's weights copied into a FusedSASRec built from another seed,
    scores and loss are equal floats (the same function); trained with the same seed and settings, both run as many
    epochs to the same best validation score and metrics, and test the same."""
    settings = {**tiny_data, **stage_setup, **SASREC_SETTINGS}
    _, sasrec, batches = _built("SASRec", settings)
    _, fused, _ = _built("FusedSASRec", settings)
    theirs = sasrec.state_dict()
    ours = {_sasrec_name(name): value for name, value in fused.state_dict().items()}
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs), "initial weights differ"

    _, other, _ = _built("FusedSASRec", {**settings, "seed": 8})
    assert not torch.equal(other.encoder.item_embedding.weight, sasrec.item_embedding.weight)
    other.load_state_dict({name: theirs[_sasrec_name(name)] for name in other.state_dict()})
    batch = next(iter(batches))
    for mode in (False, True):  # eval, then train: dropout masks drawn from the same generator state
        sasrec.train(mode), other.train(mode)
        for method in ("full_sort_predict", "predict", "calculate_loss"):
            torch.manual_seed(0)
            expected = getattr(sasrec, method)(batch)
            torch.manual_seed(0)
            assert torch.equal(getattr(other, method)(batch), expected), (method, mode)

    sasrec_run, fused_run = run("SASRec", "tiny", config_dict=settings), run("FusedSASRec", "tiny", config_dict=settings)
    assert fused_run["epochs"] == sasrec_run["epochs"] > 1
    assert fused_run["best_valid_score"] == sasrec_run["best_valid_score"]
    assert fused_run["best_valid_result"] == sasrec_run["best_valid_result"]
    assert fused_run["test_result"] == sasrec_run["test_result"]
