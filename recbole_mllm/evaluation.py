"""Per-user evaluation records: what RecBole evaluated, user by user, for paired tests and slices.

RecBole's ``Collector`` builds one ``rec.topk`` row per evaluated user (hits in the top ``max(topk)`` and
the number of positives) and its evaluator averages metrics over those rows. ``PerUserCollector`` keeps
those very rows with each user's id and target, so per-user NDCG (and the paired significance tests
and cold-item slices built on it) comes from the scores RecBole evaluated, not from a private metric.
"""

import inspect

import numpy as np
import torch
from recbole.config import Config as RecBoleConfig
from recbole.evaluator import Collector
from recbole.evaluator.base_metric import TopkMetric
from recbole.evaluator.register import metrics_dict
from scipy.stats import wilcoxon

from recbole_mllm import compat, distributed
from recbole_mllm.data.histories import internal_histories
from recbole_mllm.data.split import held_out_rows


class PerUserCollector(Collector):
    """RecBole's ``Collector`` that also records, per evaluation, each user's id, target and ``rec.topk`` row.

    While ``recording`` is True, ``evaluations`` gets one dict per ``get_data_struct`` call (one per
    ``trainer.evaluate``), in order: ``{"user_id": int64[n], "target_item": int64[n], "topk": int64[n, max(topk) + 1]}``.
    Off by default, so the validations of training keep nothing.

    Under ``torchrun`` each rank evaluates a share of the users; the ``rec.topk`` rows of every rank are gathered
    (a user repeated by ``DistributedSampler``'s padding counted once), so every rank computes the metrics of all
    users, exactly as one process would, and records them.
    """

    def __init__(self, config):
        super().__init__(config)
        self.uid_field = config["USER_ID_FIELD"]
        self.recording = False
        self.evaluations = []
        self._users, self._targets = [], []

    def eval_batch_collect(self, scores_tensor, interaction, positive_u, positive_i):
        super().eval_batch_collect(scores_tensor, interaction, positive_u, positive_i)
        if not self.recording and not distributed.active():
            return
        # a batch holds each user's rows contiguously (one row under full ranking, a block of 1 + N when sampled),
        # in the order of the score rows
        users = torch.unique_consecutive(interaction[self.uid_field].cpu())
        if len(users) != scores_tensor.shape[0] or len(positive_u) != len(users):
            raise ValueError(f"per-user records need one target per user and contiguous rows per user: "
                             f"{len(users)} users, {scores_tensor.shape[0]} score rows, {len(positive_u)} targets")
        targets = torch.empty(len(users), dtype=torch.long)
        targets[positive_u.cpu()] = positive_i.cpu().long()
        self._users.append(users.long())
        self._targets.append(targets)

    def get_data_struct(self):
        struct = super().get_data_struct()
        if "rec.topk" in struct and (self.recording or distributed.active()):
            users, targets, topk = torch.cat(self._users), torch.cat(self._targets), struct["rec.topk"].cpu()
            if distributed.active():
                users, targets, topk = self._gathered(users, targets, topk)
                struct.set("rec.topk", topk)
            if self.recording:
                self.evaluations.append({"user_id": users.numpy(), "target_item": targets.numpy(),
                                         "topk": topk.long().numpy()})
        self._users, self._targets = [], []
        return struct

    @staticmethod
    def _gathered(users, targets, topk):
        """Every rank's rows in the loader's own order, each user once.

        ``DistributedSampler`` (unshuffled) deals the loader's users to the ranks in turn, one row each, padding the
        last round with the first users again; interleaving the ranks' rows restores the order one process sees,
        and the padding's repeats are dropped.
        """
        parts = distributed.gather((users, targets, topk))
        order = [(k, r) for k in range(max(len(part[0]) for part in parts)) for r in range(len(parts))
                 if k < len(parts[r][0])]
        users, targets, topk = (torch.stack([parts[r][i][k] for k, r in order]) for i in range(3))
        _, first = np.unique(users.numpy(), return_index=True)
        keep = torch.from_numpy(np.sort(first))
        return users[keep], targets[keep], topk[keep]


def user_item_statistics(dataset, config):
    """``(item_train_count [n_items], test_history_length [n_users])`` of a dataset before ``build()``.

    An item's training interactions exclude each user's held-out ones (the evaluation targets, as
    ``data.split`` counts them for the configured split); a user's history at test is every interaction
    before the last one. Time order as RecBole sorts it (stable on the float32 timestamp, then by user).
    """
    histories = internal_histories(dataset)
    per_user = np.array([len(h) for h in histories], dtype=np.int64)
    train_items = [h[:len(h) - int(held_out_rows(len(h), config))] for h in histories]
    item_train_count = np.bincount(np.concatenate([np.zeros(0, dtype=np.int64), *train_items]).astype(np.int64),
                                   minlength=dataset.item_num)
    return item_train_count, np.maximum(per_user - 1, 0)


def per_user_record(evaluation, item_train_count, history_length):
    """One evaluation's record with the slice features the comparison reads."""
    return {**evaluation, "target_train_count": item_train_count[evaluation["target_item"]],
            "history_length": history_length[evaluation["user_id"]]}


def as_numpy(array):
    """A numpy copy of a numpy array, a torch tensor (any device) or a list."""
    return array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)


def is_top_k_metric(name):
    """Whether RecBole's metric ``name`` (``"ndcg"``, any case) is a top-k metric, the kind with a per-user value."""
    return issubclass(metrics_dict.get(str(name).lower(), object), TopkMetric)


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


def per_user_metric(evaluation, metric):
    """``(user_id [n], values [n])`` of one top-k ``metric`` (``"ndcg@10"``) in one ``PerUserCollector`` evaluation,
    sorted by user so two evaluations of the same users pair up."""
    name, cutoff = metric.lower().split("@")
    order = np.argsort(evaluation["user_id"], kind="stable")
    values = per_user_metrics(evaluation["topk"][order], [name], [int(cutoff)])[metric.lower()]
    return evaluation["user_id"][order], values


def one_sided_p(values, reference):
    """p of a one-sided Wilcoxon signed-rank test that ``values`` are above ``reference`` (paired arrays); 1.0 when
    no pair differs (scipy raises there)."""
    if not np.any(values != reference):
        return 1.0
    return float(wilcoxon(values, reference, zero_method="wilcox", alternative="greater").pvalue)


def keeps_first_stage(p_over_first_stage, alpha, chosen_score, first_stage_score):
    """The late-fusion fallback's rule (``first_stage_fallback_alpha``): the first stage ranks the test unless the
    chosen weight beats it on validation, both significantly (``p_over_first_stage`` below ``alpha``) and in the mean
    (Wilcoxon ranks the sizes of the differences, so many small gains can outweigh a few large losses)."""
    return not (p_over_first_stage < alpha and chosen_score > first_stage_score)
