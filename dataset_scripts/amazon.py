"""Amazon review dumps (2014, 2018, 2023) to a multimodal RecBole dataset, images included.

The paper evaluates on Amazon categories (Baby, Sports, Beauty, Toys): reviews give the sequences,
the metadata the item text (title, brand, categories, description) and the image URLs. The three
public vintages differ in file format and field names, and this script reads all of them:

    2014  reviews_<Cat>[_5].json.gz  JSON lines       meta_<Cat>.json.gz  Python literals (ast)
          reviewerID asin overall unixReviewTime       asin title brand categories description imUrl
    2018  <Cat>[_5].json.gz          JSON lines       meta_<Cat>.json.gz  JSON lines
          (same review keys)                           asin title brand category description imageURL(HighRes)
    2023  <Cat>.jsonl[.gz]           JSON lines       meta_<Cat>.jsonl[.gz]  JSON lines
          user_id parent_asin rating timestamp (ms)    parent_asin title store categories description images

Each line is read as JSON, else as a Python literal, and the fields are picked by name, so the
vintage needs no flag. Items are ``parent_asin`` for 2023 (what its metadata is keyed by), ``asin``
before. Steps: reviews -> ``--min-rating`` -> one interaction per (user, item), the earliest
(``--duplicates keep``: every review) ->
iterative k-core (``--k-core``, default 5, on users and items) -> metadata of the kept items ->
images from ``--images`` (files ``<item_id>.<ext>``) or downloaded from the metadata URLs.

Downloads resume: an ``images/<item_id>.jpg`` that already is a clean RGB JPEG is kept; transient
failures (timeouts, HTTP 429/5xx) are retried with exponential backoff; a failure leaves the item
text-only and is listed in ``missing_images.txt``, never fatal. When no connection succeeds at all
(no network), downloading stops after a few attempts. ``--no-download`` never touches the network.

Usage (idempotent: a second run with the same inputs and arguments does nothing):

    python dataset_scripts/amazon.py --reviews raw/reviews_Beauty_5.json.gz \\
        --meta raw/meta_Beauty.json.gz --output dataset --name amazon-beauty-mm

Written to ``<output>/<name>/`` (see atomic_files.py): ``.inter`` and ``.item`` with ``title``,
``description`` (words, the description cut to ``--max-description-words``), ``brand`` (one token),
``categories`` (one token per category, inner spaces as ``_``), ``image``; no ``.user`` (the dumps
have no demographics). Items whose metadata is missing keep their interactions with empty text.
"""

import ast
import gzip
import http.client
import json
import re
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from tqdm import tqdm

if __package__:
    from .atomic_files import INTER_FIELDS, TIE_SEED, number, tie_key, write_atomic_file, write_dataset_yaml
    from .cli import argument_parser, run_main, run_script
    from .errors import InputError, LineErrors, check_input_file, compression_of
    from .interactions import k_core
    from .images import (find_images, image_paths, is_clean_jpeg, normalise_image, remove_stale_images,
                         write_missing_images)
    from .stats import dataset_stats, row_counts
    from .text import label_token, markup_text
else:  # run as a script: python dataset_scripts/amazon.py
    from atomic_files import INTER_FIELDS, TIE_SEED, number, tie_key, write_atomic_file, write_dataset_yaml
    from cli import argument_parser, run_main, run_script
    from errors import InputError, LineErrors, check_input_file, compression_of
    from interactions import k_core
    from images import (find_images, image_paths, is_clean_jpeg, normalise_image, remove_stale_images,
                        write_missing_images)
    from stats import dataset_stats, row_counts
    from text import label_token, markup_text

ITEM_FIELDS = [
    ("item_id", "token"), ("title", "token_seq"), ("brand", "token"), ("categories", "token_seq"),
    ("description", "token_seq"), ("image", "token"),
]  # fmt: skip
RETRY_HTTP_CODES = {408, 425, 429, 500, 502, 503, 504}
MAX_IMAGE_BYTES = 32 * 2**20  # a larger answer is no product image
NO_NETWORK_AFTER = 8  # consecutive connection failures, with no success yet, that mean "no network"
USER_AGENT = "recbole_mllm-dataset-scripts (+urllib)"
_META_ID = re.compile(r"""['"](parent_asin|asin)['"]\s*:\s*['"]([^'"]+)['"]""")


