"""Any Hugging Face image-text-to-text model: Qwen2-VL / Qwen2.5-VL, LLaVA / LLaVA-NeXT, SmolVLM / Idefics3.

The processor owns everything model specific (image tokens, their count, pixel tensors, the chat
template), so this backend only writes chat messages in the multimodal content-list form and lets
``processor.apply_chat_template`` and ``processor(text=..., images=...)`` do the rest. Requests
without an image go through the same model text-only. ``prepare_inputs`` accepts mixed batches (the
ranker's); the generate / score loops still keep the two kinds apart (``HFChatBackend._batches``), so
no text-only row pays for padded image slots.
"""

from __future__ import annotations

from typing import Optional, Sequence

from transformers import AutoModelForImageTextToText, AutoProcessor

from .base import ChatRequest
from .hf_chat import HFChatBackend, append_completions, chat_messages, resolve_device, resolve_dtype
from .weights import local_model_folder, model_files


class HFVisionLM(HFChatBackend):
    """``AutoProcessor`` + ``AutoModelForImageTextToText`` behind the chat interface."""

    backend = "hf-image-text-to-text"

    def __init__(self, model, processor, name: str, files, device, dtype):
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"processor of {name} has no tokenizer")
        super().__init__(model, tokenizer, name=name, files=files, device=device, dtype=dtype)
        self.processor = processor
        if not (getattr(processor, "chat_template", None) or tokenizer.chat_template):
            raise ValueError(f"neither the processor nor the tokenizer of {name} has a chat template; "
                             "use an instruction-tuned model or set processor.chat_template")

    @classmethod
    def from_pretrained(cls, name_or_path: str, device=None, dtype=None, processor=None,
                        **model_kwargs) -> "HFVisionLM":
        """Load model and processor; pass ``processor`` to use one built or configured by hand."""
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        processor = processor if processor is not None else AutoProcessor.from_pretrained(name_or_path)
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype, **model_kwargs)
        if "device_map" not in model_kwargs:
            model = model.to(device)
        return cls(model, processor, name=str(name_or_path), files=model_files(local_model_folder(name_or_path)),
                   device=device, dtype=dtype)

    @property
    def supports_images(self) -> bool:
        return True

    def render(self, request: ChatRequest) -> str:
        template_owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        return template_owner.apply_chat_template(chat_messages(request, content_lists=True),
                                                  add_generation_prompt=True, tokenize=False)

    def prepare_inputs(self, requests: Sequence[ChatRequest],
                       completions: Optional[Sequence[str]] = None) -> dict:
        texts = [self.render(r) for r in requests]
        # one image list per text (empty for text-only rows): the form every processor reads unambiguously
        images = [[r.image.convert("RGB")] if r.image is not None else [] for r in requests]
        has_image = any(r.image is not None for r in requests)
        enc = self.processor(text=texts, images=images if has_image else None, padding=True, return_tensors="pt")
        inputs = dict(enc)
        if completions is not None:
            inputs = append_completions(inputs, self.completion_token_ids(completions), self.tokenizer.pad_token_id)
        return {k: v.to(self.device, dtype=self.dtype) if v.is_floating_point() else v.to(self.device)
                for k, v in inputs.items()}
