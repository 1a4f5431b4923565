"""Atomic files are checked line by line before RecBole reads them: the first bad line is named, in one line."""

import pytest

from recbole_mllm.config import Config
from recbole_mllm.data import create_dataset
from recbole_mllm.data.atomic_check import AtomicFileError, check_atomic_file, loaded_fields
from tests.conftest import write_tiny_dataset

HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\ttags:float_seq\n"


@pytest.mark.parametrize("line, why", [
    (b"u9\ti1\n", "2 fields, but the header has 5 (field_separator '\\t')"),
    (b"u9\ti1\t3\t1\tx\ty\n", "6 fields, but the header has 5 (field_separator '\\t')"),
    (b"u9\ti1\t3\tyesterday\t1\n", "field 'timestamp' is 'yesterday', not a number (its type is float)"),
    (b"u9\ti1\t3\t1\t1 2 x\n", "field 'tags' is 'x', not a number (its type is float_seq)"),
    (b"u9\ti1\t3\t\x89PNG\xff\t1\n", "byte b'\\x89' at column 9 is not utf-8 (encoding)"),
])
def test_the_first_bad_line_is_named(tmp_path, line, why):
    path = tmp_path / "x.inter"
    path.write_bytes(HEADER.encode() + b"u1\ti1\t3\t100\t1 2\n\nu1\ti2\t\t\t\n" + line + b"u2\tbad\n")
    with pytest.raises(AtomicFileError) as error:
        check_atomic_file(path)
    assert str(error.value) == f"{path}:5: {why}"


def test_good_files_and_fields_not_loaded_pass(tmp_path):
    path = tmp_path / "x.inter"
    path.write_bytes(HEADER.encode() + b"u1\ti1\t3.5\t1e9\t\r\nu2\ti1\tnan\t-1\t0.5 1\r\n")
    check_atomic_file(path)
    path.write_bytes(HEADER.encode() + b"u1\ti1\t3\tyesterday\t1\n")
    check_atomic_file(path, fields={"user_id", "item_id", "rating"})  # timestamp is not loaded
    with pytest.raises(AtomicFileError, match=r"x.inter:1: the header column 'rating:number' is not"):
        path.write_text("user_id:token\trating:number\n")
        check_atomic_file(path)


def test_load_col_decides_what_is_checked():
    assert loaded_fields({"load_col": None, "unload_col": None}, "item") is None
    config = {"load_col": {"inter": ["user_id", "timestamp"], "item": "*"}, "unload_col": {"inter": ["timestamp"]}}
    assert loaded_fields(config, "inter") == {"user_id"}
    assert (loaded_fields(config, "item"), loaded_fields(config, "user")) == (None, set())


def test_create_dataset_names_the_line_before_recbole_reads_it(tiny_data, tmp_path):
    folder = write_tiny_dataset(tmp_path / "data")
    inter = folder / "tiny.inter"
    lines = inter.read_text().splitlines()
    inter.write_text("\n".join(lines[:7] + ["u1\ti3"] + lines[7:]) + "\n")  # the 2-field line RecBole would keep
    config = Config("SASRec", "tiny", config_dict=tiny_data)
    with pytest.raises(AtomicFileError, match=r"tiny.inter:8: 2 fields, but the header has 4"):
        create_dataset(config)
