"""The batched generate / embed / answer_logprobs loop that every Hugging Face based backend shares.

A backend only says how a chat request becomes model inputs (``render`` and ``prepare_inputs``): a
causal LM tokenizes the chat template, a vision-language model runs its processor, the assembled
offline default splices projected image tokens into ``inputs_embeds``. Everything downstream of the
inputs is the same, so it lives here once: length-sorted batches (requests with and without an image
never share a batch, so processors never see a ragged image list), left padding so the next token of
every row sits at the last position, greedy decoding, mean pooling, answer log-probabilities.
"""

from __future__ import annotations

import inspect
from functools import cached_property
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor

from .base import ChatRequest, GenerationConfig, ModelIdentity, MultimodalLM
from .weights import combined_sha256

IGNORE_INDEX = -100  # the label value Hugging Face losses skip


class ReplyNGramBlocker(NoRepeatNGramLogitsProcessor):
    """transformers' n-gram blocking applied to the reply only; the prompt's n-grams stay allowed.

    ``no_repeat_ngram_size`` counts the prompt too, so a summary could never quote a three-token
    title or genre list it was shown.
    """

    def __init__(self, ngram_size: int, prompt_length: int):
        super().__init__(ngram_size)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return super().__call__(input_ids[:, self.prompt_length:], scores)


def resolve_device(device=None) -> torch.device:
    """``None`` means the first GPU when there is one, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo", capability: Optional[str] = None) -> bool:
    """Whether torch computes bfloat16 natively on this CPU: AMX or AVX-512-BF16 in its flags, and torch's kernel
    capability (``torch.backends.cpu.get_cpu_capability()``, or ``capability``) at AVX-512, so ``ATEN_CPU_CAPABILITY=avx2``
    counts as an AVX2 CPU. Elsewhere bf16 is emulated: item fusion ran about 10x slower in bf16 than in float32 on a
    2-core AVX2 CPU."""
    if (capability or torch.backends.cpu.get_cpu_capability()) != "AVX512":
        return False
    try:
        flags = next((line for line in open(cpuinfo, encoding="utf-8") if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """``None`` means bfloat16 on a GPU and float32 on the CPU (bf16 matmuls are slow on most CPUs); ``auto`` means
    bfloat16 on a GPU and on a CPU that computes it natively (:func:`cpu_has_native_bf16`), float32 elsewhere."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_native_bf16() else torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'bfloat16', 'float16' or 'float32'")
        return resolved
    return dtype


def chat_messages(request: ChatRequest, content_lists: bool = False, image_first: bool = True) -> list[dict]:
    """The request as chat-template messages; ``content_lists`` gives the multimodal ``[{"type": ...}]`` form."""
    def content(text: str, with_image: bool = False):
        if not content_lists:
            return text
        parts = [{"type": "text", "text": text}]
        if with_image:
            parts.insert(0 if image_first else 1, {"type": "image"})
        return parts

    messages = []
    if request.system:
        messages.append({"role": "system", "content": content(request.system)})
    messages.append({"role": "user", "content": content(request.prompt, request.image is not None)})
    return messages


def left_pad(rows: Sequence[torch.Tensor], value: int) -> torch.Tensor:
    """Stack 1-d tensors of different lengths, padded on the left with ``value``: ``[B, max_len]``."""
    width = max(len(r) for r in rows)
    return torch.stack([F.pad(r, (width - len(r), 0), value=value) for r in rows])


