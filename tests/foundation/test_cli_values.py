"""parse_cli_value / safe_cmd_args: command-line values as RecBole reads them, without ever running them."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from recbole_mllm.cli import help_text, parse_cli_value, safe_cmd_args


@pytest.mark.parametrize("text, value", [
    ("1e-3", 1e-3), ("5", 5), ("None", None), ("True", True), ("true", True), ("FALSE", False),
    ("[10, 20]", [10, 20]), ("1,2", (1, 2)), ("{'a': 1}", {"a": 1}), ("'a b'", "a b"),
    ("ml-1m-mm", "ml-1m-mm"), ("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M"),
    ("2020-01", "2020-01"), ("{1, 2}", "{1, 2}"), ("", ""),
])
def test_literals_are_read_like_recbole_does(text, value):
    assert parse_cli_value(text) == value and type(parse_cli_value(text)) is type(value)


@pytest.mark.parametrize("code", ['__import__("os").system("touch pwned")', "open('x', 'w')",
                                  "().__class__.__base__.__subclasses__()", "exec('1')", "lambda: 1"])
def test_code_is_a_string_never_run(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_cli_value(code) == code
    assert not any(tmp_path.iterdir())


@given(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(),
                 st.lists(st.integers()), st.dictionaries(st.text(max_size=3), st.integers())))
def test_safe_cmd_args_give_the_same_value_to_eval_and_to_parse_cli_value(value):
    """RecBole (eval) and a safe Config (parse_cli_value) both get back what parse_cli_value read."""
    (arg,) = safe_cmd_args([f"--k={value!r}"])
    spelled = arg.split("=", 1)[1]
    assert parse_cli_value(spelled) == value
    assert eval(spelled, {"__builtins__": {}}) == value  # noqa: S307 - a literal, checked above


def test_safe_cmd_args_leave_other_arguments_to_config():
    assert safe_cmd_args(["positional", "--flag", "--x=y"]) == ["positional", "--flag", "--x='y'"]


def test_help_text_lists_defaults_sorted():
    text = help_text("Doc line.\n", {"b": 2, "a": "x"})
    assert text.splitlines() == ["Doc line.", "", "Keys read (--key=value) and their defaults:", "  a  'x'", "  b  2"]
