"""Scoring speed and memory of the LoRA ranker against the naive path, with equal scores checked in the same run.

naive: every candidate's full prompt (its user's part, then its own part) in its own left-padded row, one
plain forward without cache, --naive_batch candidates per forward. ours: ``LoRARanker.score`` for all
--users x --candidates at once (user parts run once, block attention masks). Both read the Yes and No
rows of the output layer in float32, so the printed difference is the layouts' alone. list: one prompt per
user, its part and then one short line per candidate (--list_item_tokens, e.g. "(C) a title"), scored in one forward
by the logits of the candidates' option tokens (``LoRARanker.list_logits``, LlamaRec's verbalizer); its scores are
another model of the task, so only its speed is compared. The last rows per model time a training step of ours
(loss + backward, the packed layout; --train_candidates) and one of the list path (cross-entropy towards one
option of each user's list, MLLMSRec's default ranker; --train_list_candidates).

The LLMs have random weights built from a config (speed does not depend on weight values; no
download) and read random token ids, one soft embedding per prompt part. Prompt parts are 80-120%
of --user_tokens and --candidate_tokens (the defaults are the ml-1m-mm prompt sizes).

Model FLOPs of a path = 2 * N * T + 4 * layers * heads * head_dim * P, where N counts the decoder
layers' parameters (LoRA included; embeddings and the 2 output rows left out), T the tokens the path
runs and P the (query, key) pairs it needs (causal, padding left out). MFU = model FLOPs per second /
--peak_tflops; a training step counts 3 x the forward. Prompt tokens/s counts every candidate's full prompt for both paths, so its ratio is the
speed-up. Peak memory is torch.cuda.max_memory_allocated, weights included.

    python benchmarks/scoring.py                       # on a GPU: both models, bf16
    python benchmarks/scoring.py --tiny                # a few seconds on a CPU (the smoke test)
    python benchmarks/scoring.py --models llama2-7b --train_only --gradient_checkpointing --users 4  # a 7B LoRA step
    python benchmarks/scoring.py --train_only --train_candidates 0 --users 16 --gradient_checkpointing --device_busy  # MLLMSRec's joint step: GPU busy
"""

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from recbole_mllm.cli import HelpFormatter
from recbole_mllm.model.mllmsrec.ranker import LoRARanker, PromptBatch, joined
from recbole_mllm.properties_path import declared

MODELS = {  # name: (model class, config)
    "smollm2-135m": (LlamaForCausalLM, LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True)),
    "qwen2-1.5b": (Qwen2ForCausalLM, Qwen2Config(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True)),
    "llama2-7b": (LlamaForCausalLM, LlamaConfig(  # a 7B-class config: the LoRA step with gradient checkpointing
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        vocab_size=32000, max_position_embeddings=4096)),
    "tiny": (LlamaForCausalLM, LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=1000, max_position_embeddings=1024)),
}
TINY = dict(models=["tiny"], user_tokens=40, candidate_tokens=20, list_item_tokens=6, users=2, memory_case=[0, 0],
            repeats=1)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["smollm2-135m", "qwen2-1.5b"],
                        help="model configs (random weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="model dtype (none: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--users", type=int, default=20, help="users scored together")
    parser.add_argument("--candidates", type=int, nargs="+", default=[20, 100], help="candidates per user, one run each")
    parser.add_argument("--user_tokens", type=int, default=300, help="mean tokens of a user part")
    parser.add_argument("--candidate_tokens", type=int, default=150, help="mean tokens of a candidate part")
    parser.add_argument("--naive_batch", type=int, default=256, help="candidates per forward of the naive path")
    parser.add_argument("--list_item_tokens", type=int, default=16,
                        help="mean tokens of one candidate's line in the list path's prompt (0: no list row)")
    parser.add_argument("--memory_case", type=int, nargs=2, default=[40, 101], metavar=("USERS", "CANDIDATES"),
                        help="peak memory of ours at this size too (CUDA only; 0 0: skip)")
    parser.add_argument("--train_candidates", type=int, default=4,
                        help="candidates per user in a timed training step of ours (0: none)")
    parser.add_argument("--train_list_candidates", type=int, default=20,
                        help="listed candidates per user in a timed list-wise training step (0: none)")
    parser.add_argument("--lora_dropout", type=float, default=declared("model/MLLMSRec.yaml", "lora_dropout")["lora_dropout"],
                        help="LoRA dropout of the training rows (MLLMSRec's default; scoring runs in eval mode, without it)")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="recompute the LLM's activations in the backward pass (LoRARanker's gradient_checkpointing)")
    parser.add_argument("--train_only", action="store_true", help="time the training step alone (no scoring rows)")
    parser.add_argument("--peak_tflops", type=float, default=989.0,
                        help="the device's peak TFLOP/s for MFU (989: bf16 dense H200)")
    parser.add_argument("--device_busy", action="store_true",
                        help="under each training row, the share of its wall time the device ran kernels (a profiled "
                             "pass of --repeats calls of its own; MLLMSRec's joint step should keep a GPU >= 80%% busy)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up")
    parser.add_argument("--tiny", action="store_true",
                        help="a quick run (the smoke test): " + ", ".join(f"{k} {v}" for k, v in TINY.items()))
    args = parser.parse_args(argv)
    if args.tiny:
        vars(args).update(TINY)
    args.device = torch.device(args.device)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32"))
    return args


