"""The LoRA ranker: answer-token-only loss, order invariance, cached == uncached scoring."""

import pytest
import torch
from transformers import LlamaForCausalLM

from recbole_mllm.model.prompting import PieceTokenizer, assemble, build_layout
from recbole_mllm.model.ranker import LoRARanker, PromptBatch
from recbole_mllm.stages.prompts import load_prompt
from tests.mllm.mllm_tiny import tiny_llama_config, tiny_tokenizer


@pytest.fixture(scope="module")
def setup():
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    llm = LlamaForCausalLM(tiny_llama_config(tokenizer)).eval()
    layout = build_layout(load_prompt("ranker", "v1"), tokenizer)
    ranker = LoRARanker(llm, 4, 8, 0.0, ["q_proj", "v_proj"], layout.yes_id, layout.no_id).eval()
    with torch.no_grad():  # non-zero LoRA B, so adapters matter in the comparisons below
        for name, p in ranker.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return tokenizer, layout, ranker


def _batches(setup, n_users=2, per_user=4, seed=1):
    tokenizer, layout, ranker = setup
    tok = PieceTokenizer(tokenizer)
    g = torch.Generator().manual_seed(seed)
    hidden = ranker.hidden_size
    users, cands, owner = PromptBatch([], []), PromptBatch([], []), []
    for u in range(n_users):
        ids, slots = assemble(layout.user, {"user_id": u, "profile": "a comedy fan" * (u + 1), "preference": "likes drama",
                                            "evolution": "more action lately", "recent_items": "Toy Story"},
                              {"user_state": 1}, tok, {})
        users.ids.append(ids)
        users.soft.append({"user_state": (slots["user_state"], torch.randn(1, hidden, generator=g))})
        for c in range(per_user):
            ids, slots = assemble(layout.target, {"user_id": u, "item_text": "movie " * (c + 1), "item_summary": "a film",
                                                  "match": "shares Comedy"},
                                  {"item_state": 1, "match_state": 1, "image": c % 3}, tok, {})
            soft = {k: (v, torch.randn(len(v), hidden, generator=g)) for k, v in slots.items() if v}
            cands.ids.append(ids)
            cands.soft.append(soft)
            owner.append(u)
    return users, cands, torch.tensor(owner)


def _subset(batch, index):
    return PromptBatch([batch.ids[i] for i in index], [batch.soft[i] for i in index])


@torch.no_grad()
def test_scores_do_not_depend_on_order_or_batch_neighbours(setup):
    _, _, ranker = setup
    users, cands, owner = _batches(setup)
    scores = ranker.score(users, cands, owner)
    perm = torch.randperm(len(owner), generator=torch.Generator().manual_seed(3))
    permuted = ranker.score(users, _subset(cands, perm.tolist()), owner[perm])
    torch.testing.assert_close(permuted, scores[perm], atol=1e-5, rtol=1e-5)
    alone = ranker.score(_subset(users, [1]), _subset(cands, [5]), torch.tensor([0]))
    torch.testing.assert_close(alone, scores[5:6], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_kv_cache_reuse_equals_one_concatenated_forward(setup):
    _, _, ranker = setup
    users, cands, owner = _batches(setup)
    cached = ranker.answer_logits(users, cands, owner)
    ranker.gradient_checkpointing, ranker.training = True, True  # the no-cache path (dropout is 0)
    try:
        plain = ranker.answer_logits(users, cands, owner)
    finally:
        ranker.gradient_checkpointing, ranker.training = False, False
    torch.testing.assert_close(cached, plain, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_loss_is_the_answer_token_cross_entropy_only(setup):
    _, layout, ranker = setup
    users, cands, owner = _batches(setup)
    labels = torch.tensor([1, 0, 0, 1, 0, 1, 0, 0])
    # reference: one plain forward per candidate over its full, unpadded prompt; only the last position counts
    expected = []
    for c, u in enumerate(owner.tolist()):
        user_embeds, _ = ranker.embed(_subset(users, [u]))
        cand_embeds, _ = ranker.embed(_subset(cands, [c]))
        logits = ranker.llm(inputs_embeds=torch.cat([user_embeds, cand_embeds], 1)).logits[0, -1]
        target = layout.yes_id if labels[c] else layout.no_id
        expected.append(-logits.log_softmax(-1)[target])
    torch.testing.assert_close(ranker.loss(users, cands, owner, labels), torch.stack(expected).mean(), atol=1e-4, rtol=1e-4)


def test_only_lora_tensors_are_trainable(setup):
    _, _, ranker = setup
    trainable = [n for n, p in ranker.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert set(ranker.trainable_state_dict()) == {n for n in ranker.state_dict() if "lora_" in n}
