"""Fixture for the dataset script tests: RecBole 1.2.1 on numpy 2, run in a temporary folder."""

import numpy as np
import pytest
from dataset_helpers import REPO


@pytest.fixture
def recbole(monkeypatch, tmp_path):
    """``load(name, data_path, yaml)`` -> a RecBole Dataset, with numpy 2 shims and cwd in tmp_path.

    RecBole 1.2.1's Config uses ``np.float_`` & co., removed in numpy 2; the shims live in this
    fixture only (the plugin has its own compat module), so no other test sees them.
    """
    for alias, value in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
        monkeypatch.setattr(np, alias, value, raising=False)
    monkeypatch.chdir(tmp_path)  # RecBole may write saved/ and log/ into the working directory

    from recbole.config import Config
    from recbole.data import create_dataset

    def load(name, data_path, yaml):
        config = Config(
            model="SASRec",
            dataset=name,
            config_file_list=[str(REPO / "properties" / "dataset" / yaml)],
            config_dict={
                "data_path": str(data_path),
                "train_neg_sample_args": None,
                "checkpoint_dir": str(tmp_path / "saved"),
            },
        )
        return create_dataset(config)

    return load
