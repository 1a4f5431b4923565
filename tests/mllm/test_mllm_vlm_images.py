"""Item images for the ranker from Hugging Face VLMs: the model's own image tokens, fixed in count, as embeddings.

Tiny random Qwen2-VL (M-RoPE, a pixel range: the token count follows the image's shape), Idefics3
(SmolVLM's architecture, tiling images by shape) and LLaVA, each checked against the model's own forward
with ``pixel_values``.
"""

from __future__ import annotations

import pytest
import torch

from mllm_tiny import synthetic_image
from recbole_mllm.mllm import ChatRequest, load_mllm
from recbole_mllm.mllm.hf_vlm import ImageTokenProjector, mrope_position_ids

VLM_KINDS = ["qwen2vl", "idefics3", "llava"]
# placeholder the chat template writes, and its expansion: Qwen2-VL squashed to 224 and capped at 112x112
# pixels gives 4x4 tokens between its markers; Idefics3 one tile of 1 token between 3 markers; LLaVA 2x2 patches
EXPECTED_SLOT = {"qwen2vl": ("<|vision_start|><|image_pad|><|vision_end|>", 18, 16),
                 "idefics3": ("<image>", 4, 1), "llava": ("<image>", 4, 4)}


def two_images():
    """A portrait and a wide strip: different sizes and shapes."""
    return [synthetic_image(1, (60, 90)), synthetic_image(2, (90, 20))]


def fresh(tiny_folder, kind):
    folder, kwargs = tiny_folder(kind)
    return load_mllm(str(folder), **kwargs)


@pytest.fixture(scope="module", params=VLM_KINDS)
def vlm(request, tiny_folder):
    return fresh(tiny_folder, request.param)


def kind_of(backend) -> str:
    return {"Qwen2VL": "qwen2vl", "Idefics3": "idefics3", "Llava": "llava"}[type(backend.model).__name__.split("For")[0]]


def squash(backend, image):
    return image.convert("RGB").resize((backend.image_side,) * 2)


def decoder_logits(backend, embeds, mask, position_ids):
    """The ranker's way through the model: the decoder on ``inputs_embeds``, then the output layer."""
    hidden = backend.model.get_decoder()(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                         use_cache=False).last_hidden_state
    return backend.model.get_output_embeddings()(hidden)


def test_slot_is_the_placeholder_the_template_writes_expanded_by_the_processor(vlm):
    text, n, n_vision = EXPECTED_SLOT[kind_of(vlm)]
    slot = vlm.image_slot
    assert vlm.image_placeholder() == slot.text == text
    assert slot.n == n and int(slot.vision.sum()) == n_vision
    assert (slot.input_ids[slot.vision] == vlm.image_token_id).all()
    if kind_of(vlm) == "qwen2vl":  # 4x4 grid after the 2x2 merge: h and w offsets 1..4, text resumes at 6
        assert slot.rope_offsets.shape == (3, 18) and slot.span == 6
        assert slot.rope_offsets[1, 1:5].tolist() == [1] * 4 and slot.rope_offsets[2, 1:5].tolist() == [1, 2, 3, 4]
    else:
        assert slot.rope_offsets is None and slot.span == slot.n


def test_encode_images_gives_one_shape_for_images_of_different_sizes(vlm):
    images = two_images()
    slot = vlm.image_slot
    features, logits = vlm.encode_images(images)
    assert features.shape == (2, slot.n, vlm.hidden_size) and features.is_floating_point()
    assert logits.shape == (2, 0)
    assert not torch.equal(features[0], features[1])
    if kind_of(vlm) != "llava":  # the processor alone, as configured, gives these images different token counts
        raw = vlm.processor(text=[slot.text] * 2, images=[[im] for im in images], padding=True, return_tensors="pt")
        counts = raw["attention_mask"].sum(1).tolist()
        assert counts[0] != counts[1]


