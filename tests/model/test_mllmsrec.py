"""MLLMSRec end to end on CPU with a tiny random Llama: RecBole train/evaluate, invariances, checkpoints, leakage."""

import logging
import os
import re

import numpy as np
import pytest
import torch

from recbole_mllm.config import Config
from recbole_mllm.data import create_dataset, data_preparation
from recbole_mllm.quick_start import build_model, run, split_and_build_model
from recbole_mllm.stages.prepare import prepare_stages
from recbole_mllm.utils import get_model
from tests.conftest import write_tiny_dataset

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture
def mllm_config(tiny_data, stage_setup):
    """The pointwise ranker (``properties/ranker/pointwise.yaml``, without late fusion), which most tests here check;
    the list-wise tests layer ``listwise`` over it. The encoder warms up on RecBole's rows (``train_positions: last``),
    which several tests hand the trainer themselves; the tests of window rows set ``all``."""
    return dict(tiny_data, **stage_setup, ranker_scoring="pointwise", late_fusion_grid=None, train_positions="last",
                encoder_warmup_epochs=1, epochs=1, item_text_fields=["title", "genres"],
                item_title_field="title", item_category_field="genres", user_summary_max_new_tokens=6,
                user_window_size=4, user_window_step=4, ranker_eval_batch_size=128, rerank_top_k=5, train_batch_size=64,
                ranker_train_negatives=2, lora_target_modules=["q_proj", "v_proj"], hidden_size=8, inner_size=16)


def _sequences(model, uids):
    """Left-aligned input sequences ``[B L]`` and lengths of each user's whole training history."""
    histories = [model.context.histories[u][:len(model.context.histories[u]) - 2][-model.max_seq_length:] for u in uids]
    seqs = torch.zeros(len(uids), model.max_seq_length, dtype=torch.long)
    for row, history in enumerate(histories):
        seqs[row, :len(history)] = torch.as_tensor(history)
    return seqs, torch.tensor([len(h) for h in histories])


def _model_and_data(config_dict):
    """The model as ``quick_start.run`` builds it: after the split and the stage caches it reads."""
    config = Config("MLLMSRec", "tiny", config_dict=config_dict)
    model, _, _, test_data = split_and_build_model(config, create_dataset(config))
    return config, model.eval(), test_data


def test_full_recbole_train_and_test_cycle(mllm_config):
    result = run("MLLMSRec", "tiny", config_dict=mllm_config)
    assert set(result["test_result"]) == {"uni100", "full"}
    for metrics in result["test_result"].values():
        assert 0.0 <= metrics["ndcg@10"] <= metrics["hit@10"] <= 1.0


@torch.no_grad()
def test_predict_ignores_candidate_order_and_block_position(mllm_config):
    _, model, test_data = _model_and_data(mllm_config)
    interaction, row_idx, _, _ = next(iter(test_data["uni100"]))
    scores = model.predict(interaction)
    perm = torch.randperm(len(row_idx), generator=torch.Generator().manual_seed(0))
    permuted = model.predict(interaction[perm])
    torch.testing.assert_close(permuted, scores[perm], atol=1e-4, rtol=1e-4)
    one_user = (row_idx == row_idx[0]).nonzero().squeeze(1)
    torch.testing.assert_close(model.predict(interaction[one_user]), scores[one_user], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_sampled_and_full_ranking_are_the_same_two_stage_scores(mllm_config):
    """uni100's predict and full ranking give an item the same score: the LLM's inside the encoder's top-K, the
    encoder's order below them outside it."""
    from recbole_mllm.model.mllmsrec import RERANK_FLOOR

    _, model, test_data = _model_and_data(mllm_config)
    interaction, row_idx, _, _ = next(iter(test_data["uni100"]))
    users = row_idx.unique()[:3]
    rows = torch.cat([(row_idx == u).nonzero().squeeze(1) for u in users])
    block = interaction[rows]
    sampled = model.predict(block)
    firsts = torch.stack([(row_idx[rows] == u).nonzero()[0, 0] for u in users])
    full = model.full_sort_predict(block[firsts])  # [U n_items]
    owner = torch.cat([torch.full(((row_idx == u).sum(),), k) for k, u in enumerate(users)])
    candidates = block[model.ITEM_ID]
    torch.testing.assert_close(sampled, full[owner, candidates], atol=1e-4, rtol=1e-4)
    top = model.scorer.catalogue_scores(model.forward(block[model.ITEM_SEQ][firsts], block[model.ITEM_SEQ_LEN][firsts]),
                                        block[model.USER_ID][firsts].tolist(), model.positions(block[firsts]))
    top = top.topk(model.rerank_top_k, dim=1).indices
    in_top = (top[owner] == candidates.unsqueeze(1)).any(1)
    assert in_top.any() and (~in_top).any()
    assert (sampled[in_top] > -RERANK_FLOOR).all() and (sampled[~in_top] < -RERANK_FLOOR).all()
    for k in range(len(users)):  # no ties between distinct items for a tie-break to decide
        mine = owner == k
        assert len(set(sampled[mine].tolist())) == len(set(candidates[mine].tolist()))


@torch.no_grad()
def test_late_fusion_fallback_adds_the_weighted_encoder_score(mllm_config):
    from recbole_mllm.model.mllmsrec import RERANK_FLOOR

    _, model, test_data = _model_and_data(mllm_config)
    interaction = next(iter(test_data["uni100"]))[0]
    llm = model.predict(interaction)
    reranked = llm > -RERANK_FLOOR
    with model.scoring(encoder_only=True):
        encoder = model.predict(interaction)
    with model.scoring(fusion_weight=2.5):
        fused = model.predict(interaction)
    torch.testing.assert_close(fused[reranked], (llm + 2.5 * encoder)[reranked], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused[~reranked], llm[~reranked])


@torch.no_grad()  # as RecBole evaluates: predict with autograd kept every LLM activation of the batch (8 GB)
def test_checkpoint_holds_only_trained_tensors_and_reloads_identically(mllm_config, tmp_path):
    _, model, test_data = _model_and_data(mllm_config)
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.add_(0.01 * torch.randn_like(p))
    interaction = next(iter(test_data["uni100"]))[0]
    expected = model.predict(interaction)
    state = model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(state) == trainable
    assert not any(k.endswith("embed_tokens.weight") or "base_layer" in k for k in state)
    torch.save({"state_dict": state, "other_parameter": model.other_parameter()}, tmp_path / "ckpt.pth")
    _, fresh, _ = _model_and_data(mllm_config)
    checkpoint = torch.load(tmp_path / "ckpt.pth", weights_only=False)
    fresh.load_state_dict(checkpoint["state_dict"])
    fresh.load_other_parameter(checkpoint["other_parameter"])
    torch.testing.assert_close(fresh.predict(interaction), expected, atol=1e-5, rtol=1e-5)


def test_training_negatives_are_never_training_items_of_the_user(mllm_config):
    _, model, _ = _model_and_data(mllm_config)
    for uid in range(1, 6):
        history = model.context.histories[uid]
        negatives = model.candidates.sample_negatives(uid, 5)
        assert len(set(negatives)) == 5
        assert not set(negatives) & set(history[:len(history) - 2].tolist())


def test_hard_negatives_are_unseen_items_from_the_encoders_top_k(mllm_config):
    _, model, _ = _model_and_data(dict(mllm_config, ranker_hard_negatives=2))
    user_states = model.forward(*_sequences(model, range(1, 6)))
    scores = model.encoder.full_scores(user_states)
    for k, uid in enumerate(range(1, 6)):
        hard = model.candidates.hard_negatives(uid, scores[k])
        assert len(set(hard)) == 2 and not set(hard) & model.candidates.user_seen[uid] and 0 not in hard
        unseen = scores[k].clone()
        unseen[[0] + sorted(model.candidates.user_seen[uid])] = -torch.inf
        assert set(hard) <= set(unseen.topk(model.rerank_top_k).indices.tolist())
        uniform = model.candidates.sample_negatives(uid, 3, hard)
        assert not set(uniform) & (set(hard) | model.candidates.user_seen[uid])


@pytest.mark.parametrize("mask", [True, False])
def test_prompted_rank_counts_the_items_the_encoder_scores_higher(mllm_config, mask):
    """The rank in the prompt counts the items the first stage scores higher, among the items it ranks: with
    ``mask_history`` the user's history before ``t`` is not ranked."""
    _, model, _ = _model_and_data(mllm_config)
    assert model.prompts.has_retrieval_rank
    uids = [1, 2]
    seqs, lengths = _sequences(model, uids)
    ts = lengths.tolist()
    user_states = model.forward(seqs, lengths)
    candidates, owner = torch.tensor([3, 7, 3, 9]), torch.tensor([0, 0, 1, 1])
    with model.scoring(mask_history=mask):
        ranks = model.scorer.retrieval_ranks(user_states, candidates, owner, uids, ts)
        alone = model.scorer.retrieval_ranks(user_states, candidates[[2]], owner[[2]], uids, ts)
    scores = (user_states @ model.encoder.item_states().T)[:, 1:]  # never the padding item
    ranked = torch.ones_like(scores, dtype=torch.bool)
    if mask:
        for row, (uid, t) in enumerate(zip(uids, ts)):
            ranked[row, torch.as_tensor(model.context.histories[uid][:t]) - 1] = False
    own = [scores[o, c - 1] if ranked[o, c - 1] else -torch.inf for c, o in zip(candidates.tolist(), owner.tolist())]
    expected = [1 + int(((scores[o] > s) & ranked[o]).sum()) for s, o in zip(own, owner.tolist())]
    assert ranks == expected
    assert alone == [ranks[2]]  # alone, beside other candidates or in another order: the same rank


def test_soft_tokens_start_at_the_scale_of_token_embeddings(mllm_config):
    _, model, _ = _model_and_data(mllm_config)
    token_std = model.backend.model.get_input_embeddings().weight.std()
    tokens = model.user_projection(torch.randn(256, model.hidden_size))
    assert 0.7 < float(tokens.std() / token_std) < 1.4


def test_checkpoint_of_other_switches_is_refused(mllm_config):
    _, model, _ = _model_and_data(mllm_config)
    _, other, _ = _model_and_data(dict(mllm_config, ranker_use_cot=False))
    with pytest.raises(ValueError, match="inputs"):
        other.load_other_parameter(model.other_parameter())


def test_encoder_warm_up_stops_early_and_keeps_the_best_encoder(mllm_config):
    from recbole_mllm.trainer import MLLMSRecTrainer

    config, model, _ = _model_and_data(dict(mllm_config, encoder_warmup_epochs=6, encoder_warmup_stopping_step=1,
                                            encoder_warmup_cache=False, stopping_min_steps=0))
    trainer = MLLMSRecTrainer(config, model)
    valid_scores, states = iter([0.1, 0.3, 0.2, 0.5]), []

    def train_epoch(train_data, epoch_idx, loss_func=None, show_progress=False):
        assert not model.uses_llm  # the warm-up scores with the encoder alone
        with torch.no_grad():
            next(model.encoder.parameters()).add_(1.0)
        states.append({k: v.clone() for k, v in model.encoder.state_dict().items()})
        return 0.0

    trainer._train_epoch = train_epoch
    trainer._valid_epoch = lambda valid_data, show_progress=False: (next(valid_scores), {})
    trainer._warm_up_encoder(None, "valid", verbose=False, show_progress=False)
    assert len(states) == 3  # 0.1, 0.3 (best), 0.2: one epoch without gain stops it
    assert model.uses_llm
    for name, value in model.encoder.state_dict().items():
        torch.testing.assert_close(value, states[1][name])


def test_warmed_up_encoder_is_reused_by_a_run_that_differs_only_in_the_ranker(mllm_config, tmp_path):
    from recbole_mllm.trainer import MLLMSRecTrainer

    settings = dict(mllm_config, encoder_warmup_epochs=2, encoder_warmup_stopping_step=0,
                    stage_cache_dir=mllm_config["stage_cache_dir"], checkpoint_dir=str(tmp_path))
    config, model, _ = _model_and_data(settings)
    trainer = MLLMSRecTrainer(config, model)

    def train_epoch(train_data, epoch_idx, loss_func=None, show_progress=False):
        with torch.no_grad():
            next(model.encoder.parameters()).add_(1.0)
        return 0.0

    trainer._train_epoch = train_epoch
    trainer._warm_up_encoder(None, None, verbose=False, show_progress=False)
    assert trainer.warmup_cache.is_file()

    config2, ablated, _ = _model_and_data(dict(settings, ranker_use_cot=False))
    reuser = MLLMSRecTrainer(config2, ablated)
    assert reuser.warmup_cache == trainer.warmup_cache
    reuser._train_epoch = lambda *args, **kwargs: pytest.fail("a reused warm-up must not train")
    reuser._warm_up_encoder(None, None, verbose=False, show_progress=False)
    for name, value in ablated.encoder.state_dict().items():
        torch.testing.assert_close(value, model.encoder.state_dict()[name])
    other = MLLMSRecTrainer(*_model_and_data(dict(settings, hidden_size=16))[:2])
    assert other.warmup_cache != trainer.warmup_cache


def test_an_update_with_non_finite_gradients_is_skipped(mllm_config):
    from recbole_mllm.trainer import MLLMSRecTrainer

    config, model, _ = _model_and_data(mllm_config)
    trainer = MLLMSRecTrainer(config, model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for p in before:
        model.get_parameter(p).grad = torch.ones_like(before[p])
    next(p for p in model.parameters() if p.requires_grad).grad[0] = float("nan")
    trainer._step()
    assert trainer.skipped_steps == 1
    assert all(torch.equal(model.get_parameter(n), v) for n, v in before.items())
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    for p in before:
        model.get_parameter(p).grad = torch.ones_like(before[p])
    trainer._step()  # a finite update goes through
    assert trainer.skipped_steps == 1
    assert any(not torch.equal(model.get_parameter(n), v) for n, v in before.items())


def test_score_fusion_script_scores_the_llm_once_per_protocol(mllm_config):
    from scripts import score_fusion_eval

    _, _, test_data = _model_and_data(mllm_config)
    batches = sum(len(loader) for loader in test_data.values())
    from recbole_mllm.model.mllmsrec.scorer import TwoStageScorer

    calls, score_blocks = [], TwoStageScorer._score_blocks

    def counted(self, *args):
        calls.append(1)
        return score_blocks(self, *args)

    argv = [f"--{k}={v!r}" for k, v in mllm_config.items()] + ["--dataset='tiny'", "--fusion_weights='0.5,2'"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TwoStageScorer, "_score_blocks", counted)
        results = score_fusion_eval.main(argv)
    assert set(results) == {(p, n) for p in ("uni100", "full") for n in ("llm", "encoder", "fusion w=0.5", "fusion w=2")}
    assert 0 < len(calls) <= batches  # three LLM-scored passes per protocol, one LLM pass each


def test_test_protocols_score_an_item_for_a_user_once_and_as_without_reuse(mllm_config):
    """Inside ``reuse_llm_scores`` (``quick_start.run``'s tests) full ranking scores only the items uni100 did not,
    and every protocol's metrics are those of scoring it alone."""
    from recbole_mllm.trainer import MLLMSRecTrainer

    config, model, test_data = _model_and_data(mllm_config)
    trainer, scored = MLLMSRecTrainer(config, model), []
    llm_scores = model.llm_scores

    def counted(uids, ts, user_states, candidates, owner, labels=None):
        scored.extend((uids[o], ts[o], c) for o, c in zip(owner.tolist(), candidates.tolist()))
        return llm_scores(uids, ts, user_states, candidates, owner, labels)

    model.llm_scores = counted
    alone = {p: dict(trainer.evaluate(loader, load_best_model=False)) for p, loader in test_data.items()}
    each = len(scored)
    scored.clear()
    with model.reuse_llm_scores():
        reused = {p: dict(trainer.evaluate(loader, load_best_model=False)) for p, loader in test_data.items()}
    assert reused == alone
    assert len(scored) == len(set(scored)) < each  # uni100's reranked items were among full ranking's


def test_evaluation_also_reports_the_encoder_alone(mllm_config):
    from recbole_mllm.trainer import MLLMSRecTrainer

    config, model, test_data = _model_and_data(mllm_config)
    trainer = MLLMSRecTrainer(config, model)
    result = trainer.evaluate(test_data["uni100"], load_best_model=False)
    assert model.uses_llm
    first_stage = trainer.last_first_stage_result
    with model.scoring(encoder_only=True):
        expected = trainer.evaluate(test_data["uni100"], load_best_model=False)
    assert dict(first_stage) == dict(expected)
    assert dict(trainer.evaluate(test_data["uni100"], load_best_model=False)) == dict(result)


def test_warm_up_cache_key_covers_every_input(mllm_config, monkeypatch):
    import dataclasses

    from recbole_mllm.model.mllmsrec import MLLMSRec
    from recbole_mllm.trainer import MLLMSRecTrainer

    config, model, _ = _model_and_data(mllm_config)
    trainer = MLLMSRecTrainer(config, model)
    base = trainer._warmup_cache_path(True)
    assert MLLMSRecTrainer(config, model)._warmup_cache_path(True) == base  # an identical config: the same path
    assert trainer._warmup_cache_path(False) != base  # an unvalidated warm-up never stands in for a validated one
    for key, value in (("gradient_accumulation_steps", 2), ("enable_amp", not config["enable_amp"]),
                       ("mllm_dtype", "float16"), ("eval_args", dict(config["eval_args"], order="RO")),
                       ("train_positions", "all"), ("encoder_warmup_batch_size", 16)):
        with monkeypatch.context() as patch:
            patch.setitem(config.final_config_dict, key, value)
            assert trainer._warmup_cache_path(True) != base, key
    with monkeypatch.context() as patch:
        identity = model.backend.identity
        other_dtype = "float16" if identity.dtype != "float16" else "float32"
        patch.setattr(type(model.backend), "identity", property(lambda self: dataclasses.replace(identity, dtype=other_dtype)))
        assert trainer._warmup_cache_path(True) != base, "resolved dtype"
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "device", torch.device("cuda"))
        assert trainer._warmup_cache_path(True) != base, "device type"
    with monkeypatch.context() as patch:
        def encoder_loss(self, interaction):  # other warm-up code
            return 2 * torch.nn.functional.cross_entropy(self.encoder.full_scores(self.forward(
                interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])), interaction[self.POS_ITEM_ID])

        patch.setattr(MLLMSRec, "encoder_loss", encoder_loss)
        assert trainer._warmup_cache_path(True) != base, "code"
    assert trainer._warmup_cache_path(True) == base


