"""Evaluation loaders every compared model shares: sampled candidates fixed per user, and full ranking that
masks each user's history as the field's protocol does.

Sampled-ranking evaluation on fixed, unseen candidates that are the same for every model compared:

RecBole draws evaluation negatives from numpy's global random state while it iterates, so they depend
on how much randomness the model consumed while training; and for sequential data its sampler may
return items the user has already interacted with (``repeatable: True`` only excludes the target).
Here each user's negatives are drawn without replacement from the items the user never interacted
with, by a random generator seeded by (seed, phase, user) alone: identical for every model, batch
size and run, and never an item from the user's history.
"""

import zlib

import numpy as np
import torch
from recbole.data.dataloader import FullSortEvalDataLoader, NegSampleEvalDataLoader, TrainDataLoader
from recbole.data.interaction import cat_interactions
from torch.utils.data.distributed import DistributedSampler


class FixedCandidateEvalDataLoader(NegSampleEvalDataLoader):
    """``NegSampleEvalDataLoader`` whose uniform negatives are fixed per (seed, phase, user) and unseen.

    Args:
        neg_sample_args (dict): ``{"distribution": "uniform", "sample_num": N}`` (RecBole's ``uniN``).
        seed (int): base seed; with the sampler's phase and the user id it fixes the candidates.
        user_items (list of np.ndarray): every item each user interacted with, indexed by user id;
            none of them is ever drawn as a negative.

    Each user's rows come as one block: the positive first, then its ``N`` negatives (RecBole's
    layout). Models must therefore never read meaning into a candidate's position in the block.
    """

    def __init__(self, config, dataset, sampler, neg_sample_args, seed, user_items):
        if neg_sample_args["distribution"] != "uniform":
            raise ValueError(f"Fixed-candidate evaluation samples uniformly; got {neg_sample_args}.")
        self._protocol_neg_sample_args = dict(neg_sample_args)
        self._seed = int(seed)
        self._user_items = user_items
        super().__init__(config, dataset, sampler, shuffle=False)

    @property
    def masks_history(self):
        """The candidates are unseen items; a first stage that picks which of them to rerank ranks the catalogue
        under the protocol's ``mask_history``, as full ranking does."""
        return bool(self.config["mask_history"])

    def _set_neg_sample_args(self, config, dataset, dl_format, neg_sample_args):
        super()._set_neg_sample_args(config, dataset, dl_format, self._protocol_neg_sample_args)

    def _user_rng(self, uid):
        phase = self._sampler.phase or "test"
        return np.random.default_rng(zlib.crc32(f"{self._seed}/{phase}/{int(uid)}".encode()))

    def _unseen_negatives(self, uid, num_rows):
        """``num_rows * N`` negatives laid out as RecBole expects: negative k of row j at ``k*num_rows + j``."""
        n, item_num = self.neg_sample_num, self._dataset.item_num
        rng = self._user_rng(uid)
        seen = set(self._user_items[uid].tolist())
        if item_num - 1 - len(seen) <= 0:
            raise ValueError(f"User {self._dataset.id2token(self.uid_field, uid)} has interacted with every item: "
                             f"no unseen negative exists.")
        per_row = []
        for _ in range(num_rows):
            if item_num - 1 - len(seen) >= n:  # enough unseen items: n distinct ones
                picks, taken = [], set(seen)
                while len(picks) < n:
                    for item in rng.integers(1, item_num, size=2 * n).tolist():
                        if item not in taken:
                            taken.add(item)
                            picks.append(item)
                            if len(picks) == n:
                                break
            else:  # tiny catalogues: repeat unseen items
                picks = rng.choice(np.setdiff1d(np.arange(1, item_num), list(seen)), n).tolist()
            per_row.append(picks)
        return torch.tensor(np.array(per_row, dtype=np.int64).T.reshape(-1))

    def collate_fn(self, index):
        data_list, idx_list, positive_u, positive_i = [], [], [], []
        for idx, uid in enumerate(self.uid_list[np.array(index)]):
            rows = self.transform(self._dataset, self._dataset[self.uid2index[uid]])
            negatives = self._unseen_negatives(uid, len(rows))
            data_list.append(self._neg_sample_by_point_wise_sampling(rows, negatives))
            idx_list += [idx] * (self.uid2items_num[uid] * self.times)
            positive_u += [idx] * self.uid2items_num[uid]
            positive_i.append(rows[self.iid_field])
        return (
            cat_interactions(data_list),
            torch.tensor(idx_list, dtype=torch.long),
            torch.tensor(positive_u, dtype=torch.long),
            torch.cat(positive_i),
        )