def test_projector_starts_as_the_models_own_image_embeddings(vlm):
    """At init the soft tokens are what the model itself splices in: captured at its decoder's input."""
    images = two_images()
    features, logits = vlm.encode_images(images)
    tokens = vlm.projector(features, logits)
    assert tokens.shape == (2, vlm.image_slot.n, vlm.hidden_size)
    captured = []
    hook = vlm.model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: captured.append(kwargs["inputs_embeds"].detach()), with_kwargs=True)
    try:
        with torch.no_grad():
            for image in images:  # one at a time: the model's own batch-of-one path
                vlm.model(**vlm._to_device(dict(vlm._process_images([image], [vlm.image_slot.text]))))
    finally:
        hook.remove()
    torch.testing.assert_close(tokens.detach(), torch.cat(captured).float())  # float32 default tolerance: batch of 2 vs 1
    # and the image-token positions hold exactly get_image_features' output (vision tower + connector)
    enc = vlm._to_device(dict(vlm._process_images(images[:1], [vlm.image_slot.text])))
    vision_inputs = {k: v for k, v in enc.items() if k in ("pixel_values", "image_grid_thw", "pixel_attention_mask")}
    own = vlm.model.get_image_features(**vision_inputs, return_dict=True).pooler_output
    torch.testing.assert_close(tokens[0, vlm.image_slot.vision].detach(), torch.cat(list(own)).reshape(-1, vlm.hidden_size))


def test_residual_trains_and_moves_only_the_image_positions():
    vision = torch.tensor([False, True, True, False])
    projector = ImageTokenProjector(8, vision, rank=2)
    x = torch.randn(3, 4, 8)
    out = projector(x, torch.zeros(3, 0))
    assert torch.equal(out, x)
    (out * torch.randn_like(out)).sum().backward()
    assert projector.up.weight.grad.abs().sum() > 0  # step 0 already moves the residual
    with torch.no_grad():
        projector.up.weight.normal_()
    moved = projector(x)
    assert torch.equal(moved[:, ~vision], x[:, ~vision]) and not torch.allclose(moved[:, vision], x[:, vision])
    state = torch.get_rng_state()
    again = ImageTokenProjector(8, vision, rank=2)
    assert torch.equal(torch.get_rng_state(), state)  # built from a fixed seed: the global random state stays
    assert torch.equal(again.down.weight, ImageTokenProjector(8, vision, rank=2).down.weight)


def prompt_rows(backend, requests):
    """Each rendered chat prompt split at the image: token ids before and after the slot."""
    rows = []
    for request in requests:
        before, found, after = backend.render(request).partition(backend.image_slot.text)
        assert found
        tokenize = lambda text: backend.tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
        rows.append((tokenize(before), tokenize(after)))
    return rows


def test_spliced_prompt_gives_the_models_own_output(vlm):
    """Chat prompts with an image, left-padded in one batch: embeddings spliced through ``inputs_embeds`` on the
    decoder (the ranker's path) give the logits of the model's own forward with ``pixel_values``."""
    images = [squash(vlm, image) for image in two_images()]
    requests = [ChatRequest("Describe the poster.", image=images[0]),
                ChatRequest("Is this a comedy? Answer Yes or No.", image=images[1], system="Be terse.")]
    slot = vlm.image_slot
    own_inputs = vlm._to_device(dict(vlm._process_images(images, [vlm.render(r) for r in requests])))
    ids, mask = own_inputs["input_ids"], own_inputs["attention_mask"]
    tokens = vlm.projector(*vlm.encode_images(images)).detach()
    table = vlm.model.get_input_embeddings()
    embeds, starts = [], []
    for row, (before, after) in enumerate(prompt_rows(vlm, requests)):
        pad = ids.shape[1] - len(before) - slot.n - len(after)
        assert ids[row, pad:].tolist() == before + slot.input_ids.tolist() + after  # the processor's own layout
        embeds.append(torch.cat([table(ids[row, :pad + len(before)]), tokens[row], table(torch.tensor(after))]))
        starts.append([pad + len(before)])
    embeds = torch.stack(embeds)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    real = mask.bool()
    with torch.no_grad():
        spliced = decoder_logits(vlm, embeds, mask, positions)
        if kind_of(vlm) != "qwen2vl":
            own = vlm.model(**own_inputs).logits
            torch.testing.assert_close(spliced[real], own[real], atol=1e-5, rtol=1e-4)
            return
        # Qwen2-VL: with the ranker's 1-D ids, the model's own forward given the same ids
        own_1d = vlm.model(**own_inputs, position_ids=positions).logits
        torch.testing.assert_close(spliced[real], own_1d[real], atol=1e-5, rtol=1e-4)
        # with M-RoPE ids from the slot's offsets: its generation path (positions from get_rope_index)
        mrope = mrope_position_ids(positions, starts, slot)
        reference = vlm.model.model.get_rope_index(ids, mm_token_type_ids=own_inputs["mm_token_type_ids"],
                                                   image_grid_thw=own_inputs["image_grid_thw"], attention_mask=mask)[0]
        assert torch.equal(mrope[:, real], reference[:, real])
        spliced_mrope = decoder_logits(vlm, embeds, mask, mrope)
        own = vlm.model(**own_inputs).logits
        torch.testing.assert_close(spliced_mrope[real], own[real], atol=1e-5, rtol=1e-4)
        # the two position schemes differ after the image: 1-D ids are a deviation from pretraining
        assert not torch.allclose(spliced[real], own[real], atol=1e-3)