def test_a_real_warm_up_runs_none_of_the_functions_left_out_of_its_cache_key(mllm_config, tmp_path, monkeypatch):
    """``after_warmup`` functions are left out of the warm-up's code hash, so none of them may run in a warm-up: a
    validated warm-up on the tiny data, each of them raising, trains and saves its encoder."""
    import recbole_mllm.trainer as trainer_module
    from recbole_mllm.encoder_warmup_cache import after_warmup_functions

    marked = after_warmup_functions(trainer_module)
    assert {f.__name__ for f in marked} >= {"select_fusion_weight", "_llm_rows", "_first_stage_alone"}
    for function in marked:
        owner = trainer_module.MLLMSRecTrainer if "." in function.__qualname__ else trainer_module
        monkeypatch.setattr(owner, function.__name__, lambda *a, _name=function.__name__, **k: pytest.fail(_name))
    settings = dict(mllm_config, encoder_warmup_epochs=2, encoder_warmup_stopping_step=1,
                    stage_cache_dir=str(tmp_path / "cache"), checkpoint_dir=str(tmp_path))
    config, dataset = _config_and_dataset(settings)
    model, train_data, valid_data, _ = split_and_build_model(config, dataset)
    trainer = trainer_module.MLLMSRecTrainer(config, model)
    trainer._warm_up_encoder(train_data, valid_data, verbose=False, show_progress=False)
    assert trainer.warmup_cache.is_file()


def test_editing_a_function_marked_after_warmup_keeps_the_warm_up_key_and_any_other_edit_changes_it(mllm_config,
                                                                                                  tmp_path):
    import importlib.util

    from recbole_mllm.encoder_warmup_cache import code_sha256

    _, model, _ = _model_and_data(mllm_config)
    template = """from recbole_mllm.encoder_warmup_cache import after_warmup


class Trainer:
    def warm_up(self):
        return {warm}

    @after_warmup
    def choose_fusion(self):
        return {fusion}


@after_warmup
def check(config):
    return {check}
"""

    def key(name, **bodies):
        path = tmp_path / f"{name}.py"
        path.write_text(template.format(**{"warm": 1, "fusion": 1, "check": 1, **bodies}))
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return code_sha256(model, module)

    base = key("base")
    assert key("fusion_edited", fusion=2) == base and key("check_edited", check=2) == base
    assert key("warm_up_edited", warm=2) != base


def test_unvalidated_and_validated_warm_ups_are_cached_apart(mllm_config, tmp_path):
    from recbole_mllm.trainer import MLLMSRecTrainer

    settings = dict(mllm_config, encoder_warmup_epochs=1, encoder_warmup_stopping_step=2,
                    stage_cache_dir=mllm_config["stage_cache_dir"], checkpoint_dir=str(tmp_path))
    config, model, _ = _model_and_data(settings)
    trainer = MLLMSRecTrainer(config, model)
    trainer._train_epoch = lambda *args, **kwargs: 0.0
    trainer._valid_epoch = lambda valid_data, show_progress=False: (0.5, {})
    trainer._warm_up_encoder(None, None, verbose=False, show_progress=False)  # as a run without valid data
    unvalidated = trainer.warmup_cache
    assert unvalidated.is_file()
    validating = MLLMSRecTrainer(config, model)
    trained = []
    validating._train_epoch = lambda *args, **kwargs: trained.append(1) or 0.0
    validating._valid_epoch = trainer._valid_epoch
    validating._warm_up_encoder(None, "valid", verbose=False, show_progress=False)
    assert trained, "a validated warm-up must not reuse an unvalidated one"
    assert validating.warmup_cache != unvalidated and validating.warmup_cache.is_file()


