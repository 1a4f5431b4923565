"""Files a dataset names stay inside its declared folder: image names that resolve elsewhere are refused at load."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recbole_mllm.model.item_images import encode_item_images
from recbole_mllm.stages.common import stage_main
from recbole_mllm.stages.item_fusion import run_item_fusion
from recbole_mllm.stages.items import UnsafePathError, fingerprint, image_path, read_item_file
from stage_doubles import FakeBackend

HOSTILE = ["../outside.png", "../../../../../../etc/passwd", "/etc/hostname", "sub/../../outside.png", "link.png"]


def _dataset(tmp_path, image_name):
    """toy/ with one good image and one item naming ``image_name``; ``outside.png`` lies beside toy/."""
    folder = tmp_path / "toy"
    (folder / "images" / "sub").mkdir(parents=True)
    (tmp_path / "toy" / "outside.png").write_bytes(b"secret")
    (folder / "images" / "good.png").write_bytes(b"not read in these tests")
    os.symlink(tmp_path / "toy" / "outside.png", folder / "images" / "link.png")
    lines = ["item_id:token\ttitle:token_seq\timage:token", "i1\tGood\tgood.png", f"i2\tBad\t{image_name}"]
    (folder / "toy.item").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.mark.parametrize("name", HOSTILE)
def test_an_image_name_outside_the_image_folder_is_refused(tmp_path, name):
    folder = _dataset(tmp_path, name)
    table = read_item_file(folder, "toy", "item_id")
    assert image_path(table, "i1", "image", folder / "images") == folder / "images" / "good.png"
    with pytest.raises(UnsafePathError) as error:
        image_path(table, "i2", "image", folder / "images")
    message = str(error.value)
    assert "\n" not in message and "toy.item: item 'i2', field 'image'" in message and repr(name) in message
    with pytest.raises(UnsafePathError):  # never hashed into a cache key
        fingerprint(table, "image", folder / "images")


def test_names_inside_the_folder_are_kept(tmp_path):
    folder = _dataset(tmp_path, "sub/../good.png")
    table = read_item_file(folder, "toy", "item_id")
    assert image_path(table, "i2", "image", folder / "images") == folder / "images" / "sub/../good.png"
    assert set(fingerprint(table, "image", folder / "images")) == {"item_file", "item_file_sha256", "images_sha256"}


def test_the_stage_refuses_before_anything_is_read_or_loaded(tmp_path, capsys, monkeypatch):
    folder = _dataset(tmp_path, "../../../../../../etc/passwd")
    config = {"dataset": "toy", "data_path": str(folder), "stage_cache_dir": str(tmp_path / "cache"),
              "item_text_fields": ["title"], "item_image_field": "image", "item_image_dir": "images"}
    monkeypatch.setattr("recbole_mllm.stages.item_fusion.load_backend",
                        lambda config: pytest.fail("the model loaded before the dataset was checked"))
    with pytest.raises(SystemExit) as exit_info:
        stage_main([], lambda argv: config, run_item_fusion)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "item 'i2', field 'image'" in err and "'../../../../../../etc/passwd'" in err
    assert not (tmp_path / "cache").exists()
    backend = FakeBackend()
    with pytest.raises(UnsafePathError):
        run_item_fusion(config, backend=backend)
    assert backend.generate_calls == 0


def test_the_model_reading_images_refuses_too(tmp_path):
    folder = _dataset(tmp_path, "/etc/hostname")
    table = read_item_file(folder, "toy", "item_id")

    class Vision:
        def encode_images(self, images):
            pytest.fail("an image reached the model")

    with pytest.raises(UnsafePathError, match="field 'image'"):
        encode_item_images(Vision(), ["[PAD]", "i1", "i2"], table, "image", Path(folder / "images"))
