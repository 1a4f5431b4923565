"""MLLMSRec's two-stage scoring: the encoder ranks the catalogue, the LLM rescores the encoder's top-K.

Under every protocol an item is scored by the LLM only when the encoder ranks it within its catalogue top
``rerank_top_k`` for the user; the other items follow in the encoder's order, below every LLM score. So
``uni100``'s sampled blocks and full ranking give an item the same score, and a score depends on the user
and the item alone: never on candidate order or on the block's other items.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

RERANK_FLOOR = 1000.0
"""Items the LLM does not rerank score ``-(RERANK_FLOOR + encoder rank)``: exact in float32 (whole numbers), so their
order is the encoder's, below every LLM score (log-odds, kept above ``-RERANK_FLOOR``)."""


@dataclass
class FirstStageRecall:
    """How often full ranking's targets were in the encoder's top ``k`` (the items the LLM can reorder) and in its top
    50 and 100 (the room a larger ``rerank_top_k`` would give), and how many of the unmasked top 10 and top 20 the user
    had already interacted with (what a history mask takes out)."""

    k: int
    hits: int = 0
    users: int = 0
    seen_in_top: dict = field(default_factory=lambda: {10: 0, 20: 0})
    hits_in_top: dict = field(default_factory=lambda: {50: 0, 100: 0})

    def reset(self):
        self.hits = self.users = 0
        self.seen_in_top = dict.fromkeys(self.seen_in_top, 0)
        self.hits_in_top = dict.fromkeys(self.hits_in_top, 0)

    @property
    def value(self):
        return self.hits / self.users if self.users else float("nan")

    def at(self):
        """``{"recall@k": ...}`` at ``k`` and at the wider cutoffs, in increasing order."""
        hits = {**self.hits_in_top, self.k: self.hits}
        return {f"recall@{cutoff}": hits[cutoff] / self.users if self.users else float("nan") for cutoff in sorted(hits)}

    def seen_share(self, cutoff):
        """Share of the unmasked first stage's top ``cutoff`` items that are in the user's history before ``t``."""
        return self.seen_in_top[cutoff] / (cutoff * self.users) if self.users else float("nan")