def _split_rows(model, train_data):
    """``{uid: [t of every row the LLM trains on]}`` over the whole training data."""
    selected = {}
    for interaction in train_data:
        rows, ts = model.candidates.llm_rows(interaction, model.positions)
        for r, t in zip(rows, ts):
            selected.setdefault(int(interaction[model.USER_ID][r]), []).append(t)
    return selected


@pytest.mark.parametrize("split", ["test_only", "valid_only"])
def test_llm_trains_on_the_last_training_targets_of_a_one_target_split(mllm_config, split):
    eval_args = {"split": {"LS": split}, "order": "TO", "group_by": "user", "mode": "full"}
    config = Config("MLLMSRec", "tiny", config_dict=dict(mllm_config, eval_args=eval_args, test_protocols=None))
    prepare_stages(config, get_model("MLLMSRec").required_stages)
    train_dataset = create_dataset(config).build()[0]
    model = build_model(config, train_dataset)
    train_data = data_preparation(config, create_dataset(config))[0]
    selected = _split_rows(model, train_data)
    targets = config["llm_train_targets_per_user"]
    assert targets == 2
    for uid in range(1, len(model.context.histories)):
        n = len(model.context.histories[uid])  # one held out: training targets end at t = n - 2
        assert sorted(selected[uid]) == [n - 3, n - 2], uid
        assert all((uid, t) in model.prompts.summaries for t in selected[uid])


def _write_repeating_dataset(root):
    """The tiny dataset, with user u1's last training target repeating its item at t = 1, and its test target
    repeating its item at t = 2. Returns the repeating user's token."""
    folder = write_tiny_dataset(root)
    inter = folder / "tiny.inter"
    lines = inter.read_text().splitlines()
    rows = [k for k, line in enumerate(lines) if line.startswith("u1\t")]
    items = [lines[k].split("\t")[1] for k in rows]

    def put(k, item):
        fields = lines[rows[k]].split("\t")
        lines[rows[k]] = "\t".join([fields[0], item, *fields[2:]])

    put(len(rows) - 3, items[1])
    put(len(rows) - 1, items[2])
    inter.write_text("\n".join(lines) + "\n")
    return "u1"


def test_a_repeated_item_trains_the_llm_at_its_own_position_only(mllm_config, tmp_path):
    user = _write_repeating_dataset(tmp_path / "data")
    config, model, _ = _model_and_data(dict(mllm_config, data_path=str(tmp_path / "data")))
    uid = model.context.user_tokens.index(user)
    history = model.context.histories[uid]
    n = len(history)
    assert history[n - 3] == history[1] and history[n - 1] == history[2]
    train_data = data_preparation(config, create_dataset(config))[0]
    assert sorted(_split_rows(model, train_data)[uid]) == [n - 4, n - 3]  # never the rows at t = 1 and t = 2
    for interaction in train_data:
        mine = (interaction[model.USER_ID] == uid).nonzero().squeeze(1)
        if len(mine):
            model.train()
            assert torch.isfinite(model.calculate_loss(interaction[mine]))  # every prompt has its summary


@torch.no_grad()
def test_a_missing_user_summary_is_an_error_naming_the_user(mllm_config):
    _, model, test_data = _model_and_data(mllm_config)
    interaction = next(iter(test_data["full"]))[0][:1]
    uid, t = int(interaction[model.USER_ID][0]), model.positions(interaction)[0]
    expected = model.full_sort_predict(interaction)
    del model.prompts.summaries[(uid, t)]
    with pytest.raises(KeyError, match=f"user '{model.context.user_tokens[uid]}' at position {t}.*recbole_mllm.stages.user_profile"):
        model.full_sort_predict(interaction)
    model.prompts.use_summaries = False  # without summaries nothing is looked up
    assert model.full_sort_predict(interaction).shape == expected.shape


def test_train_positions_all_warms_the_encoder_up_on_windows_and_keeps_the_joint_rows(mllm_config):
    """``all`` gives MLLMSRec's warm-up FusedSASRec's training (windows, the loss at every position); the joint
    epochs keep RecBole's rows, whose positions the LLM trains on."""
    from recbole_mllm.data.windows import window_rows
    from recbole_mllm.train_positions import all_positions_loss
    from recbole_mllm.trainer import MLLMSRecTrainer

    settings = dict(mllm_config, encoder_warmup_cache=False, encoder_warmup_epochs=2, encoder_warmup_stopping_step=0)
    prefix_rows = len(split_and_build_model(*_config_and_dataset(settings))[1]._dataset)
    config, dataset = _config_and_dataset(dict(settings, train_positions="all", encoder_warmup_batch_size=16))
    model, train_data, valid_data, _ = split_and_build_model(config, dataset)
    assert len(train_data._dataset) == prefix_rows  # the joint epochs' rows are RecBole's
    trainer, seen = MLLMSRecTrainer(config, model), []
    train_epoch = trainer._train_epoch

    def spy(data, epoch_idx, loss_func=None, show_progress=False):
        seen.append((data, loss_func))
        return train_epoch(data, epoch_idx, loss_func, show_progress)

    trainer._train_epoch = spy
    trainer._warm_up_encoder(train_data, valid_data, verbose=False, show_progress=False)
    assert len(seen) == 2
    windows, loss_func = seen[0]
    users = train_data._dataset.inter_feat["user_id"].numpy()
    assert len(windows._dataset) == window_rows(users, config["MAX_ITEM_LIST_LENGTH"]).sum() < prefix_rows
    assert windows.step == 16
    batch, _ = next(iter(windows)), model.eval()  # no dropout: both losses see the same network
    torch.testing.assert_close(loss_func(batch), all_positions_loss(model, batch))


def test_a_warm_up_batch_size_without_window_rows_is_refused(mllm_config):
    from recbole_mllm.trainer import MLLMSRecTrainer

    config, dataset = _config_and_dataset(dict(mllm_config, encoder_warmup_batch_size=16))
    model, train_data, _, _ = split_and_build_model(config, dataset)
    with pytest.raises(ValueError, match="encoder_warmup_batch_size applies to train_positions: all"):
        MLLMSRecTrainer(config, model)._warmup_rows(train_data)


def _config_and_dataset(config_dict):
    config = Config("MLLMSRec", "tiny", config_dict=config_dict)
    return config, create_dataset(config)


