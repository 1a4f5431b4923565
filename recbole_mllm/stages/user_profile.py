"""Temporal-aware user behaviour comprehension, part 2 of MLLM-SRec: recurrent preference summaries.

Wang et al., "Leveraging multimodal large language model for multimodal sequential
recommendation", Scientific Reports 2025 (Fig. 3, middle). Each user's time-ordered history is cut
with a sliding window; window by window the LLM revises a preference summary from the previous
summary, the window's items (their fused item summaries and text fields) and when they happened
(dates, gaps, how old the previous summary is). A profile sentence from the ``.user`` fields goes
into every step. Summaries and their embeddings are kept in a
:class:`~recbole_mllm.stages.cache.StageCache` keyed by ``(raw user token, covered count c)``.

Histories are exactly RecBole's: ``data.histories.user_histories`` reads ``dataset.inter_feat`` of the
dataset ``create_dataset(config)`` builds (so the dataset yaml's filters and k-core apply) and
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

It builds the dataset through ``recbole_mllm.config.Config(model=--model, default SASRec)``; keys the
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

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import torch
from tqdm import tqdm

from recbole_mllm.data.histories import user_histories
from recbole_mllm.data.split import LLM_TRAIN_TARGETS_PER_USER, held_out_count, needed_positions
from recbole_mllm.mllm.base import ChatRequest, GenerationConfig, MultimodalLM
from recbole_mllm.stages.cache import ShardOutput, StageCache, canonical_json, sha256_file
from recbole_mllm.stages.common import (STAGE_DEFAULTS, config_value, dataset_location, load_backend,
                                        stage_config, stage_main)
from recbole_mllm.stages.item_fusion import item_fusion_cache, load_item_fusion, render_item_text, text_fields
from recbole_mllm.stages.items import read_item_file
from recbole_mllm.stages.prompts import PromptTemplate, load_prompt
from recbole_mllm.stages.user_text import PROFILE_DEFAULTS, USER_TEXT_FORMAT, Clock, user_profiles

logger = logging.getLogger(__name__)

STAGE = "user_profile"

DEFAULTS = {
    **STAGE_DEFAULTS,
    "user_window_size": 10,
    "user_window_step": 10,
    "user_summary_max_windows": 6,
    "user_window_partial_first": True,
    "llm_train_targets_per_user": LLM_TRAIN_TARGETS_PER_USER,
    "user_shard_size": 256,
    "user_profile_prompt": "v1",
    "user_summary_max_new_tokens": 64,
    "user_time_format": "unix_s",
    "ITEM_ID_FIELD": "item_id",
    "seq_separator": " ",
    **PROFILE_DEFAULTS,
}

_PROMPT_FIELDS = {
    "system": [], "first": ["profile", "period", "items"],
    "update": ["profile", "previous_end", "previous_age", "previous_summary", "period", "items"],
    "item": ["number", "when", "item_text", "item_summary"], "field": ["label", "value"],
    "empty": [], "no_profile": [],
}


def _get(config: Mapping, key: str):
    return config_value(config, key, DEFAULTS, {"user_profile_fields", "mllm_dtype"})


# ---------------------------------------------------------------------------------------- windows
@dataclass(frozen=True)
class WindowRule:
    """Which summary a position uses and which windows build it (see the module docstring)."""

    size: int
    step: int
    max_windows: int = 0
    partial_first: bool = True

    def __post_init__(self):
        for name, low in (("size", 1), ("step", 1), ("max_windows", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"window {name} must be an integer >= {low}; got {value!r}")

    @classmethod
    def from_config(cls, config: Mapping) -> "WindowRule":
        return cls(int(_get(config, "user_window_size")), int(_get(config, "user_window_step")),
                   int(_get(config, "user_summary_max_windows")), bool(_get(config, "user_window_partial_first")))

    def key(self, t: int) -> int:
        """The covered count c of the summary used at position t; 0 means no summary (empty text)."""
        if t < 1:
            return 0
        if t < self.size:
            return t if self.partial_first else 0
        return (t - self.size) // self.step * self.step + self.size

    def windows(self, c: int) -> list:
        """The ``(lo, hi)`` item ranges of the chain that ends with the summary at ``c``, oldest first."""
        if c >= self.size and (c - self.size) % self.step == 0:
            k = (c - self.size) // self.step
            start = max(0, k - self.max_windows + 1) if self.max_windows else 0
            return [(j * self.step, j * self.step + self.size) for j in range(start, k + 1)]
        if 1 <= c < self.size and self.partial_first:
            return [(0, c)]
        raise ValueError(f"no summary covers exactly {c} items under {self}")


def summary_key(history_len_t: int, window_size: int, window_step: int, partial_first: bool = True) -> int:
    """The covered count c of the summary used for a prediction after ``history_len_t`` interactions."""
    return WindowRule(window_size, window_step, 0, partial_first).key(history_len_t)


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


def summary_keys(histories: Mapping, config: Mapping) -> list:
    """Every ``(user token, c)`` the configured split needs, for ``histories`` (the cache's key set)."""
    rule = WindowRule.from_config(config)
    keys = []
    for user, history in histories.items():
        covered = {rule.key(t) for t in needed_positions(len(history.items), config)} - {0}
        keys.extend((user, c) for c in sorted(covered))
    return keys


# ---------------------------------------------------------------------------------------- the stage
@dataclass
class _Plan:
    """What one configuration reads and where it writes."""

    cache: StageCache
    histories: Mapping
    rule: WindowRule
    clock: Clock
    template: PromptTemplate
    profiles: dict
    item_texts: dict  # raw item token -> "Title: ...; Year: ..."


def _generation_config(config: Mapping) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=int(_get(config, "user_summary_max_new_tokens")),
                            batch_size=int(_get(config, "stage_batch_size")), do_sample=False,
                            no_repeat_ngram_size=int(_get(config, "stage_no_repeat_ngram_size")))


