"""dataset_scripts/movielens.py on small raw fixtures of both releases, and on the shared ML-1M."""

import json
import os
import subprocess
import sys
import time
import zipfile

import pytest
from dataset_helpers import REPO, item_text, shared_ml1m, write_image
from PIL import Image

from dataset_scripts import movielens

ML1M_FILES = {
    "ratings.dat": [
        "1::1::5::978300760",
        "1::2::3::978300761",
        "1::73::4::978300762",
        "2::1::4::978300800",
        "2::999::2::978300900",  # movie 999 is missing from movies.dat: its rating must stay
        "this line is broken",  # line 6
        "3::1::x::978300000",  # line 7
        "3::73::5::978301000",
    ],
    "movies.dat": [
        "1::Toy Story (1995)::Animation|Children's|Comedy",
        '2::"Great" Escape, The (1963)::Adventure|Film-Noir',  # a leading quote means csv quoting
        "73::Misérables, Les (1995)::Drama|Musical",
        "100::Never Rated (2000)::Drama",
        "not a movie line",
    ],
    "users.dat": ["1::F::1::10::48067", "2::M::56::16::70072", "3::M::25::4::55117"],
}
ML100K_FILES = {
    "u.data": ["1\t1\t5\t874965758", "1\t2\t3\t876893171", "2\t1\t4\t888550871", "2\t2", "3\t267\t1\t875692955"],
    "u.item": [
        "1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0",
        "2|Cité des enfants perdus, La|01-Jan-1995||http://x|0|0|0|0|0|0|0|0|1|0|1|0|0|0|0|1|0|0|0",
        "267|unknown||||1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0",
    ],
    "u.user": ["1|24|M|technician|85711", "2|53|F|other|94043", "3|23|M|writer|32067"],
    "u.genre": [f"{g}|{i}" for i, g in enumerate(movielens.ML100K_GENRES)],
}

ML10M_FILES = {  # no users.dat, half stars
    "ratings.dat": ["1::122::5::838985046", "1::185::4.5::838983525", "2::122::3.5::868245777"],
    "movies.dat": ["122::Boomerang (1992)::Comedy|Romance", "185::Net, The (1995)::Action|Crime|Thriller"],
    "tags.dat": ["15::4973::excellent!::1215184630"],
}
MLCSV_FILES = {  # ml-20m, ml-25m, ml-32m, ml-latest: csv with a header, titles quoted where they hold a comma
    "ratings.csv": ["userId,movieId,rating,timestamp", "1,1,4.0,964982703", "1,3,4.5,964981247",
                    "2,1,3.0,964982224", "2,4,2,964983815", "2,x,3,964983815", "3,3,5.0"],
    "movies.csv": ["movieId,title,genres", "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy",
                   '3,"American President, The (1995)",Comedy|Drama|Romance',
                   '4,"Babylon 5",(no genres listed)'],
    "links.csv": ["movieId,imdbId,tmdbId", "1,0114709,862", "3,0112346,9087", "4,0105946,"],
    "tags.csv": ["userId,movieId,tag,timestamp", "2,3,politics,1445714994"],
}


def write_release(root, files, packed, top):
    """The release as GroupLens ships it: latin-1 files under ``top/``, zipped or extracted."""
    root.mkdir(parents=True, exist_ok=True)
    if packed:
        path = root / f"{top}.zip"
        with zipfile.ZipFile(path, "w") as z:
            for name, lines in files.items():
                z.writestr(f"{top}/{name}", "\n".join(lines).encode("latin-1") + b"\n")
        return path
    folder = root / top
    folder.mkdir(parents=True)
    for name, lines in files.items():
        (folder / name).write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    return root  # the folder above the release folder: the script searches below it


@pytest.fixture
def posters(tmp_path):
    folder = tmp_path / "posters"
    folder.mkdir()
    write_image(folder / "1.jpg", "rgb")
    write_image(folder / "2.jpg", "cmyk")
    write_image(folder / "73.png", "palette")
    write_image(folder / "999.jpg", "empty")
    write_image(folder / "100.jpg", "rgb")  # movie 100 is never rated
    return folder


