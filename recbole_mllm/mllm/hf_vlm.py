"""Any Hugging Face image-text-to-text model: Qwen2-VL / Qwen2.5-VL, LLaVA / LLaVA-NeXT, SmolVLM / Idefics3.

The processor owns everything model specific (image tokens, their count, pixel tensors, the chat
template), so this backend only writes chat messages in the multimodal content-list form and lets
``processor.apply_chat_template`` and ``processor(text=..., images=...)`` do the rest. Requests
without an image go through the same model text-only. ``prepare_inputs`` accepts mixed batches (the
ranker's); the generate / score loops still keep the two kinds apart (``HFChatBackend._batches``), so
no text-only row pays for padded image slots.

Item images in the ranker's prompt go through the interface the offline default has too:
``encode_images`` once per item, ``projector`` at scoring time. The tokens are the model's own: the
placeholder its chat template writes for an image (Qwen2-VL ``<|vision_start|><|image_pad|><|vision_end|>``,
SmolVLM ``<image>``), expanded by its processor, embedded, with the vision tower's and connector's
output (``get_image_features``) in the image-token positions. That is the embedding sequence the model
builds itself when it reads the image, already in the LLM's space (``ImageSlot``).

- One token count for every item: each image is squashed (not cropped, like the offline tower) to
  ``image_side`` squared, and processors that tile large images (SmolVLM / Idefics3) keep one tile. A
  processor is a function of the image's size, so every item gets the same layout; Qwen2-VL at the
  default 224 gets 8x8 = 64 image tokens. Not padding or pooling: padded slots or pooled tokens are
  inputs the LLM never saw in pretraining, and the projector could no longer start as the model's own.
- ``ImageTokenProjector``: identity plus a trainable low-rank residual whose output layer starts at
  zero, so at step 0 the ranker sees exactly what the pretrained model splices in (as the offline
  projector's zero-initialised residual leaves its class-name embeddings).
- Positions: the ranker runs the decoder with 1-D position ids, which is what LLaVA and Idefics3 use.
  Qwen2-VL's M-RoPE gives image tokens (temporal, height, width) positions, and the text after an
  image resumes at slot start + ``ImageSlot.span`` rather than + its token count. With 1-D ids (its
  text model repeats them on all three axes) the image tokens sit at consecutive text positions: the
  same embeddings under a positional encoding the model was not pretrained with, the same in training
  and scoring, which the LoRA and the residual learn from. ``ImageSlot.rope_offsets`` and
  ``mrope_position_ids`` give the exact ids for a ranker that passes 3-D ones.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from functools import cached_property
from typing import Optional, Sequence

import torch
from PIL import Image
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor

from .base import ChatRequest
from .hf_chat import HFChatBackend, append_completions, chat_messages, resolve_device, resolve_dtype
from .weights import local_model_folder, model_files

IMAGE_SIDE = 224  # every item image is squashed to this side before the processor
RESIDUAL_RANK = 16  # rank of the image projector's trainable residual
_PROBE = "\u2063probe\u2063"  # text beside the image when the chat template is probed; cannot occur in a template
_TEXT_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


@dataclass
class ImageSlot:
    """The tokens one item image takes in a prompt, the same for every item.

    ``text`` is the placeholder the chat template writes; ``input_ids [n]`` its expansion by the
    processor; ``vision [n]`` (bool) marks the positions the vision tower fills (the rest are marker
    tokens such as ``<|vision_start|>``); ``rope_offsets [3, n]`` are M-RoPE positions relative to the
    slot's first position, None for models with 1-D positions.
    """

    text: str
    input_ids: torch.Tensor
    vision: torch.Tensor
    rope_offsets: Optional[torch.Tensor] = None

    @property
    def n(self) -> int:
        return len(self.input_ids)

    @property
    def span(self) -> int:
        """How far the slot moves the next text position: ``n`` with 1-D positions."""
        return self.n if self.rope_offsets is None else int(self.rope_offsets.max()) + 1


class ImageTokenProjector(nn.Module):
    """The model's own image tokens plus a trainable residual: ``[I, n, H] -> [I, n, H]``.

    ``up(down(x))`` on the vision positions only (marker tokens stay the LLM's own embeddings); ``up``
    starts at zero, so the output starts equal to the input; ``down`` is drawn from a fixed seed, so
    building the projector does not move the global random state. Computed in float32.
    """

    def __init__(self, hidden: int, vision: torch.Tensor, rank: int = RESIDUAL_RANK):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.down = nn.Linear(hidden, rank, bias=False)  # PyTorch's default init, as LoRA's A
            self.up = nn.Linear(rank, hidden, bias=False)
        nn.init.zeros_(self.up.weight)
        self.register_buffer("vision", vision.view(-1, 1).float(), persistent=False)  # [n 1]

    def forward(self, features: torch.Tensor, logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``logits`` (the offline projector's second input) is accepted and unused."""
        x = features.to(self.up.weight.dtype)  # [I n H]
        return x + self.up(self.down(x)) * self.vision


def mrope_position_ids(positions: torch.Tensor, slot_starts: Sequence[Sequence[int]],
                       slot: ImageSlot) -> torch.Tensor:
    """M-RoPE position ids ``[3, N, L]`` from 1-D ones ``[N, L]`` and the column where each image slot starts.

    Text keeps its 1-D position on all three axes; a slot starting at position ``p`` takes
    ``p + slot.rope_offsets``, and everything after it moves by ``slot.span - slot.n`` (what Qwen2-VL's
    ``get_rope_index`` does). Columns are those of ``positions`` (left padding included).
    """
    out = positions.unsqueeze(0).repeat(3, 1, 1)
    if slot.rope_offsets is None:
        return out
    offsets = slot.rope_offsets.to(positions.device)
    for row, starts in enumerate(slot_starts):
        for start in sorted(starts, reverse=True):  # later slots first: each shift applies to what follows
            out[:, row, start + slot.n:] += slot.span - slot.n
            out[:, row, start:start + slot.n] = out[:, row, start:start + 1] + offsets
    return out


class HFVisionLM(HFChatBackend):
    """``AutoProcessor`` + ``AutoModelForImageTextToText`` behind the chat interface.

    ``image_side``: the square every item image is squashed to for the ranker (``encode_images``); chat
    requests (the stages) go through the processor as they are.
    """

    backend = "hf-image-text-to-text"

    def __init__(self, model, processor, name: str, files, device, dtype, image_side: int = IMAGE_SIDE):
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"processor of {name} has no tokenizer")
        super().__init__(model, tokenizer, name=name, files=files, device=device, dtype=dtype)
        self.processor = processor
        self.image_side = image_side
        if not (getattr(processor, "chat_template", None) or tokenizer.chat_template):
            raise ValueError(f"neither the processor nor the tokenizer of {name} has a chat template; "
                             "use an instruction-tuned model or set processor.chat_template")

    @classmethod
    def from_pretrained(cls, name_or_path: str, device=None, dtype=None, processor=None, image_side: int = IMAGE_SIDE,
                        **model_kwargs) -> "HFVisionLM":
        """Load model and processor; pass ``processor`` to use one built or configured by hand."""
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        processor = processor if processor is not None else AutoProcessor.from_pretrained(name_or_path)
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype, **model_kwargs)
        if "device_map" not in model_kwargs:
            model = model.to(device)
        return cls(model, processor, name=str(name_or_path), files=model_files(local_model_folder(name_or_path)),
                   device=device, dtype=dtype, image_side=image_side)

    @property
    def supports_images(self) -> bool:
        return True

    def _template_owner(self):
        return self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer

    def render(self, request: ChatRequest) -> str:
        return self._template_owner().apply_chat_template(chat_messages(request, content_lists=True),
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
        return self._to_device(inputs)

    def _to_device(self, inputs: dict) -> dict:
        return {k: v.to(self.device, dtype=self.dtype) if v.is_floating_point() else v.to(self.device)
                for k, v in inputs.items()}

    # ------------------------------------------------------------------------- item images (ranker)
    def image_placeholder(self) -> str:
        """The text the chat template writes for one image: what a rendering with an image adds."""
        def render(content):
            return self._template_owner().apply_chat_template([{"role": "user", "content": content}], tokenize=False)

        text = [{"type": "text", "text": _PROBE}]
        with_image, without = render([{"type": "image"}, *text]), render(text)
        common = len(os.path.commonprefix([with_image, without]))
        with_image, without = with_image[common:], without[common:]
        tail = len(os.path.commonprefix([with_image[::-1], without[::-1]]))
        placeholder = with_image[:len(with_image) - tail].strip()
        if not placeholder:
            raise ValueError(f"the chat template of {self.name} writes nothing for an image")
        return placeholder

    @property
    def image_token_id(self) -> int:
        """The id whose positions the model fills with image features."""
        config = self.model.config
        for found in (getattr(config, "image_token_id", None), getattr(config, "image_token_index", None),
                      getattr(self.processor, "image_token_id", None)):
            if found is not None:
                return int(found)
        raise ValueError(f"{self.name} names no image token id (config.image_token_id)")

    def _process_images(self, images: Sequence[Image.Image], texts: Sequence[str]):
        """The processor's CPU tensors for ``texts[i]`` with ``images[i]`` squashed to ``image_side`` squared."""
        side = (self.image_side, self.image_side)
        squashed = [[image.convert("RGB").resize(side, Image.BICUBIC)] for image in images]
        one_tile = {"do_image_splitting": False} if hasattr(getattr(self.processor, "image_processor", None),
                                                             "do_image_splitting") else {}
        return self.processor(text=list(texts), images=squashed, padding=True, add_special_tokens=False,
                              return_tensors="pt", **one_tile)

    @cached_property
    def image_slot(self) -> ImageSlot:
        """The layout of one item image (built from a blank image; the processor only, no model forward)."""
        text = self.image_placeholder()
        enc = self._process_images([Image.new("RGB", (self.image_side, self.image_side))], [text])
        ids = enc["input_ids"][0]
        vision = ids == self.image_token_id
        if not vision.any():
            raise ValueError(f"the processor of {self.name} expands {text!r} into no image tokens")
        offsets = None
        owner = next((m for m in (self.model, getattr(self.model, "model", None)) if hasattr(m, "get_rope_index")),
                     None)
        if owner is not None:  # M-RoPE (Qwen2-VL and its kin)
            params = inspect.signature(owner.get_rope_index).parameters
            offsets = owner.get_rope_index(**{k: v for k, v in enc.items() if k in params})[0][:, 0].cpu()
            if torch.equal(offsets, torch.arange(len(ids)).expand(3, -1)):
                offsets = None
        return ImageSlot(text, ids, vision, offsets)

    @cached_property
    def projector(self) -> ImageTokenProjector:
        """Soft image tokens for the ranker: ``projector(features, logits) -> [I, n, H]``."""
        return ImageTokenProjector(self.hidden_size, self.image_slot.vision).to(self.device)

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's slot as the model embeds it, ``[I, n, H]`` in the model's dtype on ``device``, and
        ``[I, 0]`` logits (this backend has no class logits)."""
        slot = self.image_slot
        enc = self._process_images(images, [slot.text] * len(images))
        if enc["input_ids"].shape[1] != slot.n or not (enc["input_ids"] == slot.input_ids).all():
            raise ValueError(f"the processor of {self.name} gave images of the same size different token layouts")
        enc = self._to_device(dict(enc))
        ids = enc["input_ids"]
        embeds = self.model.get_input_embeddings()(ids)  # [I n H]
        params = set(inspect.signature(self.model.get_image_features).parameters) - set(_TEXT_INPUTS)
        features = self.model.get_image_features(**{k: v for k, v in enc.items() if k in params},
                                                 return_dict=True).pooler_output
        hidden = embeds.shape[-1]
        features = torch.cat([f.reshape(-1, hidden) for f in features]) if isinstance(features, (list, tuple)) \
            else features.reshape(-1, hidden)
        if len(features) != int(slot.vision.sum()) * len(images):
            raise ValueError(f"{self.name} gave {len(features)} image features for {len(images)} images of "
                             f"{int(slot.vision.sum())} image tokens each")
        embeds = embeds.masked_scatter((ids == self.image_token_id).unsqueeze(-1), features.to(embeds.dtype))
        return embeds, embeds.new_zeros(len(images), 0)
