"""dataset_scripts/amazon.py on small 2014, 2018 and 2023 dumps, with a local image server."""

import gzip
import http.server
import json
import socket
import subprocess
import sys
import threading

import pandas as pd
import pytest
from dataset_helpers import REPO, item_text, write_image
from PIL import Image

from dataset_scripts import amazon
from dataset_scripts.errors import LineErrors


def write_lines(path, lines):
    data = ("\n".join(lines) + "\n").encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def review_2014(user, item, rating, time):
    return json.dumps({"reviewerID": user, "asin": item, "overall": rating, "unixReviewTime": time, "reviewText": "ok"})


def read_rows(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.split("\t") for line in lines[1:]]


def build(tmp_path, reviews, meta, name="amazon-beauty-mm", extra=()):
    argv = ["--reviews", str(reviews), "--output", str(tmp_path / "out"), "--name", name, *extra]
    if meta is not None:
        argv += ["--meta", str(meta)]
    return amazon.main(argv)


# 2014: k=2 cascade. U3's only other item A4 has one review -> A4 goes, then U3 (one left), then A3
# (U1 alone), then U4 had one review from the start. Left: U1 and U2 with A1 and A2.
REVIEWS_2014 = [
    review_2014("U1", "A1", 5.0, 100),
    review_2014("U1", "A2", 4.0, 200),
    review_2014("U1", "A3", 3.0, 300),
    review_2014("U2", "A2", 2.0, 150),
    review_2014("U2", "A1", 4.0, 50),
    review_2014("U2", "A1", 1.0, 500),  # duplicate: the earliest review of (U2, A1) stays
    '{"reviewerID": "U9", "asin": ',  # line 7: truncated
    review_2014("U3", "A3", 5.0, 10),
    review_2014("U3", "A4", 5.0, 20),
    json.dumps({"reviewerID": "U5", "asin": "A1"}),  # line 10: no rating
    review_2014("U4", "A1", 5.0, 30),
]
META_2014 = [  # Python literals, as the 2014 dump ships them
    str({"asin": "A4", "title": "Dropped by the k-core"}),
    str(
        {
            "asin": "A1",
            "title": "Rose &amp; Oud <b>Eau</b> de Parfum",
            "brand": "Acme Co",
            "categories": [["Beauty", "Skin Care", "Face"], ["Beauty", "Fragrance"]],
            "description": "Line one.\nLine\ttwo.",
            "imUrl": "http://127.0.0.1:9/A1.jpg",
        }
    ),
    "{'asin': 'A2', 'title': ",  # line 3: broken; the next record of A2 is used
    str({"asin": "A2", "title": 'Kid\'s "Best" Lotion', "categories": [["Beauty"]], "price": 3.5}),
    str({"asin": "A1", "title": "A second record of A1: ignored"}),
]


def test_k_core_is_iterative():
    inter = pd.DataFrame(
        [
            ("U1", "A1"),
            ("U1", "A2"),
            ("U1", "A3"),
            ("U2", "A1"),
            ("U2", "A2"),
            ("U3", "A3"),
            ("U3", "A4"),
            ("U4", "A1"),
        ],
        columns=["user_id", "item_id"],
    )
    kept = amazon.k_core(inter, 2)
    assert sorted(zip(kept["user_id"], kept["item_id"])) == [("U1", "A1"), ("U1", "A2"), ("U2", "A1"), ("U2", "A2")]
    assert len(amazon.k_core(inter, 3)) == 0 and len(amazon.k_core(inter, 1)) == len(inter)