def read_atomic(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[0].split("\t"), [line.split("\t") for line in lines[1:]]


def build(tmp_path, input_path, images=None, name="ml-1m-mm", extra=()):
    argv = ["--input", str(input_path), "--output", str(tmp_path / "out"), "--name", name, *extra]
    if images is not None:
        argv += ["--images", str(images)]
    return movielens.main(argv)


@pytest.mark.parametrize("packed", [True, False], ids=["zip", "folder"])
def test_ml1m_layout(tmp_path, posters, capsys, packed):
    stats = build(tmp_path, write_release(tmp_path / "raw", ML1M_FILES, packed, "ml-1m"), posters)
    out = tmp_path / "out" / "ml-1m-mm"

    header, inter = read_atomic(out / "ml-1m-mm.inter")
    assert header == ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
    assert len(inter) == 6 and ["2", "999", "2", "978300900"] in inter
    assert [row[0] for row in inter] == sorted(row[0] for row in inter)  # grouped by user

    text = (out / "ml-1m-mm.item").read_text(encoding="utf-8")
    assert text.splitlines()[0] == "item_id:token\ttitle:token_seq\tyear:token\tgenres:token_seq\timage:token"
    assert "73\tMisérables, Les\t1995\tDrama Musical\t73.jpg" in text  # latin-1 decoded, year split off
    assert "1\tToy Story\t1995\tAnimation Children's Comedy\t1.jpg" in text
    assert '2\t"""Great"" Escape, The"\t1963\tAdventure Film-Noir\t2.jpg' in text  # csv-quoted for read_csv
    assert "999\t\t\t\t\n" in text and "Never Rated" not in text  # placeholder kept, unrated movie left out

    header, users = read_atomic(out / "ml-1m-mm.user")
    assert header == ["user_id:token", "age:token", "gender:token", "occupation:token", "zip_code:token"]
    assert users[0] == ["1", "Under 18", "F", "K-12 student", "48067"]
    assert users[2] == ["3", "25-34", "M", "college/grad student", "55117"]

    assert stats["users"] == 3 and stats["items"] == 4 and stats["interactions"] == 6
    assert stats["items_with_image"] == 3 and stats["rated_items_with_image"] == 3 and stats["items_without_image"] == 1
    assert stats["rated_items_missing_from_movies"] == 1
    assert stats["malformed_lines"] == {"ratings.dat": 2, "movies.dat": 1}
    assert json.loads((out / "stats.json").read_text()) == {k: v for k, v in stats.items() if k != "rebuilt"}

    err = capsys.readouterr().err
    assert "ratings.dat:6: expected 4 fields" in err and "ratings.dat:7: not a number" in err
    assert "movies.dat:5: expected 3 fields" in err


def test_ml1m_images_are_normalised(tmp_path, posters):
    build(tmp_path, write_release(tmp_path / "raw", ML1M_FILES, True, "ml-1m"), posters)
    images = tmp_path / "out" / "ml-1m-mm" / "images"
    assert sorted(p.name for p in images.iterdir()) == ["1.jpg", "2.jpg", "73.jpg"]
    assert (images / "1.jpg").read_bytes() == (posters / "1.jpg").read_bytes()  # clean RGB JPEG: copied as is
    for name in ("1.jpg", "2.jpg", "73.jpg"):  # CMYK and palette PNG converted
        with Image.open(images / name) as image:
            assert (image.format, image.mode) == ("JPEG", "RGB")
    missing = (tmp_path / "out" / "ml-1m-mm" / "missing_images.txt").read_text().splitlines()
    assert missing == ["999\tempty file: 999.jpg"]


@pytest.mark.parametrize("packed", [True, False], ids=["zip", "folder"])
def test_ml100k_layout(tmp_path, packed):
    stats = build(tmp_path, write_release(tmp_path / "raw", ML100K_FILES, packed, "ml-100k"), name="ml-100k-mm")
    out = tmp_path / "out" / "ml-100k-mm"
    items = read_atomic(out / "ml-100k-mm.item")[1]
    assert items == [
        ["1", "Toy Story", "1995", "Animation Children's Comedy", ""],
        ["2", "Cité des enfants perdus, La", "1995", "Drama Film-Noir Sci-Fi", ""],  # year from the release date
        ["267", "unknown", "", "unknown", ""],
    ]
    assert read_atomic(out / "ml-100k-mm.user")[1][0] == ["1", "24", "M", "technician", "85711"]
    assert stats["interactions"] == 4 and stats["users"] == 3 and stats["items_with_image"] == 0
    assert stats["malformed_lines"] == {"u.data": 1}
    assert (out / "missing_images.txt").read_text().count("no --images folder given") == 3


def test_ml10m_layout(tmp_path):
    stats = build(tmp_path, write_release(tmp_path / "raw", ML10M_FILES, True, "ml-10M100K"), name="ml-10m-mm")
    out = tmp_path / "out" / "ml-10m-mm"
    assert read_atomic(out / "ml-10m-mm.inter")[1] == [["1", "185", "4.5", "838983525"], ["1", "122", "5", "838985046"],
                                                       ["2", "122", "3.5", "868245777"]]  # by user, then time
    assert read_atomic(out / "ml-10m-mm.item")[1] == [["122", "Boomerang", "1992", "Comedy Romance", ""],
                                                      ["185", "Net, The", "1995", "Action Crime Thriller", ""]]
    assert not (out / "ml-10m-mm.user").exists() and stats["source_users"] is None and stats["malformed_lines"] == {}


@pytest.mark.parametrize("packed", [True, False], ids=["zip", "folder"])
def test_csv_layout(tmp_path, capsys, packed):
    stats = build(tmp_path, write_release(tmp_path / "raw", MLCSV_FILES, packed, "ml-latest-small"), name="ml-csv-mm")
    out = tmp_path / "out" / "ml-csv-mm"
    assert read_atomic(out / "ml-csv-mm.inter")[1] == [["1", "3", "4.5", "964981247"], ["1", "1", "4", "964982703"],
                                                       ["2", "1", "3", "964982224"], ["2", "4", "2", "964983815"]]
    assert read_atomic(out / "ml-csv-mm.item")[1] == [
        ["1", "Toy Story", "1995", "Adventure Animation Children Comedy Fantasy", ""],
        ["3", "American President, The", "1995", "Comedy Drama Romance", ""],  # the quoted comma stays in the title
        ["4", "Babylon 5", "", "", ""],  # no year, "(no genres listed)" is no genre
    ]
    assert not (out / "ml-csv-mm.user").exists()
    assert stats["malformed_lines"] == {"ratings.csv": 2} and stats["interactions"] == 4
    err = capsys.readouterr().err
    assert "ratings.csv:6: not a number" in err and "ratings.csv:7: expected 4 comma-separated fields, got 3" in err


@pytest.mark.parametrize(("names", "key"), [
    ({"1": "1.jpg", "3": "3.png"}, "movie"),
    ({"1": "tt0114709.jpg", "3": "tt0112346.jpg"}, "imdb"),
    ({"1": "0114709.jpg", "3": "112346.jpg"}, "imdb"),
    ({"1": "862.jpg", "3": "9087.jpg"}, "tmdb"),
    ({"1": "0001.jpg", "3": "0003.jpg"}, "movie"),  # zero-padded MovieIDs, never TMDb/IMDb ids 1 and 3
])
def test_posters_named_by_movie_imdb_or_tmdb_id_are_found(tmp_path, names, key):
    posters = tmp_path / "posters"
    posters.mkdir()
    for item, name in names.items():
        write_image(posters / name, "rgb")
    raw = write_release(tmp_path / "raw", MLCSV_FILES, True, "ml-latest-small")
    stats = build(tmp_path, raw, posters, name="ml-csv-mm")
    assert stats["image_key"] == key and stats["items_with_image"] == 2
    out = tmp_path / "out" / "ml-csv-mm"
    assert sorted(p.name for p in (out / "images").iterdir()) == ["1.jpg", "3.jpg"]  # named by MovieID, the item id
    assert (out / "missing_images.txt").read_text().startswith("4\tno poster named by its ")
    assert build(tmp_path, raw, posters, name="ml-csv-mm", extra=["--image-key", key])["items_with_image"] == 2
    other = "movie" if key != "movie" else "tmdb"
    assert build(tmp_path, raw, posters, name="ml-csv-mm", extra=["--image-key", other])["items_with_image"] == 0


def test_the_poster_summary_counts_every_naming_and_the_unused_files(tmp_path, capsys):
    posters = tmp_path / "posters"
    posters.mkdir()
    for name in ("1.jpg", "3.jpg", "tt0105946.jpg", "77.jpg"):  # two MovieIDs, one IMDb id, one unknown
        write_image(posters / name, "rgb")
    stats = build(tmp_path, write_release(tmp_path / "raw", MLCSV_FILES, True, "ml-latest-small"), posters, name="m")
    assert stats["image_key"] == "movie" and stats["items_with_image"] == 2
    out = capsys.readouterr().out
    assert "posters: 2 of 3 rated movies, matched by MovieID (by IMDb id (links.csv): 1, TMDb id (links.csv): 0; " \
           "--image-key chooses); 2 poster files name no rated movie" in out


def test_csv_damage_stays_on_its_line(tmp_path, capsys):
    files = {**MLCSV_FILES, "links.csv": [],  # an empty optional file: no links
             "ratings.csv": ["\u00ef\u00bb\u00bfuserId, movieId, rating, timestamp", '1,"3,4.5,964981247', "1,1,4.0,964982703",
                             "2,1,3.0,964982224"],
             "movies.csv": MLCSV_FILES["movies.csv"] + ['5,"Unclosed (2001),Drama']}
    stats = build(tmp_path, write_release(tmp_path / "raw", files, True, "ml-latest-small"), name="m")
    assert stats["interactions"] == 2 and stats["malformed_lines"] == {"ratings.csv": 1, "movies.csv": 1}
    assert "ratings.csv:2: unclosed quote" in capsys.readouterr().err
    items = read_atomic(tmp_path / "out" / "m" / "m.item")[1]
    assert items[0][:2] == ["1", "Toy Story"]


def test_ml10m_movies_without_genres_get_none(tmp_path):
    files = {**ML10M_FILES, "movies.dat": ML10M_FILES["movies.dat"] + ["8606::Pull My Daisy (1958)::(no genres listed)"],
             "ratings.dat": ML10M_FILES["ratings.dat"] + ["3::8606::4::1215184630"]}
    build(tmp_path, write_release(tmp_path / "raw", files, True, "ml-10M100K"), name="m")
    assert ["8606", "Pull My Daisy", "1958", "", ""] in read_atomic(tmp_path / "out" / "m" / "m.item")[1]


def test_an_id_key_without_links_is_a_one_line_error(tmp_path, posters, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build(tmp_path, write_release(tmp_path / "raw", ML1M_FILES, True, "ml-1m"), posters, extra=["--image-key", "imdb"])
    assert exit_info.value.code == 2
    assert "ml-1m.zip: has no links.csv, which --image-key imdb needs" in capsys.readouterr().err


def test_a_csv_header_without_a_needed_column_is_a_one_line_error(tmp_path, capsys):
    files = {**MLCSV_FILES, "ratings.csv": ["user,movie,rating,timestamp", "1,1,4.0,964982703"]}
    with pytest.raises(SystemExit):
        build(tmp_path, write_release(tmp_path / "raw", files, False, "ml-latest-small"))
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "(ratings.csv): line 1: the header lacks userId, movieId" in err
    assert len(err.splitlines()) == 1


def test_second_run_does_nothing_and_changes_rebuild(tmp_path, posters):
    raw = write_release(tmp_path / "raw", ML1M_FILES, True, "ml-1m")
    assert build(tmp_path, raw, posters)["rebuilt"] is True
    out = tmp_path / "out" / "ml-1m-mm"
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    time.sleep(0.01)

    again = build(tmp_path, raw, posters)
    assert again["rebuilt"] is False and again["interactions"] == 6
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes

    assert build(tmp_path, raw, posters, extra=["--force"])["rebuilt"] is True
    text_only = build(tmp_path, raw)  # other arguments: a rebuild, and no stale image left behind
    assert text_only["rebuilt"] is True and text_only["items_with_image"] == 0
    assert list((out / "images").iterdir()) == []
    os.utime(posters / "1.jpg", ns=(0, 0))  # a changed input rebuilds too
    assert build(tmp_path, raw, posters)["rebuilt"] is True


def test_runs_as_a_script(tmp_path):
    raw = write_release(tmp_path / "raw", ML100K_FILES, True, "ml-100k")
    command = [sys.executable, str(REPO / "dataset_scripts" / "movielens.py"), "--input", str(raw)]
    command += ["--output", str(tmp_path / "out"), "--name", "tiny"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, check=True)
    assert "tiny: 3 users, 3 items, 4 interactions" in result.stdout
    assert "u.data:4: expected 4 fields" in result.stderr


def test_recbole_loads_the_fixture(tmp_path, posters, recbole):
    build(tmp_path, write_release(tmp_path / "raw", ML1M_FILES, True, "ml-1m"), posters)
    dataset = recbole("ml-1m-mm", tmp_path / "out", "ml-1m-mm.yaml")
    assert (dataset.inter_num, dataset.user_num, dataset.item_num) == (6, 3 + 1, 4 + 1)  # + [PAD]
    assert item_text(dataset, "2", "title") == '"Great" Escape, The'
    assert item_text(dataset, "73", "title") == "Misérables, Les"
    assert item_text(dataset, "1", "genres") == "Animation Children's Comedy"
    assert item_text(dataset, "73", "image") == "73.jpg" and item_text(dataset, "999", "image") == ""
    assert sorted(dataset.inter_feat["timestamp"])[0] == 978300760  # seconds, not normalised


def test_a_dataset_under_a_new_name_loads_with_the_yaml_written_beside_it(tmp_path, monkeypatch):
    """No properties/dataset/ml-csv-mm.yaml ships: the plugin's Config reads the one the script wrote, so RecBole
    loads timestamps, text and images, not its ids-only default."""
    from recbole.data import create_dataset

    from recbole_mllm.config import Config, properties_dir
    from recbole_mllm.config_check import ConfigKeyError

    assert not (properties_dir() / "dataset" / "ml-csv-mm.yaml").exists()
    posters = tmp_path / "posters"
    posters.mkdir()
    write_image(posters / "tt0114709.jpg", "rgb")
    build(tmp_path, write_release(tmp_path / "raw", MLCSV_FILES, True, "ml-latest-small"), posters, name="ml-csv-mm")
    monkeypatch.chdir(tmp_path)
    config = Config("SASRec", "ml-csv-mm", config_dict={"data_path": str(tmp_path / "out"), "train_neg_sample_args": None})
    assert config["load_col"] == {"inter": ["user_id", "item_id", "rating", "timestamp"],
                                  "item": ["item_id", "title", "year", "genres", "image"]}
    assert config["item_category_field"] == "genres"
    dataset = create_dataset(config)
    assert dataset.inter_num == 4 and sorted(dataset.inter_feat["timestamp"])[0] == 964981247
    assert item_text(dataset, "3", "title") == "American President, The" and item_text(dataset, "1", "image") == "1.jpg"
    overridden = Config("SASRec", "ml-csv-mm", config_dict={"data_path": str(tmp_path / "out"), "TIME_FIELD": "t"})
    assert overridden["TIME_FIELD"] == "t"  # the user's keys still win
    with open(tmp_path / "out" / "ml-csv-mm" / "ml-csv-mm.yaml", "a") as f:
        f.write("learning_rat: 0.5\n")
    with pytest.raises(ConfigKeyError, match=r"unknown config key 'learning_rat' \(from .*ml-csv-mm.yaml\)"):
        Config("SASRec", "ml-csv-mm", config_dict={"data_path": str(tmp_path / "out")})


def test_a_dataset_named_as_one_recbole_bundles_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build(tmp_path, write_release(tmp_path / "raw", ML100K_FILES, True, "ml-100k"), name="ml-100k")
    assert "ml-100k: is a dataset RecBole bundles" in capsys.readouterr().err


@pytest.mark.skipif(shared_ml1m() is None, reason="shared ML-1M data (../shared/data/ml-1m) not present")
def test_shared_ml1m_done_criterion(tmp_path, recbole):
    data = shared_ml1m()
    stats = build(tmp_path, data / "ml-1m.zip", data / "posters")
    dataset = recbole("ml-1m-mm", tmp_path / "out", "ml-1m-mm.yaml")
    assert (dataset.inter_num, dataset.user_num, dataset.item_num) == (1_000_209, 6_041, 3_707)
    assert (stats["interactions"], stats["users"], stats["items"]) == (1_000_209, 6_040, 3_706)

    posters = {p.stem for p in (data / "posters").iterdir()}
    rated = {
        row.split("\t", 1)[0] for row in (tmp_path / "out" / "ml-1m-mm" / "ml-1m-mm.item").read_text().splitlines()[1:]
    }
    images = {p.stem for p in (tmp_path / "out" / "ml-1m-mm" / "images").iterdir()}
    assert images == rated & posters  # every rated movie that has a poster has its image
    assert stats["rated_items_with_image"] == len(images)
    assert item_text(dataset, "73", "title") == "Misérables, Les"
