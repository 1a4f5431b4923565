r"""MLLMSRec
################################################
Reference:
    Wang et al. "Leveraging multimodal large language model for multimodal sequential recommendation."
    Scientific Reports 2025 (doi 10.1038/s41598-025-14251-1).

Three parts: (1) multimodal item fusion (``stages/item_fusion.py``: an MLLM summarises image + text of
every item), (2) temporal-aware user behaviour comprehension (``stages/user_profile.py``: recurrent
sliding-window preference summaries), (3) a generative ranker: the paper's instruction prompt with
multistep chain-of-thought, fine-tuned with LoRA on Yes/No, score = log p(Yes) - log p(No).

NOTE (deviations, all configurable):
    * Hybrid prompting (after LLaRA): a SASRec-style encoder over the fused item embeddings gives a user
      state and candidate states that enter the prompt as projected soft tokens, plus a *match* token
      ``proj(user ⊙ item)``; the encoder is trained jointly (cross-entropy over all items). Measured
      here: a 135M text-only yes/no ranker is far behind SASRec, so collaborative signal must reach
      the LLM itself. The same encoder retrieves the top-K for full ranking, which the LLM reranks.
    * Chain-of-thought steps are filled from the stage caches and the history (evolution, target
      analysis, match), so scoring needs no free-running generation.
    * Checkpoints hold only trained tensors (LoRA, projections, encoder, image projector residual) and
      the base model's identity; the base LLM is rebuilt from its weights.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np
import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn

from recbole_mllm.model.context import (RankerContext, build_histories, build_item_material,
                                        encode_item_images)
from recbole_mllm.model.prompting import PieceTokenizer, assemble, build_layout
from recbole_mllm.model.ranker import LoRARanker, PromptBatch
from recbole_mllm.model.sequence_encoder import FusedSequenceEncoder
from recbole_mllm.model.stage_inputs import read_stage_inputs
from recbole_mllm.data import needed_positions, user_split
from recbole_mllm.stages.prompts import load_prompt

logger = logging.getLogger(__name__)

RERANK_FLOOR = 1000.0
"""Items the LLM does not rerank score ``-(RERANK_FLOOR + encoder rank)``: exact in float32 (whole numbers), so their
order is the encoder's, below every LLM score (log-odds, kept above ``-RERANK_FLOOR``)."""