def test_2014_reviews_and_literal_meta(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    reviews = write_lines(raw / "reviews_Beauty_5.json.gz", REVIEWS_2014)
    meta = write_lines(raw / "meta_Beauty.json.gz", META_2014)
    images = raw / "images"
    images.mkdir()
    write_image(images / "A1.png", "rgba")
    stats = build(tmp_path, reviews, meta, extra=["--k-core", "2", "--images", str(images), "--no-download"])
    out = tmp_path / "out" / "amazon-beauty-mm"

    assert read_rows(out / "amazon-beauty-mm.inter") == [
        ["U1", "A1", "5", "100"],
        ["U1", "A2", "4", "200"],
        ["U2", "A1", "4", "50"],
        ["U2", "A2", "2", "150"],
    ]
    item_text_file = (out / "amazon-beauty-mm.item").read_text(encoding="utf-8").splitlines()
    assert item_text_file == [
        "item_id:token\ttitle:token_seq\tbrand:token\tcategories:token_seq\tdescription:token_seq\timage:token",
        "A1\tRose & Oud Eau de Parfum\tAcme Co\tBeauty Skin_Care Face Fragrance\tLine one. Line two.\tA1.jpg",
        'A2\t"Kid\'s ""Best"" Lotion"\t\tBeauty\t\t',
    ]
    with Image.open(out / "images" / "A1.jpg") as image:  # RGBA: transparent half composited on white
        assert (image.format, image.mode) == ("JPEG", "RGB")
        assert min(image.getpixel((4, 16))) > 240 and image.getpixel((28, 16))[0] > 200 > image.getpixel((28, 16))[1]
    assert (out / "missing_images.txt").read_text() == "A2\tno image URL in the metadata\n"

    assert (stats["users"], stats["items"], stats["interactions"]) == (2, 2, 4)
    assert stats["density"] == 1.0 and stats["items_with_image"] == 1
    assert (stats["reviews"], stats["duplicates"], stats["removed_by_k_core"]) == (9, 1, 4)
    assert stats["malformed_lines"] == {"reviews_Beauty_5.json.gz": 2, "meta_Beauty.json.gz": 1}
    err = capsys.readouterr().err
    assert "reviews_Beauty_5.json.gz:7: neither a JSON object" in err
    assert "reviews_Beauty_5.json.gz:10: review without a user, item, numeric rating" in err
    assert "meta_Beauty.json.gz:3: neither a JSON object" in err


def test_2018_json_meta_min_rating_and_broken_local_images(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    reviews = [
        review_2014(u, i, r, t)
        for u, i, r, t in [("U1", "B1", 5, 1), ("U1", "B2", 4, 2), ("U1", "B3", 3, 3), ("U2", "B1", 5, 4)]
    ]
    reviews.append(
        b"\xff\xfe".decode("latin-1") + review_2014("U2", "B2", 5, 5)
    )  # stray bytes: a bad line, not a crash
    reviews.append(review_2014("U2", "B4", 4, 6))
    meta = [
        json.dumps(
            {
                "category": ["Toys &amp; Games", "Puzzles"],
                "description": ["First.", "<p>Second</p>"],
                "title": "Cube",
                "asin": "B1",
                "imageURLHighRes": [],
            }
        ),
        json.dumps({"title": "Kite", "brand": "Sky", "asin": "B2", "category": ["Toys &amp; Games"]}),
        json.dumps({"title": "Ball", "asin": "B4", "description": "Round " * 300}),
    ]
    images = raw / "images"
    images.mkdir()
    write_image(images / "B1.jpg", "truncated")
    write_image(images / "B2.jpg", "gray")
    write_image(images / "B4.gif", "garbage")
    stats = build(
        tmp_path,
        write_lines(raw / "Toys_and_Games_5.json.gz", reviews),
        write_lines(raw / "meta_Toys_and_Games.json.gz", meta),
        name="amazon-toys-mm",
        extra=["--k-core", "1", "--min-rating", "4", "--images", str(images), "--no-download"],
    )
    out = tmp_path / "out" / "amazon-toys-mm"
    rows = {row[0]: row for row in read_rows(out / "amazon-toys-mm.item")}
    assert sorted(rows) == ["B1", "B2", "B4"]  # B3 (3 stars) is below --min-rating
    assert rows["B1"][1:5] == ["Cube", "", "Toys_&_Games Puzzles", "First. Second"]
    assert rows["B4"][4] == " ".join(["Round"] * 200)  # --max-description-words default
    assert [rows[i][5] for i in ("B1", "B2", "B4")] == ["", "B2.jpg", ""]
    with Image.open(out / "images" / "B2.jpg") as image:
        assert image.mode == "RGB"
    missing = dict(line.split("\t") for line in (out / "missing_images.txt").read_text().splitlines())
    assert missing["B1"].startswith("unreadable image (OSError: image file is truncated")
    assert missing["B4"].startswith("unreadable image (UnidentifiedImageError")
    assert stats["below_min_rating"] == 1 and stats["interactions"] == 4 and stats["items_without_image"] == 2


class ImageServer:
    """A loopback HTTP server with scripted answers per path; records every request."""

    def __init__(self, routes):
        self.routes, self.requests = routes, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                answers = server.routes.get(self.path, [404])
                answer = answers.pop(0) if len(answers) > 1 else answers[0]
                if isinstance(answer, int):
                    self.send_error(answer)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def image_bytes(tmp_path, kind, suffix):
    return write_image(tmp_path / f"served{suffix}", kind).read_bytes()


@pytest.fixture
def served(tmp_path):
    routes = {
        "/P1_large.jpg": [image_bytes(tmp_path, "rgba", ".png")],
        "/P2_large.jpg": [503, image_bytes(tmp_path, "gray", ".jpg")],  # transient: retried
        "/P3_large.jpg": [404],  # permanent: the next URL of the item is tried
        "/P3_thumb.jpg": [image_bytes(tmp_path, "la", ".png")],
        "/P4_large.jpg": [b"<html>rate limited</html>"],
    }
    server = ImageServer(routes)
    yield server
    server.close()


def meta_2023(item, url=None, **fields):
    images = []
    if url:
        images = [
            {"thumb": f"{url}/{item}_thumb.jpg", "large": f"{url}/{item}_large.jpg", "variant": "MAIN", "hi_res": None}
        ]
    return json.dumps({"parent_asin": item, "main_category": "All Beauty", "images": images, **fields})


def test_2023_jsonl_with_downloads_that_resume(tmp_path, served):
    raw = tmp_path / "raw"
    raw.mkdir()
    reviews = []
    for user in ("X1", "X2"):
        for n, item in enumerate(["P1", "P2", "P3", "P4", "P5", "P6"]):
            record = {
                "user_id": user,
                "asin": f"{item}-variant",
                "parent_asin": item,
                "rating": 4.0,
                "timestamp": 1588687728923 + n,
            }
            reviews.append(json.dumps(record))
    meta = [
        meta_2023(
            "P1", served.url, title="Serum", store="Glow", categories=[], description=[], features=["Light", "Fresh"]
        ),
        meta_2023("P2", served.url, title="Mask", details={"Brand": "Clay Inc"}),
        meta_2023("P3", served.url, title="Comb"),
        meta_2023("P4", served.url, title="Soap"),
        meta_2023("P5", title="Towel"),
    ]  # P6 has no metadata at all
    arguments = (
        tmp_path,
        write_lines(raw / "All_Beauty.jsonl", reviews),
        write_lines(raw / "meta_All_Beauty.jsonl.gz", meta),
    )
    stats = build(*arguments, extra=["--k-core", "2", "--retries", "2"])
    out = tmp_path / "out" / "amazon-beauty-mm"

    rows = {row[0]: row for row in read_rows(out / "amazon-beauty-mm.item")}
    assert rows["P1"][1:] == ["Serum", "Glow", "All_Beauty", "Light Fresh", "P1.jpg"]
    assert rows["P2"][2] == "Clay Inc" and rows["P6"] == ["P6", "", "", "", "", ""]
    assert read_rows(out / "amazon-beauty-mm.inter")[0] == ["X1", "P1", "4", "1588687728.923"]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["P1.jpg", "P2.jpg", "P3.jpg"]
    for name in ("P1.jpg", "P2.jpg", "P3.jpg"):
        with Image.open(out / "images" / name) as image:
            assert (image.format, image.mode) == ("JPEG", "RGB")
    missing = dict(line.split("\t") for line in (out / "missing_images.txt").read_text().splitlines())
    assert sorted(missing) == ["P4", "P5", "P6"]
    assert "unreadable image" in missing["P4"] and missing["P5"] == missing["P6"] == "no image URL in the metadata"
    assert stats["images"] == {"from_folder": 0, "already_present": 0, "downloaded": 3}
    assert stats["items_without_meta"] == 1 and served.requests.count("/P2_large.jpg") == 2

    served.requests.clear()  # a forced rebuild keeps what is already downloaded
    again = build(*arguments, extra=["--k-core", "2", "--force"])
    assert again["images"] == {"from_folder": 0, "already_present": 3, "downloaded": 0}
    assert sorted(served.requests) == ["/P4_large.jpg", "/P4_thumb.jpg"]
    assert build(*arguments, extra=["--k-core", "2"])["rebuilt"] is False


def test_no_network_stops_downloading(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: every connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    items = {f"I{n}": {"urls": [f"http://127.0.0.1:{port}/I{n}.jpg"]} for n in range(20)}
    downloader = amazon.Downloader(retries=1, timeout=2, backoff=0)
    images, missing, counts = amazon.collect_images(items, tmp_path / "images", {}, True, downloader, workers=1)
    assert images == {} and len(missing) == 20 and downloader.network_down
    assert downloader.connection_failures == amazon.NO_NETWORK_AFTER
    assert sum("no network" in reason for reason in missing.values()) == 20 - amazon.NO_NETWORK_AFTER // 2


def test_runs_as_a_script_and_recbole_loads_it(tmp_path, recbole):
    raw = tmp_path / "raw"
    raw.mkdir()
    reviews = write_lines(raw / "reviews_Beauty_5.json.gz", REVIEWS_2014)
    meta = write_lines(raw / "meta_Beauty.json.gz", META_2014)
    command = [
        sys.executable,
        str(REPO / "dataset_scripts" / "amazon.py"),
        "--reviews",
        str(reviews),
        "--meta",
        str(meta),
    ]
    command += ["--output", str(tmp_path / "out"), "--name", "amazon-beauty-mm", "--k-core", "2", "--no-download"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, check=True)
    assert "amazon-beauty-mm: 2 users, 2 items, 4 interactions" in result.stdout

    dataset = recbole("amazon-beauty-mm", tmp_path / "out", "amazon-beauty-mm.yaml")
    assert (dataset.inter_num, dataset.user_num, dataset.item_num) == (4, 3, 3)
    assert item_text(dataset, "A2", "title") == 'Kid\'s "Best" Lotion'
    assert item_text(dataset, "A1", "categories") == "Beauty Skin_Care Face Fragrance"
    assert item_text(dataset, "A1", "brand") == "Acme Co"


def test_non_utf8_bytes_are_replaced_not_dropped(tmp_path):
    reviews = tmp_path / "r.json"
    reviews.write_bytes(
        b'{"reviewerID": "U1", "asin": "A1", "overall": 5, "unixReviewTime": 1, "summary": "caf\xe9"}\n'
    )
    meta = tmp_path / "m.json"
    meta.write_bytes(b"{'asin': 'A1', 'title': 'Caf\xe9 Cream'}\n")
    errors = LineErrors()
    assert len(amazon.read_reviews(reviews, errors)) == 1
    assert amazon.read_meta(meta, {"A1"}, errors, 0)["A1"]["title"] == "Caf\ufffd Cream"
    assert errors.total == 0
