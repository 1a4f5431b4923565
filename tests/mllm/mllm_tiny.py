"""Tiny random-weight models with real tokenizers and processors, built locally (no hub).

Each builder saves a complete Hugging Face model folder (weights, config, tokenizer, processor, chat
template) so the tests go through ``load_mllm(folder)`` exactly as a user's folder would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# ML-1M posters, if the shared data folder sits beside the repository (never committed)
POSTERS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "ml-1m" / "posters"

CORPUS = [
    "The user watched a comedy and then a drama. Summarise the movie poster and the plot.",
    "Visual cues detected in the image: comic book, book jacket, theater curtain, web site.",
    "Whether the user will like the target item next? Answer Yes or No. Yes. No.",
    "A poster with bright colours, a hero, explosions and a city skyline at night.",
    "Toy Story (1995) Animation|Children's|Comedy. Jumanji (1995) Adventure|Fantasy.",
] * 4

# ChatML, rendering both plain-string contents and multimodal content lists.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}IMAGE_TEXT{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_template(image_text: str = "<image>") -> str:
    return CHAT_TEMPLATE.replace("IMAGE_TEXT", image_text)


def tiny_tokenizer(extra_special: tuple[str, ...] = (), image_text: str = "<image>") -> PreTrainedTokenizerFast:
    """A byte-level BPE (~400 tokens) trained on a few sentences, with ChatML specials and template."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra_special]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   additional_special_tokens=list(extra_special),
                                   chat_template=chat_template(image_text))


def tiny_llama_config(tokenizer, **overrides):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, initializer_range=0.2, **overrides)


def _save(model, processor_or_tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    processor_or_tokenizer.save_pretrained(folder)
    return folder


def build_tiny_causal(folder: Path) -> Path:
    from transformers import LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    return _save(LlamaForCausalLM(tiny_llama_config(tokenizer)), tokenizer, folder)


def _image_processor(folder: Path, **settings):
    """An image processor from a hand-written preprocessor config: AutoImageProcessor picks whichever
    backend (torchvision or PIL) this transformers install has."""
    import json

    from transformers import AutoImageProcessor

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(settings))
    return AutoImageProcessor.from_pretrained(folder)


def has_torchvision() -> bool:
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


def qwen2vl_processor(image_processor, tokenizer):
    """Qwen2-VL's processor; without torchvision, transformers cannot build its video half, so fall back
    to a subclass that has only the image processor and tokenizer (what image+text requests use)."""
    from transformers import ProcessorMixin, Qwen2VLProcessor

    if has_torchvision():
        return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=tokenizer.chat_template)

    class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return Qwen2VLImageOnlyProcessor(image_processor, tokenizer, chat_template=tokenizer.chat_template)


def build_tiny_qwen2vl(folder: Path):
    """Tiny Qwen2-VL; returns ``(folder, processor)``: pass the processor to ``load_mllm`` when the folder's
    own cannot be loaded here (no torchvision)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tokenizer = tiny_tokenizer(("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
                               image_text="<|vision_start|><|image_pad|><|vision_end|>")
    ids = tokenizer.convert_tokens_to_ids
    # a pixel range, as real checkpoints have: images of different shapes give different token counts (4 to 16)
    image_processor = _image_processor(folder, image_processor_type="Qwen2VLImageProcessor", min_pixels=56 * 56,
                                       max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = qwen2vl_processor(image_processor, tokenizer)
    text = tiny_llama_config(tokenizer).to_dict()
    text.update(model_type="qwen2_vl_text", rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return _save(Qwen2VLForConditionalGeneration(config), processor, folder), processor


def build_tiny_llava(folder: Path) -> Path:
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = tiny_tokenizer(("<image>",), image_text="<image>\n")
    image_processor = _image_processor(folder, image_processor_type="CLIPImageProcessor", size={"shortest_edge": 28},
                                       crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=tokenizer.chat_template)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=28, patch_size=14),
        text_config=tiny_llama_config(tokenizer), image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    return _save(LlavaForConditionalGeneration(config), processor, folder)


def build_tiny_idefics3(folder: Path) -> Path:
    """Tiny Idefics3 (SmolVLM's architecture): one 28x28 tile -> 4 patches -> 1 token after pixel shuffle.

    Images are split into tiles as SmolVLM's processor does by default: up to 2x2 tiles of 28 (by shape)
    plus the global image, so the token count depends on the image's shape."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor

    tokenizer = tiny_tokenizer(("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"),
                               image_text="<image>")
    image_processor = _image_processor(folder, image_processor_type="Idefics3ImageProcessor",
                                       do_image_splitting=True, size={"longest_edge": 56},
                                       max_image_size={"longest_edge": 28})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=1,
                                  chat_template=tokenizer.chat_template)
    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        text_config=tiny_llama_config(tokenizer).to_dict(), scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return _save(Idefics3ForConditionalGeneration(config), processor, folder)


def synthetic_image(seed: int = 0, size=(60, 90)) -> Image.Image:
    """A small deterministic RGB image with some structure (stripes), for tests that need any image."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    pixels[::7] = (255, 200, 0)
    return Image.fromarray(pixels)


def poster_or_synthetic(movie_id: int = 1) -> Image.Image:
    path = POSTERS / f"{movie_id}.jpg"
    return Image.open(path).convert("RGB") if path.is_file() else synthetic_image(movie_id, (182, 268))