def _histories_sha256(histories: Mapping) -> str:
    digest = hashlib.sha256()
    for user, history in histories.items():
        digest.update(canonical_json([user, history.items, history.timestamps]).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def _time_normalised(config: Mapping) -> bool:
    time_field = config["TIME_FIELD"] if "TIME_FIELD" in config and config["TIME_FIELD"] else "timestamp"
    fields = config["normalize_field"] if "normalize_field" in config and config["normalize_field"] else []
    return time_field in fields or bool("normalize_all" in config and config["normalize_all"])


def _plan(config: Mapping, backend: MultimodalLM, histories: Mapping) -> _Plan:
    dataset, folder = dataset_location(config)
    rule = WindowRule.from_config(config)
    clock = Clock(str(_get(config, "user_time_format")))
    if clock.format != "none" and _time_normalised(config):
        raise ValueError("RecBole normalises the time field in this configuration (normalize_all / normalize_field), "
                         "so timestamps are no dates: set normalize_all: False for the stage and the model alike "
                         "(the order does not change), or user_time_format: none")
    clock.check(t for history in histories.values() for t in history.timestamps)
    template = load_prompt(STAGE, _get(config, "user_profile_prompt")).require(_PROMPT_FIELDS)
    table = read_item_file(folder, dataset, id_field=_get(config, "ITEM_ID_FIELD"),
                           field_separator=_get(config, "field_separator"), encoding=_get(config, "encoding"))
    fields = text_fields(config, table)
    seq_separator = _get(config, "seq_separator")
    item_texts = {token: "; ".join(render_item_text(row, fields, table, template, seq_separator).splitlines())
                  for token, row in table.rows.items()}
    unknown = sorted({i for h in histories.values() for i in h.items} - set(item_texts))
    if unknown:
        raise ValueError(f"{len(unknown)} item(s) of the histories are not in {table.path}, e.g. {unknown[:5]}")
    profiles = user_profiles(config)
    generation = _generation_config(config)
    user_file = folder / f"{dataset}.user"
    inter_file = folder / f"{dataset}.inter"
    manifest = {
        "model": backend.identity.as_dict(),
        "prompt": template.identity(),
        "generation": {**generation.as_dict(), "batch_size": generation.batch_size},
        "embedding": {"input": "summary", "batch_size": generation.batch_size},
        "dataset": {"name": dataset, "inter_file_sha256": sha256_file(inter_file) if inter_file.is_file() else None,
                    "user_file_sha256": sha256_file(user_file) if user_file.is_file() else None,
                    "histories_sha256": _histories_sha256(histories), "n_users": len(histories),
                    "n_interactions": sum(len(h.items) for h in histories.values())},
        "item_fusion": {"cache": item_fusion_cache(config, backend).key_hash},
        "params": {"window_size": rule.size, "window_step": rule.step, "max_windows": rule.max_windows,
                   "partial_first": rule.partial_first, "leave_out": held_out_count(config),
                   "train_targets_per_user": int(_get(config, "llm_train_targets_per_user")),
                   "time_format": clock.format, "text_format": USER_TEXT_FORMAT,
                   "profile_fields": _get(config, "user_profile_fields"), "item_text_fields": [list(p) for p in fields],
                   "user_id_field": _get(config, "USER_ID_FIELD"), "item_id_field": table.id_field,
                   "field_separator": _get(config, "field_separator"), "seq_separator": seq_separator,
                   "encoding": _get(config, "encoding")},
    }
    cache = StageCache(_get(config, "stage_cache_dir"), STAGE, manifest, keys=summary_keys(histories, config),
                       shard_size=int(_get(config, "user_shard_size")), group_by_first=True,
                       command=f"python -m recbole_mllm.stages.{STAGE} --dataset={dataset}")
    return _Plan(cache, histories, rule, clock, template, profiles, item_texts)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


class _ShardCompute:
    """Turns one shard's ``(user, c)`` keys into summaries: all the shard's chains advance together, one
    batched ``generate`` call per window index, so every user's next window is generated at once."""

    def __init__(self, config: Mapping, plan: _Plan, backend: MultimodalLM, progress: bool):
        self.config, self.plan, self.backend, self.progress = config, plan, backend, progress
        self.generation = _generation_config(config)
        self.item_summaries: Optional[dict] = None
        self.generated = 0

    def _load_item_summaries(self) -> dict:
        if self.item_summaries is None:  # only when there is work: a finished cache needs no item cache
            tokens = sorted(self.plan.item_texts)
            texts, _ = load_item_fusion(self.config, tokens, self.backend)
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


def _histories(config: Mapping, histories: Optional[Mapping]) -> Mapping:
    if histories is not None:
        return histories
    from recbole_mllm.data import create_dataset  # deferred: RecBole's dataset module is heavy

    return user_histories(create_dataset(config))


def user_profile_cache(config: Mapping, backend: MultimodalLM, histories: Optional[Mapping] = None) -> StageCache:
    """The cache for this configuration, backend and histories, built or not (nothing is generated)."""
    return _plan(config, backend, _histories(config, histories)).cache


def run_user_profile(config: Mapping, backend: Optional[MultimodalLM] = None, histories: Optional[Mapping] = None,
                     progress: bool = True) -> StageCache:
    """Build (or finish, or just verify) the user summary cache of ``config``; returns it, complete.

    ``histories`` defaults to :func:`user_histories` of ``create_dataset(config)`` (``config`` is then a
    RecBole ``Config``). Idempotent: shards already done are kept.
    """
    backend = backend if backend is not None else load_backend(config)
    plan = _plan(config, backend, _histories(config, histories))
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


class UserSummaries:
    """A built cache, loaded once: the summary text and embedding used for each ``(user token, t)``.

    Where no summary exists yet (c = 0) the text is the template's ``[empty]`` text and the
    embedding is that text's embedding by the same backend.
    """

    def __init__(self, records: Mapping, rule: WindowRule, empty_text: str, empty_embedding: torch.Tensor):
        self.records, self.rule = records, rule
        self.empty_text, self.empty_embedding = empty_text, empty_embedding

    def key(self, user: str, t: int) -> tuple:
        """The cache key ``(user, c)`` of the summary used at position ``t``; c = 0: no summary."""
        return str(user), self.rule.key(int(t))

    def _record(self, user: str, t: int):
        key = self.key(user, t)
        if key[1] == 0:
            return None
        if key not in self.records:
            raise KeyError(f"no user summary for user {key[0]!r} at position {t} (covered count {key[1]}): the cache "
                           f"holds the positions the split needs (needed_positions: the last llm_train_targets_per_user "
                           f"training targets, valid and test); change the config and rebuild to get others")
        return self.records[key]

    def texts(self, requests: Sequence[tuple]) -> list:
        """The summary for each ``(user token, t)`` request."""
        return [r.text if r is not None else self.empty_text for r in (self._record(u, t) for u, t in requests)]

    def embeddings(self, requests: Sequence[tuple]) -> torch.Tensor:
        """Embeddings ``[len(requests), H]`` of the same summaries."""
        rows = [r.embedding if r is not None else self.empty_embedding for r in (self._record(u, t) for u, t in requests)]
        return torch.stack(rows) if rows else torch.zeros(0, self.empty_embedding.shape[0])


def open_user_summaries(config: Mapping, backend: Optional[MultimodalLM] = None,
                        histories: Optional[Mapping] = None) -> UserSummaries:
    """Load the user summary cache of ``config`` (a ``StageCacheError`` naming the command when it is not built)."""
    backend = backend if backend is not None else load_backend(config)
    plan = _plan(config, backend, _histories(config, histories))
    records = plan.cache.load()
    empty_text = plan.template.render("empty")
    empty_embedding = backend.embed([empty_text])[0].detach().to("cpu", torch.float32)
    return UserSummaries(records, plan.rule, empty_text, empty_embedding)


def load_user_summaries(config: Mapping, requests: Sequence[tuple], backend: Optional[MultimodalLM] = None,
                        histories: Optional[Mapping] = None) -> list:
    """The summary used for each ``(user token, t)`` request: built from the user's first ``c <= t`` items.

    ``t`` is the target's position in the user's whole history (:func:`user_histories`), which is
    RecBole's ``item_length`` only while the history is shorter than ``MAX_ITEM_LIST_LENGTH``. Load once
    with :func:`open_user_summaries` when asking many times; ``histories`` spares building the dataset.
    """
    return open_user_summaries(config, backend, histories).texts(requests)


def summary_chain(config: Mapping, user: str, windows: int, backend: Optional[MultimodalLM] = None,
                  histories: Optional[Mapping] = None) -> list:
    """One user's recurrent chain from window 0: ``[(c, summary)]`` for its first ``windows`` full windows.

    For reading how a summary evolves (``scripts/stage_examples.py``); nothing is cached. The cache
    holds only the summaries the split needs, each from at most ``user_summary_max_windows`` windows.
    """
    backend = backend if backend is not None else load_backend(config)
    histories = _histories(config, histories)
    if user not in histories:
        raise KeyError(f"user {user!r} is not in the dataset {config['dataset']}")
    plan = _plan(config, backend, {user: histories[user]})
    plan.rule = WindowRule(plan.rule.size, plan.rule.step, 0, plan.rule.partial_first)
    ends = [plan.rule.size + k * plan.rule.step for k in range(windows)]
    ends = [c for c in ends if c <= len(histories[user].items)]
    output = _ShardCompute(config, plan, backend, progress=False)([(user, c) for c in ends])
    return list(zip(ends, output.texts))


def main(argv: Optional[Sequence[str]] = None) -> None:
    stage_main(argv, stage_config, run_user_profile, __doc__, DEFAULTS)


if __name__ == "__main__":
    main()
