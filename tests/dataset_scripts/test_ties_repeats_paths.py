"""Same-timestamp order (a seeded hash, not item ids), repeated (user, item) pairs in the summary and the
dataset's YAML, and image file names from raw data kept inside their folder."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dataset_helpers import REPO
from test_amazon_script import read_rows, review_2014, write_lines
from test_input_errors import az_argv, fails, ml_argv
from test_movielens_script import ML1M_FILES, read_atomic, write_release

from dataset_scripts import amazon, movielens
from dataset_scripts.atomic_files import TIE_SEED, tie_key
from dataset_scripts.errors import InputError, contained_path

TIED = [str(i) for i in range(1, 9)]  # movies user 1 rated in the same second, listed in id order
TIES_FILES = {
    **ML1M_FILES,
    "ratings.dat": ["1::50::3::978300000"] + [f"1::{item}::4::978300100" for item in TIED] + ["1::60::5::978300200",
                                                                                              "2::1::4::978300800"],
}


def ties_argv(tmp_path, *extra, out="out"):
    raw = tmp_path / "raw" / "ml-1m.zip"
    if not raw.exists():
        write_release(tmp_path / "raw", TIES_FILES, True, "ml-1m")
    return ["--input", str(raw), "--output", str(tmp_path / out), "--name", "ml", *extra]


def ml_order(tmp_path, *extra, out="out"):
    """User 1's movies in the order the .inter file lists them."""
    movielens.main(ties_argv(tmp_path, *extra, out=out))
    _, rows = read_atomic(tmp_path / out / "ml" / "ml.inter")
    return [row[1] for row in rows if row[0] == "1"]


def hash_order(seed, user, items):
    return sorted(items, key=lambda item: tie_key(seed, user, item))


def test_the_tie_key_is_a_fixed_function_of_seed_user_and_item():
    # pinned: a build on another machine or Python gives the same files (Python's hash() would not)
    assert tie_key(2020, "1", "1") == 2675260693052902820
    assert tie_key(2020, "U1", "A1") == 7478749477749945611
    assert tie_key(2021, "1", "1") != tie_key(2020, "1", "1") != tie_key(2020, "2", "1")
    assert 0 <= tie_key(7, "x", "y") < 2**63  # fits pandas' int64


def test_movielens_same_second_ratings_follow_the_seeded_hash_not_the_movie_id(tmp_path):
    order = ml_order(tmp_path)
    assert order[0] == "50" and order[-1] == "60"  # different seconds stay in time order
    assert order[1:-1] == hash_order(TIE_SEED, "1", TIED) != TIED
    orders = {seed: ml_order(tmp_path, "--tie-seed", str(seed), out=f"out{seed}")[1:-1] for seed in (1, 2, 3)}
    assert all(orders[seed] == hash_order(seed, "1", TIED) for seed in orders)
    assert len({order[-1] for order in orders.values()} | {hash_order(TIE_SEED, "1", TIED)[-1]}) > 1


def test_the_same_seed_gives_the_same_files_in_any_process(tmp_path):
    inters = []
    for hash_seed in ("1", "2"):  # Python's own string hashing differs between these processes
        out = tmp_path / f"out{hash_seed}"
        command = [sys.executable, str(REPO / "dataset_scripts" / "movielens.py"),
                   *ties_argv(tmp_path, "--tie_seed", "5", out=out.name)]
        subprocess.run(command, capture_output=True, cwd=tmp_path, check=True,
                       env={**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)})
        inters.append((out / "ml" / "ml.inter").read_bytes())
        assert (out / "ml" / "ml.item").read_bytes() == (tmp_path / "out1" / "ml" / "ml.item").read_bytes()
    assert inters[0] == inters[1]
    _, rows = read_atomic(tmp_path / "out1" / "ml" / "ml.inter")
    assert [row[1] for row in rows if row[0] == "1"][1:-1] == hash_order(5, "1", TIED)


def test_the_tie_seed_is_part_of_the_fingerprint(tmp_path):
    assert movielens.main(ties_argv(tmp_path))["rebuilt"] is True
    assert movielens.main(ties_argv(tmp_path, "--tie-seed", str(TIE_SEED)))["rebuilt"] is False
    stats = movielens.main(ties_argv(tmp_path, "--tie-seed", "9"))
    assert stats["rebuilt"] is True and stats["tie_seed"] == 9


def test_amazon_same_day_reviews_follow_the_seeded_hash_not_the_item_id(tmp_path):
    items = [f"B{i:02d}" for i in range(8)]
    lines = [review_2014("U1", "A0", 5.0, 86400)] + [review_2014("U1", item, 4.0, 2 * 86400) for item in items]
    reviews = write_lines(tmp_path / "reviews.json", lines + [review_2014("U1", "B00", 1.0, 2 * 86400)])
    orders = {}
    for seed in (TIE_SEED, 1, 2):
        stats = amazon.main(az_argv(tmp_path, reviews, None, "--tie-seed", str(seed), "--force"))
        orders[seed] = [row[1] for row in read_rows(tmp_path / "out" / "az" / "az.inter")]
        assert stats["duplicates"] == 1 and orders[seed][0] == "A0"
        assert orders[seed][1:] == hash_order(seed, "U1", items)
    assert orders[TIE_SEED][1:] != items and len({order[-1] for order in orders.values()}) > 1


