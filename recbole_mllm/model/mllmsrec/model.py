r"""MLLMSRec
################################################
Reference:
    Wang et al. "Leveraging multimodal large language model for multimodal sequential recommendation."
    Scientific Reports 2025 (doi 10.1038/s41598-025-14251-1).

Three parts: (1) multimodal item fusion (``stages/item_fusion.py``: an MLLM summarises image + text of
every item), (2) temporal-aware user behaviour comprehension (``stages/user_profile.py``: recurrent
sliding-window preference summaries), (3) a generative ranker: the paper's instruction prompt with
multistep chain-of-thought, fine-tuned with LoRA on Yes/No, score = log p(Yes) - log p(No).

``MLLMSRec`` is ``FusedSASRec`` (``../fusedsasrec.py``) plus a reranker: its first stage, the sequence encoder with
its ``forward`` and loss, is that baseline by construction, so "the LLM vs its first stage" compares like with like.

This file holds RecBole's contract and the trainer's interface; the rest of the package one concept each:
``settings.py`` (the model's keys, read once), ``prompt_parts.py`` (the prompt's user and target parts),
``candidates.py`` (the LLM's training rows and negatives), ``scorer.py`` (the two-stage scorer), ``ranker.py``
(LoRA), ``prompting.py`` (the prompt layout), ``context.py`` (what prompts say about users and items), ``prompts/``
(the templates); the first stage is ``../fusedsasrec.py``. The stage caches are built before the model
(``required_stages``, ``stages/prepare.py``) and read by ``prepare`` (``../stage_inputs.py``); the constructor
opens no file and never generates.

NOTE (deviations, all configurable):
    * Hybrid prompting (after LLaRA): a SASRec-style encoder over the fused item embeddings gives a user
      state and candidate states that enter the prompt as projected soft tokens, plus a *match* token
      ``proj(user ⊙ item)``. Measured here: a 135M text-only yes/no ranker is far behind SASRec, so
      collaborative signal must reach the LLM itself. The same encoder retrieves the top-K for full
      ranking, which the LLM reranks.
    * The encoder trains alone first (a warm-up to early stopping, as FusedSASRec trains) and by default
      stays frozen after it (``encoder_frozen_after_warmup: True``), so its top-K lists, ranks and soft
      tokens are the same in training and at test; the paper trains it jointly with the LLM
      (``encoder_frozen_after_warmup: False``, ``properties/ranker/paper_joint.yaml``).
    * By default the ranker is list-wise (``ranker_scoring: listwise``, after LlamaRec): one prompt per user lists the
      encoder's top-K, scored by each letter's log-probability, with the late-fusion weight chosen on validation
      (``late_fusion_grid``); the paper's Yes/No prompt per candidate is ``ranker_scoring: pointwise``
      (``properties/ranker/pointwise.yaml``).
    * Chain-of-thought steps are filled from the stage caches and the history (evolution, target
      analysis, match), so scoring needs no free-running generation.
    * Checkpoints hold only trained tensors (LoRA, projections, encoder, image projector residual) and
      the base model's identity; the base LLM is rebuilt from its weights.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from recbole_mllm.evaluation import is_top_k_metric
from recbole_mllm.model.fusedsasrec import FusedSASRec
from recbole_mllm.model.mllmsrec.candidates import TrainingCandidates
from recbole_mllm.model.mllmsrec.context import RankerContext, build_histories, build_item_material
from recbole_mllm.model.mllmsrec.prompt_parts import PromptParts
from recbole_mllm.model.mllmsrec.prompting import build_layout, build_list_layout, check_template
from recbole_mllm.model.mllmsrec.ranker import LoRARanker, PromptBatch
from recbole_mllm.model.mllmsrec.scorer import TwoStageScorer
from recbole_mllm.model.mllmsrec.settings import MLLMSRecSettings
from recbole_mllm.model.stage_inputs import read_stage_inputs
from recbole_mllm.stages.prompts import load_prompt
from recbole_mllm.stages.user_text import Clock

def list_cross_entropy(scores, owner, labels):
    """Softmax cross-entropy of each list's positive among its candidates (``owner[c]``: the list of ``scores[c]``;
    one label 1 per list), averaged over the lists: the list-wise loss of ``ranker_residual``."""
    owner, labels = owner.to(scores.device), labels.to(scores.device)
    n_lists = int(owner.max()) + 1
    top = torch.full((n_lists,), -torch.inf, device=scores.device).scatter_reduce(0, owner, scores.detach(), "amax")
    sums = torch.zeros(n_lists, device=scores.device).index_add(0, owner, (scores - top[owner]).exp())
    log_norm = top + sums.log()  # log-sum-exp per list
    positive = labels > 0
    return (log_norm[owner[positive]] - scores[positive]).mean()


class MLLMSRec(FusedSASRec):
    required_stages = ("item_fusion", "user_profile")  # caches quick_start prepares before building the model

    @classmethod
    def stages_for(cls, config):
        """Both stages, whatever its encoder reads: the ranker's prompts read the fused items and the summaries."""
        return cls.required_stages

    @classmethod
    def check_config(cls, config):
        """MLLMSRec's settings and its ranker template checked together, before the stages run
        (``quick_start.split_and_build_model``)."""
        settings = MLLMSRecSettings.from_config(config)
        check_template(load_prompt("ranker", settings.prompt), settings.ranker_scoring == "listwise",
                       settings.ranker_use_rank)
        metric = str(config["valid_metric"]).lower()
        if settings.late_fusion_grid is not None and not ("@" in metric and is_top_k_metric(metric.split("@")[0])):
            raise ValueError(f"late_fusion_grid pairs validation users by valid_metric, which needs a top-k metric such "
                             f"as ndcg@10; got valid_metric: {config['valid_metric']}")

    @classmethod
    def prepare(cls, config, dataset, histories=None):
        """The constructor's prepared parts (``quick_start.build_model``): ``{"inputs": StageInputs}``, everything read
        from the stage caches, the LLM backend and the items' image features (``model/stage_inputs.py``);
        ``histories``: the un-split users' histories (``data.user_histories``), None reads them."""
        return {"inputs": read_stage_inputs(config, dataset, MLLMSRecSettings.from_config(config).prompt, histories)}

    def __init__(self, config, dataset, inputs=None):
        """``inputs``: the prepared ``StageInputs`` (``prepare``); the constructor opens no file."""
        # from the seed, the encoder draws its initial weights as FusedSASRec's does, and the projections theirs after it;
        # without prepared parts FusedSASRec's constructor refuses, naming build_model
        super().__init__(config, dataset, item_content=inputs and inputs.item_embeddings)  # FusedSASRec: self.encoder
        # load parameters info
        settings = MLLMSRecSettings.from_config(config)
        self.USER_ID, self.TIME_FIELD = config["USER_ID_FIELD"], config["TIME_FIELD"]
        self.hidden_size = config["hidden_size"]
        self.rerank_top_k = settings.rerank_top_k
        self.encoder_loss_weight = settings.encoder_loss_weight
        self.encoder_frozen = False  # freeze_encoder(): the trainer's encoder_frozen_after_warmup
        self.use_recent_states = settings.ranker_use_recent_states
        field_tokens = {"item_summary": settings.ranker_item_summary_tokens, "preference": settings.ranker_preference_tokens,
                        "item_text": settings.ranker_item_text_tokens}

        # prompt material
        self.backend = inputs.backend
        texts, titles, categories = build_item_material(config, inputs.item_tokens, inputs.item_table,
                                                        inputs.text_fields, config["item_category_field"],
                                                        config["item_title_field"])
        histories, timestamps, positions = build_histories(inputs.histories,
                                                           inputs.user_tokens, inputs.item_token2id)
        self.context = RankerContext(inputs.item_tokens, inputs.user_tokens, texts, titles, inputs.item_summaries,
                                     categories, histories, timestamps, inputs.profiles, positions,
                                     Clock(str(config["user_time_format"])))
        self.candidates = TrainingCandidates(histories, positions, self.n_items, config, self.USER_ID, self.POS_ITEM_ID)

        # define layers (the encoder is FusedSASRec's)
        token_embeddings = self.backend.model.get_input_embeddings().weight
        llm_hidden, token_std = token_embeddings.shape[1], float(token_embeddings.float().std())
        self.user_projection = self._projection(llm_hidden, token_std)
        self.item_projection = self._projection(llm_hidden, token_std)
        self.match_projection = self._projection(llm_hidden, token_std)
        template = inputs.template
        self.inputs_identity = {"stage_caches": inputs.cache_keys, "template": template.identity(),
                                "switches": settings.switches, "recent_items": settings.ranker_recent_items,
                                "field_tokens": field_tokens}
        self.listwise = settings.ranker_scoring == "listwise"  # one lettered list per user, scored by its letters
        self.list_shuffled = settings.ranker_list_order == "shuffled"  # listwise: no rank readable from the positions
        self.list_order_seed = int(config["seed"] or 0)
        layout = (build_list_layout(template, self.backend.tokenizer, self.rerank_top_k, settings.ranker_use_cot,
                                    settings.ranker_use_soft_tokens) if self.listwise else
                  build_layout(template, self.backend.tokenizer, settings.ranker_use_cot, settings.ranker_use_soft_tokens,
                               settings.ranker_use_rank))
        self.prompts = PromptParts(self.context, inputs.user_summaries, layout, self.backend.tokenizer, field_tokens,
                                   settings.ranker_recent_items, settings.ranker_use_summaries, self.n_items - 1,
                                   config["dataset"])
        answer_ids = layout.option_ids[:1] * 2 if self.listwise else (layout.yes_id, layout.no_id)  # listwise: unread
        self.ranker = LoRARanker(self.backend.model, settings.lora_rank, settings.lora_alpha, settings.lora_dropout,
                                 list(settings.lora_target_modules), *answer_ids, settings.gradient_checkpointing)
        self.image_projector = None
        if settings.ranker_use_images and inputs.images is not None:  # read_stage_inputs encoded them (and warned when it could not)
            features, logits, has_image = inputs.images
            self.image_projector = self.backend.projector  # its zero-initialised residual is trained
            self.register_buffer("image_features", features, persistent=False)
            self.register_buffer("image_logits", logits, persistent=False)
            self.register_buffer("has_image", has_image, persistent=False)
        # ranker_residual: score = encoder score + gate * LLM log-odds, the gate at 0 so step 0 is the first stage
        self.residual_gate = nn.Parameter(torch.zeros(())) if settings.ranker_residual else None
        self.scorer = TwoStageScorer(self.encoder, histories, self.rerank_top_k, config["mask_history"],
                                     settings.candidates_per_forward(config["device"]), settings.late_fusion_weight,
                                     residual=settings.ranker_residual)
        self.first_stage_recall = self.scorer.recall  # full ranking's stage-1 recall, read (and reset) by the trainer
        self.late_fusion_grid = settings.late_fusion_grid  # weights the trainer tries on validation (None: keep the one given)
        self.first_stage_fallback_alpha = settings.first_stage_fallback_alpha  # the trainer's test of the fusion choice
        self.first_stage_only = False  # the trainer's fusion choice kept the first stage (first_stage_fallback_alpha)
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

    # ------------------------------------------------------------------ how predictions are scored
    @contextmanager
    def scoring(self, encoder_only=False, fusion_weight=None, mask_history=None):
        """Inside the block, score with the encoder alone (``encoder_only``: the first stage), with another
        late-fusion weight, or with the history mask of an evaluation loader (``mask_history``: its
        ``masks_history``; None keeps the protocol's); the previous way is restored after it.

        The trainer's warm-up and first-stage report ask for ``encoder_only``, every evaluation for its loader's
        ``mask_history``; ``scripts/score_fusion_eval.py`` for fusion weights.
        """
        saved = self.scorer.encoder_only, self.scorer.fusion_weight, self.scorer.mask_history
        self.scorer.encoder_only = bool(encoder_only)
        if fusion_weight is not None:
            self.scorer.fusion_weight = float(fusion_weight)
        if mask_history is not None:
            self.scorer.mask_history = bool(mask_history)
        try:
            yield self
        finally:
            self.scorer.encoder_only, self.scorer.fusion_weight, self.scorer.mask_history = saved

    def use_fusion_weight(self, weight):
        """Score with late-fusion weight ``weight`` from now on (the trainer's choice on validation)."""
        self.scorer.fusion_weight = float(weight)

    def use_first_stage_only(self, flag):
        """Rank by the first stage alone from now on (``flag``): the trainer's fusion choice found no gain of the LLM
        on validation (``first_stage_fallback_alpha``). ``uses_llm`` is then False outside ``scoring`` blocks; the
        LLM stays loaded, and ``scoring()`` still reaches it (the trainer's LLM-alone report)."""
        self.first_stage_only = self.scorer.encoder_only = bool(flag)

    @property
    def fusion_weight(self):
        """The late-fusion weight predictions use now (0: the LLM's score alone)."""
        return self.scorer.fusion_weight

    @property
    def uses_llm(self):
        """Whether predictions go through the LLM reranker (False inside ``scoring(encoder_only=True)``)."""
        return not self.scorer.encoder_only

    def reuse_llm_scores(self):
        """A block in which identical LLM scoring work is done once (see ``TwoStageScorer.reuse_llm_scores``)."""
        return self.scorer.reuse_llm_scores()

    # ------------------------------------------------------------------ the LLM on hybrid prompts
    def positions(self, interaction):
        """``t`` of every row, from its input sequence (see ``RankerContext.position``)."""
        seqs = interaction[self.ITEM_SEQ].cpu().numpy()
        lens = interaction[self.ITEM_SEQ_LEN].tolist()
        uids = interaction[self.USER_ID].tolist()
        times = interaction[self.TIME_FIELD].tolist() if self.TIME_FIELD in interaction else [None] * len(uids)
        return [self.context.position(u, s, n, self.max_seq_length, ts) for u, s, n, ts in zip(uids, seqs, lens, times)]

    def _image_tokens(self, candidates):
        """Projected image tokens ``[n H']`` of each candidate, or None where it has no image (or images are off)."""
        image_tokens = [None] * len(candidates)
        if self.image_projector is not None:
            with_image = self.has_image[candidates].nonzero().squeeze(1)
            if len(with_image):
                items = candidates[with_image]
                projected = self.image_projector(self.image_features[items], self.image_logits[items])  # [I n H']
                for k, c in enumerate(with_image.tolist()):
                    image_tokens[c] = projected[k]
        return image_tokens

    def _recent_tokens(self, uids, ts, device):
        """Per user row, its recent items' soft tokens ``[n, H']`` (``ranker_use_recent_states``): each item's encoder
        state through the same projection as a candidate's, in one encoder call for the batch."""
        recent = [list(self.context.recent_items(u, t, self.prompts.recent_count)) for u, t in zip(uids, ts)]
        flat = torch.tensor([i for items in recent for i in items], dtype=torch.long, device=device)
        tokens = self.item_projection(self.encoder.item_states(flat)) if len(flat) else None
        out, start = [], 0
        for items in recent:
            out.append(tokens[start:start + len(items)] if items else None)
            start += len(items)
        return out

    def llm_scores(self, uids, ts, user_states, candidates, owner, labels=None, weights=(1.0, 1.0)):
        """Ranker scores of ``candidates[c]`` for user row ``owner[c]`` (or the SFT loss with ``labels``: its pointwise
        mean over the candidates and, under ``ranker_residual``, its mean over the lists, scaled by ``weights``; the
        list-wise ranker's loss is a mean over the lists)."""
        if self.listwise:
            return self._list_scores(uids, ts, user_states, candidates, owner, labels, weights[1])
        ranks = (self.scorer.retrieval_ranks(user_states, candidates, owner, uids, ts) if self.prompts.has_retrieval_rank
                 else [None] * len(candidates))
        item_states = self.encoder.item_states(candidates)  # [C H]
        user_tokens = self.user_projection(user_states).unsqueeze(1)  # [U 1 H']
        item_tokens = self.item_projection(item_states).unsqueeze(1)  # [C 1 H']
        match_tokens = self.match_projection(user_states[owner] * item_states).unsqueeze(1)  # [C 1 H']
        image_tokens = self._image_tokens(candidates)
        recent_tokens = self._recent_tokens(uids, ts, user_states.device) if self.use_recent_states else None
        users, targets = self.prompts.batch(uids, ts, owner, candidates, user_tokens, item_tokens, match_tokens,
                                            image_tokens, ranks, recent_tokens)
        if labels is None:
            scores = self.ranker.score(users, targets, owner)
            return scores if self.residual_gate is None else self.residual_gate * scores
        if self.residual_gate is None:
            return weights[0] * self.ranker.loss(users, targets, owner, labels)
        pointwise, log_odds = self.ranker.loss_and_scores(users, targets, owner, labels)
        encoder_scores = (user_states[owner] * item_states).sum(-1).float()  # each candidate's first-stage score
        return (weights[0] * pointwise
                + weights[1] * list_cross_entropy(encoder_scores + self.residual_gate * log_odds, owner, labels))

    def _list_scores(self, uids, ts, user_states, candidates, owner, labels=None, weight=1.0):
        """List-wise ranker (``ranker_scoring: listwise``): each user row's list is its first-stage top ``rerank_top_k``
        (the scorer's catalogue scores and mask, in the encoder's order or shuffled, ``ranker_list_order``: never
        anything of the target), one prompt per row, and a listed item's score is the log-probability of its letter
        among the list's letters.

        Scoring (``labels`` None): the score of ``candidates[c]`` in row ``owner[c]``'s list, so an item's score is
        the same whichever block asks for it. Training (``labels``): cross-entropy towards each row's positive
        (label 1) among its list, scaled by ``weight`` (the share of the step's lists in this call). Under
        ``ranker_train_candidates: top_k`` the list is the top-K and the negatives given beside the positive are not
        read; under ``sampled`` (LlamaRec's training) the list is the positive and its sampled negatives, in a fresh
        random order each step (they arrive positive first).
        """
        if labels is not None and self.candidates.rule == "sampled":
            lists = [[] for _ in uids]
            for item, row in zip(candidates.tolist(), owner.tolist()):
                lists[row].append(item)
            lists = [self._shuffled(listed, uid, t, training=True) for listed, uid, t in zip(lists, uids, ts)]
            n_options = max(len(listed) for listed in lists)
        else:
            catalogue = self.scorer.catalogue_scores(user_states.detach(), uids, ts)
            top = catalogue.topk(min(self.rerank_top_k, catalogue.shape[1]), dim=1)
            lists = [[item for item, score in zip(items, scores) if score != float("-inf")]
                     for items, scores in zip(top.indices.tolist(), top.values.tolist())]
            if self.list_shuffled:
                lists = [self._shuffled(listed, uid, t, training=labels is not None)
                         for listed, uid, t in zip(lists, uids, ts)]
            n_options = top.indices.shape[1]
        device = user_states.device
        flat = torch.tensor([item for listed in lists for item in listed], dtype=torch.long, device=device)
        item_tokens = self.item_projection(self.encoder.item_states(flat)).unsqueeze(1)  # [sum K, 1, H']
        user_tokens = self.user_projection(user_states).unsqueeze(1)  # [U 1 H']
        recent_tokens = self._recent_tokens(uids, ts, device) if self.use_recent_states else [None] * len(uids)
        prompts, start = [], 0
        for k, (uid, t) in enumerate(zip(uids, ts)):
            prompts.append(self.prompts.list_prompt(uid, t, user_tokens[k], lists[k],
                                                    item_tokens[start:start + len(lists[k])], recent_tokens[k]))
            start += len(lists[k])
        logits = self.ranker.list_logits(PromptBatch(*zip(*prompts)), self.prompts.layout.option_ids[:n_options])
        lengths = torch.tensor([len(listed) for listed in lists], device=logits.device)
        logits = logits.masked_fill(torch.arange(n_options, device=logits.device) >= lengths[:, None], -torch.inf)
        position = {(k, item): j for k, listed in enumerate(lists) for j, item in enumerate(listed)}
        pairs = [(row, position.get((row, item))) for row, item in zip(owner.tolist(), candidates.tolist())]
        if labels is not None:
            chosen = [pair for pair, label in zip(pairs, labels.tolist()) if label > 0 and pair[1] is not None]
            if not chosen:  # no positive inside its list: nothing to train on (top_k keeps only rows whose target is)
                return logits.sum() * 0
            rows, targets = (torch.tensor(x, device=logits.device) for x in zip(*chosen))
            return weight * nn.functional.cross_entropy(logits[rows], targets)  # weight: this part's share of the lists
        log_probs = logits.log_softmax(-1)
        floor = log_probs[torch.isfinite(log_probs)].min() - 1 if torch.isfinite(log_probs).any() else log_probs.new_zeros(())
        rows = torch.tensor([row for row, _ in pairs], device=logits.device)
        columns = torch.tensor([j if j is not None else 0 for _, j in pairs], device=logits.device)
        listed = torch.tensor([j is not None for _, j in pairs], device=logits.device)
        return torch.where(listed, log_probs[rows, columns], floor)  # an item tied out of the list: below every listed one

    def _shuffled(self, items, uid, t, training):
        """``items`` in an order that says nothing of the encoder's ranking (``ranker_list_order: shuffled``): a fresh
        one per training step (torch's generator: the run state keeps it), and when scoring a fixed one per (seed,
        user, position), so an item's score does not depend on the batch that asks for it. Neither reads the target."""
        order = (torch.randperm(len(items)) if training else
                 np.random.default_rng([self.list_order_seed, int(uid), int(t)]).permutation(len(items))).tolist()
        return [items[j] for j in order]

    # ------------------------------------------------------------------ what MLLMSRecTrainer asks of the model
    def llm_rows(self, interaction):
        """``(rows, trained)``: the rows of ``interaction`` the LLM may train on (``TrainingCandidates.llm_rows``) and,
        of them, those whose loss trains it (``llm_trained_rows``); the joint epochs of a frozen encoder read only them."""
        rows, ts = self.candidates.llm_rows(interaction, self.positions)
        return rows, self.llm_trained_rows(interaction, rows, ts)

    def warmup_inputs(self):
        """What a cached encoder warm-up depends on besides the config and code: the stage caches it read and the
        backend's resolved dtype (part of the warm-up cache key)."""
        return {"inputs": self.inputs_identity["stage_caches"], "dtype": self.backend.identity.dtype}

    def encoder_state(self):
        """The first stage's weights (what a warm-up keeps and caches)."""
        return self.encoder.state_dict()

    def load_encoder_state(self, state):
        self.encoder.load_state_dict(state)

    # ------------------------------------------------------------------ a first stage fixed after the warm-up
    def freeze_encoder(self):
        """Keep the warmed-up encoder as it is for the joint epochs (``encoder_frozen_after_warmup``): no gradient, no
        dropout, no encoder loss. Its top-K lists, ranks and soft tokens are then the same in training and at test."""
        self.encoder.requires_grad_(False)
        self.encoder_frozen = True
        self.encoder.eval()

    def train(self, mode=True):
        super().train(mode)
        if self.encoder_frozen:  # no dropout in a first stage that no longer trains
            self.encoder.eval()
        return self

    # ------------------------------------------------------------------ RecBole contract (forward: FusedSASRec's)
    encoder_loss = FusedSASRec.calculate_loss  # the encoder alone (its warm-up): the baseline's loss
    train_positions_warmup_only = True  # train_positions: all trains the warm-up on windows; the LLM keeps RecBole's rows

    def calculate_loss(self, interaction):
        return sum(self.loss_parts(interaction))

    def loss_parts(self, interaction, rows_per_part=None):
        """``calculate_loss`` in parts that add up to it: the LLM's loss over ``rows_per_part`` of its rows at a time
        (None: all in one part), the first part with the encoder's loss.

        With the encoder frozen no two parts share a graph, so a trainer that backpropagates each part before asking
        for the next keeps one part's activations (``MLLMSRecTrainer``); the training lists and their negatives are
        drawn for all rows first, as in one part. An encoder that trains feeds every part: one part then.
        """
        user_states = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        all_scores = self.encoder.full_scores(user_states)
        if self.encoder_frozen:
            loss = all_scores.new_zeros(())  # the LLM's loss alone; a batch without LLM rows then trains nothing
        else:
            loss = self.encoder_loss_weight * nn.functional.cross_entropy(all_scores, interaction[self.POS_ITEM_ID])
        if not self.uses_llm:
            yield loss
            return
        uids, targets = interaction[self.USER_ID].tolist(), interaction[self.POS_ITEM_ID].tolist()
        rows, ts = self.candidates.llm_rows(interaction, self.positions)
        if rows and self.candidates.rule == "top_k":  # the lists evaluation reranks: the scorer's catalogue, history rule
            catalogue = self.scorer.catalogue_scores(user_states[rows].detach(), [uids[r] for r in rows], ts)
            kept, candidates, owner, labels = self.candidates.from_top_k(catalogue, [targets[r] for r in rows])
            rows, ts = [rows[k] for k in kept], [ts[k] for k in kept]
        elif rows:
            candidates, owner, labels = self.candidates.for_rows(uids, targets, rows, all_scores)
        if not rows:
            yield loss
            return
        step = rows_per_part if rows_per_part and self.encoder_frozen else len(rows)
        device = user_states.device
        for start in range(0, len(rows), step):
            end = min(start + step, len(rows))
            part = [c for c, o in enumerate(owner) if start <= o < end]  # owner: rows' list indices, in order
            scores = self.llm_scores([uids[r] for r in rows[start:end]], ts[start:end], user_states[rows[start:end]],
                                     torch.tensor([candidates[c] for c in part], device=device),
                                     torch.tensor([owner[c] - start for c in part], device=device),
                                     torch.tensor([labels[c] for c in part], device=device),
                                     weights=(len(part) / len(candidates), (end - start) / len(rows)))
            yield loss + scores if start == 0 else scores

    @torch.no_grad()
    def llm_trained_rows(self, interaction, rows, ts):
        """Of ``rows`` of ``interaction`` (``candidates.llm_rows``, at positions ``ts``), those whose loss trains the
        LLM: all, or under ``top_k`` those whose target is inside the encoder's top-K list (exact while the encoder
        is frozen; no random draw)."""
        if not rows or self.candidates.rule != "top_k":
            return rows
        kept, step = [], 1024  # rows per catalogue [step n_items]
        for start in range(0, len(rows), step):
            part = rows[start:start + step]
            batch = interaction[torch.tensor(part)].to(self.device)
            user_states = self.forward(batch[self.ITEM_SEQ], batch[self.ITEM_SEQ_LEN])
            catalogue = self.scorer.catalogue_scores(user_states, batch[self.USER_ID].tolist(), ts[start:start + step])
            kept += [part[k] for k, _ in self.candidates.top_k_lists(catalogue, batch[self.POS_ITEM_ID].tolist())]
        return kept

    @torch.no_grad()  # scoring never trains: without it every LLM activation of a block would be kept for backward
    def predict(self, interaction):
        """Scores of RecBole's sampled blocks, by the same two stages as full ranking (``scorer.py``).

        Each user's prompt part is encoded once for all its reranked candidates.
        """
        uids_all = interaction[self.USER_ID]
        # rows of one user share its history; group them by user (never by position in the block)
        unique_uids, owner = torch.unique(uids_all, return_inverse=True)
        rows = torch.arange(len(owner), device=owner.device)
        first = torch.full_like(unique_uids, len(owner)).scatter_reduce_(0, owner, rows, "amin")
        item_seq, item_seq_len = interaction[self.ITEM_SEQ][first], interaction[self.ITEM_SEQ_LEN][first]
        user_states = self.forward(item_seq, item_seq_len)
        candidates = interaction[self.ITEM_ID]
        uids, ts = unique_uids.tolist(), self.positions(interaction[first])
        if not self.uses_llm:
            return self.scorer.sampled_first_stage(uids, ts, user_states, candidates, owner)
        return self.scorer.sampled(uids, ts, user_states, candidates, owner, self.llm_scores)

    @torch.no_grad()
    def full_sort_predict(self, interaction):
        """Retrieve-then-rerank: the encoder picks its top-K items, the LLM reranks them, the rest follow in the
        encoder's order (the LLM never scores the whole catalogue)."""
        user_states = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        uids, ts = interaction[self.USER_ID].tolist(), self.positions(interaction)
        if not self.uses_llm:
            return self.scorer.catalogue_scores(user_states, uids, ts)
        return self.scorer.full(uids, ts, user_states, interaction[self.POS_ITEM_ID], self.llm_scores)
