"""The user-profile stage's cache: which summaries a configuration needs, what keys it, and reading it.

Kept apart from the stage that builds it (``user_profile.py``, whose docstring gives the window rule)
so that readers, the model first, find and read summaries without importing anything that generates.
A plan needs of its backend only ``identity``: a loaded backend, or the weight-free description of
``backend_identity.describe_backend``. Which positions need a summary is the data layer's split rule
(``recbole_mllm.data.split.needed_positions``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch

from recbole_mllm.data.utils import histories_or_dataset
from recbole_mllm.data.split import held_out_count, needed_positions
from recbole_mllm.fileio import canonical_json, sha256_file
from recbole_mllm.mllm.base import GenerationConfig, MultimodalLM
from recbole_mllm.stages.backend_identity import BackendIdentity
from recbole_mllm.stages.cache import StageCache
from recbole_mllm.stages.common import (RECBOLE_DATASET_DEFAULTS, STAGE_DEFAULTS, config_value, dataset_location, declared,
                                         generation_config, load_backend)
from recbole_mllm.stages.item_fusion_cache import item_fusion_cache, render_item_text, text_fields
from recbole_mllm.stages.items import read_item_file
from recbole_mllm.stages.prompts import PromptTemplate, load_prompt
from recbole_mllm.stages.user_text import PROFILE_DEFAULTS, USER_TEXT_FORMAT, Clock, user_profiles

STAGE = "user_profile"

DEFAULTS = {
    **STAGE_DEFAULTS,
    **declared("user_window_size", "user_window_step", "user_summary_max_windows", "user_window_partial_first",
               "llm_train_targets_per_user", "user_shard_size", "user_profile_prompt", "user_summary_max_new_tokens",
               "user_time_format"),
    **{key: RECBOLE_DATASET_DEFAULTS[key] for key in ("ITEM_ID_FIELD", "seq_separator")},
    **PROFILE_DEFAULTS,
}

_PROMPT_FIELDS = {
    "system": [], "first": ["profile", "period", "items"],
    "update": ["profile", "previous_end", "previous_age", "previous_summary", "period", "items"],
    "item": ["number", "when", "item_text", "item_summary"], "field": ["label", "value"],
    "empty": [], "no_profile": [],
}


def setting(config: Mapping, key: str):
    """``config[key]``, or the stage's default when it is missing (or None, for most keys)."""
    return config_value(config, key, DEFAULTS, {"user_profile_fields", "mllm_dtype"})


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
        return cls(int(setting(config, "user_window_size")), int(setting(config, "user_window_step")),
                   int(setting(config, "user_summary_max_windows")), bool(setting(config, "user_window_partial_first")))

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


def summary_keys(histories: Mapping, config: Mapping) -> list:
    """Every ``(user token, c)`` the configured split needs, for ``histories`` (the cache's key set)."""
    rule = WindowRule.from_config(config)
    keys = []
    for user, history in histories.items():
        covered = {rule.key(t) for t in needed_positions(len(history.items), config)} - {0}
        keys.extend((user, c) for c in sorted(covered))
    return keys


@dataclass
class UserProfilePlan:
    """What one configuration reads and where it writes."""

    cache: StageCache
    histories: Mapping
    rule: WindowRule
    clock: Clock
    template: PromptTemplate
    profiles: dict
    item_texts: dict  # raw item token -> "Title: ...; Year: ..."
    generation: GenerationConfig  # the decoding the cache is keyed with
    item_cache: StageCache  # the item fusion cache whose summaries the window prompts quote


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


def user_profile_plan(config: Mapping, backend: Union[MultimodalLM, BackendIdentity],
                      histories: Mapping, item_histories: Optional[Mapping] = None) -> UserProfilePlan:
    """The plan of ``config`` for ``histories``: rule, clock, prompt, texts and cache (nothing is generated).
    ``item_histories`` (default ``histories``) are the whole dataset's, which give the items of the item fusion cache
    under ``item_fusion_items: interacted`` when ``histories`` are a part of them."""
    dataset, folder = dataset_location(config)
    rule = WindowRule.from_config(config)
    clock = Clock(str(setting(config, "user_time_format")))
    if clock.format != "none" and _time_normalised(config):
        raise ValueError("RecBole normalises the time field in this configuration (normalize_all / normalize_field), "
                         "so timestamps are no dates: set normalize_all: False for the stage and the model alike "
                         "(the order does not change), or user_time_format: none")
    clock.check(t for history in histories.values() for t in history.timestamps)
    template = load_prompt(STAGE, setting(config, "user_profile_prompt")).require(_PROMPT_FIELDS)
    table = read_item_file(folder, dataset, id_field=setting(config, "ITEM_ID_FIELD"),
                           field_separator=setting(config, "field_separator"), encoding=setting(config, "encoding"))
    fields = text_fields(config, table)
    seq_separator = setting(config, "seq_separator")
    item_texts = {token: "; ".join(render_item_text(row, fields, table, template, seq_separator).splitlines())
                  for token, row in table.rows.items()}
    unknown = sorted({i for h in histories.values() for i in h.items} - set(item_texts))
    if unknown:
        raise ValueError(f"{len(unknown)} item(s) of the histories are not in {table.path}, e.g. {unknown[:5]}")
    profiles = user_profiles(config)
    generation = generation_config(config, "user_summary_max_new_tokens")
    item_cache = item_fusion_cache(config, backend, histories if item_histories is None else item_histories)
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
        "item_fusion": {"cache": item_cache.key_hash},
        "params": {"window_size": rule.size, "window_step": rule.step, "max_windows": rule.max_windows,
                   "partial_first": rule.partial_first, "leave_out": held_out_count(config),
                   "train_targets_per_user": int(setting(config, "llm_train_targets_per_user")),
                   "time_format": clock.format, "text_format": USER_TEXT_FORMAT,
                   "profile_fields": setting(config, "user_profile_fields"), "item_text_fields": [list(p) for p in fields],
                   "user_id_field": setting(config, "USER_ID_FIELD"), "item_id_field": table.id_field,
                   "field_separator": setting(config, "field_separator"), "seq_separator": seq_separator,
                   "encoding": setting(config, "encoding")},
    }
    cache = StageCache(setting(config, "stage_cache_dir"), STAGE, manifest, keys=summary_keys(histories, config),
                       shard_size=int(setting(config, "user_shard_size")), group_by_first=True,
                       command=f"python -m recbole_mllm.stages.{STAGE} --dataset={dataset}")
    return UserProfilePlan(cache, histories, rule, clock, template, profiles, item_texts, generation, item_cache)


def user_profile_cache(config: Mapping, backend: Union[MultimodalLM, BackendIdentity],
                       histories: Optional[Mapping] = None) -> StageCache:
    """The cache for this configuration, backend and histories, built or not (nothing is generated)."""
    return user_profile_plan(config, backend, histories_or_dataset(config, histories)).cache


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
    plan = user_profile_plan(config, backend, histories_or_dataset(config, histories))
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