class TwoStageScorer:
    """Scores candidates by the two stages; the LLM's scores come from the ``llm_scores`` function each call passes.

    ``llm_scores(uids, ts, user_states, candidates, owner)`` scores ``candidates[c]`` for user row ``owner[c]``.

    Args:
        encoder: the sequence encoder (``full_scores``, ``item_states``); the first stage.
        histories: per internal user id, its items in time order (for ``mask_history``).
        rerank_top_k: the LLM scores an item only within the encoder's top-K for the user.
        mask_history: rank only items outside the user's history before ``t`` (the protocol's ``mask_history``; the
            model's ``scoring(mask_history=...)`` sets it per evaluation loader).
        candidates_per_forward: most candidates per LLM call.
        fusion_weight: late fusion, the fallback compared against: LLM score + w * encoder score (0: LLM alone).
        residual: the reranked score is the encoder's score plus the LLM's (``ranker_residual``: the model scales the
            LLM's log-odds by a gate that starts at 0, so the first step reranks nothing).
    """

    def __init__(self, encoder, histories, rerank_top_k, mask_history, candidates_per_forward, fusion_weight=0.0,
                 residual=False):
        self.residual = bool(residual)
        self.encoder, self.histories = encoder, histories
        self.rerank_top_k, self.mask_history = rerank_top_k, bool(mask_history)
        self.candidates_per_forward = candidates_per_forward
        self.fusion_weight = float(fusion_weight or 0.0)
        self.encoder_only = False  # the first stage alone (the trainer's warm-up and first-stage report)
        self.recall = FirstStageRecall(rerank_top_k)
        self._memo = None  # LLM scores by (user, position, item, history mask) while reuse_llm_scores() is on

    # ------------------------------------------------------------------ the first stage
    @torch.no_grad()
    def catalogue_scores(self, user_states, uids=None, ts=None):
        """The first stage: the encoder's float32 scores of every item ``[U n_items]``, padding at -inf, and under
        ``mask_history`` (when ``uids``/``ts`` are given) each user's history before ``t`` too.

        The one scoring function of the first stage: its full ranking, its ``uni100`` scores, the candidates the LLM
        reranks, the ranks in the prompt and the LLM's training lists all read it. Float32 outside autocast, so ranks
        and the first stage's order are the same in training and evaluation.
        """
        with torch.autocast(user_states.device.type, enabled=False):
            scores = self.encoder.full_scores(user_states.float())  # [U n_items]
        scores[:, 0] = -torch.inf  # padding
        return self.masked(scores, uids, ts) if uids is not None else scores

    def masked(self, scores, uids, ts, seen=None):
        """``scores`` with each row's history before its ``t`` at -inf under ``mask_history`` (in place); ``seen``: that
        history's ``seen_index``, when the caller has it already."""
        if self.mask_history:
            scores[seen if seen is not None else self.seen_index(uids, ts, scores.device)] = -torch.inf
        return scores

    def seen_index(self, uids, ts, device):
        """``(rows, items)`` of each row's history before its ``t``: the items ``mask_history`` masks."""
        rows = [b for b, t in enumerate(ts) for _ in range(t)]
        cols = [int(i) for u, t in zip(uids, ts) for i in self.histories[u][:t]]
        return (torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(cols, dtype=torch.long, device=device))

    def sampled_first_stage(self, uids, ts, user_states, candidates, owner):
        """The first stage's scores of sampled candidates ``[C]`` (``candidates[c]`` for user row ``owner[c]``)."""
        return self.catalogue_scores(user_states, uids, ts)[owner, candidates]

    @staticmethod
    def ranks(catalogue, candidates, owner, chunk=256):
        """1 + the number of items ``catalogue[owner[c]]`` scores above ``candidates[c]`` ``[C]``."""
        own = catalogue[owner, candidates]
        return torch.cat([(catalogue[o] > s.unsqueeze(1)).sum(1) for o, s in zip(owner.split(chunk), own.split(chunk))]) + 1

    @torch.no_grad()
    def retrieval_ranks(self, user_states, candidates, owner, uids, ts):
        """The first stage's catalogue rank of each candidate for its user (history masked as the catalogue is), as
        written into the prompt.

        A function of the user and the item alone (never of the other candidates in a block), so it can
        be written into the prompt without breaking order invariance or revealing the target.
        """
        return self.ranks(self.catalogue_scores(user_states, uids, ts), candidates, owner).tolist()

    # ------------------------------------------------------------------ the second stage
    @contextmanager
    def reuse_llm_scores(self):
        """Inside the block, the LLM scores an item for a user at a position (under one history mask) once.

        A score depends on the user, the position and the item alone (the prompt's rank is the catalogue's under the
        mask; a list-wise prompt's list is the catalogue's top-K under it), so with the weights fixed it can be reused:
        by passes over the same data that differ only in ``fusion_weight`` (``scripts/score_fusion_eval.py``, the
        trainer's late-fusion choice and LLM-alone report), and by a run's test protocols (``quick_start.run``), whose
        sampled candidates inside the encoder's top-K are among those full ranking reranks. The remembered scores are
        dropped at the end of the outermost block (a nested block shares them).
        """
        if self._memo is not None:
            yield
            return
        self._memo = {}
        try:
            yield
        finally:
            self._memo = None

    def score_blocks(self, uids, ts, user_states, candidates, owner, llm_scores):
        """LLM scores in chunks of whole users, at most ``candidates_per_forward`` candidates each; inside
        ``reuse_llm_scores`` only of the candidates not scored before."""
        if self._memo is None:
            return self._score_blocks(uids, ts, user_states, candidates, owner, llm_scores)
        keys = [(uids[o], ts[o], c, self.mask_history) for o, c in zip(owner.tolist(), candidates.tolist())]
        first = {}  # each key not scored yet, at its first place in the block (a sampled block may repeat an item)
        for k, key in enumerate(keys):
            if key not in self._memo:
                first.setdefault(key, k)
        new = list(first.values())
        if new:
            new = torch.tensor(new, device=candidates.device)
            users, local = torch.unique(owner[new], return_inverse=True)
            scores = self._score_blocks([uids[u] for u in users.tolist()], [ts[u] for u in users.tolist()],
                                        user_states[users], candidates[new], local, llm_scores)
            self._memo.update((keys[k], score) for k, score in zip(new.tolist(), scores.tolist()))
        return torch.tensor([self._memo[key] for key in keys], device=user_states.device)

    def _score_blocks(self, uids, ts, user_states, candidates, owner, llm_scores):
        scores = torch.empty(len(candidates), device=user_states.device)
        counts = torch.bincount(owner, minlength=len(uids)).tolist()
        start = 0
        while start < len(uids):
            end, total = start + 1, counts[start]
            while end < len(uids) and total + counts[end] <= self.candidates_per_forward:
                total += counts[end]
                end += 1
            chosen = ((owner >= start) & (owner < end)).nonzero().squeeze(1)
            scores[chosen] = llm_scores(uids[start:end], ts[start:end], user_states[start:end],
                                        candidates[chosen], owner[chosen] - start).to(scores.dtype)
            start = end
        return scores

    def two_stage(self, uids, ts, user_states, candidates, owner, own, ranks, llm_scores):
        """Final scores ``[C]``: the LLM's for candidates of encoder rank <= ``rerank_top_k``, below them the rest
        as ``-(RERANK_FLOOR + rank)``.

        ``own[c]`` is the encoder's catalogue score of ``candidates[c]`` (-inf for excluded items). Ranks rather
        than -inf or an offset score: no two candidates of different encoder score tie (float32 loses
        the encoder's small gaps under a large offset), so no tie-break (which could follow the position of the
        positive in a block) ever decides a metric, and metrics beyond ``rerank_top_k`` keep the encoder's order.
        """
        scores = torch.where(torch.isfinite(own), -(RERANK_FLOOR + ranks.float()), own)  # excluded items stay -inf
        chosen = (ranks <= self.rerank_top_k).nonzero().squeeze(1)
        if len(chosen):
            users, local = torch.unique(owner[chosen], return_inverse=True)  # only users with something to rerank
            llm = self.score_blocks([uids[u] for u in users.tolist()], [ts[u] for u in users.tolist()],
                                    user_states[users], candidates[chosen], local, llm_scores).float()
            if self.fusion_weight:  # the fallback to compare against: the encoder's score added beside the LLM's
                llm = llm + self.fusion_weight * own[chosen]
            if self.residual:  # the LLM's gated score is a correction of the encoder's
                llm = llm + own[chosen]
            scores[chosen] = llm.clamp(min=1.0 - RERANK_FLOOR)
        return scores

    # ------------------------------------------------------------------ RecBole's two evaluation forms
    def sampled(self, uids, ts, user_states, candidates, owner, llm_scores):
        """Scores of sampled candidates ``[C]`` (``candidates[c]`` for user row ``owner[c]``)."""
        catalogue = self.catalogue_scores(user_states, uids, ts)
        ranks = self.ranks(catalogue, candidates, owner)
        return self.two_stage(uids, ts, user_states, candidates, owner, catalogue[owner, candidates], ranks, llm_scores)

    def full(self, uids, ts, user_states, targets, llm_scores):
        """Scores of every item ``[U n_items]``: the encoder's top-K reranked by the LLM, the rest in the encoder's
        order (the LLM never scores the whole catalogue); counts the first stage's recall of ``targets``."""
        unmasked = self.catalogue_scores(user_states)  # [B n_items] float32
        seen = self.seen_index(uids, ts, unmasked.device)
        self._count_seen(unmasked, seen)
        catalogue = self.masked(unmasked.clone(), uids, ts, seen)  # what catalogue_scores(user_states, uids, ts) gives
        ascending = catalogue.sort(dim=1).values
        ranks = catalogue.shape[1] + 1 - torch.searchsorted(ascending, catalogue, right=True)  # as ranks() counts them
        items = torch.arange(catalogue.shape[1], device=catalogue.device).repeat(len(uids))
        owner = torch.arange(len(uids), device=catalogue.device).repeat_interleave(catalogue.shape[1])
        scores = self.two_stage(uids, ts, user_states, items, owner, catalogue.view(-1), ranks.view(-1), llm_scores)
        scores = scores.view_as(catalogue)
        top = catalogue.topk(self.rerank_top_k, dim=1).indices  # [B K]
        # stage-1 recall is measured after scoring and never feeds back into a score
        self.recall.hits += int((top == targets.view(-1, 1)).any(1).sum())
        self.recall.users += len(uids)
        for cutoff in self.recall.hits_in_top:
            wide = catalogue.topk(min(cutoff, catalogue.shape[1]), dim=1).indices
            self.recall.hits_in_top[cutoff] += int((wide == targets.view(-1, 1)).any(1).sum())
        return scores

    def _count_seen(self, unmasked, seen_index):
        """Counts how many of the unmasked first stage's top 10 and top 20 are in each user's history before ``t``
        (``seen_index``)."""
        seen = torch.zeros_like(unmasked, dtype=torch.bool)
        seen[seen_index] = True
        for cutoff in self.recall.seen_in_top:
            top = unmasked.topk(min(cutoff, unmasked.shape[1]), dim=1).indices
            self.recall.seen_in_top[cutoff] += int(seen.gather(1, top).sum())
