"""Any Hugging Face causal LM with a chat template, text only.

For text-only runs and items without images. Images in requests are dropped with one warning per
backend: the stages can still write visual cues into the prompt text themselves.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

from transformers import AutoModelForCausalLM, AutoTokenizer

from .base import ChatRequest
from .hf_chat import HFChatBackend, append_completions, chat_messages, resolve_device, resolve_dtype
from .weights import local_model_folder, model_files

logger = logging.getLogger(__name__)


class HFCausalLM(HFChatBackend):
    """A text-only chat LM: ``AutoTokenizer`` + ``AutoModelForCausalLM``."""

    backend = "hf-causal"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.tokenizer.chat_template:
            raise ValueError(f"tokenizer of {self.name} has no chat template; use an instruction-tuned model "
                             "or set tokenizer.chat_template")
        self._warned_image = False

    @classmethod
    def from_pretrained(cls, name_or_path: str, device=None, dtype=None, **model_kwargs) -> "HFCausalLM":
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **model_kwargs)
        if "device_map" not in model_kwargs:
            model = model.to(device)
        return cls(model, tokenizer, name=str(name_or_path), files=model_files(local_model_folder(name_or_path)),
                   device=device, dtype=dtype)

    def render(self, request: ChatRequest) -> str:
        if request.image is not None and not self._warned_image:
            logger.warning("%s is a text-only model: request images are ignored (warned once)", self.name)
            self._warned_image = True
        return self.tokenizer.apply_chat_template(chat_messages(request), add_generation_prompt=True,
                                                  tokenize=False)

    def prepare_inputs(self, requests: Sequence[ChatRequest],
                       completions: Optional[Sequence[str]] = None) -> dict:
        enc = self.tokenizer([self.render(r) for r in requests], padding=True, add_special_tokens=False,
                             return_tensors="pt")
        inputs = dict(enc)
        if completions is not None:
            inputs = append_completions(inputs, self.completion_token_ids(completions), self.tokenizer.pad_token_id)
        return {k: v.to(self.device) for k, v in inputs.items()}