class MLLMSRec(SequentialRecommender):
    input_type = InputType.POINTWISE
    required_stages = ("item_fusion", "user_profile")  # caches quick_start prepares before building the model

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        # load parameters info
        self.USER_ID, self.TIME_FIELD = config["USER_ID_FIELD"], config["TIME_FIELD"]
        self.hidden_size = config["hidden_size"]
        self.train_negatives = config["ranker_train_negatives"]
        self.hard_negatives = min(config["ranker_hard_negatives"], self.train_negatives)
        self.recent_count = config["ranker_recent_items"]
        self.rerank_top_k = config["rerank_top_k"]
        self.rerank_exclude_seen = config["rerank_exclude_seen"]
        self.candidates_per_forward = config["ranker_eval_batch_size"]
        self.encoder_loss_weight = config["encoder_loss_weight"]
        self.fusion_weight = float(config["late_fusion_weight"] or 0.0)
        self.use_images = config["ranker_use_images"]
        self.use_summaries = config["ranker_use_summaries"]
        self.use_soft_tokens = config["ranker_use_soft_tokens"]
        self.use_cot = config["ranker_use_cot"]
        self.field_tokens = {"item_summary": config["ranker_item_summary_tokens"],
                             "preference": config["ranker_preference_tokens"], "item_text": 48}
        self.score_mode = "llm"  # "encoder" while the trainer warms the encoder up

        # stage caches (read only: quick_start prepared them) and prompt material
        inputs = read_stage_inputs(config, dataset)
        self.backend = inputs.backend
        texts, titles, categories = build_item_material(config, inputs.item_tokens, inputs.item_table,
                                                        inputs.text_fields, config["item_category_field"],
                                                        config["item_title_field"])
        histories, timestamps, positions = build_histories(inputs.histories,
                                                           inputs.user_tokens, inputs.item_token2id)
        self.context = RankerContext(inputs.item_tokens, inputs.user_tokens, texts, titles, inputs.item_summaries,
                                     categories, histories, timestamps, inputs.profiles, positions)
        self.summaries = inputs.user_summaries  # (uid, t) -> preference summary
        self.dataset_name = config["dataset"]
        # a user's training items (data.split): valid/test targets are labels, never negatives' filter
        self.user_seen = [set(h[:user_split(len(h), config).first_held_out].tolist()) for h in histories]
        # the LLM trains on positions t >= this: the first of needed_positions, the split rule the user-profile
        # stage builds summaries by (so every training prompt has its summary); training rows stop before held-out t
        self.llm_train_from = [min(needed_positions(len(h), config), default=len(h)) for h in histories]

        # define layers
        self.encoder = FusedSequenceEncoder.from_config(config, inputs.item_embeddings, self.max_seq_length)
        token_embeddings = self.backend.model.get_input_embeddings().weight
        llm_hidden, token_std = token_embeddings.shape[1], float(token_embeddings.float().std())
        self.user_projection = self._projection(llm_hidden, token_std)
        self.item_projection = self._projection(llm_hidden, token_std)
        self.match_projection = self._projection(llm_hidden, token_std)
        template = load_prompt("ranker", config["ranker_prompt"])
        self.inputs_identity = {"stage_caches": inputs.cache_keys, "template": template.identity(),
                                "switches": [self.use_images, self.use_summaries, self.use_soft_tokens, self.use_cot],
                                "recent_items": self.recent_count, "field_tokens": self.field_tokens}
        self.layout = build_layout(template, self.backend.tokenizer, self.use_cot, self.use_soft_tokens)
        self.prompt_has_rank = any(p.kind == "field" and p.value == "retrieval_rank" for p in self.layout.target)
        self.tokenize = PieceTokenizer(self.backend.tokenizer)
        self.ranker = LoRARanker(self.backend.model, config["lora_rank"], config["lora_alpha"], config["lora_dropout"],
                                 config["lora_target_modules"], self.layout.yes_id, self.layout.no_id,
                                 config["gradient_checkpointing"])
        self.image_projector = None
        if self.use_images and getattr(self.backend, "projector", None) is None:
            logger.warning(f"ranker_use_images: the {self.backend.identity.backend} backend has no image projector "
                           f"the ranker can use yet, so target images are left out of its prompts (text only)")
        if self.use_images and getattr(self.backend, "projector", None) is not None:
            features, logits, has_image = encode_item_images(self.backend, inputs.item_tokens, inputs.item_table,
                                                             inputs.image_field, inputs.image_dir)
            if features is not None:
                self.image_projector = self.backend.projector  # its zero-initialised residual is trained
                self.register_buffer("image_features", features, persistent=False)
                self.register_buffer("image_logits", logits, persistent=False)
                self.register_buffer("has_image", has_image, persistent=False)
        self.stage1_hits = self.stage1_total = 0
        self._trained_keys = {name for name, p in self.named_parameters() if p.requires_grad}

    def _projection(self, llm_hidden, token_std):
        """Encoder state -> one soft token in the LLM's embedding space.

        Initialised so a soft token starts at the scale of the LLM's own token embeddings: with
        PyTorch's default init it was about 4x longer than any of SmolLM2's tokens, far out of the
        distribution the frozen layers were trained on.
        """
        linear = nn.Linear(self.hidden_size, llm_hidden)
        nn.init.normal_(linear.weight, std=token_std / self.hidden_size ** 0.5)  # LayerNorm output: unit variance
        nn.init.zeros_(linear.bias)
        return nn.Sequential(nn.LayerNorm(self.hidden_size), linear)

    # ------------------------------------------------------------------ checkpoints: trained tensors only
    def state_dict(self, *args, **kwargs):
        full = super().state_dict(*args, **kwargs)
        return OrderedDict((k, v) for k, v in full.items() if k in self._trained_keys)

    def load_state_dict(self, state_dict, strict=True):
        unexpected = set(state_dict) - self._trained_keys
        missing = self._trained_keys - set(state_dict)
        if strict and (unexpected or missing):
            raise RuntimeError(f"MLLMSRec checkpoint does not match this model: missing {sorted(missing)[:5]}, "
                               f"unexpected {sorted(unexpected)[:5]}")
        return super().load_state_dict(state_dict, strict=False)

    def _identity(self):
        base = {k: v for k, v in self.backend.identity.as_dict().items() if k != "dtype"}  # CPU fp32 may load GPU bf16
        return {"base_model": base, "inputs": self.inputs_identity}

    def other_parameter(self):
        return self._identity()

    def load_other_parameter(self, para):
        """Refuse a checkpoint trained on another base model, other stage caches, template or switches."""
        expected = self._identity()
        for key, value in expected.items():
            if para and para.get(key) != value:
                raise ValueError(f"checkpoint {key} {para.get(key)} does not match this model's {value}")

    # ------------------------------------------------------------------ prompt assembly
    def _user_part(self, uid, t, user_token):
        """Token ids and soft slots of a user's shared prompt part; ``user_token`` is its soft embedding ``[1, H]``."""
        preference = self._summary(uid, t) if self.use_summaries else "unknown"
        values = {"user_id": self.context.user_tokens[uid], "profile": self.context.profiles[uid],
                  "preference": preference, "evolution": self.context.evolution(uid, t, self.recent_count),
                  "recent_items": self.context.recent_titles(uid, t, self.recent_count)}
        ids, slots = assemble(self.layout.user, values, {"user_state": 1}, self.tokenize, self.field_tokens)
        return ids, {"user_state": (slots["user_state"], user_token)} if "user_state" in slots else {}

    def _summary(self, uid, t):
        """The user's preference summary at ``t``; a missing one is an error, never a silent "unknown" in the prompt."""
        if (uid, t) not in self.summaries:
            raise KeyError(f"no user summary for user {self.context.user_tokens[uid]!r} at position {t}: the summaries "
                           f"loaded are the positions the split needs (data.split.needed_positions); rebuild the cache "
                           f"with the run's config: python -m recbole_mllm.stages.user_profile --dataset={self.dataset_name} "
                           f"[--key=value ...]")
        return self.summaries[(uid, t)]

    def _target_part(self, uid, t, iid, item_token, match_token, image_tokens, rank):
        """Token ids and soft slots of one candidate's prompt part (``image_tokens`` None: no image)."""
        values = {"user_id": self.context.user_tokens[uid], "item_text": self.context.item_text[iid],
                  "item_summary": self.context.item_summary[iid],
                  "match": self.context.match(uid, t, iid, self.recent_count),
                  "retrieval_rank": rank, "catalog_size": self.n_items - 1}
        sizes = {"item_state": 1, "match_state": 1, "image": 0 if image_tokens is None else image_tokens.shape[0]}
        ids, slots = assemble(self.layout.target, values, sizes, self.tokenize, self.field_tokens)
        soft = {"item_state": (slots.get("item_state"), item_token), "match_state": (slots.get("match_state"), match_token),
                "image": (slots.get("image"), image_tokens)}
        return ids, {name: value for name, value in soft.items() if value[0]}

    def _positions(self, interaction):
        """``t`` of every row, from its input sequence (see ``RankerContext.position``)."""
        seqs = interaction[self.ITEM_SEQ].cpu().numpy()
        lens = interaction[self.ITEM_SEQ_LEN].tolist()
        uids = interaction[self.USER_ID].tolist()
        times = interaction[self.TIME_FIELD].tolist() if self.TIME_FIELD in interaction else [None] * len(uids)
        return [self.context.position(u, s, n, self.max_seq_length, ts) for u, s, n, ts in zip(uids, seqs, lens, times)]

    @torch.no_grad()
    def _catalogue_scores(self, user_states, uids=None, ts=None):
        """The encoder's float32 scores of every item ``[U n_items]``: padding at -inf, and with
        ``rerank_exclude_seen`` (when ``uids``/``ts`` are given) each user's history before ``t`` too.

        Float32 outside autocast, so ranks and the first stage's order are the same in training and evaluation.
        """
        with torch.autocast(user_states.device.type, enabled=False):
            scores = self.encoder.full_scores(user_states.float())  # [U n_items]
        scores[:, 0] = -torch.inf  # padding
        if self.rerank_exclude_seen and uids is not None:  # a model choice: RecBole masks no history here
            rows = [b for b, t in enumerate(ts) for _ in range(t)]
            cols = [int(i) for u, t in zip(uids, ts) for i in self.context.histories[u][:t]]
            scores[torch.tensor(rows, dtype=torch.long, device=scores.device),
                   torch.tensor(cols, dtype=torch.long, device=scores.device)] = -torch.inf
        return scores

    @staticmethod
    def _ranks(catalogue, candidates, owner, chunk=256):
        """1 + the number of items ``catalogue[owner[c]]`` scores above ``candidates[c]`` ``[C]``."""
        own = catalogue[owner, candidates]
        return torch.cat([(catalogue[o] > s.unsqueeze(1)).sum(1) for o, s in zip(owner.split(chunk), own.split(chunk))]) + 1

    @torch.no_grad()
    def _retrieval_ranks(self, user_states, candidates, owner):
        """The encoder's catalogue rank of each candidate for its user, as written into the prompt.

        A function of the user and the item alone (never of the other candidates in a block), so it can
        be written into the prompt without breaking order invariance or revealing the target.
        """
        return self._ranks(self._catalogue_scores(user_states), candidates, owner).tolist()

    def _llm_scores(self, uids, ts, user_states, candidates, owner, labels=None):
        """Ranker scores of ``candidates[c]`` for user row ``owner[c]`` (or the SFT loss with ``labels``)."""
        ranks = self._retrieval_ranks(user_states, candidates, owner) if self.prompt_has_rank else [None] * len(candidates)
        item_states = self.encoder.item_states(candidates)  # [C H]
        user_tokens = self.user_projection(user_states).unsqueeze(1)  # [U 1 H']
        item_tokens = self.item_projection(item_states).unsqueeze(1)  # [C 1 H']
        match_tokens = self.match_projection(user_states[owner] * item_states).unsqueeze(1)  # [C 1 H']
        image_tokens = [None] * len(candidates)
        if self.image_projector is not None:
            with_image = self.has_image[candidates].nonzero().squeeze(1)
            if len(with_image):
                items = candidates[with_image]
                projected = self.image_projector(self.image_features[items], self.image_logits[items])  # [I n H']
                for k, c in enumerate(with_image.tolist()):
                    image_tokens[c] = projected[k]
        users = PromptBatch(*zip(*[self._user_part(u, t, user_tokens[k])
                                   for k, (u, t) in enumerate(zip(uids, ts))]))
        owners = owner.tolist()
        targets = PromptBatch(*zip(*[self._target_part(uids[o], ts[o], i, item_tokens[c], match_tokens[c], image_tokens[c],
                                                       ranks[c])
                                     for c, (o, i) in enumerate(zip(owners, candidates.tolist()))]))
        if labels is not None:
            return self.ranker.loss(users, targets, owner, labels)
        return self.ranker.score(users, targets, owner)

    # ------------------------------------------------------------------ RecBole contract
    def forward(self, item_seq, item_seq_len):
        return self.encoder(item_seq, item_seq_len)  # [B H]

    def encoder_loss(self, interaction):
        user_states = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return nn.functional.cross_entropy(self.encoder.full_scores(user_states), interaction[self.POS_ITEM_ID])

    def _sample_negatives(self, uid, count, taken=()):
        """``count`` uniform items the user never interacted with (before valid/test) and not in ``taken``."""
        seen, out = self.user_seen[uid], list(taken)
        while len(out) < len(taken) + count:
            item = int(np.random.randint(1, self.n_items))
            if item not in seen and item not in out:
                out.append(item)
        return out[len(taken):]

    @torch.no_grad()
    def _hard_negatives(self, uid, scores):
        """``ranker_hard_negatives`` unseen items drawn from the encoder's top ``rerank_top_k`` for this user.

        These are the items full ranking asks the LLM to reorder; uniform negatives alone never teach it that.
        """
        scores = scores.float().clone()
        scores[0] = -torch.inf
        seen = torch.tensor(sorted(self.user_seen[uid]), dtype=torch.long, device=scores.device)
        scores[seen] = -torch.inf
        top = scores.topk(self.rerank_top_k).indices
        top = top[torch.isfinite(scores[top])]
        picked = torch.randperm(len(top))[:self.hard_negatives]
        return top[picked.to(top.device)].tolist()

    def _llm_rows(self, interaction):
        """The rows the LLM trains on, and their positions ``t``: each user's last ``llm_train_targets_per_user``
        training targets (``t >= llm_train_from``).

        The target filters cheaply first (training may read it): a row at ``t`` has its target at ``t`` or earlier
        than the item's last occurrence. The position is then the row's own, from its input sequence as in
        evaluation: a user who repeats an item has that item as the target of several rows, and only the late
        ones are kept.
        """
        uids, targets = interaction[self.USER_ID].tolist(), interaction[self.POS_ITEM_ID].tolist()
        rows = [r for r, (u, i) in enumerate(zip(uids, targets))
                if self.context.positions[(u, i)][-1] >= self.llm_train_from[u]]
        if not rows:
            return [], []
        ts = self._positions(interaction[torch.tensor(rows, device=interaction[self.USER_ID].device)])
        kept = [(r, t) for r, t in zip(rows, ts) if t >= self.llm_train_from[uids[r]]]
        return [r for r, _ in kept], [t for _, t in kept]

    def calculate_loss(self, interaction):
        user_states = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        all_scores = self.encoder.full_scores(user_states)
        loss = self.encoder_loss_weight * nn.functional.cross_entropy(all_scores, interaction[self.POS_ITEM_ID])
        if self.score_mode == "encoder":
            return loss
        uids, targets = interaction[self.USER_ID].tolist(), interaction[self.POS_ITEM_ID].tolist()
        rows, ts = self._llm_rows(interaction)
        if not rows:
            return loss
        candidates, owner, labels = [], [], []
        for k, r in enumerate(rows):
            hard = self._hard_negatives(uids[r], all_scores[r]) if self.hard_negatives else []
            items = [targets[r]] + hard + self._sample_negatives(uids[r], self.train_negatives - len(hard), hard)
            candidates += items
            owner += [k] * len(items)
            labels += [1] + [0] * (len(items) - 1)
        device = user_states.device
        return loss + self._llm_scores([uids[r] for r in rows], ts, user_states[rows],
                                       torch.tensor(candidates, device=device), torch.tensor(owner, device=device),
                                       torch.tensor(labels, device=device))

    def _score_blocks(self, uids, ts, user_states, candidates, owner):
        """LLM scores in chunks of whole users, at most ``ranker_eval_batch_size`` candidates each."""
        scores = torch.empty(len(candidates), device=user_states.device)
        counts = torch.bincount(owner, minlength=len(uids)).tolist()
        start = 0
        while start < len(uids):
            end, total = start + 1, counts[start]
            while end < len(uids) and total + counts[end] <= self.candidates_per_forward:
                total += counts[end]
                end += 1
            chosen = ((owner >= start) & (owner < end)).nonzero().squeeze(1)
            scores[chosen] = self._llm_scores(uids[start:end], ts[start:end], user_states[start:end],
                                              candidates[chosen], owner[chosen] - start).to(scores.dtype)
            start = end
        return scores

    def _two_stage(self, uids, ts, user_states, candidates, owner, own, ranks):
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
            llm = self._score_blocks([uids[u] for u in users.tolist()], [ts[u] for u in users.tolist()],
                                     user_states[users], candidates[chosen], local).float()
            if self.fusion_weight:  # the fallback to compare against: the encoder's score added beside the LLM's
                llm = llm + self.fusion_weight * own[chosen]
            scores[chosen] = llm.clamp(min=1.0 - RERANK_FLOOR)
        return scores

    def predict(self, interaction):
        """Scores of RecBole's sampled blocks, by the same two stages as full ranking.

        A candidate is scored by the LLM when the encoder ranks it within its top ``rerank_top_k`` of the
        whole catalogue for this user (exactly the items full ranking reranks), otherwise it keeps the
        encoder's order below those. Each user's prompt part is encoded once for all its reranked candidates.
        A score depends on the user and the item only: never on candidate order or the block's other items.
        """
        uids_all = interaction[self.USER_ID]
        # rows of one user share its history; group them by user (never by position in the block)
        unique_uids, owner = torch.unique(uids_all, return_inverse=True)
        rows = torch.arange(len(owner), device=owner.device)
        first = torch.full_like(unique_uids, len(owner)).scatter_reduce_(0, owner, rows, "amin")
        item_seq, item_seq_len = interaction[self.ITEM_SEQ][first], interaction[self.ITEM_SEQ_LEN][first]
        user_states = self.forward(item_seq, item_seq_len)
        candidates = interaction[self.ITEM_ID]
        if self.score_mode == "encoder":
            return (user_states[owner] * self.encoder.item_states(candidates)).sum(-1)
        uids, ts = unique_uids.tolist(), self._positions(interaction[first])
        catalogue = self._catalogue_scores(user_states, uids, ts)
        ranks = self._ranks(catalogue, candidates, owner)
        return self._two_stage(uids, ts, user_states, candidates, owner, catalogue[owner, candidates], ranks)

    def full_sort_predict(self, interaction):
        """Retrieve-then-rerank: the encoder picks its top-K items, the LLM reranks them, the rest follow in the
        encoder's order (the LLM never scores the whole catalogue)."""
        user_states = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        if self.score_mode == "encoder":
            return self._catalogue_scores(user_states)
        uids, ts = interaction[self.USER_ID].tolist(), self._positions(interaction)
        catalogue = self._catalogue_scores(user_states, uids, ts)  # [B n_items] float32
        ascending = catalogue.sort(dim=1).values
        ranks = catalogue.shape[1] + 1 - torch.searchsorted(ascending, catalogue, right=True)  # as _ranks counts them
        items = torch.arange(catalogue.shape[1], device=catalogue.device).repeat(len(uids))
        owner = torch.arange(len(uids), device=catalogue.device).repeat_interleave(catalogue.shape[1])
        scores = self._two_stage(uids, ts, user_states, items, owner, catalogue.view(-1), ranks.view(-1))
        scores = scores.view_as(catalogue)
        top = catalogue.topk(self.rerank_top_k, dim=1).indices  # [B K]
        # stage-1 recall is measured after scoring and never feeds back into a score
        targets = interaction[self.POS_ITEM_ID].view(-1, 1)
        self.stage1_hits += int((top == targets).any(1).sum())
        self.stage1_total += len(uids)
        return scores