class HistoryMaskedFullSortEvalDataLoader(FullSortEvalDataLoader):
    """RecBole's full-ranking loader that also masks, for sequential models, the items each user interacted with
    before its target: every published full-ranking number (SASRec+, eSASRec, HSTU, LlamaRec) ranks the catalogue
    so, while RecBole masks history only for general models.

    Args:
        histories_before (list of np.ndarray or None): per internal user id, the items before the user's target in
            this loader's phase (``data_preparation``); None masks nothing (RecBole's sequential full ranking).

    The mask reaches RecBole's trainer as its ``history_index`` (``scores[history_index] = -inf`` after
    ``full_sort_predict``), so it applies to every model alike; a model whose first stage picks candidates
    (MLLMSRec) reads ``masks_history`` to pick them under the same mask.
    """

    def __init__(self, config, dataset, sampler, histories_before=None):
        self.histories_before = histories_before
        super().__init__(config, dataset, sampler, shuffle=False)

    @property
    def masks_history(self):
        return self.histories_before is not None

    def collate_fn(self, index):
        interaction, history_index, positive_u, positive_i = super().collate_fn(index)
        if not self.is_sequential or self.histories_before is None:
            return interaction, history_index, positive_u, positive_i
        seen = [self.histories_before[u] for u in interaction[self.uid_field].tolist()]
        rows = np.repeat(np.arange(len(seen)), [len(items) for items in seen])
        items = np.concatenate([np.zeros(0, dtype=np.int64), *seen]).astype(np.int64)
        return interaction, (torch.from_numpy(rows), torch.from_numpy(items)), positive_u, positive_i


class SubsetTrainDataLoader(TrainDataLoader):
    """RecBole's training loader over some of the training rows, with a batch size of its own: ``train_batch_size``
    counts the rows that the same run's other loader still serves (MLLMSRec's warm-up on windows, its joint epochs
    on the LLM's rows alone)."""

    def __init__(self, config, dataset, sampler, batch_size, shuffle=False):
        self._subset_batch_size = int(batch_size)
        super().__init__(config, dataset, sampler, shuffle=shuffle)

    def _init_batch_size_and_step(self):
        self.step = self._subset_batch_size
        self.set_batch_size(self._subset_batch_size)


def row_subset(dataset, rows):
    """``dataset`` (RecBole's training rows) reduced to the rows ``rows`` (indices, in that order)."""
    return dataset.copy(dataset.inter_feat[torch.as_tensor(np.asarray(rows, dtype=np.int64))])


def subset_loader(config, train_data, rows, batch_size):
    """A loader of rows ``rows`` (indices) of ``train_data``'s dataset, ``batch_size`` rows per batch, shuffled as
    ``train_data`` is (RecBole's ``shuffle``)."""
    return seeded(SubsetTrainDataLoader(config, row_subset(train_data._dataset, rows), train_data._sampler, batch_size,
                                        shuffle=config["shuffle"]), config)


def seeded(loader, config):
    """``loader``, its ``DistributedSampler`` (under torchrun) seeded with the run's seed: RecBole leaves that at 0,
    so every run of ``--seeds`` would train on the same batch order."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.seed = config["seed"]
    return loader