def append_completions(inputs: dict, completion_ids: Sequence[Sequence[int]], pad_id: int) -> dict:
    """Append each row's completion tokens after its prompt, re-pad on the left, and add ``labels``.

    Labels are ``IGNORE_INDEX`` everywhere except on the completion tokens, so a training loss covers
    the answer only. Other per-token tensors (e.g. ``mm_token_type_ids``) are extended with zeros.
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    per_token = [k for k, v in inputs.items() if torch.is_tensor(v) and v.shape == ids.shape and k != "input_ids"]
    out = dict(inputs)
    prompts = [ids[i][mask[i]] for i in range(len(ids))]
    completions = [torch.as_tensor(list(c), dtype=ids.dtype, device=ids.device) for c in completion_ids]
    out["input_ids"] = left_pad([torch.cat([p, c]) for p, c in zip(prompts, completions)], pad_id)
    out["labels"] = left_pad([torch.cat([torch.full_like(p, IGNORE_INDEX), c]) for p, c in zip(prompts, completions)],
                             IGNORE_INDEX)
    for k in per_token:
        tail = 1 if k == "attention_mask" else 0
        out[k] = left_pad([torch.cat([inputs[k][i][mask[i]], torch.full_like(c, tail, dtype=inputs[k].dtype)])
                           for i, c in enumerate(completions)], 0)
    return out


class HFChatBackend(MultimodalLM):
    """A Hugging Face model plus tokenizer with a chat template, batched and left-padded.

    Subclasses set ``backend`` and implement ``render`` (the chat prompt text of one request) and
    ``prepare_inputs`` (a left-padded batch of model inputs).
    """

    backend = "hf"

    def __init__(self, model: torch.nn.Module, tokenizer, name: str, files: Sequence, device: torch.device,
                 dtype: torch.dtype, settings: Optional[dict] = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self.dtype = dtype
        self._files = list(files)
        self._settings = dict(settings or {})
        self._prepare_tokenizer(tokenizer)
        self._forward_params = set(inspect.signature(model.forward).parameters)

    def _prepare_tokenizer(self, tokenizer) -> None:
        """Left padding (the next token of every row at the last position) and a pad token."""
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(f"tokenizer of {self.name} has neither a pad nor an eos token to pad with")
            tokenizer.pad_token = tokenizer.eos_token

    # ----------------------------------------------------------------------------------------- hooks
    def render(self, request: ChatRequest) -> str:
        """The chat-template text of ``request``, ending with the assistant generation prompt."""
        raise NotImplementedError

    def prepare_inputs(self, requests: Sequence[ChatRequest],
                       completions: Optional[Sequence[str]] = None) -> dict:
        """Left-padded model inputs for ``requests`` (on ``device``), ready for ``model(**inputs)``.

        With ``completions`` (one string per request, e.g. ``"Yes."``) their tokens follow each
        prompt and ``labels`` mark them as the only supervised positions: the ranker's training
        inputs use exactly the template that scoring uses.
        """
        raise NotImplementedError

    # -------------------------------------------------------------------------------------- identity
    @cached_property
    def identity(self) -> ModelIdentity:
        return ModelIdentity(backend=self.backend, name=self.name,
                             weights_sha256=combined_sha256(self._files, self._settings or None),
                             dtype=str(self.dtype).removeprefix("torch."), extra=dict(self._settings))

    # ------------------------------------------------------------------------------------ public API
    def generate(self, requests: Sequence[ChatRequest], config: GenerationConfig = GenerationConfig(),
                 progress: bool = False) -> list[str]:
        requests = list(requests)
        outputs: list[Optional[str]] = [None] * len(requests)
        with tqdm(total=len(requests), unit="item", desc=f"generate {self.name}", disable=not progress) as bar, \
                torch.inference_mode():
            for idx in self._batches(requests, config.batch_size):
                new_tokens = self._generate_batch(self.prepare_inputs([requests[i] for i in idx]), config)
                for i, text in zip(idx, self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                    outputs[i] = text.strip()
                bar.update(len(idx))
        return outputs

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        texts = list(texts)
        pooled: list[Optional[torch.Tensor]] = [None] * len(texts)
        lengths = [len(ids) for ids in self.tokenizer(texts).input_ids] if texts else []
        order = sorted(range(len(texts)), key=lengths.__getitem__)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                enc = self.tokenizer([texts[i] for i in idx], padding=True, return_tensors="pt").to(self.device)
                out = self.model(**enc, output_hidden_states=True, **self._last_logit_only())
                mask = enc["attention_mask"].bool().unsqueeze(-1)
                hidden = out.hidden_states[-1].masked_fill(~mask, 0).float()
                vectors = F.normalize(hidden.sum(1) / mask.sum(1).clamp(min=1), dim=-1).cpu()
                for i, v in zip(idx, vectors):
                    pooled[i] = v
        if not texts:
            return torch.empty(0, self.hidden_size)
        return torch.stack(pooled)

    def answer_logprobs(self, requests: Sequence[ChatRequest], answers: Sequence[str],
                        batch_size: int = 16) -> torch.Tensor:
        requests = list(requests)
        token_ids = self.answer_token_ids(answers)
        scores = torch.empty(len(requests), len(token_ids))
        with torch.inference_mode():
            for idx in self._batches(requests, batch_size):
                logits = self.model(**self.prepare_inputs([requests[i] for i in idx]),
                                    **self._last_logit_only()).logits[:, -1].float()
                scores[idx] = logits.log_softmax(-1)[:, token_ids].cpu()
        return scores

    # ------------------------------------------------------------------------------------- utilities
    @property
    def hidden_size(self) -> int:
        config = self.model.config
        return (config.get_text_config() if hasattr(config, "get_text_config") else config).hidden_size

    def answer_token_ids(self, answers: Sequence[str]) -> list[int]:
        """First token id of each answer string as the tokenizer writes it at the start of a reply."""
        ids = []
        for answer in answers:
            tokens = self.tokenizer(answer, add_special_tokens=False).input_ids
            if not tokens:
                raise ValueError(f"answer {answer!r} has no tokens under the tokenizer of {self.name}")
            ids.append(tokens[0])
        if len(set(ids)) < len(ids):
            raise ValueError(f"answers {list(answers)} share a first token under the tokenizer of {self.name}; "
                             "their log-probabilities could not be told apart")
        return ids

    def completion_token_ids(self, completions: Sequence[str]) -> list[list[int]]:
        """Tokens of each completion as they follow the generation prompt."""
        return [self.tokenizer(c, add_special_tokens=False).input_ids for c in completions]

    def stop_token_ids(self) -> list[int]:
        """The tokenizer's eos plus any end-of-turn ids the model's generation config lists."""
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
        return sorted(i for i in ids if i is not None)

    def _last_logit_only(self) -> dict:
        """Skip the vocabulary projection except at the last position, where the model supports it."""
        return {"logits_to_keep": 1} if "logits_to_keep" in self._forward_params else {}

    def _prompt_length(self, request: ChatRequest) -> int:
        return len(self.tokenizer(self.render(request), add_special_tokens=False).input_ids)

    def _batches(self, requests: Sequence[ChatRequest], batch_size: int) -> Iterator[list[int]]:
        """Indices in batches of similar prompt length; image and text-only requests never mixed."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        keys = [(r.image is not None, self._prompt_length(r)) for r in requests]
        batch: list[int] = []
        for i in sorted(range(len(requests)), key=keys.__getitem__):
            if batch and (len(batch) == batch_size or keys[i][0] != keys[batch[0]][0]):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def _generate_batch(self, inputs: dict, config: GenerationConfig) -> torch.Tensor:
        """New tokens only, ``[B, T]``; greedy unless ``config.do_sample``."""
        kwargs = dict(max_new_tokens=config.max_new_tokens, do_sample=config.do_sample,
                      pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.stop_token_ids())
        if config.no_repeat_ngram_size:
            prompt_length = inputs["input_ids"].shape[1] if "input_ids" in inputs else 0
            kwargs["logits_processor"] = LogitsProcessorList(
                [ReplyNGramBlocker(config.no_repeat_ngram_size, prompt_length)])
        if not config.do_sample:  # silence sampling settings a model's generation_config may carry
            kwargs.update(temperature=None, top_p=None, top_k=None)
        out = self.model.generate(**inputs, **kwargs)
        return out[:, inputs["input_ids"].shape[1]:] if "input_ids" in inputs else out
