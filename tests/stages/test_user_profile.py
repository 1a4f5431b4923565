"""User stage: RecBole histories and raw tokens, prompts (profile, time), cache identity, resume, CLI, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import recbole
import torch

from recbole_mllm.config import Config
from recbole_mllm.data import UserHistory, create_dataset, user_histories
from recbole_mllm.stages import item_fusion, user_profile
from recbole_mllm.stages.cache import StageCacheError
from recbole_mllm.stages.prompts import load_prompt
from recbole_mllm.stages.item_fusion import run_item_fusion
from recbole_mllm.stages.user_profile import run_user_profile
from recbole_mllm.stages.item_fusion_cache import item_fusion_cache, load_item_fusion
from recbole_mllm.stages.user_profile_cache import _PROMPT_FIELDS, open_user_summaries, user_profile_cache
from recbole_mllm.stages.user_text import Clock, duration_words, month_year, user_profiles
from stage_doubles import TinyLlamaBackend
from user_profile_doubles import T0, EchoBackend, build_items, shown_items, toy_config, write_items

ML100K = Path(recbole.__file__).parent / "dataset_example" / "ml-100k"
DAY = 86400.0

# (user, item, timestamp) in file order. B-2: 1_000_000_030 and 1_000_000_010 are one float32 value,
# so RecBole keeps their file order (x3 before x4) although x4 is earlier; A-1 has an exact tie.
INTER = [("A-1", "x1", 1_000_000_000), ("B-2", "x2", 1_000_100_000), ("A-1", "x3", 1_000_000_000),
         ("A-1", "x2", 1_000_500_000), ("B-2", "x3", 1_000_000_030), ("B-2", "x4", 1_000_000_010),
         ("A-1", "x4", 1_090_000_000), ("A-1", "x5", 1_000_200_000), ("C-3", "x1", 1_000_000_000),
         ("C-3", "x2", 1_000_000_001), ("B-2", "x1", 1_200_000_000), ("A-1", "rare", 1_300_000_000),
         ("C-3", "x3", 1_000_086_400), ("B-2", "x5", 1_200_000_050), ("A-1", "x3", 1_300_000_001)]
USERS = ["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token",
         "A-1\t25\tM\t12\t55455", "B-2\t1\tF\t0\t", "C-3\t56\t\t20\t02139"]


def recbole_config(root: Path, **overrides):
    """A RecBole Config of the toy dataset: the path the stage's command line takes."""
    return Config(model="SASRec", dataset="toy", config_dict={
        "data_path": str(root), "use_gpu": False, "show_progress": False, "normalize_all": False,
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "item_inter_num_interval": "[2,inf)",
        "MAX_ITEM_LIST_LENGTH": 50, "stage_cache_dir": str(root / "cache"), "item_image_field": None,
        "user_shard_size": 2, "user_window_size": 2, "user_window_step": 2, "user_summary_max_new_tokens": 6,
        **overrides})


@pytest.fixture
def toy(tmp_path):
    folder = tmp_path / "toy"
    write_items(folder, "toy", ["x1", "x2", "x3", "x4", "x5", "rare"])
    lines = ["user_id:token\titem_id:token\ttimestamp:float"] + [f"{u}\t{i}\t{t}" for u, i, t in INTER]
    (folder / "toy.inter").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "toy.user").write_text("\n".join(USERS) + "\n", encoding="utf-8")
    return tmp_path


def test_histories_are_recboles_sequences_with_raw_tokens(toy):
    config = recbole_config(toy)
    histories = user_histories(create_dataset(config))
    assert histories["A-1"].items == ["x1", "x3", "x5", "x2", "x4", "x3"]  # 'rare' (one interaction) filtered out
    assert histories["B-2"].items == ["x3", "x4", "x2", "x1", "x5"]        # float32 tie keeps file order
    assert histories["C-3"].items == ["x1", "x2", "x3"]
    assert histories["C-3"].timestamps == [1_000_000_000.0, 1_000_000_001.0, 1_000_086_400.0]

    dataset = create_dataset(config)
    splits = dataset.build()  # what every model trains and is evaluated on
    last_rows = {}
    for part in splits:
        feat = part.inter_feat
        for row in range(len(feat)):
            user = dataset.id2token("user_id", int(feat["user_id"][row]))
            length = int(feat["item_length"][row])
            seq = [str(dataset.id2token("item_id", int(i))) for i in feat["item_id_list"][row][:length]]
            target = str(dataset.id2token("item_id", int(feat["item_id"][row])))
            if length > last_rows.get(user, (0, None))[0]:
                last_rows[user] = (length, seq + [target])
    assert {u: seq for u, (_, seq) in last_rows.items()} == {u: h.items for u, h in histories.items()}
    with pytest.raises(ValueError, match=r"before build\(\)"):
        user_histories(dataset)