def test_top_k_training_lists_are_the_lists_evaluation_reranks():
    """``ranker_train_candidates: top_k``: a target outside its row's top-K trains nothing; a kept row's negatives
    come from that top-K (masked items never), drawn without repeats."""
    from recbole_mllm.model.mllmsrec.candidates import TrainingCandidates

    config = {"ranker_train_candidates": "top_k", "ranker_train_negatives": 2, "ranker_hard_negatives": 0,
              "rerank_top_k": 3, "eval_args": {"split": {"LS": "valid_and_test"}}, "llm_train_targets_per_user": 2}
    rule = TrainingCandidates([np.arange(1, 6)], {}, 8, config, "user_id", "item_id")
    catalogue = torch.tensor([[-torch.inf, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0],    # top-3: 1, 2, 3
                              [-torch.inf, 5.0, -torch.inf, 3.0, 2.0, 1.0, 0.0, -1.0],  # 2 masked: top-3 is 1, 3, 4
                              [-torch.inf, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    kept, candidates, owner, labels = rule.from_top_k(catalogue, [2, 2, 6])
    assert kept == [0]  # row 1's target is masked (history), row 2's ranks 6th: neither is reranked at test
    assert candidates[0] == 2 and labels == [1, 0, 0] and owner == [0, 0, 0]
    assert sorted(candidates[1:]) == [1, 3]
    kept, candidates, _, _ = rule.from_top_k(catalogue[1:2], [4])
    assert kept == [0] and candidates[0] == 4 and set(candidates[1:]) <= {1, 3} and 2 not in candidates


def test_an_unknown_training_list_rule_is_refused():
    from recbole_mllm.model.mllmsrec.candidates import TrainingCandidates

    with pytest.raises(ValueError, match="ranker_train_candidates: 'hard' is none of sampled, top_k"):
        TrainingCandidates([], {}, 5, {"ranker_train_candidates": "hard"}, "user_id", "item_id")


def _independent_top_k(model, user_states, uids, ts):
    """Each row's top ``rerank_top_k`` computed here from the encoder's parts, not by the scorer: padding and the
    history before ``t`` masked."""
    scores = user_states.float() @ model.encoder.item_states().float().T
    scores[:, 0] = -torch.inf
    for row, (uid, t) in enumerate(zip(uids, ts)):
        scores[row, torch.as_tensor(model.context.histories[uid][:t], dtype=torch.long)] = -torch.inf
    return scores.topk(model.rerank_top_k, dim=1).indices


@pytest.mark.parametrize("mask", [True, False])
def test_top_k_training_lists_put_the_label_on_the_target_among_its_top_k(mllm_config, mask):
    """Train as tested: each list's positive is the row's own next item ``history[t]``, both it and its negatives are
    in the row's top-K of the masked catalogue (computed here independently), one positive per list."""
    config_dict = dict(mllm_config, ranker_train_candidates="top_k", ranker_train_negatives=4, mask_history=mask)
    config, dataset = _config_and_dataset(config_dict)
    model, train_data = split_and_build_model(config, dataset)[:2]
    model.train()
    calls = []

    def llm_scores(uids, ts, user_states, candidates, owner, labels=None, weights=(1.0, 1.0)):
        calls.append((uids, ts, user_states.detach(), candidates, owner, labels))
        return user_states.sum() * 0

    model.llm_scores = llm_scores
    for batch in train_data:
        model.calculate_loss(batch)
    assert calls
    for uids, ts, user_states, candidates, owner, labels in calls:
        top = _independent_top_k(model, user_states, uids, ts) if mask else None
        for row, (uid, t) in enumerate(zip(uids, ts)):
            mine = owner == row
            positives = candidates[mine & (labels == 1)].tolist()
            assert positives == [int(model.context.histories[uid][t])]  # the label sits on the target
            if mask:
                assert set(candidates[mine].tolist()) <= set(top[row].tolist())
                assert not set(candidates[mine].tolist()) & set(model.context.histories[uid][:t].tolist())


def test_a_frozen_encoder_stays_as_warmed_up_while_the_llm_trains(mllm_config):
    from recbole_mllm.trainer import MLLMSRecTrainer

    config, dataset = _config_and_dataset(dict(mllm_config, encoder_frozen_after_warmup=True, encoder_warmup_cache=False,
                                               encoder_warmup_epochs=1, encoder_warmup_stopping_step=0))
    model, train_data, valid_data, _ = split_and_build_model(config, dataset)
    trainer = MLLMSRecTrainer(config, model)
    warm_up, states = trainer._warm_up_encoder, {}

    def spy(*args, **kwargs):
        warm_up(*args, **kwargs)
        states["encoder"] = {k: v.clone() for k, v in model.encoder.state_dict().items()}
        states["lora"] = {k: v.clone() for k, v in model.named_parameters() if "lora_B" in k}

    trainer._warm_up_encoder = spy
    trainer.fit(train_data, valid_data, saved=False)
    assert model.encoder_frozen and not model.train().encoder.training  # no dropout in the joint epochs either
    for name, value in model.encoder.state_dict().items():
        torch.testing.assert_close(value, states["encoder"][name])
    lora = dict(model.named_parameters())
    assert any(not torch.equal(lora[k], v) for k, v in states["lora"].items())  # the LLM's adapters did train


@pytest.mark.parametrize("residual", [False, True])
def test_a_step_in_parts_of_one_row_has_the_loss_and_gradient_of_the_whole_step(mllm_config, residual):
    """``loss_parts``: with the encoder frozen, the LLM's rows one at a time, each part backpropagated before the next
    is computed, add up to ``calculate_loss`` and its gradient (no LoRA dropout, so neither draws anything there);
    the trainer asks for parts of one row on a CPU."""
    from recbole_mllm.trainer import MLLMSRecTrainer

    config, dataset = _config_and_dataset(dict(mllm_config, ranker_residual=residual, lora_dropout=0.0, rerank_top_k=8,
                                               ranker_train_negatives=3))
    model, train_data, _, _ = split_and_build_model(config, dataset)
    model.freeze_encoder()
    model.train()
    batch = next(b for b in train_data if len(model.llm_rows(b)[1]) > 1)

    def loss_and_gradients(parts):
        model.zero_grad()
        torch.manual_seed(0)  # the same negatives
        total, count = 0.0, 0
        for part in parts():
            part.backward()
            total, count = total + part.item(), count + 1
        return total, count, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole, one, whole_grads = loss_and_gradients(lambda: [model.calculate_loss(batch)])
    split, parts, split_grads = loss_and_gradients(lambda: model.loss_parts(batch, rows_per_part=1))
    assert one == 1 and parts == len(model.llm_rows(batch)[1]) and split == pytest.approx(whole, rel=1e-5)
    assert whole_grads.keys() == split_grads.keys() and any("lora_B" in n for n in whole_grads)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(split_grads[name], grad, atol=1e-6, rtol=1e-4)
    assert MLLMSRecTrainer(config, model).rows_per_forward == 1  # the tests' device is the CPU


@pytest.mark.parametrize("rule, train_rows", [("top_k", "all"), ("sampled", "all"), ("top_k", "trained")])
def test_a_frozen_encoders_joint_epochs_read_exactly_the_rows_the_llm_trains_on(mllm_config, rule, train_rows, caplog):
    """With the encoder frozen, the other rows train nothing: the joint epochs read the LLM's rows alone, by the
    model's own rule, ``ranker_train_batch_size`` per step; the log counts those whose loss reaches the LLM (under
    top_k: targets inside the encoder's top-K). ``ranker_train_rows: trained`` batches those alone."""
    from recbole_mllm.trainer import MLLMSRecTrainer

    config, dataset = _config_and_dataset(dict(mllm_config, encoder_frozen_after_warmup=True, encoder_warmup_cache=False,
                                               encoder_warmup_epochs=1, encoder_warmup_stopping_step=0,
                                               ranker_train_batch_size=3, ranker_train_candidates=rule, rerank_top_k=8,
                                               ranker_train_rows=train_rows))
    model, train_data, valid_data, _ = split_and_build_model(config, dataset)
    trainer, read = MLLMSRecTrainer(config, model), []
    train_epoch = trainer._train_epoch

    def spy(data, epoch_idx, loss_func=None, show_progress=False):
        read.append(data if loss_func is not None else trainer.joint_rows)
        return train_epoch(data, epoch_idx, loss_func, show_progress)

    trainer._train_epoch = spy
    with caplog.at_level("INFO"):
        trainer.fit(train_data, valid_data, saved=False)
    warm_up, joint = read
    assert warm_up is train_data and joint.step == 3
    scored = {}  # {uid: [t]} of the rows whose loss reaches the LLM in a pass over every training row

    def llm_scores(uids, ts, user_states, candidates, owner, labels=None, weights=(1.0, 1.0)):
        for u, t in zip(uids, ts):
            scored.setdefault(u, []).append(t)
        return user_states.sum() * 0

    model.llm_scores = llm_scores
    model.train()
    for batch in train_data:
        model.calculate_loss(batch)
    expected = _split_rows(model, train_data)  # {uid: [t]} of llm_train_targets_per_user's rows in a full pass
    trained = sum(map(len, scored.values()))
    if train_rows == "trained":  # exactly the rows whose loss reaches the LLM, each once
        expected = scored
        assert 0 < trained < sum(map(len, _split_rows(model, train_data).values()))
    assert sum(map(len, expected.values())) == len(joint._dataset) < len(train_data._dataset)
    assert {u: sorted(ts) for u, ts in _split_rows(model, joint).items()} == {u: sorted(ts) for u, ts in expected.items()}
    assert 0 < trained < len(joint._dataset) if (rule, train_rows) == ("top_k", "all") else trained == len(joint._dataset)
    assert (f"the joint epochs read {len(joint._dataset)} rows (of {len(train_data._dataset)}; ranker_train_rows: "
            f"{train_rows}), 3 per step; {trained} of them train the LLM") in caplog.text


def test_a_run_where_no_row_can_train_the_llm_is_an_error_after_the_warm_up(mllm_config):
    from recbole_mllm.trainer import MLLMSRecTrainer

    config, dataset = _config_and_dataset(dict(mllm_config, encoder_warmup_cache=False, encoder_warmup_epochs=1,
                                               encoder_warmup_stopping_step=0))
    model, train_data, valid_data, _ = split_and_build_model(config, dataset)
    model.llm_trained_rows = lambda interaction, rows, ts: []  # no target inside any top-K list
    with pytest.raises(ValueError, match="no training row can train the LLM: no training target is inside the "
                                         "warmed-up encoder's top rerank_top_k=5"):
        MLLMSRecTrainer(config, model).fit(train_data, valid_data, saved=False)


def test_runs_started_at_once_share_one_warm_up(mllm_config, tmp_path):
    """A run whose warm-up is being computed by another waits on its lock, then reuses it rather than training."""
    import threading

    from filelock import FileLock

    from recbole_mllm.trainer import MLLMSRecTrainer

    settings = dict(mllm_config, encoder_warmup_epochs=2, encoder_warmup_stopping_step=0,
                    stage_cache_dir=str(tmp_path / "cache"), checkpoint_dir=str(tmp_path))
    config, first_model, _ = _model_and_data(settings)
    second_model = _model_and_data(settings)[1]
    first, second = MLLMSRecTrainer(config, first_model), MLLMSRecTrainer(config, second_model)
    second._train_epoch = lambda *args, **kwargs: pytest.fail("the second run must reuse the first one's warm-up")
    first.warmup_cache.parent.mkdir(parents=True)
    lock = FileLock(f"{first.warmup_cache}.lock")
    lock.acquire()  # the first run is warming up
    waiting = threading.Thread(target=second._warm_up_encoder, args=(None, None, False, False))
    waiting.start()
    waiting.join(timeout=1.0)
    assert waiting.is_alive()  # blocked on the lock, not training
    with torch.no_grad():
        next(first_model.encoder.parameters()).add_(1.0)
    first._train_encoder = lambda *args: (None, 2)  # the holder's (changed) encoder is its warm-up's result
    first._warm_up_or_reuse(None, None, False, False)
    lock.release()
    waiting.join(timeout=60)
    assert not waiting.is_alive()
    for name, value in second_model.encoder.state_dict().items():
        torch.testing.assert_close(value, first_model.encoder.state_dict()[name])


def test_freezing_an_encoder_that_was_never_warmed_up_is_refused_before_the_stages_run(mllm_config, monkeypatch):
    import recbole_mllm.quick_start as quick_start

    config, dataset = _config_and_dataset(dict(mllm_config, encoder_frozen_after_warmup=True, encoder_warmup_epochs=0))
    monkeypatch.setattr(quick_start, "prepare_stages", lambda *a: pytest.fail("the stages ran before the check"))
    with pytest.raises(ValueError, match="encoder_frozen_after_warmup needs a warm-up"):
        split_and_build_model(config, dataset)


@pytest.mark.parametrize("settings, refusal", [
    ({"ranker_prompt": "v9"}, "no prompt template 'ranker_v9'"),
    ({"ranker_scoring": "listwise", "ranker_prompt": "v2", "ranker_train_candidates": "top_k", "ranker_residual": False},
     "needs a list prompt"),
    ({"ranker_prompt": "v2", "ranker_use_rank": False}, "ranker_use_rank: False needs")])
def test_a_ranker_prompt_that_cannot_work_is_refused_before_the_stages_run(mllm_config, monkeypatch, settings, refusal):
    import recbole_mllm.quick_start as quick_start

    config, dataset = _config_and_dataset(dict(mllm_config, **settings))
    monkeypatch.setattr(quick_start, "prepare_stages", lambda *a: pytest.fail("the stages ran before the check"))
    with pytest.raises(ValueError, match=refusal):
        split_and_build_model(config, dataset)


def test_list_cross_entropy_is_each_lists_softmax_loss_of_its_positive():
    from recbole_mllm.model.mllmsrec.model import list_cross_entropy

    scores = torch.tensor([2.0, 0.0, 1.0, 5.0, 3.0])
    owner, labels = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([0, 1, 0, 1, 0])
    first = torch.logsumexp(torch.tensor([2.0, 0.0, 1.0]), 0) - 0.0
    second = torch.logsumexp(torch.tensor([5.0, 3.0]), 0) - 5.0
    torch.testing.assert_close(list_cross_entropy(scores, owner, labels), (first + second) / 2)


@torch.no_grad()
def test_a_residual_ranker_starts_as_its_first_stage(mllm_config):
    """``ranker_residual``: the gate starts at 0, so full ranking's top-K and uni100's blocks keep the encoder's order."""
    _, model, test_data = _model_and_data(dict(mllm_config, ranker_residual=True))
    assert float(model.residual_gate) == 0.0 and "residual_gate" in model.state_dict()
    interaction = next(iter(test_data["full"]))[0]
    reranked = model.full_sort_predict(interaction)
    with model.scoring(encoder_only=True):
        first = model.full_sort_predict(interaction)
    k = model.rerank_top_k
    assert torch.equal(reranked.topk(k, dim=1).indices, first.topk(k, dim=1).indices)
    top = first.topk(k, dim=1).indices
    torch.testing.assert_close(reranked.gather(1, top), first.gather(1, top))  # the encoder's own scores, untouched


def test_a_residual_ranker_trains_its_gate_with_the_list_loss(mllm_config):
    config, dataset = _config_and_dataset(dict(mllm_config, ranker_residual=True, ranker_train_negatives=3))
    model, train_data, _, _ = split_and_build_model(config, dataset)
    model.train()
    for batch in train_data:  # the first batch with LLM rows
        model.zero_grad()
        loss = model.calculate_loss(batch)
        if loss.requires_grad:
            loss.backward()
        if model.residual_gate.grad is not None and float(model.residual_gate.grad) != 0.0:
            break
    assert model.residual_gate.grad is not None and float(model.residual_gate.grad) != 0.0


def test_every_ranker_switch_together_trains_and_tests_end_to_end(mllm_config):
    result = run("MLLMSRec", "tiny", config_dict=dict(
        mllm_config, train_positions="all", encoder_warmup_batch_size=16, ranker_train_candidates="top_k",
        ranker_train_negatives=4, encoder_frozen_after_warmup=True, ranker_residual=True, ranker_prompt="v3",
        ranker_use_rank=False, encoder_warmup_cache=False, report_first_stage=True))
    assert set(result["test_result"]) == set(result["first_stage_result"]) == {"uni100", "full"}
    for metrics in result["test_result"].values():
        assert 0.0 <= metrics["ndcg@10"] <= metrics["hit@10"] <= 1.0


@torch.no_grad()
def test_recent_states_follow_each_recent_title_as_its_own_projected_encoder_state(mllm_config):
    """``ranker_use_recent_states``: one soft slot right after each recent item's title, filled with that item's
    encoder state through the candidates' projection; only items before ``t`` (never the target)."""
    _, model, _ = _model_and_data(dict(mllm_config, ranker_use_recent_states=True))
    uid = 1
    t = len(model.context.histories[uid]) - 1  # the test position
    recent = list(model.context.recent_items(uid, t, model.prompts.recent_count))
    assert recent == list(model.context.histories[uid][max(0, t - model.prompts.recent_count):t]) and len(recent) > 1
    tokens = model._recent_tokens([uid], [t], torch.device("cpu"))[0]
    torch.testing.assert_close(tokens, model.item_projection(model.encoder.item_states(torch.tensor(recent))))
    ids, soft = model.prompts.user_part(uid, t, torch.zeros(1, tokens.shape[1]), tokens)
    positions, values = soft["recent_states"]
    assert len(positions) == len(recent) and values is tokens
    tokenizer = model.backend.tokenizer
    for position, item in zip(positions, recent):  # each slot right after its own title (and a space)
        title = tokenizer(model.context.item_title[item] + " ", add_special_tokens=False).input_ids
        assert ids[position - len(title):position] == title
    plain_ids, plain_soft = model.prompts.user_part(uid, t, torch.zeros(1, tokens.shape[1]))
    assert "recent_states" not in plain_soft and len(plain_ids) < len(ids)


def test_recent_states_train_and_test_end_to_end(mllm_config):
    result = run("MLLMSRec", "tiny", config_dict=dict(mllm_config, ranker_use_recent_states=True, encoder_warmup_cache=False))
    for metrics in result["test_result"].values():
        assert 0.0 <= metrics["ndcg@10"] <= metrics["hit@10"] <= 1.0


def test_the_encoder_reads_the_item_content_it_is_given(mllm_config, tmp_path):
    """``encoder_item_content: minilm`` replaces the fused rows the encoder and its warm-up read."""
    from tests.model.test_item_content import build_tiny_bert

    settings = dict(mllm_config, encoder_item_content="minilm", item_content_text_model=str(build_tiny_bert(tmp_path / "bert")))
    _, model, _ = _model_and_data(settings)
    assert model.encoder.fused.shape[1] == 16  # the tiny BERT's width, not the LLM's
    torch.testing.assert_close(model.encoder.fused[1:].norm(dim=1), torch.ones(model.n_items - 1))
    result = run("MLLMSRec", "tiny", config_dict=dict(settings, encoder_warmup_cache=False))
    assert set(result["test_result"]) == {"uni100", "full"}


@pytest.mark.parametrize("mask", [True, False])
def test_an_llm_that_keeps_the_encoders_order_scores_as_the_first_stage(mllm_config, mask):
    """The two stages with "LLM" scores that keep the first stage's order give the first stage's metrics, under
    every protocol and both history-mask settings: the reported first stage is the one the LLM reranks."""
    from recbole_mllm.trainer import MLLMSRecTrainer

    config, model, test_data = _model_and_data(dict(mllm_config, mask_history=mask,
                                                    test_protocols=["uni100", "full", "full_unmasked"]))
    model.llm_scores = lambda uids, ts, user_states, candidates, owner, labels=None: \
        model.scorer.catalogue_scores(user_states, uids, ts)[owner, candidates]
    trainer = MLLMSRecTrainer(config, model)
    for protocol, loader in test_data.items():
        result = trainer.evaluate(loader, load_best_model=False)
        assert dict(result) == dict(trainer.last_first_stage_result), protocol


@pytest.mark.parametrize("mask", [True, False])
def test_first_stage_recall_counts_the_targets_in_its_top_k_as_its_metrics_do(mllm_config, mask):
    """Full ranking records the first stage's recall at ``rerank_top_k`` (what the LLM can reorder) and at 50 and 100
    (what a larger list would give), as its own metrics count hits under the loader's history mask."""
    from recbole_mllm.trainer import MLLMSRecTrainer

    config, model, test_data = _model_and_data(dict(mllm_config, mask_history=mask, metrics=["Hit"], topk=[5, 10, 20]))
    assert list(model.first_stage_recall.hits_in_top) == [50, 100]
    model.first_stage_recall.hits_in_top = {10: 0, 20: 0}  # the tiny catalogue has 30 items: narrower cutoffs
    trainer = MLLMSRecTrainer(config, model)
    trainer.evaluate(test_data["full"], load_best_model=False)
    recall, first_stage = trainer.last_first_stage_recall, trainer.last_first_stage_result
    assert list(recall) == ["recall@5", "recall@10", "recall@20"]
    assert [recall[f"recall@{k}"] for k in (5, 10, 20)] == pytest.approx([first_stage[f"hit@{k}"] for k in (5, 10, 20)],
                                                                          abs=1e-4)
    assert 0 < recall["recall@5"] < recall["recall@20"] < 1
    trainer.evaluate(test_data["uni100"], load_best_model=False)  # sampled ranking has no catalogue top-k
    assert trainer.last_first_stage_recall is None


@torch.no_grad()
def test_scores_read_neither_the_target_nor_its_time(mllm_config):
    """Full ranking's and uni100's scores are the same with the target column permuted across users and the target's
    timestamp replaced: the model never reads what it is asked to predict."""
    _, model, test_data = _model_and_data(mllm_config)
    interaction = next(iter(test_data["full"]))[0]
    scores = model.full_sort_predict(interaction)
    altered = interaction[torch.arange(len(interaction))]
    generator = torch.Generator().manual_seed(0)
    altered[model.POS_ITEM_ID] = interaction[model.POS_ITEM_ID][torch.randperm(len(interaction), generator=generator)]
    altered[model.TIME_FIELD] = torch.rand(len(interaction), generator=generator) * 1e9
    torch.testing.assert_close(model.full_sort_predict(altered), scores)
    block = next(iter(test_data["uni100"]))[0]
    sampled = model.predict(block)
    retimed = block[torch.arange(len(block))]
    retimed[model.TIME_FIELD] = torch.rand(len(block), generator=generator) * 1e9
    torch.testing.assert_close(model.predict(retimed), sampled)


@torch.no_grad()
def test_a_user_part_does_not_change_with_the_history_from_t_on(mllm_config):
    """A user's prompt part (token ids and soft tokens, recent items' states included) at position ``t`` is the same
    when every interaction from ``t`` on (the target and what follows) is replaced."""
    _, model, test_data = _model_and_data(dict(mllm_config, ranker_use_recent_states=True))
    interaction = next(iter(test_data["full"]))[0]
    uids, ts = interaction[model.USER_ID].tolist(), model.positions(interaction)
    user_states = model.forward(interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN])

    def user_parts():
        user_tokens = model.user_projection(user_states).unsqueeze(1)
        recent = model._recent_tokens(uids, ts, user_states.device)
        return [model.prompts.user_part(u, t, user_tokens[k], recent[k]) for k, (u, t) in enumerate(zip(uids, ts))]

    before = user_parts()
    n_items = model.n_items
    for uid, t in zip(uids, ts):
        history, times = model.context.histories[uid], model.context.timestamps[uid]
        history[t:] = (history[t:] + 7) % (n_items - 1) + 1  # other items
        times[t:] = times[t:] + 86_400 * 400  # other times
    after = user_parts()
    assert len(before) == len(after) > 0
    for (ids_before, soft_before), (ids_after, soft_after) in zip(before, after):
        assert ids_before == ids_after
        assert soft_before.keys() == soft_after.keys()
        for name in soft_before:
            assert soft_before[name][0] == soft_after[name][0]
            torch.testing.assert_close(soft_before[name][1], soft_after[name][1])


def test_the_encoder_warm_up_counts_its_optimizer_steps_toward_the_stopping_floor(mllm_config):
    """MLLMSRecTrainer has an epoch loop of its own; its optimizer steps still count toward ``stopping_min_steps``, so
    the warm-up stops early once the floor is reached (it ran all 300 epochs when they did not)."""
    from recbole_mllm.trainer import MLLMSRecTrainer

    config, dataset = _config_and_dataset(dict(mllm_config, stopping_min_steps=5, encoder_warmup_cache=False))
    model, train_data, valid_data, _ = split_and_build_model(config, dataset)
    trainer = MLLMSRecTrainer(config, model)
    trainer._train_epoch(train_data, 0, loss_func=model.encoder_loss)
    assert trainer.steps_taken == len(train_data)
    scores = iter([0.5 - 0.01 * k for k in range(100)])
    trainer._valid_epoch = lambda valid_data, show_progress=False: (next(scores), {})
    trainer.config["encoder_warmup_epochs"] = trainer.warmup_epochs = 50
    trainer.steps_taken, trainer.warmup_stopping_step = 0, 1
    _, epochs = trainer._train_encoder(train_data, valid_data, verbose=False, show_progress=False)
    assert epochs == max(2, -(-5 // len(train_data)))  # one epoch without gain, once the floor is reached


def test_a_warm_up_stopped_with_its_machine_goes_on_where_it_stopped_as_if_never_stopped(mllm_config):
    """``resume_training``: each warm-up epoch's end is kept beside the warm-up's cache file; a warm-up stopped after
    epoch 1 goes on at epoch 2 and ends with the encoder, best score and epoch count of one never stopped, and a
    finished one trains nothing."""
    from recbole_mllm import run_state
    from recbole_mllm.trainer import MLLMSRecTrainer

    class Stopped(Exception):
        pass

    settings = dict(mllm_config, encoder_warmup_epochs=3, encoder_warmup_stopping_step=5, stopping_min_steps=0,
                    resume_training=True, seed=2031)

    def trainer(stop_at=None, trained=None):
        config, dataset = _config_and_dataset(settings)
        model, train_data, valid_data, _ = split_and_build_model(config, dataset)  # seeded: the same initial encoder
        built = MLLMSRecTrainer(config, model)
        train_epoch = built._train_epoch

        def epoch(data, epoch_idx, *args, **kwargs):
            if epoch_idx == stop_at:
                raise Stopped
            if trained is not None:
                trained.append(epoch_idx)
            return train_epoch(data, epoch_idx, *args, **kwargs)

        built._train_epoch = epoch
        return built, lambda: built._train_encoder(train_data, valid_data, verbose=False, show_progress=False)

    never_stopped, warm_up = trainer()
    progress = never_stopped._warmup_progress_file()
    assert progress.parent == never_stopped.warmup_cache.parent
    progress.unlink(missing_ok=True)
    expected = warm_up()
    reference = {k: v.clone() for k, v in never_stopped.model.encoder_state().items()}
    assert run_state.load(progress, "cpu")["done"]
    progress.unlink()

    stopped, warm_up = trainer(stop_at=2)
    with pytest.raises(Stopped):
        warm_up()
    assert run_state.load(progress, "cpu")["epoch"] == 1 and not run_state.load(progress, "cpu")["done"]
    trained = []
    resumed, warm_up = trainer(trained=trained)
    assert warm_up() == expected and trained == [2]
    for name, value in resumed.model.encoder_state().items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=0)

    finished, warm_up = trainer(stop_at=0)  # the progress says done: nothing trains
    assert warm_up() == expected
    for name, value in finished.model.encoder_state().items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=0)
    progress.unlink()

    # a run that differs only in a ranker switch shares the warm-up (and its progress) but trains other ranker
    # parameters: it goes on with the encoder's optimizer state, found by name
    stopped, warm_up = trainer(stop_at=2)
    with pytest.raises(Stopped):
        warm_up()
    settings.update(ranker_residual=True)
    sibling, warm_up = trainer(trained=(trained := []))
    assert sibling._warmup_progress_file() == progress
    assert len(sibling.optimizer.param_groups[0]["params"]) != len(stopped.optimizer.param_groups[0]["params"])
    assert warm_up() == expected and trained == [2]
    for name, value in sibling.model.encoder_state().items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=0)
    progress.unlink()


def test_mllmsrec_is_fusedsasrec_plus_a_reranker(mllm_config):
    """Its first stage is the baseline by construction: FusedSASRec's encoder, ``forward`` and loss (the warm-up's), and
    from the same seed the same initial encoder as FusedSASRec's (the LLM is read before any layer is built)."""
    from recbole_mllm.model import FusedSASRec, MLLMSRec

    assert issubclass(MLLMSRec, FusedSASRec)
    assert MLLMSRec.forward is FusedSASRec.forward and MLLMSRec.encoder_loss is FusedSASRec.calculate_loss
    _, model, _ = _model_and_data(mllm_config)
    config = Config("FusedSASRec", "tiny", config_dict=mllm_config)
    baseline, train_data = split_and_build_model(config, create_dataset(config))[:2]
    encoder = baseline.encoder.state_dict()
    assert all(torch.equal(value, encoder[name]) for name, value in model.encoder.state_dict().items())
    batch = next(iter(train_data))
    torch.testing.assert_close(model.eval().encoder_loss(batch), baseline.eval().calculate_loss(batch), rtol=0, atol=0)


def test_mllmsrec_constructor_opens_no_file(mllm_config, monkeypatch):
    """Everything MLLMSRec reads (stage caches, the LLM, prompt template, item images) is prepared before it is built
    (``MLLMSRec.prepare``, ``quick_start.build_model``): with those parts passed in, ``__init__`` opens no file."""
    import builtins
    import io

    from recbole_mllm.model import MLLMSRec

    config = Config("MLLMSRec", "tiny", config_dict=mllm_config)
    prepare_stages(config, MLLMSRec.required_stages)
    train_dataset = data_preparation(config, create_dataset(config))[0]._dataset
    parts = MLLMSRec.prepare(config, train_dataset)
    with pytest.raises(ValueError, match="prepared parts"):
        MLLMSRec(config, train_dataset)

    def refuse(*args, **kwargs):
        raise AssertionError(f"the constructor opened {args[:1]}")

    for owner, name in ((builtins, "open"), (io, "open"), (os, "open")):
        monkeypatch.setattr(owner, name, refuse)
    model = MLLMSRec(config, train_dataset, **parts)
    monkeypatch.undo()
    assert model.backend is parts["inputs"].backend and model.prompts.summaries  # built from the parts it was given



def test_a_reused_warm_up_trains_the_llm_as_an_in_process_one(mllm_config, tmp_path, monkeypatch):
    """Whether the encoder warm-up ran in this process or was read from its cache, the joint epochs train the LLM at
    the same, full learning rate: the learning-rate warm-up belongs to the encoder's warm-up. (A reused warm-up once
    restarted the ramp, so the LLM trained at a fraction of its rate and scored differently from an in-process run.)"""
    from recbole_mllm.trainer import MLLMSRecTrainer

    class JointEpochsReached(Exception):
        pass

    rates = []

    def record_rate(self, train_data):
        rates.append([group["lr"] for group in self.optimizer.param_groups])
        raise JointEpochsReached

    monkeypatch.setattr(MLLMSRecTrainer, "_llm_rows", record_rate)
    settings = dict(mllm_config, stage_cache_dir=str(tmp_path / "stage_cache"), checkpoint_dir=str(tmp_path / "saved"),
                    output_dir=str(tmp_path / "outputs"), encoder_warmup_cache=True, lr_warmup_steps=1000)
    for _ in range(2):  # the first warms up in this process, the second reuses its cached encoder
        with pytest.raises(JointEpochsReached):
            run("MLLMSRec", "tiny", config_dict=settings)
    assert list((tmp_path / "stage_cache" / "encoder_warmup").glob("*.pth"))
    assert rates[0] == rates[1] == [settings.get("learning_rate", 0.001)] * len(rates[0])


def test_late_fusion_grid_picks_the_best_weight_on_validation_scoring_the_llm_once(mllm_config):
    from recbole_mllm.model.mllmsrec.scorer import TwoStageScorer
    from recbole_mllm.trainer import MLLMSRecTrainer

    config, dataset = _config_and_dataset(dict(mllm_config, encoder_warmup_cache=False, late_fusion_grid=[0.0, 1.0, 50.0],
                                               first_stage_fallback_alpha=None))
    model, train_data, valid_data, _ = split_and_build_model(config, dataset)
    trainer = MLLMSRecTrainer(config, model)
    calls, score_blocks = [], TwoStageScorer._score_blocks

    def counted(self, *args):
        calls.append(1)
        return score_blocks(self, *args)

    with pytest.MonkeyPatch.context() as patch:
        select = trainer.select_fusion_weight
        trainer.select_fusion_weight = lambda *a, **k: (calls.clear(), select(*a, **k))[1]  # count the selection's calls
        patch.setattr(TwoStageScorer, "_score_blocks", counted)
        trainer.fit(train_data, valid_data, saved=False)
    selection = trainer.fusion_selection
    assert selection["weights"] == [0.0, 1.0, 50.0]
    assert 0 < len(calls) <= len(valid_data)  # three passes over the validation set, the LLM's scores computed once
    scores = []
    for weight in selection["weights"]:  # each weight's score is that of an ordinary validation at that weight
        with model.scoring(fusion_weight=weight):
            scores.append(trainer.evaluate(valid_data, load_best_model=False)[trainer.valid_metric])
    assert selection["valid_scores"] == pytest.approx(scores)
    assert selection["chosen"] == selection["weights"][int(np.argmax(scores))]
    assert model.scorer.fusion_weight == selection["chosen"]  # and the test is scored with it
    with model.scoring(encoder_only=True):  # the first stage alone, scored on the same validation users
        first_stage = trainer.evaluate(valid_data, load_best_model=False)[trainer.valid_metric]
    assert selection["first_stage_valid_score"] == pytest.approx(first_stage)
    assert 0 < selection["p_over_first_stage"] <= 1
    assert selection["first_stage"] is False and model.uses_llm  # no first_stage_fallback_alpha: the best weight ranks


def test_a_fusion_choice_that_does_not_beat_the_first_stage_on_validation_keeps_it(mllm_config, tmp_path):
    """first_stage_fallback_alpha: p at or above it (a level no tiny validation reaches) and the test is the first
    stage's, in every protocol; the LLM alone is still reported, and the saved record does not take the test for it."""
    from recbole_mllm.comparison import load_record, save_record

    result = run("MLLMSRec", "tiny", config_dict=dict(mllm_config, late_fusion_grid=[0.0, 1.0],
                                                        first_stage_fallback_alpha=1e-12))
    selection = result["late_fusion_selection"]
    assert selection["first_stage"] is True and selection["p_over_first_stage"] >= 1e-12
    assert set(result["first_stage_result"]) == set(result["test_result"]) == set(result["llm_alone_result"])
    for protocol, metrics in result["test_result"].items():
        assert metrics == result["first_stage_result"][protocol]
        assert np.array_equal(result["per_user"][protocol]["topk"], result["first_stage_per_user"][protocol]["topk"])
    assert "full" in result["first_stage_recall"]  # counted by the LLM-alone pass, the one that reranked
    save_record(result, folder := tmp_path / "record")
    loaded = load_record(folder)
    assert set(loaded["llm_alone_per_user"]) == set(result["test_result"])  # its own pass, not the test's copy
    assert loaded["late_fusion_selection"]["first_stage"] is True


def test_where_the_fallback_keeps_the_first_stage_the_chosen_weight_is_still_scored_and_recorded(mllm_config):
    """The fallback ranks the test with the first stage, scored once; the weight validation chose is scored beside it
    (the LLM's scores reused), each per-user record its own evaluation's, and the trainer's figure is that weight's."""
    from recbole_mllm.comparison import per_user_metrics
    from recbole_mllm.trainer import MLLMSRecTrainer

    config, model, test_data = _model_and_data(mllm_config)
    trainer = MLLMSRecTrainer(config, model)
    model.use_fusion_weight(2.0)
    with model.scoring():
        expected = trainer.evaluate(test_data["full"], load_best_model=False)
    model.use_first_stage_only(True)
    trainer._first_stage_alone = lambda *args: pytest.fail("the first stage scored twice: the test pass was its own")
    tested = trainer.evaluate(test_data["full"], load_best_model=False)
    assert dict(trainer.last_chosen_weight_result) == dict(expected)
    assert trainer.last_first_stage_is_test and dict(trainer.last_first_stage_result) == dict(tested)

    result = run("MLLMSRec", "tiny", config_dict=dict(mllm_config, late_fusion_grid=[2.0], first_stage_fallback_alpha=1e-12))
    selection = result["late_fusion_selection"]
    assert selection["first_stage"] is True and selection["first_stage_fallback_alpha"] == 1e-12
    assert set(result["chosen_weight_result"]) == set(result["test_result"])
    for part, per_user in (("test_result", "per_user"), ("first_stage_result", "first_stage_per_user"),
                           ("chosen_weight_result", "chosen_weight_per_user"), ("llm_alone_result", "llm_alone_per_user")):
        for protocol, metrics in result[part].items():
            values = per_user_metrics(result[per_user][protocol]["topk"], ["ndcg"], [10])
            assert values["ndcg@10"].mean() == pytest.approx(metrics["ndcg@10"], abs=1e-4)


@pytest.mark.parametrize("raw_p, gain, keeps_llm", [(0.001, 0.01, True), (0.02, 0.01, False), (0.001, -0.01, False)])
def test_the_first_stage_ranks_unless_the_best_weight_beats_it_on_validation(mllm_config, monkeypatch, raw_p, gain,
                                                                              keeps_llm):
    """first_stage_fallback_alpha 0.05 over a grid of 3 weights: a one-sided p of 0.001 keeps the LLM; 0.02 is 0.06 once
    corrected for the 3 weights tried and keeps the first stage; so does a small p whose mean gain is negative (Wilcoxon
    ranks the sizes of the differences, so many small gains can outweigh a few large losses)."""
    import recbole_mllm.trainer as trainer_module

    config, dataset = _config_and_dataset(dict(mllm_config, encoder_warmup_cache=False, late_fusion_grid=[0.0, 1.0, 50.0],
                                               first_stage_fallback_alpha=0.05))
    model, _, valid_data, _ = split_and_build_model(config, dataset)
    trainer = trainer_module.MLLMSRecTrainer(config, model)
    passes, tested = [], []

    def per_user(evaluation, metric):  # the grid's 3 passes score base + gain, the first stage's (the 4th) base
        passes.append(evaluation)
        users, base = np.sort(evaluation["user_id"]), np.linspace(0.2, 0.8, len(evaluation["user_id"]))
        return users, base if len(passes) == 4 else base + gain

    monkeypatch.setattr(trainer_module, "per_user_metric", per_user)
    monkeypatch.setattr(trainer_module, "one_sided_p", lambda values, reference: tested.append(
        float(np.mean(values - reference))) or raw_p)
    selection = trainer.select_fusion_weight(valid_data)
    assert len(passes) == 4 and tested == [pytest.approx(gain)]  # the best weight tested against the first stage
    assert selection["p_over_first_stage"] == pytest.approx(3 * raw_p)
    assert selection["first_stage"] is (not keeps_llm) and model.first_stage_only is (not keeps_llm)
    assert selection["first_stage_valid_score"] == round(float(np.linspace(0.2, 0.8, len(passes[-1]["user_id"])).mean()), 4)


def test_an_unknown_ranker_train_rows_is_refused_naming_the_key(mllm_config):
    from recbole_mllm.model.mllmsrec.settings import MLLMSRecSettings

    config, _ = _config_and_dataset(dict(mllm_config, ranker_train_rows="some"))
    with pytest.raises(ValueError, match="ranker_train_rows: 'some' is none of all, trained"):
        MLLMSRecSettings.from_config(config)


def test_trained_rows_alone_need_a_frozen_encoder_and_say_so_before_the_data_loads(mllm_config):
    from recbole_mllm.quick_start import check_run_config

    config, _ = _config_and_dataset(dict(mllm_config, ranker_train_rows="trained", encoder_frozen_after_warmup=False))
    with pytest.raises(ValueError, match="ranker_train_rows: trained picks a frozen encoder's joint rows"):
        check_run_config(config)


@pytest.mark.parametrize("alpha", [0, 1.5, True, "x"])
def test_a_bad_first_stage_fallback_alpha_is_refused_naming_the_key(mllm_config, alpha):
    from recbole_mllm.model.mllmsrec.settings import MLLMSRecSettings

    config, _ = _config_and_dataset(dict(mllm_config, late_fusion_grid=[0, 1], first_stage_fallback_alpha=alpha))
    with pytest.raises(ValueError, match="first_stage_fallback_alpha"):
        MLLMSRecSettings.from_config(config)


def test_late_fusion_needs_a_top_k_valid_metric_and_says_so_before_training(mllm_config):
    from recbole_mllm.model.mllmsrec.model import MLLMSRec

    config, _ = _config_and_dataset(dict(mllm_config, late_fusion_grid=[0, 1], valid_metric="ItemCoverage@10",
                                                       metrics=["NDCG", "ItemCoverage"]))
    with pytest.raises(ValueError, match="valid_metric"):
        MLLMSRec.check_config(config)
    for metric in ("NDCG@10", "mrr@10"):  # top-k metrics, in either case, pass
        MLLMSRec.check_config(_config_and_dataset(dict(mllm_config, late_fusion_grid=[0, 1], valid_metric=metric))[0])


@pytest.mark.parametrize("grid", [[-1.0], [], ["a"]])
def test_a_bad_late_fusion_grid_is_refused_naming_the_key(mllm_config, grid):
    from recbole_mllm.model.mllmsrec.settings import MLLMSRecSettings

    config, _ = _config_and_dataset(dict(mllm_config, late_fusion_grid=grid))
    with pytest.raises(ValueError, match="late_fusion_grid"):
        MLLMSRecSettings.from_config(config)


def test_under_late_fusion_every_evaluation_also_reports_the_llm_alone_and_the_run_records_it(mllm_config):
    from recbole_mllm.comparison import per_user_metrics
    from recbole_mllm.trainer import MLLMSRecTrainer

    config, model, test_data = _model_and_data(mllm_config)
    trainer = MLLMSRecTrainer(config, model)
    model.use_fusion_weight(2.0)
    trainer.evaluate(test_data["full"], load_best_model=False)
    with model.scoring(fusion_weight=0.0):
        expected = trainer.evaluate(test_data["full"], load_best_model=False)
    assert trainer.last_llm_alone_result is None  # the LLM alone is what it just scored: nothing beside it
    model.use_fusion_weight(2.0)
    trainer.evaluate(test_data["full"], load_best_model=False)
    assert dict(trainer.last_llm_alone_result) == dict(expected)

    result = run("MLLMSRec", "tiny", config_dict=dict(mllm_config, late_fusion_weight=2.0))
    for part, per_user in (("test_result", "per_user"), ("first_stage_result", "first_stage_per_user"),
                           ("llm_alone_result", "llm_alone_per_user")):  # each per-user record is its own evaluation's
        for protocol, metrics in result[part].items():
            values = per_user_metrics(result[per_user][protocol]["topk"], ["ndcg"], [10])
            assert values["ndcg@10"].mean() == pytest.approx(metrics["ndcg@10"], abs=1e-4)


def test_when_validation_chooses_the_llm_alone_the_record_still_has_its_row(mllm_config, tmp_path):
    """Weight 0 chosen: no second pass, and the test result is the LLM-alone row, so that row has every seed."""
    from recbole_mllm.comparison import load_record, save_record

    result = run("MLLMSRec", "tiny", config_dict=dict(mllm_config, late_fusion_grid=[0.0], first_stage_fallback_alpha=None))
    assert result["late_fusion_selection"]["chosen"] == 0
    assert set(result["llm_alone_result"]) == set(result["test_result"])
    for protocol, metrics in result["test_result"].items():
        assert result["llm_alone_result"][protocol] == metrics
        assert result["llm_alone_per_user"][protocol] is result["per_user"][protocol]
    save_record(result, folder := tmp_path / "record")
    with np.load(folder / "per_user.npz") as arrays:  # saved once, rebuilt on loading
        assert not [key for key in arrays.files if key.startswith("llm_alone_per_user/")]
    loaded = load_record(folder)
    assert all(np.array_equal(loaded["llm_alone_per_user"][p]["topk"], loaded["per_user"][p]["topk"]) for p in loaded["per_user"])


@pytest.fixture(scope="module")
def listwise():
    """``ranker_scoring: listwise`` with the packaged list prompt (``ranker_prompt: None``): the tiny test tokenizer
    splits " A" into a space and a letter, where SmolLM2's has one token per " A" ... " Z", so its options are scored
    by the bare letters (``prompting._option_ids``)."""
    return dict(ranker_scoring="listwise", ranker_prompt=None)


@pytest.mark.parametrize("check", [test_predict_ignores_candidate_order_and_block_position,
                                   test_sampled_and_full_ranking_are_the_same_two_stage_scores,
                                   test_scores_read_neither_the_target_nor_its_time])
def test_the_listwise_ranker_keeps_the_scoring_invariants(mllm_config, listwise, check):
    check(dict(mllm_config, **listwise))


def test_the_listwise_ranker_trains_and_tests_end_to_end(mllm_config, listwise):
    result = run("MLLMSRec", "tiny", config_dict=dict(mllm_config, **listwise, late_fusion_grid=[0, 1]))
    for metrics in (*result["test_result"].values(), *result["first_stage_result"].values()):
        assert 0.0 <= metrics["ndcg@10"] <= metrics["hit@10"] <= 1.0
    phases = result["phase_seconds"]  # MLLMSRec's own phases beside the run's
    assert {"stages", "warmup", "llm_rows", "train", "valid", "fusion", "test"} <= set(phases)
    assert sum(seconds for name, seconds in phases.items() if name != "total") == pytest.approx(phases["total"], abs=1.0)


def test_a_listwise_list_is_the_first_stage_top_k_in_order_and_trains_towards_the_targets_letter(mllm_config, listwise):
    config, model, _ = _model_and_data(dict(mllm_config, **listwise))
    (u1, t1), (u2, t2) = sorted(model.prompts.summaries)[:2]  # positions whose user summaries are cached
    uids, ts = [u1, u2], [t1, t2]
    user_states = torch.randn(2, model.hidden_size, generator=torch.Generator().manual_seed(0))
    top = model.scorer.catalogue_scores(user_states, uids, ts).topk(model.rerank_top_k, dim=1).indices
    seen = {}

    def list_logits(prompts, options):
        seen["prompts"], seen["options"] = prompts, options
        return torch.arange(len(options), dtype=torch.float32).repeat(len(prompts.ids), 1).requires_grad_()

    model.ranker.list_logits = list_logits
    targets = [int(top[0, 3]), int(top[1, 0])]  # the 4th and the 1st item of their lists
    loss = model.llm_scores(uids, ts, user_states, torch.tensor(targets), torch.tensor([0, 1]), torch.tensor([1, 1]))
    logits = torch.arange(model.rerank_top_k, dtype=torch.float32).repeat(2, 1)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.tensor([3, 0])).item())
    assert seen["options"] == model.prompts.layout.option_ids[:model.rerank_top_k]
    tokenizer = model.backend.tokenizer
    text = tokenizer.decode(seen["prompts"].ids[0])
    titles = [model.context.item_text[i] for i in top[0].tolist()]
    found = [text.find(tokenizer.decode(model.prompts.tokenize(title, config["ranker_item_text_tokens"]))) for title in titles]
    assert all(f >= 0 for f in found) and found == sorted(found)  # every listed item, in the encoder's order
    scores = model.llm_scores(uids, ts, user_states, top[0, [4, 0]], torch.tensor([0, 0]))  # log-softmax of the letters
    torch.testing.assert_close(scores, logits[0].log_softmax(-1)[[4, 0]])


