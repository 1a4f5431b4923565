"""MLLMSRec's ranker prompts, part by part: a user's part (shared by its candidates) and one target part each.

Values come from the :class:`~recbole_mllm.model.mllmsrec.context.RankerContext` (texts, history, chain-of-thought
steps) and the user-profile stage's summaries; the layout and the tokenising are ``prompting.py``'s.
Only the user's interactions before the target position ``t`` reach a user part.
"""

from __future__ import annotations

from recbole_mllm.model.mllmsrec.prompting import OPTION_LETTERS, PieceTokenizer, PromptLayout, SoftSlot, assemble
from recbole_mllm.model.mllmsrec.ranker import PromptBatch, joined


class PromptParts:
    """Token ids and soft slots of the ranker's prompt parts.

    Args:
        context: the ranker context (items, histories, profiles) indexed by internal ids.
        summaries: ``{(uid, t): preference summary}``, the positions the split needs (``data.split``).
        layout: the template's two parts as pieces; ``tokenizer`` the LLM's.
        field_tokens: most tokens kept of a field value (``item_summary``, ``preference``, ``item_text``).
        recent_count: recent items named in the prompt and read by the match step.
        use_summaries: write the preference summary (False: "unknown"; an ablation switch).
        catalog_size: items in the catalogue, written beside the retrieval rank.
        dataset_name: named in the error of a missing summary.
    """

    def __init__(self, context, summaries: dict, layout: PromptLayout, tokenizer, field_tokens: dict,
                 recent_count: int, use_summaries: bool, catalog_size: int, dataset_name: str):
        self.context, self.summaries, self.layout = context, summaries, layout
        self.tokenize = PieceTokenizer(tokenizer)
        self.field_tokens, self.recent_count = field_tokens, recent_count
        self.use_summaries, self.catalog_size, self.dataset_name = use_summaries, catalog_size, dataset_name
        self.has_retrieval_rank = any(p.kind == "field" and p.value == "retrieval_rank"
                                      for p in getattr(layout, "target", ()))  # a ListLayout has none: order is rank

    def summary(self, uid, t):
        """The user's preference summary at ``t``; a missing one is an error, never a silent "unknown" in the prompt."""
        if (uid, t) not in self.summaries:
            raise KeyError(f"no user summary for user {self.context.user_tokens[uid]!r} at position {t}: the summaries "
                           f"loaded are the positions the split needs (data.split.needed_positions); rebuild the cache "
                           f"with the run's config: python -m recbole_mllm.stages.user_profile --dataset={self.dataset_name} "
                           f"[--key=value ...]")
        return self.summaries[(uid, t)]

    def recent_items(self, uid, t, recent_tokens):
        """The recent-items field: titles joined by "; ", or with ``recent_tokens`` (``[n, H]``, one per recent item:
        ``ranker_use_recent_states``) each title followed by its item's soft token, LLaRA's hybrid item representation."""
        if recent_tokens is None:
            return self.context.recent_titles(uid, t, self.recent_count)
        items = self.context.recent_items(uid, t, self.recent_count)
        segments = []
        for k, item in enumerate(items):
            segments += ["; " if k else "", self.context.item_title[item] + " ", SoftSlot("recent_states")]
        return segments or "none"

    def user_part(self, uid, t, user_token, recent_tokens=None):
        """Token ids and soft slots of a user's shared prompt part; ``user_token`` is its soft embedding ``[1, H]``,
        ``recent_tokens`` those of its recent items (or None: titles only)."""
        preference = self.summary(uid, t) if self.use_summaries else "unknown"
        values = {"user_id": self.context.user_tokens[uid], "profile": self.context.profiles[uid],
                  "preference": preference, "evolution": self.context.evolution(uid, t, self.recent_count),
                  "recent_items": self.recent_items(uid, t, recent_tokens)}
        ids, slots = assemble(self.layout.user, values, {"user_state": 1}, self.tokenize, self.field_tokens)
        soft = {"user_state": (slots.get("user_state"), user_token), "recent_states": (slots.get("recent_states"), recent_tokens)}
        return ids, {name: value for name, value in soft.items() if value[0]}

    def target_part(self, uid, t, iid, item_token, match_token, image_tokens, rank):
        """Token ids and soft slots of one candidate's prompt part (``image_tokens`` None: no image)."""
        values = {"user_id": self.context.user_tokens[uid], "item_text": self.context.item_text[iid],
                  "item_summary": self.context.item_summary[iid],
                  "match": self.context.match(uid, t, iid, self.recent_count),
                  "retrieval_rank": rank, "catalog_size": self.catalog_size}
        sizes = {"item_state": 1, "match_state": 1, "image": 0 if image_tokens is None else image_tokens.shape[0]}
        ids, slots = assemble(self.layout.target, values, sizes, self.tokenize, self.field_tokens)
        soft = {"item_state": (slots.get("item_state"), item_token), "match_state": (slots.get("match_state"), match_token),
                "image": (slots.get("image"), image_tokens)}
        return ids, {name: value for name, value in soft.items() if value[0]}

    def list_prompt(self, uid, t, user_token, items, item_tokens, recent_tokens=None):
        """A list-wise prompt ``(ids, soft)`` (``ListLayout``): the user's part, one lettered line per item of ``items``
        in order with its soft token (``item_tokens[k]`` ``[1, H]``), then the question and the answer cue."""
        parts = [self.user_part(uid, t, user_token, recent_tokens)]
        for k, item in enumerate(items):
            ids, slots = assemble(self.layout.line, {"option": OPTION_LETTERS[k], "item_text": self.context.item_text[item],
                                                     "user_id": self.context.user_tokens[uid]},
                                  {"item_state": 1}, self.tokenize, self.field_tokens)
            parts.append((ids, {"item_state": (slots["item_state"], item_tokens[k])} if slots.get("item_state") else {}))
        parts.append((assemble(self.layout.tail, {}, {}, self.tokenize, self.field_tokens)[0], {}))
        return joined(parts)

    def batch(self, uids, ts, owner, candidates, user_tokens, item_tokens, match_tokens, image_tokens, ranks,
              recent_tokens=None):
        """``(users, targets)`` prompt batches: one user part per ``uids[k]`` at ``ts[k]`` (with ``recent_tokens[k]``
        when given), one target part per candidate ``c`` of user row ``owner[c]``, with its soft tokens, image tokens
        (or None) and rank."""
        recent_tokens = recent_tokens or [None] * len(uids)
        users = PromptBatch(*zip(*[self.user_part(u, t, user_tokens[k], recent_tokens[k])
                                   for k, (u, t) in enumerate(zip(uids, ts))]))
        targets = PromptBatch(*zip(*[self.target_part(uids[o], ts[o], i, item_tokens[c], match_tokens[c],
                                                      image_tokens[c], ranks[c])
                                     for c, (o, i) in enumerate(zip(owner.tolist(), candidates.tolist()))]))
        return users, targets
