"""A MovieLens release of another era (csv layout, no user file), built under a name the plugin ships no yaml
for, trains and tests MLLMSRec through the README's path: dataset script, then ``run`` with only
``--dataset`` and ``--data_path``."""

import os

import numpy as np
import pytest

from dataset_scripts import movielens
from recbole_mllm.quick_start import run
from tests.mllm.mllm_tiny import build_tiny_causal

os.environ["HF_HUB_OFFLINE"] = "1"


def write_csv_release(folder, n_users=40, n_movies=30, per_user=12, seed=0):
    """ratings.csv / movies.csv / links.csv as ml-25m ships them; users drift through the movies."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    ratings = ["userId,movieId,rating,timestamp"]
    for user in range(1, n_users + 1):
        start = int(rng.integers(1, n_movies + 1))
        movies = dict.fromkeys((start + k + int(rng.integers(0, 2))) % n_movies + 1 for k in range(per_user))
        ratings += [f"{user},{movie},{rng.integers(1, 11) / 2},{1_500_000_000 + 3600 * t + user}"
                    for t, movie in enumerate(movies)]
    genres = ["Drama", "Comedy", "Action|Thriller", "(no genres listed)"]
    movie_lines = ["movieId,title,genres"] + [f'{m},"Film{m}x, The ({1990 + m})",{genres[m % 4]}' for m in range(1, n_movies + 1)]
    links = ["movieId,imdbId,tmdbId"] + [f"{m},{100000 + m:07d},{500 + m}" for m in range(1, n_movies + 1)]
    for name, lines in (("ratings.csv", ratings), ("movies.csv", movie_lines), ("links.csv", links)):
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_mllmsrec_runs_on_a_csv_release_built_under_a_new_name(tmp_path, monkeypatch):
    write_csv_release(tmp_path / "raw" / "ml-latest-small")
    stats = movielens.main(["--input", str(tmp_path / "raw"), "--output", str(tmp_path / "data"), "--name", "ml-new-mm"])
    assert stats["users"] == 40 and stats["source_users"] is None
    monkeypatch.chdir(tmp_path)
    result = run("MLLMSRec", "ml-new-mm", config_dict={
        "data_path": str(tmp_path / "data"), "checkpoint_dir": str(tmp_path / "saved"),
        "stage_cache_dir": str(tmp_path / "stage_cache"), "mllm": str(build_tiny_causal(tmp_path / "llm")),
        "item_image_field": None, "encoder_warmup_epochs": 1, "epochs": 1, "stage_batch_size": 8,
        "item_fusion_max_new_tokens": 6, "user_summary_max_new_tokens": 6, "user_window_size": 4, "user_window_step": 4,
        "rerank_top_k": 5, "ranker_train_negatives": 2, "lora_target_modules": ["q_proj", "v_proj"],
        "hidden_size": 8, "inner_size": 16, "train_batch_size": 64, "show_progress": False,
        "ranker_scoring": "pointwise", "late_fusion_grid": None})  # the tiny tokenizer splits the list prompt's " A"
    config = result["config"]
    assert config["load_col"] == {"inter": ["user_id", "item_id", "rating", "timestamp"],
                                  "item": ["item_id", "title", "year", "genres", "image"]}  # not RecBole's ids-only default
    assert set(result["test_result"]) == set(result["first_stage_result"]) == {"uni100", "full"}
    for metrics in result["test_result"].values():
        assert 0.0 <= metrics["ndcg@10"] <= metrics["hit@10"] <= 1.0
    assert sorted(result["per_user"]["full"]["user_id"].tolist()) == list(range(1, 41))  # every user tested once