def _record_lists(model):
    """Replace the list-wise prompts and LLM by stand-ins that record each prompt's listed items (returned, filled as
    the model asks) and give letter ``j`` the logit ``j``."""
    listed = []

    def list_prompt(uid, t, user_token, items, item_tokens, recent_tokens=None):
        listed.append(list(items))
        return [0], {}

    def list_logits(prompts, options):
        return torch.arange(len(options), dtype=torch.float32).repeat(len(prompts.ids), 1).requires_grad_()

    model.prompts.list_prompt, model.ranker.list_logits = list_prompt, list_logits
    return listed


@pytest.mark.parametrize("check", [test_predict_ignores_candidate_order_and_block_position,
                                   test_scores_read_neither_the_target_nor_its_time])
def test_shuffled_lists_keep_the_scoring_invariants(mllm_config, listwise, check):
    check(dict(mllm_config, **listwise, ranker_list_order="shuffled"))


def test_a_shuffled_list_is_the_top_k_in_a_seeded_order_and_each_item_is_scored_by_its_own_letter(mllm_config, listwise):
    """Scoring: the same seed gives the same order for a (user, position) whatever else is in the batch, another seed
    another order; each candidate's score is its letter's log-probability where the shuffle put it. Training: a fresh
    order each step, the loss on the target's letter there."""
    config, model, _ = _model_and_data(dict(mllm_config, **listwise, ranker_list_order="shuffled"))
    (u1, t1), (u2, t2) = sorted(model.prompts.summaries)[:2]
    user_states = torch.randn(2, model.hidden_size, generator=torch.Generator().manual_seed(0))
    top = model.scorer.catalogue_scores(user_states, [u1, u2], [t1, t2]).topk(model.rerank_top_k, dim=1).indices
    listed = _record_lists(model)
    scores = model.llm_scores([u1, u2], [t1, t2], user_states, top.flatten(),
                              torch.arange(2).repeat_interleave(model.rerank_top_k))
    first, second = listed[0], listed[1]
    assert sorted(first) == sorted(top[0].tolist()) and first != top[0].tolist()  # shuffled, nothing lost
    letters = torch.arange(model.rerank_top_k, dtype=torch.float32).log_softmax(-1)
    expected = [letters[first.index(i)] for i in top[0].tolist()] + [letters[second.index(i)] for i in top[1].tolist()]
    torch.testing.assert_close(scores, torch.stack(expected))
    listed.clear()
    model.llm_scores([u1], [t1], user_states[:1], top[0], torch.zeros(model.rerank_top_k, dtype=torch.long))
    assert listed == [first]  # the same order alone in its batch
    model.list_order_seed += 1
    listed.clear()
    model.llm_scores([u1], [t1], user_states[:1], top[0], torch.zeros(model.rerank_top_k, dtype=torch.long))
    assert listed[0] != first
    target = top[0, 2].item()
    losses, orders = set(), set()
    for _ in range(4):  # training: each call its own order, cross-entropy towards the target's letter in it
        listed.clear()
        loss = model.llm_scores([u1], [t1], user_states[:1], torch.tensor([target]), torch.tensor([0]), torch.tensor([1]))
        position = listed[0].index(target)
        expected = torch.nn.functional.cross_entropy(torch.arange(model.rerank_top_k, dtype=torch.float32)[None],
                                                     torch.tensor([position]))
        assert loss.item() == pytest.approx(expected.item())
        orders.add(tuple(listed[0]))
    assert len(orders) > 1


