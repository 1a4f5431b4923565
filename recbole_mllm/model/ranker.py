"""The LoRA-tuned generative ranker: score = log p(Yes) - log p(No) at the answer position.

The base LLM is frozen and wrapped by peft LoRA. A user's part of the prompt is encoded once; its
key/value cache is then repeated for each of the user's candidates, and only the candidate parts run
through the model again (KV-cache reuse). Every candidate attends to its user's part and to itself,
never to another candidate, so a score depends neither on candidate order nor on which other
candidates share the batch. With gradient checkpointing (which cannot keep a cache) the same padded
layout runs as one concatenated forward instead: identical scores, more compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from torch import nn


@dataclass
class PromptBatch:
    """Token ids of prompt parts and where their soft embeddings go.

    ``ids[i]`` is a list of token ids; ``soft[i]`` maps a slot name to ``(positions, embeddings [n, H])``.
    """

    ids: list
    soft: list


class LoRARanker(nn.Module):
    """A frozen causal LLM with LoRA adapters that scores (user part, candidate part) prompts."""

    def __init__(self, llm, lora_rank, lora_alpha, lora_dropout, target_modules, yes_id, no_id,
                 gradient_checkpointing=False):
        super().__init__()
        lora = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          target_modules=list(target_modules), task_type="CAUSAL_LM")
        self.llm = get_peft_model(llm, lora)
        self.yes_id, self.no_id = int(yes_id), int(no_id)
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.llm.enable_input_require_grads()

    @property
    def hidden_size(self):
        return self.llm.get_input_embeddings().weight.shape[1]

    def embed(self, batch: PromptBatch):
        """Token embeddings with the soft slots filled in; left-padded ``[N, L, H]`` and mask ``[N, L]``.

        One embedding lookup and one scatter for the whole batch (no per-row kernels).
        """
        table = self.llm.get_input_embeddings()
        device, dtype = table.weight.device, table.weight.dtype
        length = max(len(ids) for ids in batch.ids)
        ids = torch.zeros(len(batch.ids), length, dtype=torch.long)
        mask = torch.zeros(len(batch.ids), length, dtype=torch.long)
        rows, cols, values = [], [], []
        for i, (row_ids, soft) in enumerate(zip(batch.ids, batch.soft)):
            offset = length - len(row_ids)
            ids[i, offset:] = torch.tensor(row_ids, dtype=torch.long)
            mask[i, offset:] = 1
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

    def answer_logits(self, users: PromptBatch, candidates: PromptBatch, owner: torch.Tensor):
        """Full-vocabulary logits at the answer position of every candidate, float32 ``[C, V]``.

        ``owner[c]`` is the row in ``users`` whose prompt part candidate ``c`` continues. The output
        layer runs in float32 on the last hidden state: bf16 logits are too coarse (steps of 0.06-0.12
        at typical sizes) for ``logit(Yes) - logit(No)`` to rank 100 candidates without ties.
        """
        base = self.llm.get_base_model()
        decoder, head = base.get_decoder(), base.get_output_embeddings()
        user_embeds, user_mask = self.embed(users)
        cand_embeds, cand_mask = self.embed(candidates)
        owner = owner.to(user_embeds.device)
        mask = torch.cat([user_mask[owner], cand_mask], dim=1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        if self.gradient_checkpointing and self.training:
            hidden = decoder(inputs_embeds=torch.cat([user_embeds[owner], cand_embeds], dim=1), attention_mask=mask,
                             position_ids=positions, use_cache=False).last_hidden_state
        else:
            prefix = decoder(inputs_embeds=user_embeds, attention_mask=user_mask,
                             position_ids=(user_mask.cumsum(1) - 1).clamp(min=0), use_cache=True)
            cache = prefix.past_key_values
            cache.reorder_cache(owner)  # one copy of the user's keys/values per candidate
            hidden = decoder(inputs_embeds=cand_embeds, attention_mask=mask, position_ids=positions[:, user_mask.shape[1]:],
                             past_key_values=cache, use_cache=True).last_hidden_state
        logits = hidden[:, -1].float() @ head.weight.float().T
        return logits if head.bias is None else logits + head.bias.float()

    def answer_log_probs(self, users, candidates, owner):
        """``(log p(Yes), log p(No))`` per candidate, each ``[C]``."""
        log_probs = self.answer_logits(users, candidates, owner).log_softmax(-1)
        return log_probs[:, self.yes_id], log_probs[:, self.no_id]

    def score(self, users, candidates, owner):
        """The ranking score ``log p(Yes) - log p(No)`` per candidate ``[C]``."""
        logits = self.answer_logits(users, candidates, owner)
        return logits[:, self.yes_id] - logits[:, self.no_id]

    def loss(self, users, candidates, owner, labels):
        """Supervised fine-tuning loss on the answer token only: CE towards "Yes" (label 1) or "No" (0)."""
        log_probs = self.answer_logits(users, candidates, owner).log_softmax(-1)
        targets = torch.where(labels.to(log_probs.device) > 0, self.yes_id, self.no_id)
        return -log_probs.gather(1, targets.view(-1, 1)).mean()

    def trainable_state_dict(self):
        """Only the LoRA adapter tensors (the base model is frozen and identified by its hash)."""
        return {k: v for k, v in self.state_dict().items() if "lora_" in k}