# ------------------------------------------------------------------------------------ raw lines
def raw_lines(path):
    """``(line_number, text)`` of a ``.json``/``.jsonl`` file, gzipped or not, blank lines skipped.

    Bytes are decoded as UTF-8 with replacement, so a stray byte costs a character, not the line.
    Gzip is recognised by its content; a file named ``.gz`` that is not gzip, another compression, or
    gzip data that is cut off or damaged is a :class:`InputError` naming the file.
    """
    path = Path(path)
    kind = compression_of(path)
    if path.suffix == ".gz" and kind != "gzip":
        raise InputError(path, f"is named .gz but is {f'{kind}-compressed' if kind else 'not compressed'}")
    if kind not in (None, "gzip"):
        raise InputError(path, f"is {kind}-compressed; give the .json/.jsonl file, plain or gzipped")
    line_number = 0
    with (gzip.open if kind == "gzip" else open)(path, "rb") as f:
        try:
            for line_number, raw in enumerate(tqdm(f, desc=path.name, unit=" lines", disable=None), 1):
                line = raw.decode("utf-8", errors="replace").strip()
                if line:
                    yield line_number, line
        except (OSError, EOFError, zlib.error) as error:
            if kind != "gzip":
                raise InputError(path, f"cannot be read after line {line_number:,} ({error})") from None
            problem = "is cut off" if isinstance(error, EOFError) else f"is damaged ({error})"
            raise InputError(path, f"gzip data {problem} after line {line_number:,}") from None


def parse_record(line, file, line_number, errors):
    """A dict from a JSON line (2018, 2023, all reviews) or a Python literal (2014 metadata), else None."""
    try:
        record = json.loads(line)
    except ValueError:
        try:
            record = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            record = None
    if not isinstance(record, dict):
        errors.add(file, line_number, "neither a JSON object nor a Python dict literal")
        return None
    return record


# -------------------------------------------------------------------------------- interactions
def read_reviews(path, errors):
    """DataFrame ``user_id item_id rating timestamp`` (timestamp in seconds) of every valid review."""
    rows = []
    name = Path(path).name
    for line_number, line in raw_lines(path):
        record = parse_record(line, name, line_number, errors)
        if record is None:
            continue
        user = record.get("user_id", record.get("reviewerID"))
        item = record.get("parent_asin") or record.get("asin")
        rating = record.get("rating", record.get("overall"))
        timestamp = record.get("timestamp", record.get("unixReviewTime"))
        try:
            user, item = label_token(user), label_token(item)
            rating, timestamp = float(rating), float(timestamp)
        except (TypeError, ValueError):
            user = None
        if not user or not item:
            errors.add(name, line_number, "review without a user, item, numeric rating or timestamp")
            continue
        if timestamp > 1e11:  # 2023 stores milliseconds
            timestamp /= 1000.0
        rows.append((user, item, rating, timestamp))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])


def filter_interactions(inter, min_rating, k, duplicates="drop", tie_seed=TIE_SEED):
    """Rating threshold, then one interaction per (user, item) (the earliest; ``duplicates="keep"``:
    every review), then k-core. ``counts["duplicates"]`` is the number of repeated reviews either way.

    Each user's interactions come out in time order, those of the same timestamp (the 2014 and 2018 dumps
    have whole days) in the order of :func:`tie_key`, not of item ids."""
    counts = {"reviews": len(inter)}
    if min_rating is not None:
        inter = inter[inter["rating"] >= min_rating]
    counts["below_min_rating"] = counts["reviews"] - len(inter)
    ties = [tie_key(tie_seed, user, item) for user, item in zip(inter["user_id"], inter["item_id"])]
    inter = inter.assign(tie=pd.Series(ties, index=inter.index, dtype="int64"))
    inter = inter.sort_values(["user_id", "timestamp", "tie"], kind="stable").drop(columns="tie")
    repeated = inter.duplicated(["user_id", "item_id"], keep="first")
    counts["duplicates"] = int(repeated.sum())
    if duplicates == "drop":
        inter = inter[~repeated]
    before = len(inter)
    inter = k_core(inter, k)
    counts["removed_by_k_core"] = before - len(inter)
    return inter.reset_index(drop=True), counts