def test_lora_ranker_scores_image_prompts_as_the_model_does(tiny_folder):
    """``LoRARanker`` on each VLM class: decoder, embeddings and LoRA targets are found, the image slot's soft
    tokens score like the model's own forward with ``pixel_values`` (LoRA starts at zero), and the ranker's
    loss trains the projector's residual."""
    from recbole_mllm.model.mllmsrec.ranker import LoRARanker, PromptBatch

    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    for kind in VLM_KINDS:
        backend = fresh(tiny_folder, kind)  # LoRA wraps the model in place: never the shared one
        tokenize = lambda text: backend.tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
        yes, no = backend.answer_token_ids(["Yes", "No"])
        ranker = LoRARanker(backend.model, 4, 8, 0.0, targets, yes, no).eval()
        decoder = ranker.llm.get_base_model().get_decoder()
        adapted = [name for name, module in decoder.named_modules() if hasattr(module, "lora_A")]
        layers = backend.model.config.get_text_config().num_hidden_layers
        assert len(adapted) == len(targets) * layers, (kind, adapted)
        images = [squash(backend, image) for image in two_images()]
        slot = backend.image_slot
        user = tokenize("<|im_start|>user\nThe user watched a comedy and then a drama.")
        before, after = tokenize(" Target item: "), tokenize(" Answer Yes or No.<|im_end|>\n<|im_start|>assistant\n")
        cand_ids = before + slot.input_ids.tolist() + after
        span = list(range(len(before), len(before) + slot.n))
        tokens = backend.projector(*backend.encode_images(images))  # [2 n H]
        users = PromptBatch([user], [{}])
        candidates = PromptBatch([cand_ids] * 2, [{"image": (span, tokens[k])} for k in range(2)])
        owner = torch.tensor([0, 0])
        with torch.no_grad():
            scores = ranker.score(users, candidates, owner)
            for k, image in enumerate(images):
                enc = backend._to_device(dict(backend._process_images([image], [slot.text])))
                ids = torch.tensor([user + cand_ids])
                extra = {key: v for key, v in enc.items() if key not in ("input_ids", "attention_mask",
                                                                         "mm_token_type_ids")}
                logits = backend.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                       position_ids=torch.arange(ids.shape[1]).unsqueeze(0), **extra).logits[0, -1]
                torch.testing.assert_close(scores[k], logits[yes] - logits[no], atol=1e-4, rtol=1e-4)
        assert not torch.allclose(scores[0], scores[1])  # the images reach the score
        ranker.train()
        ranker.loss(users, candidates, owner, torch.tensor([1, 0])).backward()
        assert backend.projector.up.weight.grad.abs().sum() > 0, kind


def test_encode_item_images_caches_the_slot_of_every_item(vlm, tmp_path):
    from recbole_mllm.model.item_images import encode_item_images
    from recbole_mllm.stages.items import AtomicTable

    images = two_images()
    for name, image in zip(("a.png", "c.png"), images):
        image.save(tmp_path / name)
    rows = {"a": {"item_id": "a", "image": "a.png"}, "b": {"item_id": "b", "image": ""},
            "c": {"item_id": "c", "image": "c.png"}}
    table = AtomicTable(tmp_path / "x.item", "item_id", {"item_id": "token", "image": "token"}, rows)
    features, logits, has_image = encode_item_images(vlm, ["[PAD]", "a", "b", "c"], table, "image", tmp_path,
                                                     batch_size=1)
    assert has_image.tolist() == [False, True, False, True]
    assert features.shape == (4, vlm.image_slot.n, vlm.hidden_size) and logits.shape == (4, 0)
    assert features.device.type == "cpu" and features.dtype == vlm.dtype
    assert not features[[0, 2]].any()
    torch.testing.assert_close(features[[1, 3]], vlm.encode_images(images)[0].cpu())
