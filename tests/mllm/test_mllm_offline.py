"""The real offline default: EfficientNet-Lite0 + label-embedding projector + SmolLM2-135M-Instruct."""

from __future__ import annotations

import pytest
import torch

from mllm_tiny import POSTERS, poster_or_synthetic, synthetic_image
from recbole_mllm.mllm import ChatRequest, GenerationConfig
from recbole_mllm.mllm.offline import IMAGE_MARKER, LabelProjector, OfflineMLLMConfig, imagenet_class_names


def test_imagenet_class_names_ship_in_index_order():
    names = imagenet_class_names()
    assert len(names) == 1000
    assert names[:3] == ["tench", "goldfish", "great white shark"]
    assert (names[917], names[921], names[999]) == ("comic book", "book jacket", "toilet tissue")


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of n_visual_tokens"):
        OfflineMLLMConfig(n_visual_tokens=3, projector_top_k=4)
    with pytest.raises(ValueError, match="temperature"):
        OfflineMLLMConfig(temperature=0)


def test_projector_starts_as_class_name_embeddings():
    table = torch.randn(1000, 8)
    projector = LabelProjector(table, OfflineMLLMConfig(n_visual_tokens=2, projector_top_k=4))
    logits = torch.full((1, 1000), -10.0)
    logits[0, [5, 7, 9, 11]] = torch.tensor([4.0, 3.0, 2.0, 2.0])
    tokens = projector(torch.randn(1, 1280), logits)  # [1, 2, 8]
    top2 = torch.tensor([4.0, 3.0]).softmax(0)
    torch.testing.assert_close(tokens[0, 0], top2[0] * table[5] + top2[1] * table[7])  # ranks 1-2, mixed
    torch.testing.assert_close(tokens[0, 1], (table[9] + table[11]) / 2)  # ranks 3-4, tied
    assert not projector.label_embed.weight.requires_grad and projector.residual.weight.requires_grad


def test_identity_is_stable_and_covers_projector_settings(offline_mllm):
    identity = offline_mllm.identity
    assert identity.backend == "offline-llava" and identity.name == "offline-default"
    assert type(offline_mllm).identity.func(offline_mllm) == identity  # recomputed: same hash
    assert identity.extra["n_visual_tokens"] == offline_mllm.config.n_visual_tokens
    assert "projector_init" in identity.as_dict()


def test_poster_gives_imagenet_cues_and_a_summary(offline_mllm):
    poster = poster_or_synthetic(1)  # Toy Story, when the ML-1M posters are present
    _, logits = offline_mllm.encode_images([poster])
    cues = offline_mllm.visual_cues(logits)[0]
    assert len(cues) == offline_mllm.config.n_cues and all(0 < p <= 1 for _, p in cues)
    assert [p for _, p in cues] == sorted((p for _, p in cues), reverse=True)
    if POSTERS.is_dir():
        assert cues[0][0] in ("comic book", "book jacket", "toyshop", "jigsaw puzzle")
    request = ChatRequest("Describe this movie poster in one sentence.", image=poster)
    rendered = offline_mllm.render(request, [name for name, _ in cues])
    assert IMAGE_MARKER in rendered and f"Visual cues detected in the image: {cues[0][0]}" in rendered
    summary = offline_mllm.generate([request], GenerationConfig(max_new_tokens=24))[0]
    assert isinstance(summary, str) and len(summary.split()) >= 3


def test_batched_generation_and_scores_match_single(offline_mllm):
    requests = [ChatRequest("Describe the poster in a few words.", image=poster_or_synthetic(2)),
                ChatRequest("Jumanji (1995), Adventure|Children's|Fantasy. Describe the movie in a few words."),
                ChatRequest("What genre is this poster?", image=synthetic_image(5))]
    config = GenerationConfig(max_new_tokens=4, batch_size=4)
    assert offline_mllm.generate(requests, config) == [offline_mllm.generate([r], config)[0] for r in requests]
    scores = offline_mllm.answer_logprobs(requests, ["Yes", "No"])
    single = torch.cat([offline_mllm.answer_logprobs([r], ["Yes", "No"]) for r in requests])
    torch.testing.assert_close(scores, single, atol=1e-4, rtol=1e-4)
    assert offline_mllm.embed(["Toy Story", "Jumanji"]).shape == (2, offline_mllm.hidden_size)


def test_soft_image_tokens_are_spliced_and_train_the_residual(offline_mllm):
    request = ChatRequest("Will the user like it?", image=poster_or_synthetic(3))
    inputs = offline_mllm.prepare_inputs([request], completions=["Yes."])
    assert set(inputs) == {"inputs_embeds", "attention_mask", "labels"}
    projector = offline_mllm.projector
    try:
        loss = offline_mllm.model(**inputs).loss
        loss.backward()
        assert projector.residual.weight.grad is not None and projector.residual.weight.grad.abs().sum() > 0
    finally:
        offline_mllm.model.zero_grad(set_to_none=True)
        projector.zero_grad(set_to_none=True)


def test_no_repeat_ngram_size_stops_greedy_loops(offline_mllm):
    request = ChatRequest("Repeat the word 'the' forty times.")
    text = offline_mllm.generate([request], GenerationConfig(max_new_tokens=40, no_repeat_ngram_size=2))[0]
    words = text.split()
    bigrams = list(zip(words, words[1:]))
    ids = offline_mllm.tokenizer(text, add_special_tokens=False).input_ids
    token_bigrams = list(zip(ids, ids[1:]))
    assert len(token_bigrams) == len(set(token_bigrams)), text
    assert words and len(bigrams) >= 1


def test_reply_ngram_blocker_bans_repeats_of_the_reply_only():
    from recbole_mllm.mllm.hf_chat import ReplyNGramBlocker

    prompt = [5, 6, 7, 5, 6]  # "5 6" -> 7 is a prompt trigram: quoting it stays allowed
    reply = [8, 9, 4, 8, 9]  # "8 9" -> 4 already occurred in the reply: banned
    blocker = ReplyNGramBlocker(3, prompt_length=len(prompt))
    scores = blocker(torch.tensor([prompt + reply]), torch.zeros(1, 12))
    assert scores[0, 4] == -float("inf")
    assert torch.isfinite(scores[0, [i for i in range(12) if i != 4]]).all()
    quoting = blocker(torch.tensor([prompt + [1, 5, 6]]), torch.zeros(1, 12))
    assert torch.isfinite(quoting).all()  # the reply's own "5 6" never ended in 7
