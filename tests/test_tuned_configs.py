"""The shipped tuned configurations (``properties/tuned/<dataset>/<Model>.yaml``) are points of their search space."""

import pytest
import yaml

from recbole_mllm.config import properties_dir
from recbole_mllm.search_space import load_search_space, space_points, search_space_file

EARLIER_REGIME = {"train_positions": "last", "train_batch_size": 2048}
"""The training regime of searches run before every space fixed ``train_positions: all`` (ml-100k's)."""
TUNED = sorted((properties_dir() / "tuned").glob("*/*.yaml"))


@pytest.mark.parametrize("path", TUNED, ids=[f"{p.parent.name}/{p.stem}" for p in TUNED])
def test_tuned_config_is_a_point_of_its_search_space(path):
    selected = yaml.safe_load(path.read_text())
    points = space_points(load_search_space(search_space_file(path.stem)))
    if selected["train_positions"] == "last":  # searched before the spaces fixed the regime: the rest must match
        assert selected["train_batch_size"] == 2048
        points = [{**point, **EARLIER_REGIME} for point in points]
    assert selected in points, f"{path} sets {selected}, which is no combination of {search_space_file(path.stem)}"


def test_every_dataset_ships_something():
    assert {p.parent.name for p in TUNED} >= {"ml-100k", "ml-1m-mm"}