def test_a_shuffled_order_is_refused_without_lists(mllm_config):
    from recbole_mllm.model.mllmsrec.settings import MLLMSRecSettings

    config, _ = _config_and_dataset(dict(mllm_config, ranker_scoring="pointwise", ranker_list_order="shuffled"))
    with pytest.raises(ValueError, match="ranker_list_order: shuffled orders the list-wise"):
        MLLMSRecSettings.from_config(config)
    with pytest.raises(ValueError, match="ranker_list_order' expects str .one of encoder, shuffled., got 'random'"):
        _config_and_dataset(dict(mllm_config, ranker_list_order="random"))


def test_an_unset_prompt_is_read_as_the_scorings_own_template(mllm_config, monkeypatch):
    from recbole_mllm.model.mllmsrec import model as mllmsrec_model

    read = []
    monkeypatch.setattr(mllmsrec_model, "read_stage_inputs",
                        lambda config, dataset, prompt, histories=None: read.append(prompt))
    for scoring in ("pointwise", "listwise"):
        config = Config("MLLMSRec", "tiny", config_dict=dict(mllm_config, ranker_scoring=scoring, ranker_prompt=None))
        mllmsrec_model.MLLMSRec.prepare(config, dataset=None)
    assert read == ["v2", "list_v1"]


