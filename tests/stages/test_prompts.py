"""Versioned prompt templates: lookup, parsing, hashing, validation."""

from __future__ import annotations

import pytest

from recbole_mllm.stages.prompts import load_prompt, parse_template

ITEM_FIELDS = {"system": [], "image": ["item_text"], "text_only": ["item_text"], "field": ["label", "value"]}


def test_packaged_item_fusion_v1():
    template = load_prompt("item_fusion", "v1").require(ITEM_FIELDS)
    assert template.name == "item_fusion_v1" and len(template.sha256) == 64
    assert template.render("field", label="Year", value="1995") == "Year: 1995"
    prompt = template.render("image", item_text="Title: {x} Heat")  # braces in item text stay literal
    assert "Title: {x} Heat" in prompt and "watermarks" in prompt and "logos" in prompt
    assert not template.sections["system"].startswith("#")  # header comments are not prompt text


def test_unknown_version_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"no prompt template 'item_fusion_v9'.*'v1'"):
        load_prompt("item_fusion", "v9")


def test_file_path_and_hash(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("# note\n[system]\nBe brief.\n[image]\n{item_text}\n", encoding="utf-8")
    first = load_prompt("item_fusion", str(path))
    assert first.name == "mine" and first.sections == {"system": "Be brief.", "image": "{item_text}"}
    path.write_text("# note\n[system]\nBe briefer.\n[image]\n{item_text}\n", encoding="utf-8")
    assert load_prompt("item_fusion", str(path)).sha256 != first.sha256
    with pytest.raises(ValueError, match=r"lacks the \[text_only\] section"):
        first.require(ITEM_FIELDS)


def test_wrong_placeholders_and_repeated_sections_are_errors():
    with pytest.raises(ValueError, match=r"\[image\].*uses \['title'\]"):
        parse_template("t", "[image]\n{title}\n").require({"image": ["item_text"]})
    with pytest.raises(ValueError, match="repeats"):
        parse_template("t", "[a]\nx\n[a]\ny\n")
    with pytest.raises(ValueError, match="no \\[section\\]"):
        parse_template("t", "just text\n")
