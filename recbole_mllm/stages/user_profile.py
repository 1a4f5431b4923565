"""Temporal-aware user behaviour comprehension, part 2 of MLLM-SRec: recurrent preference summaries.

Wang et al., "Leveraging multimodal large language model for multimodal sequential
recommendation", Scientific Reports 2025 (Fig. 3, middle). Each user's time-ordered history is cut
with a sliding window; window by window the LLM revises a preference summary from the previous
summary, the window's items (their fused item summaries and text fields) and when they happened
(dates, gaps, how old the previous summary is). A profile sentence from the ``.user`` fields goes
into every step. Summaries and their embeddings are kept in a
:class:`~recbole_mllm.stages.cache.StageCache` keyed by ``(raw user token, covered count c)``. This
module builds the cache; the window rule's code, what keys the cache and how it is read live in
``user_profile_cache.py``, so readers never import the stage.

Histories are exactly RecBole's: ``data.histories.user_histories`` reads ``dataset.inter_feat`` of
the dataset ``create_dataset(config)`` builds (so the dataset yaml's filters and k-core apply) and
orders each user's rows as RecBole's sequential augmentation and leave-one-out split do (a stable
sort by the float32 timestamp, as RecBole keeps it, then by user).

Window rule (W = ``user_window_size``, S = ``user_window_step``, M = ``user_summary_max_windows``):

* Window k (k = 0, 1, ...) holds the history items [k*S, k*S + W). A summary is stored after a
  full window only: after window k it covers c = k*S + W items. There is no partial last window.
* The summary used for a prediction at position t (t = the number of earlier interactions) is the
  latest one with c <= t: ``summary_key(t) = (t - W) // S * S + W`` for t >= W. Items [c, t) are in
  no summary yet; the ranker's list of recent items shows them.
* History shorter than W: with ``user_window_partial_first`` (the default) a position t in [1, W)
  gets a summary of its own, one window over items [0, t) (c = t); without it, and at t = 0, the
  summary is the template's ``[empty]`` text.
* S > W: items [k*S + W, (k+1)*S) lie between two windows and are never shown to the LLM.
  S < W: windows overlap and W - S items are shown again in the next window.
* The summary at c is the last step of a chain of windows, oldest first, each step reading the
  previous step's summary. M = 0: the chain starts at window 0. M > 0: it starts at window
  max(0, k - M + 1), so a summary costs at most M generations and sees the last W + (M-1)*S items.
  The start depends on c alone, never on the history's length, so adding interactions after c
  never changes the summary at c; summaries with the same start share one chain.
* Leakage: the summary at c reads items [0, c) only: the window items, their timestamps, the gap
  of a window's first item to the item before it, and the previous summary's age, measured to the
  window's last item c - 1. Nothing about the target or later interactions enters it.

Which summaries are built: ``data.split.needed_positions`` lists the positions the configured
leave-one-out split trains and evaluates the LLM on (the last ``llm_train_targets_per_user``
training targets, the valid and the test target); a user's keys are their distinct c > 0.

NOTE (deviations and choices): the paper publishes neither its prompt nor W, S; ours is
``prompts/user_profile_v1.txt`` with W = S = 10. Decoding is greedy. An empty generation keeps the
previous summary (or, on a chain's first window, the window's item list), counted in
``complete.json`` under ``meta_counts.summary``. ``user_summary_max_windows`` bounds the cost on long
histories (the paper summarises the whole history).

Command line (``torchrun --nproc_per_node=N -m ...`` splits the shards of users over N processes)::

    python -m recbole_mllm.stages.user_profile --dataset=ml-1m-mm [--config_files="a.yaml b.yaml"] [--key=value ...]

It builds the dataset through ``recbole_mllm.config.Config(model=--model, default MLLMSRec)``; keys the
model reads too (``llm_train_targets_per_user``, the window keys) must reach the stage the same way.
The item fusion cache of the same configuration must be built first.

Config keys, besides those of item fusion (``mllm``, ``stage_cache_dir``, ``stage_batch_size``, item text
fields, ...; ``stage_shard_size`` is part of the item cache's key, so it is not reused for users):
    user_window_size (int): W, items per window.
    user_window_step (int): S, items between the starts of two windows.
    user_summary_max_windows (int): M, most windows in one chain; 0 = from the first window.
    user_window_partial_first (bool): summarise histories shorter than W in one partial window.
    llm_train_targets_per_user (int): training targets per user the LLM is trained on (the last ones).
    user_shard_size (int): users per cache shard: the unit of resume and of multi-process work; each
        shard's chains advance together, one batched generation per window index.
    user_profile_prompt (str): template version (``v1`` -> ``prompts/user_profile_v1.txt``) or a .txt path.
    user_summary_max_new_tokens (int): longest summary, in tokens.
    user_profile_fields (list | dict | None): ``.user`` fields of the profile sentence, as field names or
        ``{label: field}``; None: every field but the user id.
    user_time_format (str): ``unix_s`` or ``unix_ms`` timestamps (dates and gaps are written out), or
        ``none`` (positions only).
    dataset, data_path, USER_ID_FIELD, eval_args, normalize_all, normalize_field: as in RecBole.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import torch
from tqdm import tqdm

from recbole_mllm.data.utils import histories_or_dataset
from recbole_mllm.mllm.base import ChatRequest, MultimodalLM
from recbole_mllm.stages.cache import ShardOutput, StageCache
from recbole_mllm.stages.common import load_backend, stage_config, stage_main
from recbole_mllm.stages.user_profile_cache import DEFAULTS, STAGE, UserProfilePlan, WindowRule, user_profile_plan

logger = logging.getLogger(__name__)


@dataclass
class _Chain:
    """One recurrent run over windows of one user; ``records[step] = c`` stores the summary after a step."""

    user: str
    windows: list
    records: dict = field(default_factory=dict)


def _chains(rule: WindowRule, user: str, covered: Iterable[int]) -> list:
    """The fewest chains that produce the summaries at ``covered``: those with the same first window share one."""
    by_start: dict = {}
    for c in sorted(set(covered)):
        windows = rule.windows(c)
        chain = by_start.setdefault(windows[0], _Chain(user, windows))
        if len(windows) > len(chain.windows):
            chain.windows = windows  # the shorter chains of this start are its prefixes
        chain.records[len(windows) - 1] = c
    return list(by_start.values())


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


class _ShardCompute:
    """Turns one shard's ``(user, c)`` keys into summaries: all the shard's chains advance together, one
    batched ``generate`` call per window index, so every user's next window is generated at once."""

    def __init__(self, config: Mapping, plan: UserProfilePlan, backend: MultimodalLM, progress: bool):
        self.config, self.plan, self.backend, self.progress = config, plan, backend, progress
        self.generation = plan.generation
        self.item_summaries: Optional[dict] = None
        self.generated = 0

    def _load_item_summaries(self) -> dict:
        if self.item_summaries is None:  # only when there is work: a finished cache needs no item cache
            tokens = sorted({item for history in self.plan.histories.values() for item in history.items})
            texts, _, _ = self.plan.item_cache.load_aligned(tokens)
            self.item_summaries = {t: " ".join(s.split()) for t, s in zip(tokens, texts)}
        return self.item_summaries

    def window_items(self, user: str, lo: int, hi: int) -> str:
        plan, history = self.plan, self.plan.histories[user]
        summaries = self._load_item_summaries()
        return "\n".join(plan.template.render(
            "item", number=n, when=plan.clock.when(history.timestamps, p), item_text=plan.item_texts[history.items[p]],
            item_summary=summaries[history.items[p]]) for n, p in enumerate(range(lo, hi), 1))

    def request(self, chain: _Chain, step: int, previous: Optional[tuple]) -> ChatRequest:
        plan, template = self.plan, self.plan.template
        lo, hi = chain.windows[step]
        ts = plan.histories[chain.user].timestamps
        common = {"profile": plan.profiles.get(chain.user) or template.render("no_profile"),
                  "period": plan.clock.period(ts, lo, hi), "items": self.window_items(chain.user, lo, hi)}
        if previous is None:
            prompt = template.render("first", **common)
        else:
            text, previous_hi = previous
            prompt = template.render("update", previous_end=plan.clock.end(ts, previous_hi),
                                     previous_age=plan.clock.age(ts, previous_hi, hi), previous_summary=text, **common)
        return ChatRequest(prompt=prompt, system=template.render("system") or None)

    def fallback(self, chain: _Chain, step: int) -> str:
        lo, hi = chain.windows[step]
        items = self.plan.histories[chain.user].items[lo:hi]
        return "Interactions: " + " | ".join(self.plan.item_texts[item] for item in items)

    def __call__(self, keys: list) -> ShardOutput:
        by_user: dict = {}
        for user, c in keys:
            by_user.setdefault(user, []).append(c)
        chains = [chain for user, covered in by_user.items() for chain in _chains(self.plan.rule, user, covered)]
        previous: list = [None] * len(chains)
        stored: dict = {}
        bar = tqdm(total=sum(len(ch.windows) for ch in chains), unit="summary", desc=f"{STAGE} windows", leave=False,
                   disable=not self.progress or _rank() != 0, dynamic_ncols=True)
        with bar:
            for step in range(max((len(ch.windows) for ch in chains), default=0)):
                active = [i for i, ch in enumerate(chains) if step < len(ch.windows)]
                requests = [self.request(chains[i], step, previous[i]) for i in active]
                outputs = self.backend.generate(requests, self.generation, progress=False)
                for i, output in zip(active, outputs):
                    text, status = " ".join(output.split()), "generated"
                    if not text:  # keep what was known: the previous summary, or the window's items
                        text = previous[i][0] if previous[i] else self.fallback(chains[i], step)
                        status = "fallback"
                    previous[i] = (text, chains[i].windows[step][1])
                    if step in chains[i].records:
                        stored[(chains[i].user, chains[i].records[step])] = (text, status, step + 1)
                bar.update(len(active))
                self.generated += len(active)
        texts = [stored[k][0] for k in keys]
        metas = [{"summary": stored[k][1], "chain_windows": stored[k][2]} for k in keys]
        embeddings = self.backend.embed(texts, batch_size=self.generation.batch_size)
        return ShardOutput(texts, embeddings, metas)