def test_listwise_refuses_a_pointwise_prompt_and_sampled_lists_longer_than_it_ranks(mllm_config, listwise):
    from recbole_mllm.model.mllmsrec.settings import MLLMSRecSettings

    with pytest.raises(ValueError, match=r"ranker_prompt: list_v1") as refused:
        _model_and_data(dict(mllm_config, ranker_scoring="listwise", ranker_prompt="v2"))  # an explicit prompt wins
    assert "\n" not in str(refused.value) and "'ranker_v2'" in str(refused.value)
    sampled = dict(mllm_config, **listwise, ranker_train_candidates="sampled")
    assert MLLMSRecSettings.from_config(_config_and_dataset(dict(sampled, ranker_train_negatives=4))[0])
    config, _ = _config_and_dataset(dict(sampled, ranker_train_negatives=5))  # lists of 6 against rerank_top_k: 5
    with pytest.raises(ValueError, match=r"ranker_train_negatives \(5\) items, longer than the rerank_top_k \(5\)"):
        MLLMSRecSettings.from_config(config)


@pytest.fixture(scope="module")
def listwise_sampled(listwise):
    """LlamaRec's training of the list-wise ranker (``properties/ranker/listwise_sampled.yaml``) at the tiny sizes."""
    return dict(listwise, ranker_train_candidates="sampled", ranker_train_negatives=4, ranker_hard_negatives=1)


