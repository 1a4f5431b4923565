"""The one small interface every multimodal LLM backend implements.

The stages (item fusion, user summaries) only generate text and embed it; the ranker also needs the
underlying Hugging Face model, its tokenizer and a way to turn an image into prompt inputs. Keeping
those behind one interface lets a user swap the offline default for Qwen2-VL, LLaVA or SmolVLM by
naming it, with no code branch on the model's name anywhere else.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from PIL import Image


@dataclass
class ChatRequest:
    """One generation request: an optional image plus a user prompt (and an optional system prompt)."""

    prompt: str
    image: Optional[Image.Image] = None
    system: Optional[str] = None


@dataclass
class GenerationConfig:
    """Decoding settings. Greedy by default so stage caches are reproducible."""

    max_new_tokens: int = 96
    batch_size: int = 16
    do_sample: bool = False
    no_repeat_ngram_size: int = 0  # > 0: the reply never repeats one of its own n-grams (small LLMs loop greedily)

    def as_dict(self) -> dict:
        out = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
               "no_repeat_ngram_size": self.no_repeat_ngram_size}
        if self.no_repeat_ngram_size:
            out["ngram_scope"] = "reply"  # n-grams of the prompt are not blocked (transformers' own rule blocks them)
        return out


@dataclass
class ModelIdentity:
    """Everything about a backend that changes its outputs; goes into every cache manifest."""

    backend: str
    name: str
    weights_sha256: str
    dtype: str
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"backend": self.backend, "name": self.name, "weights_sha256": self.weights_sha256,
                "dtype": self.dtype, **self.extra}


class MultimodalLM(abc.ABC):
    """A (multimodal) causal language model behind a uniform, batched API.

    Attributes set by every backend:
        model: the Hugging Face ``PreTrainedModel`` whose forward takes ``inputs_embeds`` or input ids
            (for the assembled offline default: the text LLM).
        tokenizer: its tokenizer (with a chat template and a pad token).
        device, dtype: where and how the model runs.

    Backends whose images can enter the ranker's prompt as embeddings (the offline default and every
    image-text-to-text model) also have:
        encode_images(images) -> (features, logits): per-image inputs of the projector, computed once
            per item and cached (``model.item_images.encode_item_images``).
        projector: an ``nn.Module``, ``projector(features, logits) -> [I, n, hidden]`` soft tokens in the
            LLM's embedding space, ``n`` the same for every image; the ranker trains its parameters.
    """

    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype

    @property
    @abc.abstractmethod
    def identity(self) -> ModelIdentity:
        """Model name, weight hash and settings: the cache key part that belongs to the model."""

    @property
    def supports_images(self) -> bool:
        return False

    @abc.abstractmethod
    def generate(self, requests: Sequence[ChatRequest], config: GenerationConfig = GenerationConfig(),
                 progress: bool = False) -> list[str]:
        """Greedy chat generation for each request, batched (sorted by length), in request order."""

    @abc.abstractmethod
    def embed(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Mean-pooled last hidden states of ``texts``, L2-normalised, float32 on CPU: ``[N, hidden]``."""

    def prepare_inputs(self, requests: Sequence[ChatRequest], completions: Optional[Sequence[str]] = None) -> dict:
        """Left-padded inputs of ``requests`` for ``model(**inputs)``, built with the chat template.

        The ranker's way in: text, images (processor tensors, or projected visual tokens spliced into
        ``inputs_embeds`` for the offline default) and, with ``completions``, ``labels`` that mark only
        the completion tokens. The last position of every row is where the answer starts.
        """
        raise NotImplementedError(f"{type(self).__name__} does not expose model inputs")

    @abc.abstractmethod
    def answer_logprobs(self, requests: Sequence[ChatRequest], answers: Sequence[str],
                        batch_size: int = 16) -> torch.Tensor:
        """Log-probability of each answer's first token after each chat prompt: ``[N, len(answers)]``.

        Zero-shot yes/no scoring; the trained ranker builds its own inputs with the same chat template.
        """
