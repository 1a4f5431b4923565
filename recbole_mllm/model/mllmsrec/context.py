"""Everything the ranker's prompts say about users and items, gathered once from the stage caches.

The model only sees RecBole's internal ids; prompts need raw tokens, texts, fused item summaries,
temporal preference summaries, each user's full time-ordered history (to find the position ``t`` of
a target and to write the evolution and match steps) and item images. :class:`RankerContext` holds
them indexed by internal id. Only interactions before ``t`` ever reach a user's text: the summary is
the one keyed for ``t`` by the user-profile stage, and the evolution, recent items and match lines
read ``history[:t]``.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from recbole_mllm.stages.user_text import Clock

logger = logging.getLogger(__name__)


def _readable(value: str, seq_separator: str) -> str:
    return " ".join(value.replace(seq_separator, " ").replace("_", " ").split())


@dataclass
class RankerContext:
    """Per-item and per-user material of the prompts, indexed by RecBole's internal ids."""

    item_tokens: list
    user_tokens: list
    item_text: list  # compact one-line description per item
    item_title: list
    item_summary: list  # fused (image + text) summary per item
    item_categories: list  # tuple of category strings per item
    histories: list  # per user: np.ndarray of internal item ids in time order
    timestamps: list  # per user: np.ndarray of timestamps
    profiles: list  # per user: profile sentence
    positions: dict = field(default_factory=dict)  # (uid, iid) -> list of positions in the history
    clock: Clock = field(default_factory=lambda: Clock("unix_s"))  # user_time_format: dates, or positions only

    def position(self, uid: int, item_seq, seq_len: int, max_len: int, timestamp: float | None = None) -> int:
        """Number of the user's interactions before a target (``t``), from the model's input sequence alone.

        Never from the candidate item: in an evaluation block every candidate shares the user's input,
        so ``t`` (and every text built from ``history[:t]``) is the same for the positive and the negatives.
        """
        history = self.histories[uid]
        if seq_len < max_len:  # RecBole's sequence is the whole history before the target
            if not np.array_equal(history[:seq_len], np.asarray(item_seq[:seq_len])):
                raise KeyError(f"user {self.user_tokens[uid]}: the input sequence is not the start of the user's "
                               f"history (stage histories and RecBole's disagree)")
            return int(seq_len)
        last = int(item_seq[seq_len - 1])
        found = [p + 1 for p in self.positions.get((uid, last), [])]
        found = [t for t in found if t >= seq_len and np.array_equal(history[t - seq_len:t], np.asarray(item_seq[:seq_len]))]
        if not found:
            raise KeyError(f"user {self.user_tokens[uid]}: the input sequence is not part of the user's history")
        if len(found) == 1 or timestamp is None:
            return found[-1]
        times = self.timestamps[uid]  # the target's own time sits at index t
        return min(found, key=lambda t: abs(times[min(t, len(times) - 1)] - timestamp))

    def evolution(self, uid: int, t: int, window: int) -> str:
        """Step 1: how the user's categories moved from the older history to the latest window."""
        items, times = self.histories[uid][:t], self.timestamps[uid][:t]
        if len(items) == 0:
            return "no earlier interactions"
        recent, older = items[-window:], items[:-window]

        def top(ids):
            counts = Counter(c for i in ids for c in self.item_categories[i])
            return ", ".join(c for c, _ in counts.most_common(3)) or "unknown"

        span = self.clock.span(times, 0, len(items))  # "" when the timestamps are positions (no dates)
        text = f"{len(items)} items{' ' + span if span else ''}; latest {len(recent)}: {top(recent)}"
        return text + (f"; earlier: {top(older)}" if len(older) else "")

    def recent_items(self, uid: int, t: int, count: int):
        """The user's last ``count`` items before position ``t``, oldest first (never the item at ``t``)."""
        return self.histories[uid][max(0, t - count):t]

    def recent_titles(self, uid: int, t: int, count: int) -> str:
        return "; ".join(self.item_title[i] for i in self.recent_items(uid, t, count)) or "none"

    def match(self, uid: int, t: int, iid: int, count: int) -> str:
        """Step 3: which of the target's categories the recent items share, and how many recent items do."""
        target = set(self.item_categories[iid])
        recent = self.histories[uid][max(0, t - count):t]
        if not target or len(recent) == 0:
            return "unknown"
        shared = [c for c in self.item_categories[iid] if any(c in self.item_categories[i] for i in recent)]
        hits = sum(1 for i in recent if target & set(self.item_categories[i]))
        if not shared:
            return f"none of its categories appear in the last {len(recent)} items"
        return f"shares {', '.join(shared)} with {hits} of the last {len(recent)} items"


def build_item_material(config, item_tokens, table, text_fields, category_field, title_field):
    """Compact item texts, titles and category tuples aligned with internal item ids."""
    sep = config["seq_separator"] or " "
    for key, name in (("item_title_field", title_field), ("item_category_field", category_field)):
        if name and name not in table.field_types:  # e.g. an Amazon dataset's categories under the default genres
            logger.warning(f"{table.path} has no field {name!r} ({key}); its fields are "
                           f"{list(table.field_types)}: set --{key}=<field> (or ~ for none)")
    texts, titles, categories = [], [], []
    for token in item_tokens:
        row = table.rows.get(str(token))
        if row is None:  # [PAD], or an item absent from the .item file
            texts.append(""), titles.append(str(token)), categories.append(())
            continue
        parts = [_readable(row[f], sep) for _, f in text_fields if row.get(f, "").strip()]
        texts.append("; ".join(parts))
        titles.append(_readable(row.get(title_field, ""), sep) or str(token))
        raw = row.get(category_field, "") if category_field else ""
        categories.append(tuple(c.replace("_", " ") for c in raw.split(sep) if c))
    return texts, titles, categories


def build_histories(histories_by_token, user_tokens, item_token2id):
    """Internal-id histories and the (uid, iid) -> positions index."""
    histories, timestamps, positions = [], [], {}
    for uid, token in enumerate(user_tokens):
        history = histories_by_token.get(str(token))
        if history is None:
            histories.append(np.zeros(0, dtype=np.int64)), timestamps.append(np.zeros(0))
            continue
        items = np.array([item_token2id[str(i)] for i in history.items], dtype=np.int64)
        histories.append(items)
        timestamps.append(np.asarray(history.timestamps, dtype=np.float64))
        for t, iid in enumerate(items.tolist()):
            positions.setdefault((uid, iid), []).append(t)
    return histories, timestamps, positions
