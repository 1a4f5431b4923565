"""Every Hugging Face backend on a tiny random model: load by folder, generate, embed, answer log-probs."""

from __future__ import annotations

import logging

import pytest
import torch

from mllm_tiny import synthetic_image
from recbole_mllm.mllm import ChatRequest, GenerationConfig
from recbole_mllm.mllm.hf_causal import HFCausalLM
from recbole_mllm.mllm.hf_chat import IGNORE_INDEX
from recbole_mllm.mllm.hf_vlm import HFVisionLM


def mixed_requests() -> list[ChatRequest]:
    """Images and text-only requests of different lengths, interleaved (sorting must undo it)."""
    return [
        ChatRequest("Describe the poster.", image=synthetic_image(1)),
        ChatRequest("Summarise Toy Story (1995), an animated comedy about toys, in one sentence."),
        ChatRequest("What is shown in this image? Be brief, mention colours and objects.", image=synthetic_image(2),
                    system="You are terse."),
        ChatRequest("Hi"),
        ChatRequest("Is it a comedy?", image=synthetic_image(3, (40, 40))),
    ]


def test_load_picks_backend_by_config(tiny_backend):
    expected = HFCausalLM if tiny_backend.backend == "hf-causal" else HFVisionLM
    assert isinstance(tiny_backend, expected)
    assert tiny_backend.supports_images == (expected is HFVisionLM)
    assert tiny_backend.tokenizer.padding_side == "left" and tiny_backend.tokenizer.pad_token is not None
    assert tiny_backend.dtype == torch.float32 and tiny_backend.device.type == "cpu"


def test_generate_batched_equals_single_in_request_order(tiny_backend):
    requests = mixed_requests()
    config = GenerationConfig(max_new_tokens=6, batch_size=3)
    batched = tiny_backend.generate(requests, config, progress=True)
    single = [tiny_backend.generate([r], config)[0] for r in requests]
    assert batched == single
    assert all(isinstance(text, str) and text == text.strip() for text in batched)
    assert tiny_backend.generate([], config) == []


def test_embed_is_normalised_and_batch_independent(tiny_backend):
    texts = ["a short text", "a much longer text about a movie poster with explosions", "Toy Story"]
    vectors = tiny_backend.embed(texts, batch_size=2)
    assert vectors.shape == (3, tiny_backend.hidden_size)
    assert vectors.dtype == torch.float32 and vectors.device.type == "cpu"
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(tiny_backend.embed(texts[1:2])[0], vectors[1], atol=1e-5, rtol=1e-4)
    assert tiny_backend.embed([]).shape == (0, tiny_backend.hidden_size)


def test_answer_logprobs_are_next_token_log_softmax(tiny_backend):
    requests = mixed_requests()
    scores = tiny_backend.answer_logprobs(requests, ["Yes", "No"], batch_size=2)
    assert scores.shape == (len(requests), 2) and (scores <= 0).all()
    yes, no = tiny_backend.answer_token_ids(["Yes", "No"])
    with torch.no_grad():
        for row, request in zip(scores, requests):
            full = tiny_backend.model(**tiny_backend.prepare_inputs([request])).logits[0, -1].float().log_softmax(-1)
            torch.testing.assert_close(full.exp().sum(), torch.tensor(1.0))
            torch.testing.assert_close(row, full[[yes, no]], atol=1e-4, rtol=1e-4)


def test_completion_labels_cover_the_answer_only(tiny_backend):
    """Training inputs: the prompt exactly as scored, then the answer; only the answer is supervised."""
    requests = mixed_requests()[:3]
    answers = ["Yes.", "No.", "Yes, it is."]
    inputs = tiny_backend.prepare_inputs(requests, completions=answers)
    prompt_only = tiny_backend.prepare_inputs(requests)
    for row, answer in enumerate(answers):
        answer_ids = tiny_backend.tokenizer(answer, add_special_tokens=False).input_ids
        labels = inputs["labels"][row]
        assert labels[labels != IGNORE_INDEX].tolist() == answer_ids
        assert labels[-len(answer_ids):].tolist() == answer_ids  # left padding: the answer ends every row
        assert inputs["attention_mask"][row].sum() == prompt_only["attention_mask"][row].sum() + len(answer_ids)
    with torch.no_grad():
        logits = tiny_backend.model(**inputs).logits.float()
    first = tiny_backend.answer_logprobs(requests, ["Yes", "No"])
    for row, answer in enumerate(answers):
        n = len(tiny_backend.tokenizer(answer, add_special_tokens=False).input_ids)
        predicted = logits[row, -n - 1].log_softmax(-1)[inputs["labels"][row, -n]]
        column = 0 if answer.startswith("Yes") else 1
        torch.testing.assert_close(predicted, first[row, column], atol=1e-4, rtol=1e-4)


def test_identity_is_stable_and_names_the_model(tiny_backend):
    identity = tiny_backend.identity
    assert identity.backend == tiny_backend.backend and identity.dtype == "float32"
    assert len(identity.weights_sha256) == 64
    assert type(tiny_backend).identity.func(tiny_backend) == identity  # recomputed (hash cache hit): same


def test_text_only_backend_warns_once_about_images(tiny_folder, caplog):
    from recbole_mllm.mllm import load_mllm

    folder, _ = tiny_folder("causal")
    backend = load_mllm(str(folder))
    with caplog.at_level(logging.WARNING):
        backend.generate([ChatRequest("Describe it.", image=synthetic_image())] * 3, GenerationConfig(max_new_tokens=2))
    assert sum("text-only" in r.getMessage() for r in caplog.records) == 1


def test_answers_sharing_a_first_token_are_refused(tiny_backend):
    with pytest.raises(ValueError, match="share a first token"):
        tiny_backend.answer_token_ids(["Yes", "Yes!"])
