"""Throughput and memory of the LoRA ranker (``recbole_mllm.model.ranker.LoRARanker``) on synthetic prompts.

Speed does not depend on weight values, so the LLM is built from a config with random weights
(default: the SmolLM2-135M architecture of the offline default); no download, no dataset. Prints
one line per setting: training steps (forward + backward of the SFT loss) and scoring (forward only),
in candidates per second, with peak GPU memory. Sizes follow an ml-1m-mm MLLMSRec run: a user part
of about 300 tokens shared by its candidates, about 150 tokens per candidate.

    python benchmarks/ranker_throughput.py [--users 25 --candidates_per_user 4 --score_batch 1024 ...]
"""

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from recbole_mllm.cli import HelpFormatter
from recbole_mllm.model.ranker import LoRARanker, PromptBatch

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True)


def prompts(n, length, vocab, generator):
    lengths = torch.randint(int(length * 0.8), int(length * 1.2) + 1, (n,), generator=generator).tolist()
    return PromptBatch([torch.randint(10, vocab, (k,), generator=generator).tolist() for k in lengths], [{}] * n)


def timed(fn, repeats, device):
    fn()  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--user_tokens", type=int, default=300, help="tokens of a user part")
    parser.add_argument("--candidate_tokens", type=int, default=150, help="tokens of a candidate part")
    parser.add_argument("--users", type=int, default=25, help="users per training step")
    parser.add_argument("--candidates_per_user", type=int, default=4, help="1 positive + negatives")
    parser.add_argument("--score_users", type=int, nargs="+", default=[2, 10, 40], help="users per scoring forward")
    parser.add_argument("--score_candidates_per_user", type=int, default=101, help="candidates per user when scoring")
    parser.add_argument("--attn", nargs="+", default=["sdpa", "eager"], help="attention implementations")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per setting")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, dtype {dtype}, "
          f"user part ~{args.user_tokens} tokens, candidate part ~{args.candidate_tokens} tokens")
    for attn in args.attn:
        torch.manual_seed(0)
        llm = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M, attn_implementation=attn)).to(device, dtype)
        ranker = LoRARanker(llm, 8, 16, 0.05, ["q_proj", "k_proj", "v_proj", "o_proj"], 1, 2).to(device)
        vocab = SMOLLM2_135M["vocab_size"]
        k = args.candidates_per_user
        users, cands = prompts(args.users, args.user_tokens, vocab, generator), prompts(args.users * k, args.candidate_tokens, vocab, generator)
        owner = torch.arange(args.users, device=device).repeat_interleave(k)
        labels = (torch.arange(args.users * k, device=device) % k == 0).long()
        ranker.train()

        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                loss = ranker.loss(users, cands, owner, labels)
            loss.backward()

        seconds, peak = timed(step, args.repeats, device)
        print(f"[{attn}] train step: {args.users} users x {k} candidates in {seconds * 1000:.0f} ms "
              f"-> {args.users * k / seconds:.0f} candidates/s, peak {peak:.2f} GiB")
        ranker.eval()
        for n_users in args.score_users:
            c = args.score_candidates_per_user
            su, sc = prompts(n_users, args.user_tokens, vocab, generator), prompts(n_users * c, args.candidate_tokens, vocab, generator)
            sowner = torch.arange(n_users, device=device).repeat_interleave(c)

            @torch.no_grad()
            def score():
                with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                    ranker.score(su, sc, sowner)

            try:
                seconds, peak = timed(score, args.repeats, device)
            except torch.OutOfMemoryError:
                print(f"[{attn}] score: {n_users} users x {c} candidates: out of GPU memory")
                torch.cuda.empty_cache()
                continue
            print(f"[{attn}] score: {n_users} users x {c} candidates in {seconds * 1000:.0f} ms "
                  f"-> {n_users * c / seconds:.0f} candidates/s, peak {peak:.2f} GiB")
        del ranker, llm
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
