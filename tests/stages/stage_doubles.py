"""Test doubles for the stage tests: a deterministic fake backend, a tiny real LLM backend, and
a compute function for the pure cache tests. Test-only code; never imported by the package."""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from recbole_mllm.mllm.base import ChatRequest, GenerationConfig, ModelIdentity, MultimodalLM
from recbole_mllm.stages.cache import ShardOutput


def text_vector(text: str, dim: int = 8) -> torch.Tensor:
    """A deterministic float vector for a string (sha256 bytes scaled to [-1, 1))."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return torch.tensor([b / 128.0 - 1.0 for b in digest[:dim]], dtype=torch.float32)


def fake_compute(keys: list) -> ShardOutput:
    """What a stage would produce, derived from the key alone: the expected value in every assertion."""
    texts = [f"text for {key!r}" for key in keys]
    return ShardOutput(texts, torch.stack([text_vector(t) for t in texts]),
                       [{"even": len(str(key)) % 2 == 0, "kind": "fake"} for key in keys])


class Interrupt(RuntimeError):
    """Raised by the doubles to simulate a run stopped half-way."""


class FakeBackend(MultimodalLM):
    """Deterministic backend: the 'summary' echoes the prompt's first description line and whether an
    image was seen; records every request so tests can check what the stage asked."""

    def __init__(self, weights_sha256: str = "fake-weights-1", supports_images: bool = True, fail_after: int = -1):
        self._identity = ModelIdentity(backend="fake", name="fake-mllm", weights_sha256=weights_sha256, dtype="float32")
        self._images = supports_images
        self.fail_after = fail_after  # raise Interrupt on this generate() call (0-based); -1: never
        self.requests: list[ChatRequest] = []
        self.generate_calls = 0

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    @property
    def supports_images(self) -> bool:
        return self._images

    def generate(self, requests: Sequence[ChatRequest], config: GenerationConfig = GenerationConfig(),
                 progress: bool = False) -> list[str]:
        if self.generate_calls == self.fail_after:
            raise Interrupt("simulated interruption inside generate")
        self.generate_calls += 1
        self.requests.extend(requests)
        out = []
        for r in requests:
            first = next((line for line in r.prompt.splitlines() if ": " in line), "")
            size = f"{r.image.size[0]}x{r.image.size[1]}" if r.image is not None else "none"
            out.append("" if "EMPTY" in r.prompt else f" {first} | image {size} ")
        return out

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        return torch.stack([text_vector(t) for t in texts])

    def answer_logprobs(self, requests, answers, batch_size=16):
        raise NotImplementedError


def byte_tokenizer():
    """A 256-symbol byte-level tokenizer with a chat template, built offline (no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        padding_side="left")
    tokenizer.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
                               "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    return tokenizer


class TinyLlamaBackend(MultimodalLM):
    """A real causal LM (random tiny Llama) behind the interface: text-only, greedy, batched by length."""

    def __init__(self, seed: int = 0):
        from transformers import LlamaConfig, LlamaForCausalLM

        self.tokenizer = byte_tokenizer()
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(self.tokenizer), hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=2048, bos_token_id=self.tokenizer.bos_token_id,
                             eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        self.model = LlamaForCausalLM(config).eval()
        self.device, self.dtype = torch.device("cpu"), torch.float32
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.numpy().tobytes())
        self._identity = ModelIdentity(backend="tiny-llama", name="tiny", weights_sha256=digest.hexdigest(), dtype="float32")
        self.fail_after = -1
        self.generate_calls = 0

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    def generate(self, requests, config: GenerationConfig = GenerationConfig(), progress: bool = False) -> list[str]:
        if self.generate_calls == self.fail_after:
            raise Interrupt("simulated interruption inside generate")
        self.generate_calls += 1
        prompts = [self.tokenizer.apply_chat_template(
            ([{"role": "system", "content": r.system}] if r.system else []) + [{"role": "user", "content": r.prompt}],
            tokenize=False, add_generation_prompt=True) for r in requests]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out = [""] * len(prompts)
        for start in range(0, len(order), config.batch_size):
            batch = order[start:start + config.batch_size]
            enc = self.tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                ids = self.model.generate(**enc, max_new_tokens=config.max_new_tokens, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id)
            for i, row in zip(batch, ids[:, enc["input_ids"].shape[1]:]):
                out[i] = self.tokenizer.decode(row, skip_special_tokens=True)
        return out

    def embed(self, texts, batch_size: int = 32) -> torch.Tensor:
        vectors = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True)
            with torch.no_grad():
                hidden = self.model.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            vectors.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(vectors).float()

    def answer_logprobs(self, requests, answers, batch_size=16):
        raise NotImplementedError


def gloo_worker(rank: int, world_size: int, port: int, root: str, manifest: dict, keys: list, shard_size: int) -> None:
    """One rank of a real ``torch.distributed`` (gloo) build; top-level so that spawn can pickle it."""
    from recbole_mllm.stages.cache import StageCache

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        StageCache(root, "demo", manifest, keys, shard_size=shard_size).build(fake_compute, progress=False)
    finally:
        torch.distributed.destroy_process_group()
