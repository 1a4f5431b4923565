"""Checkpoints and plugin-written tensors load without running code from the file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from recbole_mllm import compat
from recbole_mllm.quick_start import run


class Payload:
    """What a hostile checkpoint carries: unpickling it would run ``os.system``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def hostile(tmp_path):
    """``hostile(**save_kwargs)`` -> a file shaped like a RecBole checkpoint whose config is the payload."""
    marker = tmp_path / "code-ran"

    def write(name="hostile.pth", **save_kwargs):
        path = tmp_path / name
        torch.save({"config": Payload(marker), "epoch": 0, "state_dict": {"w": torch.ones(2)}}, path, **save_kwargs)
        return path

    write.marker = marker
    return write


@pytest.mark.parametrize("save_kwargs", [{}, {"pickle_protocol": 4}, {"_use_new_zipfile_serialization": False}])
def test_a_hostile_checkpoint_is_refused_naming_the_file(hostile, save_kwargs):
    path = hostile(**save_kwargs)
    with pytest.raises(compat.UnsafeCheckpointError) as error:
        compat.load_checkpoint(path)
    assert str(error.value).startswith(f"refused to load {path}: it holds posix.system")
    assert not hostile.marker.exists()


def test_plugin_tensors_load_weights_only_and_refuse_anything_else(hostile, tmp_path):
    path = hostile()
    with pytest.raises(compat.UnsafeCheckpointError, match=rf"refused to load {path}: it holds posix.system"):
        compat.load_weights(path)
    assert not hostile.marker.exists()
    plain = tmp_path / "warmup.pth"
    torch.save({"encoder": {"w": torch.arange(3.0)}, "best_score": float("nan"), "epochs": 2}, plain)
    loaded = compat.load_weights(plain)
    assert torch.equal(loaded["encoder"]["w"], torch.arange(3.0)) and loaded["epochs"] == 2


def test_a_checkpoint_recbole_wrote_loads_with_its_config_inert(tiny_data):
    """RecBole pickles its Config (protocol 4) with the model class, enums and a yaml loader inside."""
    result = run("SASRec", "tiny", config_dict=tiny_data)
    (path,) = Path(tiny_data["checkpoint_dir"]).glob("SASRec-*.pth")
    checkpoint = compat.load_checkpoint(path)
    assert isinstance(checkpoint["config"], compat.CheckpointObject)  # data only: no Config code ran
    assert checkpoint["config"].state["final_config_dict"]["model"] == "SASRec"
    assert checkpoint["epoch"] == result["epochs"] - 1 and "lr" in checkpoint["optimizer"]["param_groups"][0]
    assert checkpoint["state_dict"]["item_embedding.weight"].shape[1] == tiny_data["hidden_size"]


def test_a_warmup_file_with_a_numpy_score_loads(tmp_path):
    """RecBole's validation scores are numpy.float64: a warm-up file written before this change holds one."""
    import numpy as np

    path = tmp_path / "warmup.pth"
    torch.save({"encoder": {"w": torch.ones(1)}, "best_score": np.float64(0.25), "epochs": 3}, path)
    assert compat.load_weights(path)["best_score"] == 0.25


def test_state_is_set_on_stand_ins_only():
    """BUILD on an allowed object (here a RecBole enum member) would change it for the whole process."""
    import io

    from recbole.utils.enum_type import ModelType

    crafted = (b"\x80\x02crecbole.utils.enum_type\nModelType\nK\x01\x85R"  # ModelType(1)
               b"}U\x05valueK\x07sb.")  # .__dict__.update({"value": 7})
    with pytest.raises(compat.UnsafeCheckpointError, match="sets the state of a ModelType"):
        compat._allowlist_pickle.load(io.BytesIO(crafted))
    assert ModelType(1).value == 1
