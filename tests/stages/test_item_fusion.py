"""Item fusion stage: prompts, images with text-only fallback, cache keys, config, errors."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import recbole
import torch
from PIL import Image

from recbole_mllm.stages.cache import StageCacheError
from recbole_mllm.stages.common import stage_config
from recbole_mllm.stages.item_fusion import run_item_fusion
from recbole_mllm.stages.item_fusion_cache import item_fusion_cache, load_item_fusion
from recbole_mllm.stages import prompts
from stage_doubles import FakeBackend, Interrupt, TinyLlamaBackend

ML100K = Path(recbole.__file__).parent / "dataset_example" / "ml-100k"


def _png(color, size=(6, 9)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def toy(tmp_path):
    """A dataset folder in the layout the dataset scripts write: toy.item plus images/."""
    folder = tmp_path / "toy"
    (folder / "images").mkdir(parents=True)
    rows = [("0007", "Toy Story", "1995", "Animation Children's Comedy", "0007.png"),
            ("0010", "GoldenEye", "1995", "Action Thriller", "0010.png"),
            ("0042", "Heat", "1995", "Crime", "missing.png"),         # named, not on disk
            ("0100", "Casino", "1995", "Drama", "empty.png"),         # zero bytes
            ("0200", "Sabrina", "1995", "Comedy Romantic_Comedy", "junk.png"),  # not an image
            ("0300", "Balto", "1995", "Animation", "cut.png"),        # truncated PNG
            ("tt99", "EMPTY Oddity", "", "Drama", "")]                # no image named; backend returns ""
    lines = ["item_id:token\ttitle:token_seq\tyear:token\tgenres:token_seq\timage:token"]
    lines += ["\t".join(r) for r in rows]
    (folder / "toy.item").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "images" / "0007.png").write_bytes(_png("red"))
    (folder / "images" / "0010.png").write_bytes(_png("blue", (12, 4)))
    (folder / "images" / "empty.png").write_bytes(b"")
    (folder / "images" / "junk.png").write_bytes(b"definitely not a png" * 10)
    (folder / "images" / "cut.png").write_bytes(_png("green", (64, 64))[:60])
    return {"dataset": "toy", "data_path": str(folder), "stage_cache_dir": str(tmp_path / "cache"),
            "item_text_fields": ["title", "year", "genres"], "stage_shard_size": 3, "stage_batch_size": 2,
            "item_fusion_max_new_tokens": 6}


def test_summaries_keyed_by_raw_tokens_with_text_only_fallback(toy, caplog):
    backend = FakeBackend()
    with caplog.at_level(logging.WARNING):
        cache = run_item_fusion(toy, backend, progress=False)
    records = cache.load()
    assert sorted(records) == ["0007", "0010", "0042", "0100", "0200", "0300", "tt99"]
    assert records["0007"].text == "Title: Toy Story | image 6x9"
    assert records["0010"].text == "Title: GoldenEye | image 12x4"
    assert records["0042"].text == "Title: Heat | image none"
    assert {k: r.meta["image"] for k, r in records.items()} == {
        "0007": "used", "0010": "used", "0042": "missing", "0100": "unreadable", "0200": "unreadable",
        "0300": "unreadable", "tt99": "absent"}
    errors = {k: r.meta.get("image_error") for k, r in records.items() if r.meta["image"] == "unreadable"}
    assert errors["0100"] == "empty file"
    assert errors["0200"] == "UnidentifiedImageError: cannot identify image file 'junk.png'"
    assert errors["0300"] == "OSError: image file is truncated"
    assert all(str(toy["data_path"]) not in e for e in errors.values())  # no folder: the cache does not depend on it
    assert not any("image_error" in r.meta for k, r in records.items() if k not in errors)
    # an empty generation keeps the item text as the summary, and says so
    assert records["tt99"].text == "Title: EMPTY Oddity\nGenres: Drama" and records["tt99"].meta["summary"] == "item_text"
    counts = cache.summary()["meta_counts"]
    assert counts["image"] == {"used": 2, "missing": 1, "unreadable": 3, "absent": 1}
    assert counts["summary"] == {"generated": 6, "item_text": 1}
    image_warnings = [r for r in caplog.records if "text only" in r.getMessage()]
    assert len(image_warnings) == 1  # warned once, not per item

    by_title = {r.prompt.splitlines()[1]: r for r in backend.requests}
    seen = by_title["Title: Toy Story"]
    assert seen.image is not None and seen.image.mode == "RGB"
    assert "Ignore visual noise" in seen.prompt and "watermarks" in seen.prompt and seen.system
    assert seen.prompt.splitlines()[1:4] == ["Title: Toy Story", "Year: 1995", "Genres: Animation Children's Comedy"]
    assert "Genres: Comedy Romantic Comedy\n" in by_title["Title: Sabrina"].prompt  # label tokens read as words
    fallback = by_title["Title: Casino"]
    assert fallback.image is None and "no image" not in fallback.prompt and "image" not in fallback.prompt.split("\n\n")[1]
    assert torch.equal(records["0007"].embedding, backend.embed(["Title: Toy Story | image 6x9"])[0])


def test_rerun_reuses_and_each_input_change_makes_a_new_cache(toy, tmp_path):
    first = run_item_fusion(toy, FakeBackend(), progress=False)
    again_backend = FakeBackend()
    assert run_item_fusion(toy, again_backend, progress=False).path == first.path
    assert again_backend.generate_calls == 0  # nothing recomputed

    custom = tmp_path / "item_fusion_mine.txt"
    v1 = Path(prompts.__file__).parent / "item_fusion_v1.txt"
    custom.write_text(v1.read_text(encoding="utf-8").replace("two or three sentences", "one sentence"), encoding="utf-8")
    paths = {
        "prompt": item_fusion_cache({**toy, "item_fusion_prompt": str(custom)}, FakeBackend()).path,
        "model": item_fusion_cache(toy, FakeBackend(weights_sha256="fake-weights-2")).path,
        "text-only model": item_fusion_cache(toy, FakeBackend(supports_images=False)).path,
        "max_new_tokens": item_fusion_cache({**toy, "item_fusion_max_new_tokens": 7}, FakeBackend()).path,
        "fields": item_fusion_cache({**toy, "item_text_fields": ["title", "genres"]}, FakeBackend()).path,
    }
    (Path(toy["data_path"]) / "images" / "0007.png").write_bytes(_png("black"))  # same name, new poster
    paths["image content"] = item_fusion_cache(toy, FakeBackend()).path
    assert first.path not in paths.values() and len(set(paths.values())) == len(paths)
    manifest = json.loads((first.path / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["prompt"]["name"] == "item_fusion_v1" and manifest["model"]["weights_sha256"] == "fake-weights-1"
    assert manifest["generation"]["max_new_tokens"] == 6 and manifest["generation"]["do_sample"] is False
    assert manifest["dataset"]["name"] == "toy" and len(manifest["dataset"]["item_file_sha256"]) == 64
    assert str(tmp_path) not in json.dumps(manifest)  # no machine paths in the key


def test_text_only_backend_never_gets_images(toy):
    backend = FakeBackend(supports_images=False)
    cache = run_item_fusion(toy, backend, progress=False)
    assert all(r.image is None for r in backend.requests)
    assert cache.summary()["meta_counts"]["image"] == {"not_supported": 7}


def test_image_field_none_means_text_only(toy):
    backend = FakeBackend()
    cache = run_item_fusion({**toy, "item_image_field": None}, backend, progress=False)
    assert all(r.image is None for r in backend.requests)
    assert cache.summary()["meta_counts"]["image"] == {"absent": 7}
    assert cache.path != item_fusion_cache(toy, backend).path


def test_dataset_without_text_fields_is_a_clear_error(toy):
    with pytest.raises(ValueError, match=r"toy\.item has none of the item text fields \['plot', 'brand'\].*"
                                         r"\['item_id', 'title', 'year', 'genres', 'image'\]"):
        run_item_fusion({**toy, "item_text_fields": ["plot", "brand"]}, FakeBackend(), progress=False)
    with pytest.raises(FileNotFoundError, match="nope.item"):
        run_item_fusion({**toy, "dataset": "nope"}, FakeBackend(), progress=False)


def test_recbole_ml100k_through_a_field_mapping(tmp_path):
    config = {"dataset": "ml-100k", "data_path": str(ML100K), "stage_cache_dir": str(tmp_path),
              "item_text_fields": {"Title": "movie_title", "Year": "release_year", "Genres": "class"},
              "stage_shard_size": 1000}
    backend = FakeBackend()
    cache = run_item_fusion(config, backend, progress=False)
    assert cache.summary()["n_records"] == 1682 and cache.summary()["meta_counts"]["image"] == {"absent": 1682}
    toy_story = next(r for r in backend.requests if "Toy Story" in r.prompt)
    assert "Title: Toy Story\nYear: 1995\nGenres: Animation Children's Comedy" in toy_story.prompt
    texts, emb = load_item_fusion(config, ["[PAD]", "1", "1682"], backend=backend)
    assert texts[0] == "" and torch.equal(emb[0], torch.zeros(emb.shape[1]))
    assert texts[1] == "Title: Toy Story | image none" and emb.shape == (3, 8)


def test_load_before_build_names_the_command(toy):
    with pytest.raises(StageCacheError, match=r"python -m recbole_mllm\.stages\.item_fusion --dataset=toy"):
        load_item_fusion(toy, ["0007"], backend=FakeBackend())


def test_real_tiny_llm_interrupted_then_resumed_is_byte_identical(toy, tmp_path, tree):
    reference = run_item_fusion({**toy, "stage_cache_dir": str(tmp_path / "a")}, TinyLlamaBackend(), progress=False)
    backend = TinyLlamaBackend()
    backend.fail_after = 1
    with pytest.raises(Interrupt):
        run_item_fusion({**toy, "stage_cache_dir": str(tmp_path / "b")}, backend, progress=False)
    backend.fail_after = -1
    resumed = run_item_fusion({**toy, "stage_cache_dir": str(tmp_path / "b")}, backend, progress=False)
    assert tree(resumed.path) == tree(reference.path)
    records = resumed.load()
    assert records["0007"].embedding.shape == (32,) and torch.isfinite(records["0007"].embedding).all()
    for record in records.values():  # the stored vector is the embedding of the stored summary
        assert torch.allclose(record.embedding, backend.embed([record.text])[0], atol=1e-5)
    assert json.loads((resumed.path / "manifest.json").read_text())["model"]["backend"] == "tiny-llama"


def test_stage_config_is_the_plugin_config_of_mllmsrec(tmp_path):
    """The command line builds the same layered Config the model sees, so both find the same cache."""
    yaml_file = tmp_path / "a.yaml"
    yaml_file.write_text("stage_batch_size: 4\nitem_text_fields: [title]\nmllm: from-file\n")
    (tmp_path / "data" / "ml-1m-mm").mkdir(parents=True)
    config = stage_config(["--dataset=ml-1m-mm", f"--config_files={yaml_file}", "--mllm=qwen",
                           "--item_text_fields={'Title': 'movie_title', 'Year': 'release_year'}",
                           f"--data_path={tmp_path / 'data'}"])
    assert config["model"] == "MLLMSRec" and config["rerank_top_k"] is not None  # MLLMSRec.yaml is read
    assert config["stage_batch_size"] == 4 and config["mllm"] == "qwen"
    assert config["item_text_fields"] == {"Title": "movie_title", "Year": "release_year"}
    assert Path(config["data_path"]) == tmp_path / "data" / "ml-1m-mm"
    assert Path(stage_config(["--dataset=ml-100k"])["data_path"]).resolve() == ML100K.resolve()
    other = tmp_path / "b.yaml"
    other.write_text("stage_batch_size: 3\n")  # commas separate files too, as in run_recbole_mllm.py
    assert stage_config(["--dataset=ml-100k", f"--config_files={yaml_file},{other}"])["stage_batch_size"] == 3
    with pytest.raises(ValueError, match="--dataset"):
        stage_config(["--mllm=x"])


def test_named_backend_is_loaded_through_load_mllm(toy, tmp_path):
    """No backend passed: config['mllm'] names a local Hugging Face folder (a tiny random Llama)."""
    folder = tmp_path / "tiny-llama"
    tiny = TinyLlamaBackend()
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    config = {**toy, "mllm": str(folder), "device": "cpu", "stage_shard_size": 4}
    cache = run_item_fusion(config, progress=False)
    manifest = json.loads((cache.path / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["model"]["backend"] == "hf-causal" and manifest["params"]["images_seen"] is False
    assert cache.summary()["meta_counts"]["image"] == {"not_supported": 7}
    texts, emb = load_item_fusion(config, ["0007", "tt99"])
    assert emb.shape == (2, 32) and torch.isfinite(emb).all()


def test_unknown_model_name_is_the_loaders_error(toy):
    with pytest.raises(ValueError, match="does not exist.*offline-default"):
        run_item_fusion({**toy, "mllm": "./no-such-model"}, progress=False)


def test_the_stage_batch_size_defaults_to_the_device_it_runs_on():
    from recbole_mllm.stages.common import CPU_STAGE_BATCH_SIZE, GPU_STAGE_BATCH_SIZE, stage_batch_size

    assert stage_batch_size({"device": "cpu"}) == CPU_STAGE_BATCH_SIZE == 16
    assert stage_batch_size({"device": "cuda"}) == GPU_STAGE_BATCH_SIZE == 512
    assert stage_batch_size({"device": "cuda", "stage_batch_size": 8}) == 8  # a given value wins on every device


def test_interacted_items_only_and_the_same_cache_for_the_same_items(toy):
    from recbole_mllm.data.histories import UserHistory

    histories = {"u1": UserHistory(["0010", "0007"], [1.0, 2.0]), "u2": UserHistory(["0010"], [1.0])}
    scoped = {**toy, "item_fusion_items": "interacted"}
    backend = FakeBackend()
    cache = run_item_fusion(scoped, backend, progress=False, histories=histories)
    assert cache.keys == ["0007", "0010"] and len(backend.requests) == 2  # the other five are never prompted
    assert cache.path != item_fusion_cache(toy, backend).path
    texts, _ = load_item_fusion(scoped, ["[PAD]", "0010"], backend, histories)
    run_item_fusion(toy, backend, progress=False)
    assert texts == ["", load_item_fusion(toy, ["0010"], backend)[0][0]]  # the same summary as from every item
    every = {f"u{i}": UserHistory([token], [1.0]) for i, token in enumerate(item_fusion_cache(toy, backend).keys)}
    assert item_fusion_cache(scoped, backend, every).path == item_fusion_cache(toy, backend).path
    with pytest.raises(ValueError, match="item_fusion_items: interacted"):
        load_item_fusion(scoped, ["0042"], backend, histories)
    with pytest.raises(ValueError, match="item_fusion_items"):
        item_fusion_cache({**toy, "item_fusion_items": "some"}, backend)
