"""The LoRA ranker: both layouts (scoring, training) give the scores and loss of the naive path, one full
left-padded prompt per candidate with no cache; order and batch invariance; gradient checkpointing."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from recbole_mllm.model.mllmsrec.prompting import PieceTokenizer, assemble, build_layout
from recbole_mllm.model.mllmsrec.ranker import LoRARanker, PromptBatch, joined
from recbole_mllm.stages.prompts import load_prompt
from tests.mllm.mllm_tiny import tiny_llama_config, tiny_tokenizer


def _ranker(tokenizer, layout, attention="sdpa", gradient_checkpointing=False):
    torch.manual_seed(0)
    llm = LlamaForCausalLM(tiny_llama_config(tokenizer, attn_implementation=attention))
    ranker = LoRARanker(llm, 4, 8, 0.0, ["q_proj", "k_proj", "v_proj"], layout.yes_id, layout.no_id,
                        gradient_checkpointing)
    with torch.no_grad():  # non-zero LoRA B, so adapters matter in the comparisons below
        for name, p in ranker.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    return ranker.eval()


@pytest.fixture(scope="module")
def setup():
    tokenizer = tiny_tokenizer()
    layout = build_layout(load_prompt("ranker", "v1"), tokenizer)
    return tokenizer, layout, _ranker(tokenizer, layout)


def _batches(setup, n_users=3, per_user=4, seed=1):
    """Users and candidates of different lengths (so rows are padded), with soft slots, owners interleaved."""
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
    for c in range(n_users * per_user):
        u = c % n_users
        ids, slots = assemble(layout.target, {"user_id": u, "item_text": "movie " * (c % 5 + 1), "item_summary": "a film",
                                              "match": "shares Comedy"},
                              {"item_state": 1, "match_state": 1, "image": c % 3}, tok, {})
        cands.ids.append(ids)
        cands.soft.append({k: (v, torch.randn(len(v), hidden, generator=g)) for k, v in slots.items() if v})
        owner.append(u)
    return users, cands, torch.tensor(owner)


def _subset(batch, index):
    return PromptBatch([batch.ids[i] for i in index], [batch.soft[i] for i in index])


def _naive_answer_logits(ranker, users, cands, owner):
    """The reference: each candidate's full prompt (its user's part, then its own, each embedded alone) in its own
    left-padded row, one plain forward, no cache."""
    rows = [torch.cat([ranker.embed(_subset(users, [u]))[0][0], ranker.embed(_subset(cands, [c]))[0][0]])
            for c, u in enumerate(owner.tolist())]
    length = max(len(row) for row in rows)
    embeds = torch.stack([nn.functional.pad(row, (0, 0, length - len(row), 0)) for row in rows])
    mask = torch.stack([(torch.arange(length) >= length - len(row)).long() for row in rows])
    return ranker.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits[:, -1]


def _naive_scores(ranker, users, cands, owner):
    logits = _naive_answer_logits(ranker, users, cands, owner)
    return logits[:, ranker.yes_id] - logits[:, ranker.no_id]


@dataclass
class Scored:
    """A batch scored in one layout; ``score`` scores other batches in the same layout."""

    ranker: LoRARanker
    grad: bool
    users: PromptBatch
    cands: PromptBatch
    owner: torch.Tensor
    scores: torch.Tensor = None

    def score(self, users, cands, owner):
        with torch.set_grad_enabled(self.grad):
            return self.ranker.score(users, cands, owner).detach()


# autograd off: user parts run once, candidates read their keys/values; on: one packed row per user
@pytest.fixture(params=[False, True], ids=["scoring-layout", "training-layout"])
def scored(setup, request):
    batch = Scored(setup[2], request.param, *_batches(setup))
    batch.scores = batch.score(batch.users, batch.cands, batch.owner)
    return batch


def test_scores_equal_the_naive_path(scored):
    with torch.no_grad():
        expected = _naive_scores(scored.ranker, scored.users, scored.cands, scored.owner)
    assert expected.std() > 0.01  # the comparison means something
    torch.testing.assert_close(scored.scores, expected, atol=2e-5, rtol=1e-5)


def test_eager_attention_gives_the_same_scores(setup, scored):
    eager = Scored(_ranker(*setup[:2], attention="eager"), scored.grad, scored.users, scored.cands, scored.owner)
    torch.testing.assert_close(eager.score(scored.users, scored.cands, scored.owner), scored.scores, atol=2e-5, rtol=1e-5)


def test_soft_slots_reach_the_scores(scored):
    users = PromptBatch(scored.users.ids, [dict(s) for s in scored.users.soft])
    cands = PromptBatch(scored.cands.ids, [dict(s) for s in scored.cands.soft])
    positions, value = users.soft[1]["user_state"]
    users.soft[1]["user_state"] = (positions, value + 1)
    positions, value = cands.soft[3]["match_state"]
    cands.soft[3]["match_state"] = (positions, value + 1)
    changed = scored.score(users, cands, scored.owner) != scored.scores
    assert changed.tolist() == [c % 3 == 1 or c == 3 for c in range(len(changed))]  # user 1's candidates and candidate 3


def test_scores_do_not_depend_on_candidate_order(scored):
    perm = torch.randperm(len(scored.owner), generator=torch.Generator().manual_seed(3))
    permuted = scored.score(scored.users, _subset(scored.cands, perm.tolist()), scored.owner[perm])
    torch.testing.assert_close(permuted, scored.scores[perm], atol=1e-5, rtol=1e-5)


def test_scores_do_not_depend_on_other_users_or_candidates_in_the_batch(scored):
    alone = scored.score(_subset(scored.users, [1]), _subset(scored.cands, [4]), torch.tensor([0]))
    torch.testing.assert_close(alone, scored.scores[4:5], atol=1e-5, rtol=1e-5)
    without_user_0 = scored.score(_subset(scored.users, [1, 2]), _subset(scored.cands, [1, 2, 5]), torch.tensor([0, 1, 1]))
    torch.testing.assert_close(without_user_0, scored.scores[[1, 2, 5]], atol=1e-5, rtol=1e-5)


def test_loss_is_the_naive_answer_token_cross_entropy(scored):
    labels = torch.tensor([1, 0, 0, 1, 0, 1, 0, 0, 1, 0, 0, 0])
    with torch.no_grad():
        log_probs = _naive_answer_logits(scored.ranker, scored.users, scored.cands, scored.owner).log_softmax(-1)
    targets = torch.where(labels > 0, scored.ranker.yes_id, scored.ranker.no_id)
    expected = -log_probs[torch.arange(len(labels)), targets].mean()
    with torch.set_grad_enabled(scored.grad):
        loss = scored.ranker.loss(scored.users, scored.cands, scored.owner, labels)
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)


def _loss_and_gradients(ranker, users, cands, owner, labels):
    ranker.train()
    ranker.zero_grad()
    loss = ranker.loss(users, cands, owner, labels)
    loss.backward()
    ranker.eval()
    return loss.detach(), {n: p.grad.clone() for n, p in ranker.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(setup):
    tokenizer, layout, _ = setup
    users, cands, owner = _batches(setup)
    labels = (torch.arange(len(owner)) % 4 == 0).long()
    plain = _loss_and_gradients(_ranker(tokenizer, layout), users, cands, owner, labels)
    checkpointed = _loss_and_gradients(_ranker(tokenizer, layout, gradient_checkpointing=True), users, cands, owner, labels)
    torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)
    assert all(g.abs().sum() > 0 for g in plain[1].values())


def test_only_lora_tensors_are_trainable(setup):
    _, _, ranker = setup
    trainable = [n for n, p in ranker.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert set(ranker.trainable_state_dict()) == {n for n in ranker.state_dict() if "lora_" in n}


def _fields_and_slots(pieces):
    return {p.value for p in pieces if p.kind in ("field", "soft")}


@pytest.mark.parametrize("use_soft_tokens, use_rank", [(True, True), (False, True), (True, False), (False, False)])
def test_v3_ablates_the_rank_line_and_the_soft_tokens_separately(use_soft_tokens, use_rank):
    layout = build_layout(load_prompt("ranker", "v3"), tiny_tokenizer(), use_soft_tokens=use_soft_tokens,
                          use_rank=use_rank)
    target = _fields_and_slots(layout.target)
    assert ("retrieval_rank" in target) == use_rank
    assert ("item_state" in target) == use_soft_tokens and ("match_state" in target) == use_soft_tokens
    assert ("user_state" in _fields_and_slots(layout.user)) == use_soft_tokens


def test_v2_ties_the_rank_to_the_soft_tokens_so_dropping_the_rank_alone_is_refused():
    v2 = load_prompt("ranker", "v2")
    assert "retrieval_rank" not in _fields_and_slots(build_layout(v2, tiny_tokenizer(), use_soft_tokens=False).target)
    with pytest.raises(ValueError, match="ranker_use_rank: False needs a prompt whose rank has a line of its own"):
        build_layout(v2, tiny_tokenizer(), use_rank=False)


def test_list_logits_are_each_prompts_own_last_position_logits_and_train_the_adapters(setup):
    tokenizer, layout, ranker = setup
    users, cands, owner = _batches(setup, n_users=3, per_user=2)
    lists = [joined([(users.ids[u], users.soft[u])] + [(cands.ids[c], cands.soft[c]) for c in (owner == u).nonzero().squeeze(1).tolist()])
             for u in range(3)]  # one prompt per user: its part, then its candidates' parts (different lengths)
    prompts = PromptBatch(*zip(*lists))
    options = [5, 7, 11]
    with torch.no_grad():
        batched = ranker.list_logits(prompts, options)
        alone = torch.cat([ranker.list_logits(PromptBatch([ids], [soft]), options) for ids, soft in lists])
    assert batched.shape == (3, 3) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)  # padding changes nothing
    head = ranker.llm.get_base_model().get_output_embeddings().weight
    hidden = ranker.llm.get_base_model().get_decoder()(inputs_embeds=ranker.embed(PromptBatch([lists[0][0]], [lists[0][1]]))[0],
                                                       use_cache=False).last_hidden_state[:, -1]
    torch.testing.assert_close(batched[0], (hidden.float() @ head[options].float().T)[0], atol=1e-4, rtol=1e-4)
    ranker.train()
    loss = torch.nn.functional.cross_entropy(ranker.list_logits(prompts, options), torch.tensor([0, 2, 1]))
    loss.backward()
    ranker.eval()
    grads = [p.grad for name, p in ranker.named_parameters() if "lora_" in name]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    ranker.zero_grad(set_to_none=True)