def run_user_profile(config: Mapping, backend: Optional[MultimodalLM] = None, histories: Optional[Mapping] = None,
                     progress: bool = True) -> StageCache:
    """Build (or finish, or just verify) the user summary cache of ``config``; returns it, complete.

    ``histories`` defaults to ``data.histories.user_histories`` of ``create_dataset(config)`` (``config`` is then a
    RecBole ``Config``). Idempotent: shards already done are kept.
    """
    backend = backend if backend is not None else load_backend(config)
    plan = user_profile_plan(config, backend, histories_or_dataset(config, histories))
    compute = _ShardCompute(config, plan, backend, progress)
    started = time.perf_counter()
    cache = plan.cache.build(compute, progress=progress)
    if compute.generated:
        seconds = time.perf_counter() - started
        logger.info(f"{STAGE}: generated {compute.generated} window summaries in {seconds:.1f}s "
                    f"({compute.generated / max(seconds, 1e-9):.2f} summaries/s)")
    if cache.is_complete():
        stats = cache.summary()
        logger.info(f"{STAGE}: {stats['n_records']} summaries in {cache.path}; {stats['meta_counts']}")
    return cache


def summary_chain(config: Mapping, user: str, windows: int, backend: Optional[MultimodalLM] = None,
                  histories: Optional[Mapping] = None) -> list:
    """One user's recurrent chain from window 0: ``[(c, summary)]`` for its first ``windows`` full windows.

    For reading how a summary evolves (``scripts/stage_examples.py``); nothing is cached. The cache
    holds only the summaries the split needs, each from at most ``user_summary_max_windows`` windows.
    """
    backend = backend if backend is not None else load_backend(config)
    histories = histories_or_dataset(config, histories)
    if user not in histories:
        raise KeyError(f"user {user!r} is not in the dataset {config['dataset']}")
    plan = user_profile_plan(config, backend, {user: histories[user]}, item_histories=histories)
    plan.rule = WindowRule(plan.rule.size, plan.rule.step, 0, plan.rule.partial_first)
    ends = [plan.rule.size + k * plan.rule.step for k in range(windows)]
    ends = [c for c in ends if c <= len(histories[user].items)]
    output = _ShardCompute(config, plan, backend, progress=False)([(user, c) for c in ends])
    return list(zip(ends, output.texts))


def main(argv: Optional[Sequence[str]] = None) -> None:
    stage_main(argv, stage_config, run_user_profile, __doc__, DEFAULTS)


if __name__ == "__main__":
    main()
