"""Per-user ranking metrics from RecBole's own metric classes, so their means are its evaluator's numbers."""

import inspect

import numpy as np
from recbole.config import Config as RecBoleConfig
from recbole.evaluator.base_metric import TopkMetric
from recbole.evaluator.register import metrics_dict

from recbole_mllm import compat


def as_numpy(array):
    """A numpy copy of a numpy array, a torch tensor (any device) or a list."""
    return array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)


def split_metric_keys(keys):
    """``["ndcg@10", "hit@5", "gauc"]`` -> (``["ndcg", "hit"]``, ``[5, 10]``): RecBole's per-user (top-k) metrics."""
    pairs = [key.split("@") for key in keys if "@" in key]
    names = [name for name, _ in pairs if issubclass(metrics_dict.get(name, object), TopkMetric)]
    return list(dict.fromkeys(names)), sorted({int(k) for name, k in pairs if name in names})


def per_user_metrics(topk, metrics, cutoffs):
    """``{"ndcg@10": float array [n], ...}``: every top-k metric in ``metrics`` at every cut-off, per user.

    ``topk`` is RecBole's ``rec.topk`` ([n, maxk + 1]: 0/1 "the item at rank j is a positive", then the
    number of positives). Each value is what RecBole's metric class computes for that user, so a mean
    over users equals ``recbole.evaluator.Evaluator``'s result. Metrics that are not top-k metrics
    (AUC, ItemCoverage, ...) have no per-user value and are left out.
    """
    compat.apply_numpy_aliases()
    RecBoleConfig.compatibility_settings(None)  # RecBole's MRR reads np.float, which only its Config defines
    topk = as_numpy(topk)
    pos_index, pos_len = topk[:, :-1].astype(bool), topk[:, -1]
    config = {"topk": list(cutoffs), "metric_decimal_place": 4}
    values = {}
    for name in metrics:
        metric = metrics_dict[name.lower()](config)
        if not isinstance(metric, TopkMetric):
            continue
        n_args = len(inspect.signature(metric.metric_info).parameters)  # Hit/MRR take pos_index only
        by_rank = metric.metric_info(*(pos_index, pos_len)[:n_args])  # [n maxk]
        values.update({f"{name.lower()}@{k}": by_rank[:, k - 1].astype(float) for k in cutoffs})
    return values


def target_ranks(topk):
    """Each user's rank (1-based) of their first positive in RecBole's ``rec.topk`` ([n, maxk + 1]), 0 when none is
    within the top ``maxk``."""
    hits = as_numpy(topk)[:, :-1] > 0
    return np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, 0)
