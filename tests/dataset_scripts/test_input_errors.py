"""Bad inputs to the dataset scripts: one line naming the file and the problem, exit status 2; duplicates
and every dropped or orphaned row in the printed summary."""

import bz2
import gzip
import subprocess
import sys
import zipfile

import pytest
from dataset_helpers import REPO
from test_amazon_script import META_2014, REVIEWS_2014, read_rows, review_2014, write_lines
from test_movielens_script import ML1M_FILES, read_atomic, write_release

from dataset_scripts import amazon, movielens
from dataset_scripts.errors import InputError


def fails(main, argv, capsys):
    """The exit status and the stderr lines of a run that must fail."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def ml_argv(tmp_path, input_path, *extra):
    return ["--input", str(input_path), "--output", str(tmp_path / "out"), "--name", "ml", *extra]


def az_argv(tmp_path, reviews, meta=None, *extra):
    argv = ["--reviews", str(reviews), "--output", str(tmp_path / "out"), "--name", "az", "--no-download"]
    return argv + (["--meta", str(meta)] if meta else []) + ["--k-core", "1", *extra]


def damaged_member_zip(tmp_path):
    """A real release zip with bytes of ratings.dat's compressed data flipped (its CRC no longer matches)."""
    path = tmp_path / "raw" / "ml-1m.zip"
    path.parent.mkdir(parents=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("ml-1m/ratings.dat", "\n".join(ML1M_FILES["ratings.dat"] * 50))
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("ml-1m/ratings.dat")
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + 10
    data[start : start + 20] = bytes(20)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("case, expected", [
    ("missing", "{path}: does not exist (--input)"),
    ("text", "{path}: is neither a zip file nor a folder; give the release zip as downloaded or its extracted folder"),
    ("gzip", "{path}: is gzip-compressed; give the release zip as downloaded or its extracted folder"),
    ("truncated zip", "{path}: is a damaged zip file (File is not a zip file)"),
    ("damaged member", "{path} (ml-1m/ratings.dat): damaged zip member: "),
    ("no ratings", "{path}: holds no ratings.csv (ml-20m and later), ratings.dat (ml-1m, ml-10m) or u.data (ml-100k) (--input)"),
])
def test_movielens_bad_inputs_are_one_line_and_exit_2(tmp_path, capsys, case, expected):
    path = tmp_path / "ml-1m.zip"
    if case == "text":
        path.write_text("1::1::5::978300760\n")
    elif case == "gzip":
        path.write_bytes(gzip.compress(b"1::1::5::978300760\n"))
    elif case == "truncated zip":
        whole = write_release(tmp_path / "raw", ML1M_FILES, True, "ml-1m").read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    elif case == "damaged member":
        path = damaged_member_zip(tmp_path)
    elif case == "no ratings":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("ml-1m/README", "nothing here")
    code, err = fails(movielens.main, ml_argv(tmp_path, path), capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: " + expected.format(path=path)), err
    assert err[0].endswith("(--debug shows the traceback)")


def test_debug_shows_the_exception(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        movielens.main(ml_argv(tmp_path, tmp_path / "nope.zip", "--debug"))


def test_the_script_itself_exits_2(tmp_path):
    command = [sys.executable, str(REPO / "dataset_scripts" / "amazon.py"), *az_argv(tmp_path, tmp_path / "r.json.gz")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'r.json.gz'}: does not exist (--reviews) (--debug shows the traceback)"]


@pytest.mark.parametrize("case, expected", [
    ("missing", "{path}: does not exist (--reviews)"),
    ("plain named .gz", "{path}: is named .gz but is not compressed"),
    ("bzip2 named .gz", "{path}: is named .gz but is bzip2-compressed"),
    ("bzip2", "{path}: is bzip2-compressed; give the .json/.jsonl file, plain or gzipped"),
    ("truncated gzip", "{path}: gzip data is cut off after line "),
    ("folder", "{path}: is not a file (--reviews)"),
])
def test_amazon_bad_inputs_are_one_line_and_exit_2(tmp_path, capsys, case, expected):
    data = ("\n".join(REVIEWS_2014 * 40) + "\n").encode()
    path = tmp_path / ("reviews.json" if case == "bzip2" else "reviews.json.gz")
    if case == "plain named .gz":
        path.write_bytes(data)
    elif case in ("bzip2 named .gz", "bzip2"):
        path.write_bytes(bz2.compress(data))
    elif case == "truncated gzip":
        packed = gzip.compress(data)
        path.write_bytes(packed[: len(packed) * 2 // 3])
    elif case == "folder":
        path.mkdir()
    code, err = fails(amazon.main, az_argv(tmp_path, path), capsys)
    assert code == 2 and err[-1].startswith("error: " + expected.format(path=path)), err
    assert sum(line.startswith("error:") for line in err) == 1


def test_amazon_meta_is_checked_too(tmp_path, capsys):
    reviews = write_lines(tmp_path / "reviews.json", REVIEWS_2014)
    meta = tmp_path / "meta.json.gz"
    meta.write_bytes(b"{'asin': 'A1'}\n")
    code, err = fails(amazon.main, az_argv(tmp_path, reviews, meta), capsys)
    assert code == 2 and err[-1].startswith(f"error: {meta}: is named .gz but is not compressed")


@pytest.mark.parametrize("choice", ["drop", "keep"])
def test_movielens_duplicate_lines_are_counted_and_dropped_or_kept(tmp_path, capsys, choice):
    files = {**ML1M_FILES, "ratings.dat": ML1M_FILES["ratings.dat"] + ["1::1::5::978300760", "1::1::5::978300760"]}
    raw = write_release(tmp_path / "raw", files, True, "ml-1m")
    stats = movielens.main(ml_argv(tmp_path, raw, "--duplicates", choice))
    _, rows = read_atomic(tmp_path / "out" / "ml" / "ml.inter")
    assert stats["duplicates"] == 2 and stats["interactions"] == (6 if choice == "drop" else 8) == len(rows)
    out = capsys.readouterr().out
    assert f"duplicates: 2 {'dropped' if choice == 'drop' else 'kept'} (--duplicates {choice})" in out
    # every dropped and orphaned row: 2 malformed ratings + 1 malformed movie line, movie 100 never
    # rated, movie 999 rated but not in movies.dat (its rating stays)
    assert "dropped: 3 malformed lines, 1 movies never rated, 0 users without ratings" in out
    assert "kept without a match: 1 rated movies missing from the movies file, 0 rating users missing" in out


def test_movielens_repeated_movie_and_user_ids_are_reported_lines(tmp_path, capsys):
    files = {**ML1M_FILES, "movies.dat": ML1M_FILES["movies.dat"] + ["1::Toy Story again (1995)::Comedy"],
             "users.dat": ML1M_FILES["users.dat"] + ["4::F::1::10::48067", "1::M::1::10::48067"]}
    stats = movielens.main(ml_argv(tmp_path, write_release(tmp_path / "raw", files, True, "ml-1m")))
    captured = capsys.readouterr()
    assert "movies.dat:6: id 1 listed before; the first row is kept" in captured.err
    assert "users.dat:5: id 1 listed before; the first row is kept" in captured.err
    assert stats["dropped"]["users without ratings"] == 1  # user 4
    assert "dropped: 5 malformed lines, 1 movies never rated, 1 users without ratings" in captured.out


@pytest.mark.parametrize("choice", ["drop", "keep"])
def test_amazon_duplicates_and_every_dropped_row_are_printed(tmp_path, capsys, choice):
    reviews = write_lines(tmp_path / "reviews.json.gz", REVIEWS_2014)
    meta = write_lines(tmp_path / "meta.json.gz", META_2014)
    stats = amazon.main(az_argv(tmp_path, reviews, meta, "--k-core", "2", "--duplicates", choice))
    out = capsys.readouterr().out
    assert stats["duplicates"] == 1 and f"duplicates: 1 {'dropped' if choice == 'drop' else 'kept'}" in out
    pairs = [tuple(row[:2]) for row in read_rows(tmp_path / "out" / "az" / "az.inter")]
    assert pairs.count(("U2", "A1")) == (1 if choice == "drop" else 2)
    if choice == "drop":  # the fixture's own counts (test_2014_reviews_and_literal_meta)
        assert ("dropped: 3 malformed lines, 0 reviews below min rating, 4 reviews removed by k core, "
                "1 meta of other items, 1 repeated meta records") in out
        assert "kept without a match: none" in out


def test_amazon_items_without_metadata_are_printed(tmp_path, capsys):
    reviews = write_lines(tmp_path / "reviews.json", [review_2014("U1", "B1", 5, 1), review_2014("U1", "B2", 5, 2)])
    meta = write_lines(tmp_path / "meta.json", [str({"asin": "B1", "title": "One"})])
    amazon.main(az_argv(tmp_path, reviews, meta))
    assert "kept without a match: 1 items without metadata" in capsys.readouterr().out