# ---------------------------------------------------------------------------------------- items


def _categories(record):
    labels = [record.get("main_category")]
    for key in ("categories", "category"):
        for value in record.get(key) or []:
            labels.extend(value if isinstance(value, (list, tuple)) else [value])  # 2014: list of paths
    tokens = (label_token(markup_text(label)) for label in labels if label)
    return list(dict.fromkeys(t for t in tokens if t))


def _image_urls(record):
    """Candidate URLs, best first: 2023 MAIN image (large, hi_res, thumb), 2018 high-res, 2014 imUrl."""
    urls = []
    images = record.get("images") or record.get("image") or []
    images = sorted(images, key=lambda im: not (isinstance(im, dict) and im.get("variant") == "MAIN"))
    for image in images:
        if isinstance(image, dict):
            urls.extend(image.get(key) for key in ("large", "hi_res", "thumb"))
        else:
            urls.append(image)
    urls += list(record.get("imageURLHighRes") or []) + list(record.get("imageURL") or []) + [record.get("imUrl")]
    return list(
        dict.fromkeys(u.strip() for u in urls if isinstance(u, str) and u.strip().startswith(("http://", "https://")))
    )


def item_record(record, max_description_words):
    """The text fields and image URLs of one metadata record, whatever its vintage."""
    details = record.get("details") if isinstance(record.get("details"), dict) else {}
    description = markup_text(record.get("description")) or markup_text(record.get("features") or record.get("feature"))
    if max_description_words > 0:
        description = " ".join(description.split(" ")[:max_description_words])
    return {
        "title": markup_text(record.get("title")),
        "brand": markup_text(record.get("brand") or record.get("store") or details.get("Brand")),
        "categories": " ".join(_categories(record)),
        "description": description,
        "urls": _image_urls(record),
    }


def read_meta(path, wanted, errors, max_description_words, counts=None):
    """``{item_id: item_record}`` for the ``wanted`` items; the first record of an item wins.

    ``counts`` (a dict) receives how many records were of other items and how many repeated an item.

    The item id is looked up with a regex first, so that the (large) lines of other items are never
    parsed; a line whose id the regex cannot see is parsed in full.
    """
    items = {}
    name = Path(path).name
    skipped = {"other": 0, "repeated": 0}
    for line_number, line in raw_lines(path):
        ids = {}
        for key, value in _META_ID.findall(line):
            ids.setdefault(key, value)
        item = ids.get("parent_asin") or ids.get("asin")
        if item is not None and (item not in wanted or item in items):
            skipped["repeated" if item in items else "other"] += 1
            continue
        record = parse_record(line, name, line_number, errors)
        if record is None:
            continue
        item = label_token(record.get("parent_asin") or record.get("asin"))
        if item in wanted and item not in items:
            items[item] = item_record(record, max_description_words)
        else:
            skipped["repeated" if item in items else "other"] += 1
    if counts is not None:
        counts.update(meta_of_other_items=skipped["other"], repeated_meta_records=skipped["repeated"])
    return items