def test_stage_from_recbole_config_keys_are_raw_tokens(toy):
    config = recbole_config(toy)
    backend = EchoBackend()
    build_items(config, backend)
    cache = run_user_profile(config, backend, progress=False)
    # n = 6, t = 2..5 -> c = 2, 4; B-2: n = 5, t = 1..4 -> c = 1, 2, 4; C-3: n = 3, t = 1, 2 -> c = 1, 2
    assert sorted(cache.load()) == [("A-1", 2), ("A-1", 4), ("B-2", 1), ("B-2", 2), ("B-2", 4), ("C-3", 1), ("C-3", 2)]
    summaries = open_user_summaries(config, backend)
    assert summaries.texts([("B-2", 3)])[0].endswith("saw x3,x4")
    b2 = [r.prompt for r in backend.requests if "aged under 18" in r.prompt]
    assert b2 and all("female, occupation other" in p for p in b2)
    manifest = json.loads((cache.path / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["dataset"]["n_interactions"] == 14 and len(manifest["dataset"]["user_file_sha256"]) == 64
    assert manifest["item_fusion"]["cache"] == item_fusion_cache(config, backend).key_hash
    assert str(toy) not in json.dumps({k: v for k, v in manifest.items()})  # no machine paths in the key

    # filters change histories: another cache, never the old one
    unfiltered = recbole_config(toy, item_inter_num_interval="[0,inf)")
    assert user_profile_cache(unfiltered, backend).path != cache.path


def test_interacted_items_from_a_recbole_config_feed_the_user_stage(toy):
    config = recbole_config(toy, item_fusion_items="interacted")
    backend = EchoBackend()
    items = run_item_fusion(config, backend, progress=False)  # the stage builds the filtered dataset to find its items
    assert items.keys == ["x1", "x2", "x3", "x4", "x5"]  # 'rare' (one interaction) filtered out, never prompted
    cache = run_user_profile(config, backend, progress=False)
    manifest = json.loads((cache.path / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["item_fusion"]["cache"] == items.key_hash
    assert open_user_summaries(config, backend).texts([("B-2", 3)])[0].endswith("saw x3,x4")


def test_prompt_reads_profile_dates_gaps_and_item_summaries(toy):
    config = toy_config(toy, user_window_size=3, user_window_step=3)
    build_items(config, EchoBackend())
    backend = EchoBackend()
    times = [T0, T0 + 600, T0 + 16 * DAY, T0 + 100 * DAY, T0 + 101 * DAY, T0 + 500 * DAY, T0 + 501 * DAY]
    histories = {"A-1": UserHistory(["x1", "x2", "x3", "x4", "x5", "x1", "x2"], times)}
    run_user_profile(config, backend, histories, progress=False)
    first, update = backend.requests  # t = 3, 4, 5 -> c = 3; t = 6 -> c = 6: one chain of two windows
    assert first.system and "User profile: aged 25-34, male, occupation programmer, zip code 55455." in first.prompt
    assert "interactions from December 2000 to January 2001, oldest first:" in first.prompt
    assert "1. December 2000, first interaction: Title: x1; Genres: Drama. " in first.prompt
    assert "2. December 2000, less than an hour later: Title: x2" in first.prompt
    assert "3. January 2001, two weeks later: Title: x3" in first.prompt
    item_summary = load_item_fusion(config, ["x1"], backend)[0][0]
    assert item_summary in first.prompt
    assert "preferences up to January 2001 (a year before the newest interaction below):" in update.prompt
    assert "1. April 2001, two months later: Title: x4" in update.prompt
    assert shown_items(update.prompt) == ["x4", "x5", "x1"]  # never x2, the interaction at t = 6

    (toy / "toy" / "toy.user").unlink()
    other = EchoBackend()
    run_user_profile(config, other, histories, progress=False)
    assert other.requests and all(r.prompt.startswith("User profile: unknown.") for r in other.requests)


def test_profiles_from_user_files(toy, tmp_path):
    config = toy_config(toy)
    assert user_profiles(config) == {"A-1": "aged 25-34, male, occupation programmer, zip code 55455",
                                     "B-2": "aged under 18, female, occupation other",
                                     "C-3": "aged 56+, occupation writer, zip code 02139"}
    assert user_profiles({**config, "user_profile_fields": {"Job": "occupation"}})["A-1"] == "Job programmer"
    assert sorted(user_profiles({**config, "user_profile_fields": ["zip_code"]})) == ["A-1", "C-3"]  # B-2: none
    with pytest.raises(ValueError, match=r"lacks the user profile field\(s\) \['income'\]"):
        user_profiles({**config, "user_profile_fields": ["income"]})
    ml100k = user_profiles({"dataset": "ml-100k", "data_path": str(ML100K)})  # real ages, named occupations
    assert ml100k["1"] == "aged 24, male, occupation technician, zip code 85711"
    assert user_profiles({"dataset": "none", "data_path": str(tmp_path)}) == {}


def test_time_words():
    assert [duration_words(s) for s in (0, 3599, 3600, 5 * 3600, DAY, 2.5 * DAY, 7 * DAY, 15 * DAY, 31 * DAY,
                                         200 * DAY, 366 * DAY, 4000 * DAY)] == [
        "less than an hour", "less than an hour", "an hour", "five hours", "a day", "two days", "a week",
        "two weeks", "a month", "six months", "a year", "ten years"]
    assert month_year(T0) == "December 2000" and month_year(0) == "January 1970"
    ts = [T0 * 1000, T0 * 1000 + 14 * DAY * 1000]
    assert Clock("unix_ms").when(ts, 1) == "January 2001, two weeks later"
    positions = Clock("none")
    assert (positions.when(ts, 1), positions.period(ts, 0, 2), positions.age(ts, 1, 2)) == (
        "interaction 2", "number 1 to 2", "an interaction")
    with pytest.raises(ValueError, match="user_time_format"):
        Clock("iso")
    with pytest.raises(ValueError, match="not Unix s.*normalize_all"):
        Clock("unix_s").check([T0 * 1000])


def test_normalised_timestamps_are_refused(toy):
    config = toy_config(toy, normalize_all=True)
    with pytest.raises(ValueError, match="normalize_all: False"):
        user_profile_cache(config, EchoBackend(), {"A-1": UserHistory(["x1"], [0.5])})
    user_profile_cache({**config, "user_time_format": "none"}, EchoBackend(), {"A-1": UserHistory(["x1"], [0.5])})


def test_every_setting_is_in_the_cache_key(toy, tmp_path):
    config = toy_config(toy)
    backend = EchoBackend()
    histories = {"A-1": UserHistory(["x1", "x2", "x3", "x4"], [T0 + k * DAY for k in range(4)])}
    base = user_profile_cache(config, backend, histories).path
    custom = tmp_path / "mine.txt"
    v1 = Path(user_profile.__file__).parent / "prompts" / "user_profile_v1.txt"
    custom.write_text(v1.read_text(encoding="utf-8").replace("two or three", "three"), encoding="utf-8")
    changed = {
        "W": {"user_window_size": 3}, "S": {"user_window_step": 3}, "M": {"user_summary_max_windows": 3},
        "N": {"llm_train_targets_per_user": 1}, "partial": {"user_window_partial_first": False},
        "tokens": {"user_summary_max_new_tokens": 9}, "prompt": {"user_profile_prompt": str(custom)},
        "time": {"user_time_format": "none"}, "profile": {"user_profile_fields": ["age"]},
        "item fusion": {"item_fusion_max_new_tokens": 5},
    }
    paths = {name: user_profile_cache({**config, **change}, backend, histories).path for name, change in changed.items()}
    paths["model"] = user_profile_cache(config, EchoBackend(weights_sha256="other"), histories).path
    later = {"A-1": UserHistory(["x1", "x2", "x3", "x4"], [T0 + k * DAY for k in (0, 1, 2, 9)])}
    paths["timestamps"] = user_profile_cache(config, backend, later).path
    (toy / "toy" / "toy.user").write_text("\n".join(USERS[:2]) + "\n", encoding="utf-8")
    paths["user file"] = user_profile_cache(config, backend, histories).path
    assert base not in paths.values() and len(set(paths.values())) == len(paths)


def test_errors_name_the_commands(toy):
    config = toy_config(toy)
    histories = {"A-1": UserHistory(["x1", "x2", "x3"], [T0, T0 + 1, T0 + 2])}
    with pytest.raises(StageCacheError, match=r"python -m recbole_mllm\.stages\.item_fusion --dataset=toy"):
        run_user_profile(config, EchoBackend(), histories, progress=False)
    build_items(config, EchoBackend())
    with pytest.raises(StageCacheError, match=r"python -m recbole_mllm\.stages\.user_profile --dataset=toy"):
        open_user_summaries(config, EchoBackend(), histories)
    with pytest.raises(ValueError, match=r"not in .*toy\.item, e\.g\. \['nope'\]"):
        user_profile_cache(config, EchoBackend(), {"A-1": UserHistory(["nope"], [T0])})


def test_empty_generation_keeps_what_was_known(toy):
    class Silent(EchoBackend):
        def generate(self, requests, config=None, progress=False):
            out = super().generate(requests, config, progress)
            return ["" if "x4" in r.prompt or "x1" in r.prompt.split("\n\n")[1] else o for r, o in zip(requests, out)]

    config = toy_config(toy, user_window_size=2, user_window_step=2, user_window_partial_first=False)
    build_items(config, EchoBackend())
    histories = {"A-1": UserHistory(["x1", "x2", "x3", "x4", "x5"], [T0 + k * DAY for k in range(5)])}
    cache = run_user_profile(config, Silent(), histories, progress=False)
    records = cache.load()  # t = 2, 3 -> c = 2 (x1 x2, silent); t = 4 -> c = 4 (x3 x4, silent again)
    assert records[("A-1", 2)].text == "Interactions: Title: x1; Genres: Drama | Title: x2; Genres: Drama"
    assert records[("A-1", 4)].text == records[("A-1", 2)].text
    assert cache.summary()["meta_counts"]["summary"] == {"fallback": 2}


def test_tiny_llm_interrupted_then_resumed_is_byte_identical(toy, tmp_path, tree):
    histories = {f"u{k}": UserHistory([f"x{1 + (k + j) % 5}" for j in range(3 + 2 * k)],
                                      [T0 + j * 5 * DAY for j in range(3 + 2 * k)]) for k in range(5)}
    runs = {}
    for name, fail_at in (("reference", None), ("resumed", 3)):
        config = toy_config(toy, stage_cache_dir=str(tmp_path / name), stage_batch_size=3, user_window_size=2,
                            user_window_step=2, user_summary_max_windows=3)
        backend = TinyLlamaBackend()
        build_items(config, backend)
        if fail_at is not None:  # stop inside the second shard, mid-chain
            backend.fail_after = backend.generate_calls + fail_at
            with pytest.raises(RuntimeError, match="simulated interruption"):
                run_user_profile(config, backend, histories, progress=False)
            backend.fail_after = -1
            assert not user_profile_cache(config, backend, histories).is_complete()
        runs[name] = run_user_profile(config, backend, histories, progress=False)
    assert tree(runs["resumed"].path) == tree(runs["reference"].path)
    records = runs["resumed"].load()
    assert len(records) == 14 and {r.meta["chain_windows"] for r in records.values()} == {1, 2, 3}
    for record in records.values():  # the stored vector is the embedding of the stored summary
        assert torch.allclose(record.embedding, backend.embed([record.text])[0], atol=1e-5)


def test_command_line_builds_through_recbole_config(toy, capsys):
    folder = toy / "tiny-llama"
    tiny = TinyLlamaBackend()
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    args = [f"--data_path={toy}", f"--stage_cache_dir={toy / 'cache'}", f"--mllm={folder}", "--device=cpu",
            "--item_fusion_max_new_tokens=4"]
    item_fusion.main(["--dataset=toy", *args])
    user_profile.main(["--dataset=toy", *args, "--use_gpu=False", "--normalize_all=False",
                       "--load_col={'inter': ['user_id', 'item_id', 'timestamp']}", "--user_window_size=2",
                       "--user_summary_max_new_tokens=4", "--show_progress=False", "--user_shard_size=1"])
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert path.parent.name == "user_profile" and (path / "complete.json").is_file()
    manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["model"]["backend"] == "hf-causal" and manifest["params"]["window_size"] == 2
    assert manifest["cache"]["shard_size"] == 1  # users per shard: the item cache (256 items per shard) is still found
    assert manifest["dataset"]["n_interactions"] == 15  # the command line kept every item (no filter given)
    with pytest.raises(ValueError, match="--dataset"):
        user_profile.stage_config(["--mllm=x"])


def test_packaged_template_has_every_section():
    template = load_prompt("user_profile", "v1").require(_PROMPT_FIELDS)
    assert template.render("no_profile") == "unknown" and "{" not in template.render("empty")


def test_summary_chain_runs_every_window_from_the_first_and_caches_nothing(toy):
    config = recbole_config(toy, user_summary_max_windows=1)  # the cache's chains would be one window long
    backend = EchoBackend()
    build_items(config, backend)
    backend.requests.clear()  # the item fusion requests
    chain = user_profile.summary_chain(config, "A-1", windows=5, backend=backend)
    assert [c for c, _ in chain] == [2, 4, 6]  # A-1 has 6 items: three full windows
    assert [shown_items(r.prompt) for r in backend.requests] == [["x1", "x3"], ["x5", "x2"], ["x4", "x3"]]
    assert chain[1][1] in backend.requests[2].prompt  # each window revises the previous summary
    assert not (toy / "cache" / "user_profile").exists()
    with pytest.raises(KeyError, match="nobody"):
        user_profile.summary_chain(config, "nobody", 2, backend)
