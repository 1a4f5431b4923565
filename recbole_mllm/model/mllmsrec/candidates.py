"""What the LLM trains on: which training rows, and the negatives beside each positive.

The split rules are the data layer's (``data.split``): a user's training items are those before its first
held-out position, and the LLM trains on the user's last ``llm_train_targets_per_user`` training targets,
the positions the user-profile stage wrote summaries for. Valid and test targets are labels, never a
negative's filter.
"""

from __future__ import annotations

import numpy as np
import torch

from recbole_mllm.data.split import needed_positions, user_split

TRAIN_CANDIDATE_RULES = ("sampled", "top_k")
"""Values of ``ranker_train_candidates`` (see :class:`TrainingCandidates`)."""


class TrainingCandidates:
    """The LLM's training rows and, per positive, its negatives, by one of two rules (``ranker_train_candidates``):

    * ``sampled`` (the paper's pointwise fine-tuning): every training target, with ``ranker_hard_negatives`` from the
      encoder's top ``rerank_top_k`` and the rest uniform, all unseen by the user in training;
    * ``top_k`` (train as tested): only targets the encoder ranks within its top ``rerank_top_k`` under evaluation's
      rule, with ``ranker_train_negatives`` of the other items of that same list: the lists the LLM reranks at test.

    Args:
        histories: per internal user id, its internal item ids in time order (the whole history).
        positions: ``{(uid, iid): [positions of the item in the user's history]}``.
        n_items: RecBole's item count (id 0 is padding).
        config: reads the split, ``ranker_train_negatives``, ``ranker_hard_negatives``, ``rerank_top_k``.
        user_field, target_field: the interaction columns of the user id and the target item.
    """

    def __init__(self, histories, positions, n_items, config, user_field, target_field):
        self.positions, self.n_items = positions, n_items
        self.user_field, self.target_field = user_field, target_field
        self.rule = config["ranker_train_candidates"]
        if self.rule not in TRAIN_CANDIDATE_RULES:
            raise ValueError(f"ranker_train_candidates: {self.rule!r} is none of {', '.join(TRAIN_CANDIDATE_RULES)}")
        self.n_negatives = config["ranker_train_negatives"]
        self.n_hard = min(config["ranker_hard_negatives"], self.n_negatives)
        self.rerank_top_k = config["rerank_top_k"]
        self.user_seen = [set(h[:user_split(len(h), config).first_held_out].tolist()) for h in histories]
        # the LLM trains on positions t >= this: the first of the positions the user-profile stage built
        # summaries for (so every training prompt has its summary); training rows stop before held-out t
        self.llm_train_from = [min(needed_positions(len(h), config), default=len(h)) for h in histories]

    def sample_negatives(self, uid, count, taken=()):
        """``count`` uniform items the user never interacted with (before valid/test) and not in ``taken``."""
        seen, out = self.user_seen[uid], list(taken)
        while len(out) < len(taken) + count:
            item = int(np.random.randint(1, self.n_items))
            if item not in seen and item not in out:
                out.append(item)
        return out[len(taken):]

    @torch.no_grad()
    def hard_negatives(self, uid, scores):
        """``ranker_hard_negatives`` unseen items drawn from the encoder's top ``rerank_top_k`` for this user.

        These are the items full ranking asks the LLM to reorder; uniform negatives alone never teach it that.
        """
        scores = scores.float().clone()
        scores[0] = -torch.inf
        seen = torch.tensor(sorted(self.user_seen[uid]), dtype=torch.long, device=scores.device)
        scores[seen] = -torch.inf
        top = scores.topk(self.rerank_top_k).indices
        top = top[torch.isfinite(scores[top])]
        picked = torch.randperm(len(top))[:self.n_hard]
        return top[picked.to(top.device)].tolist()

    def llm_rows(self, interaction, positions_of):
        """The rows the LLM trains on, and their positions ``t``: each user's last ``llm_train_targets_per_user``
        training targets (``t >= llm_train_from``); ``positions_of(interaction)`` gives each row's ``t``.

        The target filters cheaply first (training may read it): a row at ``t`` has its target at ``t`` or earlier
        than the item's last occurrence. The position is then the row's own, from its input sequence as in
        evaluation: a user who repeats an item has that item as the target of several rows, and only the late
        ones are kept.
        """
        uids, targets = interaction[self.user_field].tolist(), interaction[self.target_field].tolist()
        rows = [r for r, (u, i) in enumerate(zip(uids, targets))
                if self.positions[(u, i)][-1] >= self.llm_train_from[u]]
        if not rows:
            return [], []
        ts = positions_of(interaction[torch.tensor(rows, device=interaction[self.user_field].device)])
        kept = [(r, t) for r, t in zip(rows, ts) if t >= self.llm_train_from[uids[r]]]
        return [r for r, _ in kept], [t for _, t in kept]

    def for_rows(self, uids, targets, rows, encoder_scores):
        """``(candidates, owner, labels)`` of the LLM's training rows: per row its target (label 1), then its
        hard and uniform negatives (label 0); ``owner[c]`` is the index in ``rows`` of candidate ``c``."""
        candidates, owner, labels = [], [], []
        for k, r in enumerate(rows):
            hard = self.hard_negatives(uids[r], encoder_scores[r]) if self.n_hard else []
            items = [targets[r]] + hard + self.sample_negatives(uids[r], self.n_negatives - len(hard), hard)
            candidates += items
            owner += [k] * len(items)
            labels += [1] + [0] * (len(items) - 1)
        return candidates, owner, labels

    def top_k_lists(self, catalogue, targets):
        """``[(row, its top-K list)]`` of the rows whose target is inside their top ``rerank_top_k`` of ``catalogue``
        (items at -inf never listed): the only rows that train the LLM under ``top_k``."""
        top = catalogue.topk(min(self.rerank_top_k, catalogue.shape[1]), dim=1)
        lists = ([item for item, score in zip(items, scores) if score != float("-inf")]
                 for items, scores in zip(top.indices.tolist(), top.values.tolist()))
        return [(row, listed) for row, (listed, target) in enumerate(zip(lists, targets)) if target in listed]

    def from_top_k(self, catalogue, targets):
        """Train as tested: ``(kept, candidates, owner, labels)`` from each row's top ``rerank_top_k`` of ``catalogue``.

        ``catalogue`` ``[R n_items]``: the encoder's scores of each row as evaluation computes them (the scorer's
        ``catalogue_scores``: padding, and under ``mask_history`` the history before ``t``, at -inf). A row whose
        target is outside its top-K is dropped (at test the LLM never sees such a target); ``kept`` lists the rows
        kept. A kept row gives its target (label 1), then ``ranker_train_negatives`` other items of its top-K drawn
        uniformly (label 0); ``owner[c]`` indexes ``kept``.
        """
        kept, candidates, owner, labels = [], [], [], []
        for row, listed in self.top_k_lists(catalogue, targets):
            target = targets[row]
            others = [item for item in listed if item != target]
            picked = [others[j] for j in torch.randperm(len(others))[:self.n_negatives].tolist()]
            owner += [len(kept)] * (1 + len(picked))
            candidates += [target] + picked
            labels += [1] + [0] * len(picked)
            kept.append(row)
        return kept, candidates, owner, labels
