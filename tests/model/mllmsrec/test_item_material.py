"""The ranker's item material: titles and categories read from the fields the config names."""

import logging

from recbole_mllm.model.mllmsrec.context import build_item_material
from recbole_mllm.stages.items import read_item_file


def amazon_like_items(tmp_path):
    (tmp_path / "shop.item").write_text("item_id:token\ttitle:token_seq\tcategories:token_seq\n"
                                        "a\tRed Lipstick\tBeauty Skin_Care\n", encoding="utf-8")
    return read_item_file(tmp_path, "shop")


def test_categories_come_from_the_named_field(tmp_path):
    table = amazon_like_items(tmp_path)
    texts, titles, categories = build_item_material({"seq_separator": " "}, ["[PAD]", "a"], table,
                                                    [("Title", "title")], "categories", "title")
    assert titles == ["[PAD]", "Red Lipstick"] and categories == [(), ("Beauty", "Skin Care")]


def test_a_category_or_title_field_the_item_file_lacks_is_named_in_a_warning(tmp_path, caplog):
    table = amazon_like_items(tmp_path)
    with caplog.at_level(logging.WARNING):
        _, titles, categories = build_item_material({"seq_separator": " "}, ["a"], table, [("Title", "title")],
                                                    "genres", "name")
    assert categories == [()] and titles == ["a"]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "shop.item has no field 'genres' (item_category_field)" in warned
    assert "has no field 'name' (item_title_field)" in warned and "--item_category_field=<field>" in warned
