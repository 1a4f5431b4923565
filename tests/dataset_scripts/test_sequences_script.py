"""sequences.py: a sequence file plus a title table to atomic files with positions as timestamps; a malformed line
ends the run naming the file and line; the written yaml loads in RecBole and tells the plugin there are no dates."""

import subprocess
import sys

import pytest
import yaml
from dataset_helpers import REPO, item_text

from dataset_scripts import sequences
from recbole_mllm.model.mllmsrec.context import RankerContext
from recbole_mllm.stages.user_text import Clock

SEQUENCES = ["U1 A1 A2 A3 A2", "U2 A3 A1", "", "U3 A4 A1 A2 A3"]  # U1 repeats A2; a blank line is no user
TITLES = ["item_id,title,brand", 'A1,"Kid&#39;s ""Best"" Lotion, 2 oz",Acme', "A2,Cr&egrave;me\\nVanilla \\t <b>Rich</b>,",
          "A3,,Acme", "Z9,Not rated,Acme"]  # A3: empty title; A4: no row; Z9: no interaction


def write(path, lines):
    text = "\n".join(lines) + "\n"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:  # an unchanged input keeps its mtime
        path.write_text(text, encoding="utf-8")
    return path


def build(tmp_path, *extra, sequence_lines=SEQUENCES, title_lines=TITLES, name="seq"):
    raw = tmp_path / "raw"
    raw.mkdir(exist_ok=True)
    argv = ["--sequences", str(write(raw / "user_sequence.txt", sequence_lines)), "--output", str(tmp_path / "out"),
            "--name", name]
    if title_lines is not None:
        argv += ["--titles", str(write(raw / "titles.csv", title_lines))]
    return sequences.main([*argv, *extra])


def rows(path):
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]


def test_positions_titles_and_repeats(tmp_path):
    stats = build(tmp_path)
    out = tmp_path / "out" / "seq"
    assert rows(out / "seq.inter") == [["user_id:token", "item_id:token", "timestamp:float"],
                                       ["U1", "A1", "0"], ["U1", "A2", "1"], ["U1", "A3", "2"],  # the repeated A2 dropped
                                       ["U2", "A3", "0"], ["U2", "A1", "1"],
                                       ["U3", "A4", "0"], ["U3", "A1", "1"], ["U3", "A2", "2"], ["U3", "A3", "3"]]
    assert rows(out / "seq.item") == [["item_id:token", "title:token_seq"], ["A1", '"Kid\'s ""Best"" Lotion, 2 oz"'],
                                      ["A2", "Crème Vanilla Rich"], ["A3", ""], ["A4", ""]]
    assert (stats["users"], stats["items"], stats["interactions"], stats["duplicates"]) == (3, 4, 9, 1)
    assert (stats["items_with_title"], stats["items_without_title"], stats["title_rows_of_other_items"]) == (2, 2, 1)
    assert stats["orphaned"] == {"items without title": 2} and stats["rebuilt"] is True
    written = yaml.safe_load((out / "seq.yaml").read_text(encoding="utf-8"))
    assert written["user_time_format"] == "none" and written["load_col"] == {"inter": ["user_id", "item_id", "timestamp"],
                                                                             "item": ["item_id", "title"]}
    assert written["item_image_field"] is None and written["item_category_field"] is None
    assert build(tmp_path)["rebuilt"] is False  # idempotent
    kept = build(tmp_path, "--duplicates", "keep")
    assert kept["rebuilt"] is True and kept["interactions"] == 10 and kept["repeated_pairs"] == 1


def test_k_core_renumbers_positions(tmp_path):
    stats = build(tmp_path, "--k-core", "2", title_lines=None)  # A4 goes (one user): U3's A1 moves to position 0
    assert (stats["users"], stats["items"], stats["removed_by_k_core"]) == (3, 3, 1)
    assert rows(tmp_path / "out" / "seq" / "seq.inter")[1:] == [
        ["U1", "A1", "0"], ["U1", "A2", "1"], ["U1", "A3", "2"], ["U2", "A3", "0"], ["U2", "A1", "1"],
        ["U3", "A1", "0"], ["U3", "A2", "1"], ["U3", "A3", "2"]]
    assert stats["items_without_title"] == 3


