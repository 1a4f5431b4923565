"""Per-user ranking metrics from RecBole's own metric classes, so their means are its evaluator's numbers."""

import numpy as np

from recbole_mllm.evaluation import as_numpy, is_top_k_metric, per_user_metrics  # noqa: F401  (the comparison's names)


def split_metric_keys(keys):
    """``["ndcg@10", "hit@5", "gauc"]`` -> (``["ndcg", "hit"]``, ``[5, 10]``): RecBole's per-user (top-k) metrics."""
    pairs = [key.split("@") for key in keys if "@" in key]
    names = [name for name, _ in pairs if is_top_k_metric(name)]
    return list(dict.fromkeys(names)), sorted({int(k) for name, k in pairs if name in names})


def target_ranks(topk):
    """Each user's rank (1-based) of their first positive in RecBole's ``rec.topk`` ([n, maxk + 1]), 0 when none is
    within the top ``maxk``."""
    hits = as_numpy(topk)[:, :-1] > 0
    return np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, 0)