def test_a_sampled_training_list_is_the_target_and_its_negatives_in_a_fresh_order(mllm_config, listwise_sampled):
    """Training under ``sampled``: every training row's list is its target and its sampled negatives (never the
    encoder's top-K), in a new random order each step, and the loss is the cross-entropy towards the target's letter
    there. Scoring still ranks the top-K."""
    config, model, _ = _model_and_data(dict(mllm_config, **listwise_sampled))
    listed = _record_lists(model)
    (u1, t1), (u2, t2) = sorted(model.prompts.summaries)[:2]
    user_states = torch.randn(2, model.hidden_size, generator=torch.Generator().manual_seed(0))
    targets = [3, 7]
    negatives = [model.candidates.sample_negatives(u, 4, [target]) for u, target in zip((u1, u2), targets)]
    candidates = torch.tensor([targets[0], *negatives[0], targets[1], *negatives[1]])
    owner, labels = torch.tensor([0] * 5 + [1] * 5), torch.tensor(([1] + [0] * 4) * 2)
    positions = set()
    for _ in range(6):
        listed.clear()
        loss = model.llm_scores([u1, u2], [t1, t2], user_states, candidates, owner, labels)
        assert [sorted(items) for items in listed] == [sorted([targets[0], *negatives[0]]),
                                                       sorted([targets[1], *negatives[1]])]
        where = [items.index(target) for items, target in zip(listed, targets)]
        expected = torch.nn.functional.cross_entropy(torch.arange(5, dtype=torch.float32).repeat(2, 1), torch.tensor(where))
        assert loss.item() == pytest.approx(expected.item())
        positions.add(tuple(where))
    assert len(positions) > 1  # the target is not always where it arrived (first)
    listed.clear()
    top = model.scorer.catalogue_scores(user_states[:1], [u1], [t1]).topk(model.rerank_top_k, dim=1).indices[0]
    model.llm_scores([u1], [t1], user_states[:1], top, torch.zeros(model.rerank_top_k, dtype=torch.long))
    assert sorted(listed[0]) == sorted(top.tolist())  # scoring: the first stage's top-K


@pytest.mark.parametrize("check", [test_predict_ignores_candidate_order_and_block_position,
                                   test_scores_read_neither_the_target_nor_its_time])
def test_sampled_training_lists_keep_the_scoring_invariants(mllm_config, listwise_sampled, check):
    check(dict(mllm_config, **listwise_sampled, ranker_list_order="shuffled"))


def test_a_listwise_ranker_on_sampled_lists_trains_every_row_and_tests_end_to_end(mllm_config, listwise_sampled, caplog):
    with caplog.at_level(logging.INFO):
        result = run("MLLMSRec", "tiny", config_dict=dict(mllm_config, **listwise_sampled, late_fusion_grid=[0, 1]))
    frozen = [r.getMessage() for r in caplog.records if "the joint epochs read" in r.getMessage()]
    rows, trained = (int(n) for n in re.search(r"read (\d+) rows .* (\d+) of them train the LLM", frozen[0]).groups())
    assert rows == trained > 0  # not only those whose target is inside the encoder's top-K
    for metrics in (*result["test_result"].values(), *result["llm_alone_result"].values()):
        assert 0.0 <= metrics["ndcg@10"] <= metrics["hit@10"] <= 1.0


@pytest.mark.parametrize("frozen", [True, False])
def test_a_run_interrupted_after_its_first_joint_epoch_resumes_as_if_never_stopped(mllm_config, frozen, monkeypatch,
                                                                                    caplog):
    """Resumed, MLLMSRec skips its encoder warm-up (the state holds the warmed-up encoder), reads its joint rows from
    that encoder, trains its second joint epoch only and ends with the uninterrupted run's metrics, exactly; run once
    more, it trains nothing and tests the same. The warm-up cache is off: a reused warm-up leaves the random generators
    where a trained one does not."""
    from recbole_mllm.trainer import MLLMSRecTrainer
    from tests.foundation.test_run_resume import assert_same_run, interrupted, rerun

    settings = dict(mllm_config, epochs=2, encoder_warmup_cache=False, encoder_frozen_after_warmup=frozen,
                    stopping_min_steps=0, resume_training=True)
    warm_ups = []
    warm_up = MLLMSRecTrainer._train_encoder
    monkeypatch.setattr(MLLMSRecTrainer, "_train_encoder", lambda self, *args: warm_ups.append(1) or warm_up(self, *args))
    interrupted(monkeypatch, "MLLMSRec", settings, stop_epoch=1, trainer_class=MLLMSRecTrainer)
    resumed, trained, lines = rerun(monkeypatch, caplog, "MLLMSRec", settings, trainer_class=MLLMSRecTrainer)
    assert trained == [1] and warm_ups == [1] and "epoch 1 of 2 done" in lines[0]
    reference = run("MLLMSRec", "tiny", config_dict=dict(settings, resume_training=False))
    assert trained == [1, 0, 1] and warm_ups == [1, 1]
    assert_same_run(resumed, reference)
    again, trained_again, lines = rerun(monkeypatch, caplog, "MLLMSRec", settings, trainer_class=MLLMSRecTrainer)
    assert trained_again == [] and warm_ups == [1, 1] and "epoch 2 of 2 done" in lines[-1]  # ended: tested only
    assert_same_run(again, reference)