# ------------------------------------------------------------------------------- repeated pairs
def yaml_comment(path):
    text = path.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if "repeated (user, item) pairs" in line]
    assert len(lines) == 1 and lines[0].startswith("# ")
    assert "repeated_pairs" not in yaml.safe_load(text)  # a comment, not a key
    return lines[0]


def test_movielens_repeated_pairs_are_in_the_yaml_the_stats_and_the_summary(tmp_path, capsys):
    ratings = ML1M_FILES["ratings.dat"] + ["1::1::2::978309999", "1::1::2::978309999"]  # a rerating, then its copy
    raw = write_release(tmp_path / "raw", {**ML1M_FILES, "ratings.dat": ratings}, True, "ml-1m")
    stats = movielens.main(ml_argv(tmp_path, raw))
    assert stats["duplicates"] == 1 and stats["repeated_pairs"] == 1 and stats["interactions"] == 7
    line = "repeated (user, item) pairs kept: 1 of 7 interactions"
    assert yaml_comment(tmp_path / "out" / "ml" / "ml.yaml") == "# " + line
    assert "repeated (user, item) pairs kept: 1 of 7 interactions (masking" in capsys.readouterr().out
    movielens.main(ml_argv(tmp_path, raw))  # up to date: the stored statistics say it too
    assert "repeated (user, item) pairs kept: 1 of 7 interactions" in capsys.readouterr().out


@pytest.mark.parametrize("choice, repeated", [("drop", 0), ("keep", 2)])
def test_amazon_repeated_pairs_follow_the_duplicates_choice(tmp_path, capsys, choice, repeated):
    lines = [review_2014("U1", "A1", 5.0, 1), review_2014("U1", "A1", 3.0, 9), review_2014("U1", "A1", 3.0, 9),
             review_2014("U1", "A2", 4.0, 5)]
    stats = amazon.main(az_argv(tmp_path, write_lines(tmp_path / "r.json", lines), None, "--duplicates", choice))
    total = 4 - 2 + repeated
    assert stats["duplicates"] == 2 and stats["repeated_pairs"] == repeated and stats["interactions"] == total
    line = f"repeated (user, item) pairs kept: {repeated} of {total} interactions"
    assert yaml_comment(tmp_path / "out" / "az" / "az.yaml") == "# " + line
    assert line in capsys.readouterr().out


# ------------------------------------------------------------------------------------ path safety
@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "a/b.jpg", "a\\b.jpg", "..", ".", "", "C:x.jpg",
                                  "x\0y"])
def test_contained_path_refuses_anything_but_a_plain_file_name(tmp_path, name):
    with pytest.raises(InputError) as error:
        contained_path(tmp_path, name, "item 7, field poster")
    assert str(error.value).startswith(f"item 7, field poster: {name!r} is not a plain file name")
    assert str(error.value).endswith(f"refused as a file in {tmp_path.resolve()}")


@pytest.mark.parametrize("name", ["1.jpg", "..hidden.jpg", ".part", "B00X~1.jpeg"])
def test_contained_path_gives_the_file_in_the_resolved_folder(tmp_path, name):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    expected = tmp_path.resolve() / "real" / name
    assert contained_path(tmp_path / "link", name, "x") == expected
    assert contained_path(Path(os.path.relpath(tmp_path / "real")), name, "x") == expected


@pytest.mark.parametrize("item", ["../../evil", "/tmp/evil", "sub/evil", "..\\evil"])
def test_an_amazon_item_id_that_is_a_path_is_refused_before_any_file_is_touched(tmp_path, capsys, item):
    images = tmp_path / "images"
    images.mkdir()
    lines = [review_2014("U1", "A1", 5.0, 1), review_2014("U1", item, 4.0, 2)]
    meta = write_lines(tmp_path / "meta.json", [str({"asin": item, "imUrl": "http://127.0.0.1:9/x.jpg"})])
    argv = az_argv(tmp_path, write_lines(tmp_path / "r.json", lines), meta, "--images", str(images))
    code, err = fails(amazon.main, [a for a in argv if a != "--no-download"], capsys)
    assert code == 2 and len(err) == 1, err
    expected = f"error: item {item!r}, field item_id (its image file's name): {item!r} is not a plain file name"
    assert err[0].startswith(expected), err
    assert not (tmp_path / "out" / "az" / "images").exists()  # nothing opened, downloaded or written
    assert sorted(p.name for p in tmp_path.rglob("*evil*")) == []


def test_two_item_ids_that_would_share_one_image_file_are_refused(tmp_path, capsys):
    lines = [review_2014("U1", "A+1", 5.0, 1), review_2014("U1", "A_1", 4.0, 2)]
    code, err = fails(amazon.main, az_argv(tmp_path, write_lines(tmp_path / "r.json", lines)), capsys)
    assert code == 2 and err == ["error: items 'A+1' and 'A_1', field item_id: both name the image file A_1.jpg "
                                 "(characters outside [A-Za-z0-9._-] become _) (--debug shows the traceback)"]
