"""The list-wise prompt's options: one token each, up to 52 items (A to Z, then a to z)."""

import pytest

from recbole_mllm.model.mllmsrec.prompting import OPTION_LETTERS, build_list_layout
from recbole_mllm.stages.prompts import load_prompt
from tests.mllm.mllm_tiny import tiny_tokenizer


def _list_prompt():
    """The packaged list prompt: the tiny test tokenizer splits its " A" into a space and a letter, where SmolLM2's has
    one token for each of " A" ... " Z" and " a" ... " z", so here the bare letters are scored (``_option_ids``)."""
    return load_prompt("ranker", "list_v1")


def test_a_list_of_fifty_items_gets_fifty_distinct_option_tokens_after_z_the_lower_case_letters():
    tokenizer = tiny_tokenizer()
    layout = build_list_layout(_list_prompt(), tokenizer, 50)
    assert len(layout.option_ids) == 50 and len(set(layout.option_ids)) == 50
    assert [tokenizer.decode([i]).strip() for i in layout.option_ids[24:28]] == ["Y", "Z", "a", "b"]
    assert build_list_layout(_list_prompt(), tokenizer, 20).option_ids == layout.option_ids[:20]


def test_a_list_longer_than_the_options_is_an_error_naming_rerank_top_k():
    with pytest.raises(ValueError, match=f"rerank_top_k: .* at most {len(OPTION_LETTERS)} items, got 53"):
        build_list_layout(_list_prompt(), tiny_tokenizer(), 53)


def test_options_a_tokenizer_splits_from_their_space_are_scored_by_the_bare_letters():
    from recbole_mllm.model.mllmsrec.prompting import _option_ids

    class SpaceApart:  # " A" -> [space, A]; "A" -> [A]
        def __call__(self, text, add_special_tokens=False):
            return type("Encoded", (), {"input_ids": [ord(c) for c in text]})()

    assert _option_ids(SpaceApart(), " {option}", "ABC") == [ord("A"), ord("B"), ord("C")]
    assert _option_ids(SpaceApart(), "({option})", "ABC") is None  # "(" starts all: no distinct first token either way