# --------------------------------------------------------------------------------------- images
class Downloader:
    """Fetches image URLs with retries and backoff; gives up on the network when nothing ever connects."""

    def __init__(self, retries=3, timeout=20.0, backoff=1.0):
        self.retries, self.timeout, self.backoff = retries, timeout, backoff
        self._lock = threading.Lock()
        self.successes = 0
        self.connection_failures = 0  # consecutive, reset by any success

    @property
    def network_down(self):
        return self.successes == 0 and self.connection_failures >= NO_NETWORK_AFTER

    def fetch(self, url):
        """The body of ``url``; raises the last error once the retries are spent."""
        for attempt in range(self.retries + 1):
            try:
                request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    data = response.read(MAX_IMAGE_BYTES + 1)
                if len(data) > MAX_IMAGE_BYTES:
                    raise ValueError(f"larger than {MAX_IMAGE_BYTES} bytes")
                with self._lock:
                    self.successes += 1
                    self.connection_failures = 0
                return data
            except urllib.error.HTTPError as error:  # the server answered: the network is up
                if error.code not in RETRY_HTTP_CODES or attempt == self.retries:
                    raise
            except (OSError, http.client.HTTPException):  # no (full) answer: DNS, refused, reset, timeout
                with self._lock:
                    self.connection_failures += 1
                if attempt == self.retries or self.network_down:
                    raise
            time.sleep(self.backoff * 2**attempt)

    def download(self, urls, dst):
        """Try ``urls`` in order until one gives a usable image at ``dst``; ``None`` or the reason."""
        reasons = []
        for url in urls:
            if self.network_down:
                reasons.append("skipped: no connection succeeded (no network?)")
                break
            try:
                data = self.fetch(url)
            except Exception as error:  # noqa: BLE001 - any failure leaves the item text-only
                reasons.append(f"download failed ({error}): {url}")
                continue
            part = dst.with_name(f".{dst.stem}.part")
            part.write_bytes(data)
            reason = normalise_image(part, dst)
            part.unlink()
            if reason is None:
                return None
            reasons.append(f"{reason}: {url}")
        return "; ".join(reasons) or "no image URL in the metadata"


def collect_images(items, images_dir, local, download, downloader, workers):
    """``(images, missing, counts)``: ``{item: file name}``, ``{item: reason}`` and where images came from.

    Order per item: a file in the local folder, else a clean image already in ``images_dir`` (an
    earlier, possibly interrupted, run downloaded it), else a download. An item id that is no plain file name
    (``../x``, ``/x``) ends the run before any file is opened (:func:`image_paths`).
    """
    paths = image_paths(images_dir, items)
    images_dir.mkdir(parents=True, exist_ok=True)
    images, missing, queue = {}, {}, {}
    counts = {"from_folder": 0, "already_present": 0, "downloaded": 0}
    for item_id, record in tqdm(sorted(items.items()), desc="images", unit="img", disable=None):
        dst = paths[item_id]
        reason = None
        if item_id in local:
            reason = normalise_image(local[item_id], dst)
            if reason is None:
                images[item_id] = dst.name
                counts["from_folder"] += 1
                continue
            reason = f"{reason}: {local[item_id].name}"
        if dst.exists() and is_clean_jpeg(dst):
            images[item_id] = dst.name
            counts["already_present"] += 1
        elif download and record["urls"]:
            queue[item_id] = record["urls"]
        else:
            missing[item_id] = reason or (
                "no image URL in the metadata" if not record["urls"] else "not in --images, --no-download"
            )
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = {
            item: pool.submit(downloader.download, urls, paths[item])
            for item, urls in queue.items()
        }
        for item_id, job in tqdm(jobs.items(), desc="download", unit="img", disable=None):
            reason = job.result()
            if reason is None:
                images[item_id] = paths[item_id].name
                counts["downloaded"] += 1
            else:
                missing[item_id] = reason
    remove_stale_images(images_dir, keep=set(images.values()))
    return images, missing, counts


