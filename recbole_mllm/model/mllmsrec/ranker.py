"""The LoRA-tuned generative ranker: score = log p(Yes) - log p(No) at the answer position.

The base LLM is frozen and wrapped by peft LoRA. Block attention masks let every candidate attend to
its user's part of the prompt (causally) and to itself (causally), never to another candidate, with
position ids that continue after the user part. So a score depends neither on candidate order nor on
which other candidates share the batch: it is the score of the candidate's full prompt run alone.
Two layouts compute this, each without one copy of the user's keys/values per candidate for all
layers at once (that held 57 GiB at 40 users x 101 candidates for the 135M model):

* scoring (autograd off): the user parts run once and their keys/values are kept; the candidate
  parts then run as one batch, each layer reading its user's keys/values, gathered for that layer only.
* training (autograd on, where a gathered copy per layer would be kept for the backward pass): each
  user's part and all its candidates' parts are packed into one row. No cache, so gradient
  checkpointing works unchanged.

Only answer positions reach the output layer, in float32: scoring computes the Yes and No rows alone,
the training loss the full vocabulary its softmax needs. bf16 logits are too coarse (steps of 0.06-0.12
at typical sizes) for ``logit(Yes) - logit(No)`` to rank 100 candidates without ties.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

USER, PADDING = 0, -1  # segment ids in a block mask; candidates are 1, 2, ...
MASKABLE_ATTENTION = ("sdpa", "eager")  # implementations that take a custom 4D mask


@dataclass
class PromptBatch:
    """Token ids of prompt parts and where their soft embeddings go.

    ``ids[i]`` is a list of token ids; ``soft[i]`` maps a slot name to ``(positions, embeddings [n, H])``.
    """

    ids: list
    soft: list


def joined(parts):
    """One prompt ``(ids, soft)`` from ``(ids, soft)`` parts in order; soft positions move with their part."""
    ids, soft = [], {}
    for k, (part_ids, part_soft) in enumerate(parts):
        for name, (positions, value) in part_soft.items():
            soft[(k, name)] = ([len(ids) + p for p in positions], value)
        ids = ids + list(part_ids)
    return ids, soft


def padded(rows, length, fill, side="left"):
    """``[N, length]`` long tensor of the lists ``rows``, the ``fill`` on the ``side`` ``LoRARanker.embed`` pads (left
    by default: each row right-aligned)."""
    out = torch.full((len(rows), length), fill, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            start = length - len(row) if side == "left" else 0
            out[i, start:start + len(row)] = torch.tensor(row, dtype=torch.long)
    return out


class PrefixKeysValues:
    """Stands in for the decoder's cache: records the user parts' keys/values, then prepends them to
    the candidates' own, gathered per layer by ``owner`` (one layer's copy is alive at a time)."""

    def __init__(self):
        self.keys, self.values, self.owner = {}, {}, None

    def get_seq_length(self, layer_idx=0):
        """0: the decoders that ask (to number positions or build a causal mask) get explicit position ids and a
        4D mask from the ranker, so nothing depends on it; older transformers call it before looking."""
        return 0

    def update(self, keys, values, layer_idx, *args, **kwargs):
        if self.owner is None:
            self.keys[layer_idx], self.values[layer_idx] = keys, values
            return keys, values
        return (torch.cat([self.keys[layer_idx][self.owner], keys], dim=2),
                torch.cat([self.values[layer_idx][self.owner], values], dim=2))


class LoRARanker(nn.Module):
    """A frozen causal LLM with LoRA adapters that scores (user part, candidate part) prompts."""

    def __init__(self, llm, lora_rank, lora_alpha, lora_dropout, target_modules, yes_id, no_id,
                 gradient_checkpointing=False):
        super().__init__()
        attention = llm.get_decoder().config._attn_implementation
        if attention not in MASKABLE_ATTENTION:
            raise ValueError(f"the ranker needs block attention masks, which {attention!r} attention cannot take; "
                             f"load the LLM with attn_implementation in {MASKABLE_ATTENTION}")
        lora = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          target_modules=list(target_modules), task_type="CAUSAL_LM")
        self.llm = get_peft_model(llm, lora)
        self.yes_id, self.no_id = int(yes_id), int(no_id)
        self.additive_mask = attention == "eager"  # eager adds the mask to the scores; SDPA takes booleans
        # transformers 5 renamed the decoder's cache argument
        self.cache_argument = "cache" if "cache" in inspect.signature(llm.get_decoder().forward).parameters \
            else "past_key_values"
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            enable = getattr(self.llm, "activation_checkpointing_enable", None)  # transformers >= 5.2x renamed it
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.llm.enable_input_require_grads()

    @property
    def hidden_size(self):
        return self.llm.get_input_embeddings().weight.shape[1]

    def embed(self, batch: PromptBatch, padding_side="left"):
        """Token embeddings with the soft slots filled in; left-padded (or ``padding_side="right"``) ``[N, L, H]``
        and mask ``[N, L]``.

        One embedding lookup and one scatter for the whole batch (no per-row kernels).
        """
        table = self.llm.get_input_embeddings()
        device, dtype = table.weight.device, table.weight.dtype
        length = max(len(ids) for ids in batch.ids)
        ids = padded(batch.ids, length, 0, padding_side)
        mask = padded([[1] * len(row_ids) for row_ids in batch.ids], length, 0, padding_side)
        rows, cols, values = [], [], []
        for i, (row_ids, soft) in enumerate(zip(batch.ids, batch.soft)):
            offset = length - len(row_ids) if padding_side == "left" else 0
            for positions, value in soft.values():
                if positions:
                    rows += [i] * len(positions)
                    cols += [offset + p for p in positions]
                    values.append(value)
        embeds = table(ids.to(device))
        if values:
            index = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
            embeds = embeds.index_put(index, torch.cat(values).to(device=device, dtype=dtype))
        return embeds, mask.to(device)

    def _block_mask(self, segments, queries_from=0):
        """Attention mask ``[N, 1, Q, K]`` for the keys' ``segments`` ``[N, K]`` and the queries ``segments[:, queries_from:]``.

        A query sees earlier keys of its own segment and, from a candidate, of the user part; padding
        sees padding only, so no query row is empty (an empty one makes SDPA return NaN).
        """
        keys, queries = segments[:, None, :], segments[:, queries_from:, None]
        index = torch.arange(segments.shape[1], device=segments.device)
        causal = index <= index[queries_from:, None]  # [Q K]
        allowed = (causal & ((keys == queries) | ((keys == USER) & (queries > USER)))).unsqueeze(1)
        if not self.additive_mask:
            return allowed
        dtype = self.llm.get_input_embeddings().weight.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)

    def _shared_prefix_states(self, users, candidates, owner):
        """Scoring layout: last hidden state of each candidate ``[C, H]``, user parts run once."""
        decoder = self.llm.get_base_model().get_decoder()
        user_embeds, user_mask = self.embed(users)
        cand_embeds, cand_mask = self.embed(candidates)
        owner = owner.to(user_embeds.device)
        user_segments = user_mask - 1  # USER or PADDING
        cand_segments = 2 * cand_mask - 1  # the one candidate of its row (1) or PADDING
        prefix = PrefixKeysValues()
        decoder(inputs_embeds=user_embeds, attention_mask=self._block_mask(user_segments),
                position_ids=(user_mask.cumsum(1) - 1).clamp(min=0), **{self.cache_argument: prefix})
        prefix.owner = owner
        positions = user_mask.sum(1)[owner, None] + (cand_mask.cumsum(1) - 1).clamp(min=0)
        segments = torch.cat([user_segments[owner], cand_segments], dim=1)
        hidden = decoder(inputs_embeds=cand_embeds, attention_mask=self._block_mask(segments, user_mask.shape[1]),
                         position_ids=positions, **{self.cache_argument: prefix}).last_hidden_state
        return hidden[:, -1]

    def _packed_states(self, users, candidates, owner):
        """Training layout: last hidden state of each candidate ``[C, H]``, one row per user holding its
        part and then its candidates' parts (attention costs grow with the square of a row's length,
        fine for training's few candidates per user)."""
        members = [[] for _ in users.ids]
        for c, u in enumerate(owner.tolist()):
            members[u].append(c)
        rows, segments, positions = [], [], []
        answer = [None] * len(candidates.ids)  # (row, index in the row) of each candidate's last token
        for u, cands in enumerate(members):
            if not cands:
                continue
            user_length = len(users.ids[u])
            rows.append(joined([(users.ids[u], users.soft[u])] + [(candidates.ids[c], candidates.soft[c]) for c in cands]))
            segments.append([USER] * user_length)
            positions.append(list(range(user_length)))
            for segment, c in enumerate(cands, start=USER + 1):
                length = len(candidates.ids[c])
                segments[-1] += [segment] * length
                positions[-1] += range(user_length, user_length + length)
                answer[c] = (len(rows) - 1, len(segments[-1]) - 1)
        embeds, _ = self.embed(PromptBatch(*zip(*rows)))
        length, device = embeds.shape[1], embeds.device
        hidden = self.llm.get_base_model().get_decoder()(
            inputs_embeds=embeds, attention_mask=self._block_mask(padded(segments, length, PADDING).to(device)),
            position_ids=padded(positions, length, 0).to(device), use_cache=False).last_hidden_state
        row, index = torch.tensor(answer, device=device).T
        padding = length - torch.tensor([len(s) for s in segments], device=device)
        return hidden[row, padding[row] + index]

    def _answer_states(self, users, candidates, owner):
        """Last hidden state at the answer position of every candidate ``[C, H]``.

        ``owner[c]`` is the row in ``users`` whose prompt part candidate ``c`` continues.
        """
        if torch.is_grad_enabled():
            return self._packed_states(users, candidates, owner)
        return self._shared_prefix_states(users, candidates, owner)

    def output_logits(self, states, token_ids=None):
        """The output layer in float32 on ``states`` ``[C, H]``: all tokens ``[C, V]`` or only ``token_ids``."""
        head = self.llm.get_base_model().get_output_embeddings()
        weight, bias = head.weight, head.bias
        if token_ids is not None:
            weight, bias = weight[token_ids], None if bias is None else bias[token_ids]
        logits = states.float() @ weight.float().T
        return logits if bias is None else logits + bias.float()

    def answer_logits(self, users, candidates, owner):
        """Full-vocabulary logits at the answer position of every candidate, float32 ``[C, V]``."""
        return self.output_logits(self._answer_states(users, candidates, owner))

    def answer_log_probs(self, users, candidates, owner):
        """``(log p(Yes), log p(No))`` per candidate, each ``[C]``."""
        log_probs = self.answer_logits(users, candidates, owner).log_softmax(-1)
        return log_probs[:, self.yes_id], log_probs[:, self.no_id]

    def score(self, users, candidates, owner):
        """The ranking score ``log p(Yes) - log p(No)`` per candidate ``[C]``: only those two logits."""
        logits = self.output_logits(self._answer_states(users, candidates, owner), [self.yes_id, self.no_id])
        return logits[:, 0] - logits[:, 1]

    def loss(self, users, candidates, owner, labels):
        """Supervised fine-tuning loss on the answer token only: CE towards "Yes" (label 1) or "No" (0)."""
        return self.loss_and_scores(users, candidates, owner, labels)[0]

    def loss_and_scores(self, users, candidates, owner, labels):
        """``(loss, scores)`` of one forward: :meth:`loss`, and each candidate's ``log p(Yes) - log p(No)`` ``[C]``
        with its gradient (what a list-wise loss over the scores needs beside the pointwise one)."""
        log_probs = self.answer_logits(users, candidates, owner).log_softmax(-1)
        targets = torch.where(labels.to(log_probs.device) > 0, self.yes_id, self.no_id)
        loss = -log_probs.gather(1, targets.view(-1, 1)).mean()
        return loss, log_probs[:, self.yes_id] - log_probs[:, self.no_id]

    def list_logits(self, prompts: PromptBatch, option_ids):
        """List-wise scoring (LlamaRec's verbalizer): float32 logits ``[N, K]`` of the ``K`` option tokens ``option_ids``
        (e.g. the index letters of the listed candidates) at the last position of each whole prompt, one forward per
        prompt (causal). A candidate's score then depends on the list it is in: the caller fixes the list
        (the first stage's top-K in its order), never the target. Under autograd the logits train, e.g. by cross-entropy
        towards the target's option.

        The prompts are right-padded and run with no attention mask: under the causal mask alone a token never sees the
        padding after it, so each row's last real position is that of the prompt run alone, and SDPA may take its
        fused causal kernel instead of a masked one."""
        embeds, mask = self.embed(prompts, padding_side="right")
        rows, length = mask.shape
        hidden = self.llm.get_base_model().get_decoder()(
            inputs_embeds=embeds, position_ids=torch.arange(length, device=embeds.device).expand(rows, length),
            use_cache=False).last_hidden_state
        last = hidden[torch.arange(rows, device=hidden.device), mask.sum(1) - 1]
        return self.output_logits(last, list(option_ids))

    def trainable_state_dict(self):
        """Only the LoRA adapter tensors (the base model is frozen and identified by its hash)."""
        return {k: v for k, v in self.state_dict().items() if "lora_" in k}
