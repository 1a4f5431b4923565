"""The one atomic file write: a file holds its old content or all of the new, never a part."""

import pytest

from recbole_mllm.fileio import atomic_output, atomic_write


def test_a_write_replaces_the_file_whole_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "record.json"
    path.write_bytes(b"old")
    atomic_write(path, b"new content")
    assert path.read_bytes() == b"new content"
    with atomic_output(path, "w", encoding="utf-8") as f:
        f.write("text ")
        f.write("in parts")
    assert path.read_text() == "text in parts"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_a_failed_write_keeps_the_old_content(tmp_path):
    path = tmp_path / "table.tsv"
    path.write_text("old\n")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_output(path, "w") as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.tsv"]