# ---------------------------------------------------------------------------------------- build
def convert(args, build):
    errors = LineErrors()
    reviews = read_reviews(args.reviews, errors)
    inter, counts = filter_interactions(reviews, args.min_rating, args.k_core, args.duplicates, args.tie_seed)
    if inter.empty:
        errors.report()
        raise InputError(args.reviews, "no interaction is left after --min-rating / --k-core")
    kept_items = set(inter["item_id"])
    meta_counts = {"meta_of_other_items": 0, "repeated_meta_records": 0}
    meta = read_meta(args.meta, kept_items, errors, args.max_description_words, meta_counts) if args.meta else {}
    errors.report()

    empty = {"title": "", "brand": "", "categories": "", "description": "", "urls": []}
    items = {item: meta.get(item, empty) for item in kept_items}
    downloader = Downloader(retries=args.retries, timeout=args.timeout)
    images, missing, image_counts = collect_images(
        items, build.dir / "images", find_images(args.images), not args.no_download, downloader, args.workers
    )

    name = build.name
    inter_rows = zip(
        inter["user_id"], inter["item_id"], map(number, inter["rating"]), map(number, inter["timestamp"])
    )
    write_atomic_file(build.dir / f"{name}.inter", INTER_FIELDS, inter_rows)
    fields = [f for f, _ in ITEM_FIELDS[1:-1]]
    item_rows = [(item, *(items[item][f] for f in fields), images.get(item, "")) for item in sorted(items)]
    write_atomic_file(build.dir / f"{name}.item", ITEM_FIELDS, item_rows)
    write_missing_images(build.dir / "missing_images.txt", missing)

    item_images = {i: images.get(i, "") for i in items}
    stats = dataset_stats(name, inter["user_id"], inter["item_id"], item_images, missing, errors)
    stats.update(
        counts,
        **meta_counts,
        duplicates_choice=args.duplicates,
        tie_seed=args.tie_seed,
        items_without_meta=len(kept_items - set(meta)),
        items_with_title=sum(1 for record in items.values() if record["title"]),
        images=image_counts,
    )
    stats["dropped"] = row_counts(
        malformed_lines=errors.total,
        reviews_below_min_rating=counts["below_min_rating"],
        reviews_removed_by_k_core=counts["removed_by_k_core"],
        **meta_counts,
    )
    stats["orphaned"] = row_counts(items_without_metadata=stats["items_without_meta"])
    write_dataset_yaml(build, "amazon.py", "Amazon reviews with item title, brand, categories, description and "
                              "image.", {"inter": INTER_FIELDS, "item": ITEM_FIELDS}, "categories", stats)
    return stats


def parse_args(argv=None):
    images_help = "folder of local images named <item_id>.<ext>; used before downloading"
    parser = argument_parser(__doc__, "amazon-beauty-mm", images_help)
    parser.add_argument(
        "--reviews", required=True, type=Path, help="review file: .json/.jsonl, gzipped or not (2014, 2018 or 2023)"
    )
    parser.add_argument(
        "--meta", type=Path, default=None, help="metadata file of the same category and vintage (text and image URLs)"
    )
    parser.add_argument(
        "--k-core",
        type=int,
        default=5,
        help="keep users and items with at least this many interactions, iteratively (<=1: off)",
    )
    parser.add_argument(
        "--min-rating", type=float, default=None, help="drop reviews rated below this (default: keep all)"
    )
    parser.add_argument(
        "--max-description-words", type=int, default=200, help="cut descriptions to this many words (0: no limit)"
    )
    parser.add_argument(
        "--no-download", action="store_true", help="never download; items without a local image stay text-only"
    )
    parser.add_argument("--workers", type=int, default=8, help="parallel downloads")
    parser.add_argument("--retries", type=int, default=3, help="retries per URL after a timeout or HTTP 429/5xx")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per download attempt")
    return parser.parse_args(argv)


def main(argv=None):
    """Build the dataset (or find it up to date); returns the statistics, ``rebuilt`` among them.

    A missing, unreadable, damaged or wrongly compressed input ends in one line ``error: <file>: <problem>``
    and exit status 2.
    """
    return run_main(_main, argv)


def _main(argv):
    args = parse_args(argv)
    check_input_file(args.reviews, "--reviews")
    if args.meta is not None:
        check_input_file(args.meta, "--meta")
    inputs = [args.reviews, args.meta, args.images]
    return run_script(args, inputs, __file__, convert, ignored=("workers", "retries", "timeout"))


if __name__ == "__main__":
    main()
