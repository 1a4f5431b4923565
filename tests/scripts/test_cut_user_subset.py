"""scripts/cut_user_subset.py: a seeded user subset is a dataset of its own that the plugin loads."""

import importlib.util

from recbole_mllm.config import Config
from recbole_mllm.data import create_dataset
from tests.conftest import REPO_ROOT, write_tiny_dataset

_spec = importlib.util.spec_from_file_location("cut_user_subset", REPO_ROOT / "scripts" / "cut_user_subset.py")
cut_user_subset = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cut_user_subset)


def _rows(path):
    return [line.split("\t") for line in path.read_text().splitlines()[1:]]


def test_the_subset_keeps_every_interaction_of_the_drawn_users_and_only_theirs(tmp_path):
    write_tiny_dataset(tmp_path)
    (tmp_path / "tiny" / "images").mkdir()
    assert cut_user_subset.main(["--data_path", str(tmp_path), "--dataset", "tiny", "--users", "10",
                                 "--name", "tiny10", "--seed", "3"]) == 0
    source, subset = _rows(tmp_path / "tiny" / "tiny.inter"), _rows(tmp_path / "tiny10" / "tiny10.inter")
    users = {row[0] for row in subset}
    assert len(users) == 10
    assert subset == [row for row in source if row[0] in users]  # every interaction of those users, in file order
    assert {row[0] for row in _rows(tmp_path / "tiny10" / "tiny10.user")} == users
    assert {row[0] for row in _rows(tmp_path / "tiny10" / "tiny10.item")} == {row[1] for row in subset}
    again = tmp_path / "again"
    cut_user_subset.main(["--data_path", str(tmp_path), "--dataset", "tiny", "--users", "10", "--name", "tiny10",
                          "--seed", "3", "--output", str(again)])
    assert (again / "tiny10" / "tiny10.inter").read_text() == (tmp_path / "tiny10" / "tiny10.inter").read_text()
    config = Config("SASRec", "tiny10", config_dict={"data_path": str(tmp_path),
                                                     "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]}})
    assert create_dataset(config).user_num == 11  # the 10 users and RecBole's padding


def test_more_users_than_the_dataset_has_is_an_error(tmp_path, capsys):
    write_tiny_dataset(tmp_path)
    assert cut_user_subset.main(["--data_path", str(tmp_path), "--dataset", "tiny", "--users", "1000",
                                 "--name", "big"]) == 2
    assert "has only 40 users" in capsys.readouterr().err