@pytest.mark.parametrize("sequence_lines, title_lines, where, problem", [
    (["U1 A1", "U2"], TITLES, "user_sequence.txt:2", "user 'U2' has no items"),
    (["U1 A1", "", "U1 A2"], TITLES, "user_sequence.txt:3", "user 'U1' is listed again (first on line 1)"),
    (["U1 A1"], ["item_id,title", "A1,x,extra"], "titles.csv:2", "3 fields, the header has 2"),
    (["U1 A1"], ["id,name", "A1,x"], "titles.csv:2", "has no column 'item_id' (--title-id-column)"),
    (["U1 A1"], ["item_id,title", ",x"], "titles.csv:2", "empty item id"),
])
def test_a_malformed_line_is_one_line_naming_file_and_line_and_exit_2(tmp_path, capsys, sequence_lines, title_lines,
                                                                       where, problem):
    with pytest.raises(SystemExit) as exit_info:
        build(tmp_path, sequence_lines=sequence_lines, title_lines=title_lines)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {tmp_path / 'raw' / where}: {problem}")


def test_json_lines_titles_with_other_column_names(tmp_path):
    lines = ['{"asin": "A1", "name": "One &amp; Two"}', '{"asin": "A4", "name": "Four"}']
    raw = tmp_path / "raw"
    raw.mkdir()
    write(raw / "titles.jsonl", lines)
    stats = build(tmp_path, "--titles", str(raw / "titles.jsonl"), "--title-id-column", "asin", "--title-column",
                  "name", title_lines=None)
    assert rows(tmp_path / "out" / "seq" / "seq.item")[1:] == [["A1", "One & Two"], ["A2", ""], ["A3", ""],
                                                                ["A4", "Four"]]
    assert stats["items_with_title"] == 2


def test_runs_as_a_script_and_recbole_loads_it(tmp_path, recbole):
    raw = tmp_path / "raw"
    raw.mkdir()
    command = [sys.executable, str(REPO / "dataset_scripts" / "sequences.py"),
               "--sequences", str(write(raw / "user_sequence.txt", SEQUENCES)),
               "--titles", str(write(raw / "titles.csv", TITLES)), "--output", str(tmp_path / "out"), "--name", "seq"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, check=True)
    assert "seq: 3 users, 4 items, 9 interactions" in result.stdout
    assert "kept without a match: 2 items without title" in result.stdout
    dataset = recbole("seq", tmp_path / "out", tmp_path / "out" / "seq" / "seq.yaml")
    assert (dataset.inter_num, dataset.user_num, dataset.item_num) == (9, 4, 5)  # RecBole counts [PAD]
    assert item_text(dataset, "A1", "title") == 'Kid\'s "Best" Lotion, 2 oz'
    assert item_text(dataset, "A2", "title") == "Crème Vanilla Rich"
    times = dataset.inter_feat[dataset.time_field].to_numpy()
    assert sorted(times.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 3]  # positions, not normalised


def test_the_ranker_names_no_date_when_timestamps_are_positions():
    context = RankerContext([], [], [], [], [], [("Skin",), ("Skin",)], [[0, 1]], [[0.0, 1.0]], [""])
    assert context.evolution(0, 2, 1).startswith("2 items from January 1970 to January 1970;")  # unix_s, the default
    context.clock = Clock("none")
    assert context.evolution(0, 2, 1) == "2 items; latest 1: Skin; earlier: Skin"
    context.clock = Clock("unix_ms")
    context.timestamps = [[1.5e12, 1.6e12]]
    assert context.evolution(0, 2, 1).startswith("2 items from July 2017 to September 2020;")