def prompt_parts(n, mean_length, ranker, generator):
    """``n`` random prompt parts of 80-120% of ``mean_length`` tokens, each with one soft embedding."""
    vocab, hidden = ranker.llm.get_input_embeddings().weight.shape
    lengths = torch.randint(int(mean_length * 0.8), int(mean_length * 1.2) + 1, (n,), generator=generator).tolist()
    ids = [torch.randint(10, vocab, (k,), generator=generator).tolist() for k in lengths]
    soft = [{"state": ([k // 2], 0.02 * torch.randn(1, hidden, generator=generator))} for k in lengths]
    return PromptBatch(ids, soft)


def naive_scores(ranker, users, candidates, owner, batch):
    """Every candidate's full prompt in its own left-padded row, no cache: the reference and the baseline."""
    decoder, scores = ranker.llm.get_base_model().get_decoder(), []
    for start in range(0, len(owner), batch):
        full = [joined([(users.ids[u], users.soft[u]), (candidates.ids[c], candidates.soft[c])])
                for c, u in enumerate(owner[start:start + batch].tolist(), start)]
        embeds, mask = ranker.embed(PromptBatch(*zip(*full)))
        hidden = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                         use_cache=False).last_hidden_state
        logits = ranker.output_logits(hidden[:, -1], [ranker.yes_id, ranker.no_id])
        scores.append(logits[:, 0] - logits[:, 1])
    return torch.cat(scores)


def list_prompts(users, owner, mean_length, ranker, generator):
    """The list path's prompts: each user's part, then one line of ~``mean_length`` tokens per candidate of that user."""
    lines = prompt_parts(len(owner), mean_length, ranker, generator)
    prompts = [joined([(users.ids[u], users.soft[u])] + [(lines.ids[c], lines.soft[c])
                                                          for c in (owner == u).nonzero().squeeze(1).tolist()])
               for u in range(len(users.ids))]
    return PromptBatch(*zip(*prompts))


def model_flops(ranker, query_tokens, pairs):
    """``2 N T + 4 layers heads head_dim P`` (see the module docstring)."""
    decoder = ranker.llm.get_base_model().get_decoder()
    config = decoder.config
    n = sum(p.numel() for p in decoder.layers.parameters())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * n * query_tokens + 4 * config.num_hidden_layers * config.num_attention_heads * head_dim * pairs


def workload(users, candidates, owner):
    """Tokens and causal (query, key) pairs of each path: ``{path: (tokens, pairs)}``, and full prompt tokens."""
    user_lengths = [len(ids) for ids in users.ids]
    full = [user_lengths[u] + len(candidates.ids[c]) for c, u in enumerate(owner.tolist())]
    ours_pairs = sum(n * (n + 1) // 2 for n in user_lengths)
    ours_pairs += sum(len(ids) * user_lengths[u] + len(ids) * (len(ids) + 1) // 2
                      for ids, u in zip(candidates.ids, owner.tolist()))
    return {"naive": (sum(full), sum(n * (n + 1) // 2 for n in full)),
            "ours": (sum(user_lengths) + sum(len(ids) for ids in candidates.ids), ours_pairs)}, sum(full)


def timed(fn, repeats, device):
    """(result of the warm-up call, seconds per call, peak GiB or nan on a CPU)."""
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return result, (time.perf_counter() - start) / repeats, peak


def merged_seconds(intervals):
    """Time covered by ``(start, end)`` intervals, overlaps counted once (kernels of several streams, nested ops)."""
    total, covered_to = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > covered_to:
            total += end - max(start, covered_to)
            covered_to = end
    return total


def busy_share(fn, repeats, device):
    """Share of the wall time of ``repeats`` calls in which the device ran work, from a profiled pass of its own (the
    profiler's overhead stays out of the timed rows). On a GPU: its kernels' merged intervals (copies left out), so
    the rest is time the step keeps it waiting on the CPU (Python, launches, synchronisation) -- what nvidia-smi's
    utilization samples, measured per call. On a CPU: the merged intervals of its ops (a check of the path)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    spans = [(event.time_range.start, event.time_range.end) for event in profiler.events()
             if event.device_type == kind and not event.name.startswith("Memcpy")]
    return merged_seconds(spans) / 1e6 / wall  # the profiler's times are in microseconds


def report_busy(name, size, path, share, args):
    """With --device_busy, a line under a row: how much of a call's wall time the device was busy."""
    if share is not None:
        print(f"{name:13} {size:>9} {path:8} device busy {100 * share:.1f}% of the wall time (profiled calls: {args.repeats})")


def build_ranker(name, args):
    model_class, config = MODELS[name]
    torch.manual_seed(0)
    with args.device:
        llm = model_class._from_config(config, attn_implementation="sdpa", dtype=args.dtype)
    return LoRARanker(llm, 8, 16, args.lora_dropout, ["q_proj", "k_proj", "v_proj", "o_proj"], 1, 2,
                      gradient_checkpointing=args.gradient_checkpointing).eval()


def synthetic_batch(ranker, n_users, per_user, args, generator):
    """``(users, candidates, owner)``: ``per_user`` candidates for each of ``n_users`` users."""
    users = prompt_parts(n_users, args.user_tokens, ranker, generator)
    candidates = prompt_parts(n_users * per_user, args.candidate_tokens, ranker, generator)
    return users, candidates, torch.arange(n_users).repeat_interleave(per_user)


def report(name, size, path, seconds, batch, flops, peak, args):
    """One table row; ``flops`` of the call (None: not counted)."""
    _, prompt_tokens = workload(*batch)
    tflops = flops / seconds / 1e12 if flops else float("nan")
    mfu = f"{100 * tflops / args.peak_tflops:5.1f}%" if args.device.type == "cuda" and flops else "  n/a"
    print(f"{name:13} {size:>9} {path:8} {1000 * seconds:9.1f} {len(batch[2]) / seconds:12,.0f} "
          f"{prompt_tokens / seconds:14,.0f} {tflops:8.2f} {mfu:>6} {peak:9.2f}")


@torch.no_grad()
def compare(name, ranker, n_users, per_user, args, generator):
    """Naive and ours on the same batch: a row each, the speed-up and the largest score difference."""
    batch = synthetic_batch(ranker, n_users, per_user, args, generator)
    paths = {"naive": lambda: naive_scores(ranker, *batch, args.naive_batch), "ours": lambda: ranker.score(*batch)}
    work, _ = workload(*batch)
    if args.list_item_tokens:
        prompts = list_prompts(batch[0], batch[2], args.list_item_tokens, ranker, generator)
        options = list(range(10, 10 + per_user))  # one option token per listed candidate
        paths["list"] = lambda: ranker.list_logits(prompts, options)
        lengths = [len(ids) for ids in prompts.ids]
        work["list"] = (sum(lengths), sum(n * (n + 1) // 2 for n in lengths))
    scores, seconds, size = {}, {}, f"{n_users}x{per_user}"
    for path, fn in paths.items():
        try:
            scores[path], seconds[path], peak = timed(fn, args.repeats, args.device)
        except torch.OutOfMemoryError:
            print(f"{name:13} {size:>9} {path:8} out of memory")
            torch.cuda.empty_cache()
            continue
        report(name, size, path, seconds[path], batch, model_flops(ranker, *work[path]), peak, args)
    if "ours" in scores and "naive" in scores:
        difference = (scores["ours"] - scores["naive"]).abs().max().item()
        print(f"{'':13} {size:>9} speed-up {seconds['naive'] / seconds['ours']:.2f}x; equal scores: "
              f"max |ours - naive| = {difference:.3g} (score std {scores['naive'].std().item():.3g})")
    if "list" in seconds and "naive" in seconds:
        print(f"{'':13} {size:>9} list speed-up {seconds['naive'] / seconds['list']:.2f}x (its scores are another "
              "model's: speed only)")


@torch.no_grad()
def memory_case(name, ranker, n_users, per_user, args, generator):
    """Ours alone on one large batch (the size that needed 57 GiB with one cache copy per candidate)."""
    batch = synthetic_batch(ranker, n_users, per_user, args, generator)
    torch.cuda.empty_cache()
    _, seconds, peak = timed(lambda: ranker.score(*batch), 1, args.device)
    report(name, f"{n_users}x{per_user}", "ours", seconds, batch, model_flops(ranker, *workload(*batch)[0]["ours"]), peak, args)


def train_step(name, ranker, n_users, per_user, args, generator):
    """One training step of the ranker (loss + backward, packed layout), first candidate of each user positive."""
    users, candidates, owner = batch = synthetic_batch(ranker, n_users, per_user, args, generator)
    labels = (torch.arange(len(owner)) % per_user == 0).long()
    ranker.train()
    step = lambda: ranker.loss(users, candidates, owner, labels).backward()
    _, seconds, peak = timed(step, args.repeats, args.device)
    share = busy_share(step, args.repeats, args.device) if args.device_busy else None
    ranker.eval()
    # recomputation runs the forward twice, but MFU counts the model's FLOPs (3 x forward) either way
    path = "train" + ("+gc" if args.gradient_checkpointing else "")
    report(name, f"{n_users}x{per_user}", path, seconds, batch, 3 * model_flops(ranker, *workload(*batch)[0]["ours"]),
           peak, args)
    report_busy(name, f"{n_users}x{per_user}", path, share, args)


def train_list_step(name, ranker, n_users, per_user, args, generator):
    """One list-wise training step (cross-entropy towards each user's first option, then backward): MLLMSRec's
    joint step at its defaults, one lettered list of ``per_user`` candidates per user."""
    users, candidates, owner = batch = synthetic_batch(ranker, n_users, per_user, args, generator)
    prompts = list_prompts(users, owner, args.list_item_tokens or 16, ranker, generator)
    options, target = list(range(10, 10 + per_user)), torch.zeros(n_users, dtype=torch.long, device=args.device)
    lengths = [len(ids) for ids in prompts.ids]
    ranker.train()
    step = lambda: torch.nn.functional.cross_entropy(ranker.list_logits(prompts, options).float(), target).backward()
    _, seconds, peak = timed(step, args.repeats, args.device)
    share = busy_share(step, args.repeats, args.device) if args.device_busy else None
    ranker.eval()
    path = "ltrain" + ("+gc" if args.gradient_checkpointing else "")
    report(name, f"{n_users}x{per_user}", path, seconds, batch,
           3 * model_flops(ranker, sum(lengths), sum(n * (n + 1) // 2 for n in lengths)), peak, args)
    report_busy(name, f"{n_users}x{per_user}", path, share, args)


def main(argv=None):
    args = parse_args(argv)
    device_name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    print(f"device {device_name}, {args.dtype}, user part ~{args.user_tokens} tokens, candidate part "
          f"~{args.candidate_tokens} tokens, naive batch {args.naive_batch}, training LoRA dropout {args.lora_dropout:g}, MFU against {args.peak_tflops:g} TFLOP/s")
    print(f"{'model':13} {'users x c':>9} {'path':8} {'ms/call':>9} {'candidates/s':>12} {'prompt tok/s':>14} "
          f"{'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}")
    generator = torch.Generator().manual_seed(0)
    for name in args.models:
        ranker = build_ranker(name, args)
        for per_user in [] if args.train_only else args.candidates:
            compare(name, ranker, args.users, per_user, args, generator)
        if all(args.memory_case) and args.device.type == "cuda" and not args.train_only:
            memory_case(name, ranker, *args.memory_case, args, generator)
        if args.train_candidates:
            train_step(name, ranker, args.users, args.train_candidates, args, generator)
        if args.train_list_candidates:
            train_list_step(name, ranker, args.users, args.train_list_candidates, args, generator)
        del ranker
        if args.device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
