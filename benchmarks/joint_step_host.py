"""The host's part of MLLMSRec's joint training step: what the CPU does while the GPU waits for the LLM's batch.

A joint step (list-wise ranker, the defaults) runs the encoder on its rows, takes each row's first-stage top
``rerank_top_k`` (a device-to-host copy), builds one prompt per row in Python from the cached prompt pieces
(``PromptParts.list_prompt``), pads the prompts into tensors and scatters the soft tokens (``LoRARanker.embed``), and
only then runs the LLM. This times that path on a real model and dataset, ``--rows`` rows a step, with the LLM's
decoder left out (its logits replaced by zeros after ``embed``), so the figure is the time a GPU step cannot overlap
unless the prompts are built ahead; the LLM's own step is in ``benchmarks/scoring.py``. It also times the prompt
building alone.

    python benchmarks/joint_step_host.py --dataset=ml-100k --config_files=properties/quick_start.yaml \\
        --rerank_top_k=20 --stage_cache_dir=saved/stage_cache        # after a run has built that cache

Other ``--key=value`` arguments are RecBole/plugin config keys, as for ``run_recbole_mllm.py``. The stages are read
from ``stage_cache_dir`` (built first if missing, as a run does); the encoder is frozen as in the joint epochs but not
warmed up (the lists' contents do not change the time of building them).
"""

import argparse
import statistics
import time

import torch

from recbole_mllm.cli import HelpFormatter
from recbole_mllm.config import Config
from recbole_mllm.data import create_dataset
from recbole_mllm.model.mllmsrec.ranker import PromptBatch
from recbole_mllm.quick_start import split_and_build_model


def timed(function, repeats):
    """Median seconds of ``repeats`` calls after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(config, rows=16, repeats=20):
    """Figures of a step of ``rows`` training rows of ``config``'s MLLMSRec (list-wise): ``lists``, ``rerank_top_k``,
    ``tokens`` (what ``embed`` padded) and ``prompt_tokens`` (what ``list_prompt`` built), ``build_s`` and ``host_s``
    (median seconds of building its prompts alone and of its host path with the LLM's decoder left out), ``device``."""
    model, train_data, _, _ = split_and_build_model(config, create_dataset(config))
    if not model.listwise:
        raise ValueError("times the list-wise ranker's step (ranker_scoring: listwise, the default)")
    if config["encoder_frozen_after_warmup"]:
        model.freeze_encoder()  # as the joint epochs run it: no encoder gradient, no dropout, the same lists each step
    model.train()

    inter = train_data.dataset.inter_feat
    batch = inter[torch.arange(min(len(inter), 65536))].to(model.device)
    chosen, ts = model.candidates.llm_rows(batch, model.positions)  # the rows the LLM trains on (one per target drawn)
    chosen, ts = chosen[:rows], ts[:rows]
    if len(chosen) < rows:
        raise ValueError(f"only {len(chosen)} training rows in the first {len(batch)} rows of the training split")
    batch = batch[torch.tensor(chosen)]
    uids, targets = batch[model.USER_ID].tolist(), batch[model.POS_ITEM_ID].tolist()
    item_seq, item_seq_len = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]

    embedded = {}
    real_list_logits = model.ranker.list_logits

    def host_only_logits(prompts, option_ids):  # the decoder left out: what the host does before it
        embeds, mask = model.ranker.embed(prompts, padding_side="right")
        embedded["tokens"] = int(mask.sum())
        return embeds.new_zeros((len(prompts.ids), len(option_ids)), dtype=torch.float32).requires_grad_()

    def step():
        user_states = model.forward(item_seq, item_seq_len)
        candidates = torch.tensor(targets, device=user_states.device)
        owner = torch.arange(len(uids), device=user_states.device)
        loss = model._list_scores(uids, ts, user_states, candidates, owner, torch.ones_like(owner))
        loss.backward()
        if model.device.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        user_states = model.forward(item_seq, item_seq_len)
        catalogue = model.scorer.catalogue_scores(user_states, uids, ts)
        lists = catalogue.topk(min(model.rerank_top_k, catalogue.shape[1]), dim=1).indices.tolist()
        user_tokens = model.user_projection(user_states).unsqueeze(1)
        item_tokens = [model.item_projection(model.encoder.item_states(torch.tensor(listed, device=model.device)))
                       .unsqueeze(1) for listed in lists]

    def build_prompts():
        return PromptBatch(*zip(*[model.prompts.list_prompt(uid, t, user_tokens[k], lists[k], item_tokens[k])
                                  for k, (uid, t) in enumerate(zip(uids, ts))]))

    model.ranker.list_logits = host_only_logits
    try:
        with torch.no_grad():
            build_s = timed(build_prompts, repeats)
        host_s = timed(step, repeats)
    finally:
        model.ranker.list_logits = real_list_logits
    return {"lists": len(uids), "rerank_top_k": model.rerank_top_k, "tokens": embedded["tokens"],
            "prompt_tokens": sum(len(ids) for ids in build_prompts().ids), "build_s": build_s, "host_s": host_s,
            "device": str(model.device)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    parser.add_argument("--dataset", default="ml-100k", help="RecBole dataset name")
    parser.add_argument("--config_files", nargs="*", default=[], help="YAML files, as for run_recbole_mllm.py")
    parser.add_argument("--rows", type=int, default=16, help="training rows (lists) a step")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps after one warm-up")
    args, config_args = parser.parse_known_args()
    config = Config("MLLMSRec", args.dataset, args.config_files, cmd_args=config_args)
    try:
        figures = measure(config, args.rows, args.repeats)
    except ValueError as error:
        parser.error(str(error))
    print(f"device {figures['device']}, {args.dataset}, {figures['lists']} lists of rerank_top_k={figures['rerank_top_k']}, "
          f"{figures['tokens']} prompt tokens a step ({figures['tokens'] / figures['lists']:.0f} a list)")
    print(f"prompt building alone (list_prompt x {figures['lists']}):  {figures['build_s'] * 1e3:8.2f} ms a step")
    print(f"the step's host path, LLM decoder left out:  {figures['host_s'] * 1e3:8.2f} ms a step "
          f"(encoder, top-K, prompts, embed, backward of the projections)")


if __name__ == "__main__":
    main()
