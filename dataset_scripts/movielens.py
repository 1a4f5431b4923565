"""MovieLens (any release, + an optional poster folder) to a multimodal RecBole dataset.

MovieLens with posters is the real multimodal data set this project can use without a network: the
ratings give the sequences, the movies file the text (title, year, genres), users.dat/u.user (where the
release has one) a profile for the prompt, and the posters the images. Reads the releases exactly as
GroupLens ships them, as the zip or as its extracted folder:

    ml-100k: u.data (tab separated), u.item (``|``, latin-1, 19 genre flags), u.user, u.genre
    ml-1m:   ratings.dat, movies.dat (latin-1), users.dat, all ``::`` separated
    ml-10m:  ratings.dat (half stars), movies.dat, ``::`` separated; no user file
    ml-20m, ml-25m, ml-32m, ml-latest(-small): ratings.csv, movies.csv (titles csv-quoted), links.csv; no user file

Posters are files named by MovieID (``1.jpg``), or by the movie's IMDb id (``tt0114709.jpg``) or TMDb id
(``862.jpg``) given in links.csv; ``--image-key auto`` takes whichever names the most rated movies.

Usage (idempotent, like nanoGPT's ``prepare.py``: a second run with the same inputs does nothing):

    python dataset_scripts/movielens.py --input ../shared/data/ml-1m/ml-1m.zip \\
        --images ../shared/data/ml-1m/posters --output dataset --name ml-1m-mm

Written to ``<output>/<name>/`` (see atomic_files.py for the shared format):
- ``.inter``: every rating, ``user_id item_id rating timestamp``, each user's in time order (ratings of the same
  second in the order of a hash of ``--tie-seed``, user and movie, never by MovieID); identical rating lines once
  (``--duplicates keep``: as they are), counted in the printed summary either way.
- ``.item``: the rated movies only (RecBole counts every ``.item`` row as an item): ``title`` (words
  of the title without the trailing ``(year)``), ``year``, ``genres`` (one token per genre, e.g.
  ``Children's Film-Noir``), ``image`` (``<item_id>.jpg`` under ``images/``, empty for text-only).
  A rated movie missing from the movies file gets an empty row rather than losing its ratings.
- ``.user``: ``age`` (ml-1m: the README's range label such as ``25-34``; ml-100k: years), ``gender``,
  ``occupation`` (ml-1m codes turned into the README's names), ``zip_code``.
"""

import csv
import re
import zipfile
import zlib
from pathlib import Path

if __package__:
    from .atomic_files import INTER_FIELDS, number, tie_key, write_atomic_file, write_dataset_yaml
    from .cli import argument_parser, run_main, run_script
    from .errors import InputError, LineErrors, check_input_file, compression_of
    from .images import find_images, normalise_images, write_missing_images
    from .stats import dataset_stats, row_counts
    from .text import clean_text, decode_bytes, label_token, text_lines
else:  # run as a script: python dataset_scripts/movielens.py
    from atomic_files import INTER_FIELDS, number, tie_key, write_atomic_file, write_dataset_yaml
    from cli import argument_parser, run_main, run_script
    from errors import InputError, LineErrors, check_input_file, compression_of
    from images import find_images, normalise_images, write_missing_images
    from stats import dataset_stats, row_counts
    from text import clean_text, decode_bytes, label_token, text_lines

# ml-1m README: users.dat codes
ML1M_AGES = {"1": "Under 18", "18": "18-24", "25": "25-34", "35": "35-44", "45": "45-49", "50": "50-55", "56": "56+"}
ML1M_OCCUPATIONS = [
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer",
    "programmer", "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer",
    "tradesman/craftsman", "unemployed", "writer",
]  # fmt: skip
# ml-100k u.genre, in flag order (used when u.genre is absent)
ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip

ITEM_FIELDS = [
    ("item_id", "token"),
    ("title", "token_seq"),
    ("year", "token"),
    ("genres", "token_seq"),
    ("image", "token"),
]
USER_FIELDS = [
    ("user_id", "token"),
    ("age", "token"),
    ("gender", "token"),
    ("occupation", "token"),
    ("zip_code", "token"),
]
IMAGE_KEYS = {"movie": "MovieID", "imdb": "IMDb id (links.csv)", "tmdb": "TMDb id (links.csv)"}  # poster names
NO_GENRES = "(no genres listed)"  # movies.csv's genres of a movie without any
_TITLE_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")


class Release:
    """The files of a MovieLens release, from the zip or from a folder, found by base name."""

    def __init__(self, path):
        self.path = Path(path)
        if self.path.is_dir():
            self._zip = None
            names = [str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file()]
        else:
            check_input_file(self.path, "--input")
            self._zip = self._open_zip()
            names = [n for n in self._zip.namelist() if not n.endswith("/")]
        self._members = {}
        for name in sorted(names, key=lambda n: (n.count("/"), n)):  # the shallowest copy wins
            self._members.setdefault(name.rsplit("/", 1)[-1], name)

    def _open_zip(self):
        kind = compression_of(self.path)
        try:
            return zipfile.ZipFile(self.path)
        except zipfile.BadZipFile as error:
            if kind == "zip":
                raise InputError(self.path, f"is a damaged zip file ({error})") from None
            what = f"{kind}-compressed" if kind else "neither a zip file nor a folder"
            raise InputError(self.path, f"is {what}; give the release zip as downloaded or its extracted folder") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._zip is not None:
            self._zip.close()

    def has(self, base_name):
        return base_name in self._members

    def lines(self, base_name):
        """``(line_number, line)`` of a member, decoded as UTF-8 or latin-1 (see decode_bytes)."""
        member = self._members[base_name]
        if self._zip is None:
            data = (self.path / member).read_bytes()
        else:
            try:
                data = self._zip.read(member)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:  # truncated or damaged member
                raise InputError(f"{self.path} ({member})", f"damaged zip member: {error}") from None
        text, _ = decode_bytes(data)
        return text_lines(text)


def split_title(raw_title):
    """``'Toy Story (1995)'`` -> ``('Toy Story', '1995')``; a title without a year keeps it empty."""
    title = clean_text(raw_title)
    match = _TITLE_YEAR.match(title)
    return (match.group(1), match.group(2)) if match else (title, "")


def _fields(line, separator, count, file, line_number, errors, at_least=False):
    """The ``separator``-split fields of a line, or None (and the line counted as malformed)."""
    parts = line.split(separator)
    wrong = len(parts) < count if at_least else len(parts) != count
    if wrong:
        errors.add(file, line_number, f"expected {count} fields separated by {separator!r}, got {len(parts)}")
        return None
    return parts


def _add_once(rows, key, value, file, line_number, errors):
    """``rows[key] = value`` unless the id came earlier in the file: then the line counts as malformed."""
    if key in rows:
        errors.add(file, line_number, f"id {key} listed before; the first row is kept")
    else:
        rows[key] = value


def drop_duplicates(ratings, choice):
    """Identical rating lines (same user, movie, rating and time) once (``drop``) or as they are (``keep``).

    Returns the ratings and how many lines repeat an earlier one.
    """
    unique = list(dict.fromkeys(ratings))
    return (unique if choice == "drop" else ratings), len(ratings) - len(unique)


def read_ratings(release, file, separator, errors):
    """``[(user, item, rating, timestamp)]`` as strings; ids must be integers, the rest numbers."""
    ratings = []
    for line_number, line in release.lines(file):
        parts = _fields(line.strip(), separator, 4, file, line_number, errors)
        if parts is None:
            continue
        try:
            user, item = str(int(parts[0])), str(int(parts[1]))
            rating, timestamp = number(parts[2]), number(parts[3])
        except ValueError as error:
            errors.add(file, line_number, f"not a number ({error})")
            continue
        ratings.append((user, item, rating, timestamp))
    return ratings


def read_movies_1m(release, errors):
    """``{item_id: (title, year, genres)}`` from movies.dat (``MovieID::Title::Genre|Genre``)."""
    movies = {}
    for line_number, line in release.lines("movies.dat"):
        parts = _fields(line, "::", 3, "movies.dat", line_number, errors, at_least=True)
        if parts is None:
            continue
        if not id_number(parts[0]):
            errors.add("movies.dat", line_number, f"movie id {parts[0]!r} is not an integer")
            continue
        title, year = split_title("::".join(parts[1:-1]))
        genres = [label_token(g) for g in parts[-1].split("|") if g.strip() and g.strip() != NO_GENRES]
        _add_once(movies, str(int(parts[0])), (title, year, genres), "movies.dat", line_number, errors)
    return movies


def read_movies_100k(release, errors):
    """``{item_id: (title, year, genres)}`` from u.item (id|title|date|video date|url|19 genre flags)."""
    genres_names = ML100K_GENRES
    if release.has("u.genre"):
        pairs = [line.rsplit("|", 1) for _, line in release.lines("u.genre")]
        genres_names = [name for name, _ in sorted((p for p in pairs if len(p) == 2), key=lambda p: int(p[1]))]
    movies = {}
    n = len(genres_names)
    for line_number, line in release.lines("u.item"):
        parts = _fields(line, "|", n + 5, "u.item", line_number, errors, at_least=True)
        if parts is None:
            continue
        flags = parts[-n:]
        if not id_number(parts[0]) or any(flag.strip() not in ("0", "1") for flag in flags):
            errors.add("u.item", line_number, "movie id is not an integer or a genre flag is not 0/1")
            continue
        title, year = split_title("|".join(parts[1 : -n - 3]))
        release_date = parts[-n - 3].strip()  # e.g. 01-Jan-1995, used when the title has no year
        year = year or (release_date[-4:] if release_date[-4:].isdigit() else "")
        genres = [label_token(g) for g, flag in zip(genres_names, flags) if flag.strip() == "1"]
        _add_once(movies, str(int(parts[0])), (title, year, genres), "u.item", line_number, errors)
    return movies


def read_users(release, file, separator, order, errors):
    """``{user_id: (age, gender, occupation, zip_code)}``; ``order`` gives the file's column order."""
    users = {}
    for line_number, line in release.lines(file):
        parts = _fields(line.strip(), separator, 5, file, line_number, errors)
        if parts is None:
            continue
        record = dict(zip(order, (clean_text(p) for p in parts)))
        if not id_number(record["user_id"]):
            errors.add(file, line_number, f"user id {record['user_id']!r} is not an integer")
            continue
        profile = tuple(record[k] for k in ("age", "gender", "occupation", "zip_code"))
        _add_once(users, str(int(record["user_id"])), profile, file, line_number, errors)
    return users


def name_ml1m_codes(users):
    """ml-1m's users.dat stores age and occupation as codes; its README names them."""
    named = {}
    for user, (age, gender, occupation, zip_code) in users.items():
        if occupation.isdigit() and int(occupation) < len(ML1M_OCCUPATIONS):
            occupation = ML1M_OCCUPATIONS[int(occupation)]
        named[user] = (ML1M_AGES.get(age, age), gender, occupation, zip_code)
    return named


def csv_rows(release, file, columns, errors):
    """``(line_number, {column: value})`` of a MovieLens csv file (ml-20m and later), columns found by header name.

    The header must name every one of ``columns``; a row with another number of fields, or an unclosed quote, is
    malformed. Each line is parsed alone (MovieLens never quotes a line break), so a stray quote damages one line only.
    An empty file has no rows.
    """
    lines = release.lines(file)
    header_number, header = next(lines, (0, None))
    if header is None:
        return
    names = [name.strip() for name in _csv_fields(header.lstrip("\ufeff").removeprefix("\u00ef\u00bb\u00bf")) or []]
    absent = [c for c in columns if c not in names]
    if absent:
        raise InputError(f"{release.path} ({file})", f"line {header_number}: the header lacks {', '.join(absent)}; "
                                f"expected {','.join(columns)}")
    for line_number, line in lines:
        fields = _csv_fields(line)
        if fields is None:
            errors.add(file, line_number, "unclosed quote")
        elif len(fields) != len(names):
            errors.add(file, line_number, f"expected {len(names)} comma-separated fields, got {len(fields)}")
        else:
            yield line_number, dict(zip(names, fields))


def _csv_fields(line):
    """The fields of one csv line, or None when a quote is left open."""
    try:
        return next(csv.reader([line], strict=True))
    except csv.Error:
        return None


def read_ratings_csv(release, errors):
    """``[(user, item, rating, timestamp)]`` from ratings.csv (``userId,movieId,rating,timestamp``)."""
    ratings = []
    for line_number, row in csv_rows(release, "ratings.csv", ("userId", "movieId", "rating", "timestamp"), errors):
        try:
            ratings.append((str(int(row["userId"])), str(int(row["movieId"])), number(row["rating"]),
                            number(row["timestamp"])))
        except ValueError as error:
            errors.add("ratings.csv", line_number, f"not a number ({error})")
    return ratings


def read_movies_csv(release, errors):
    """``{item_id: (title, year, genres)}`` from movies.csv (``movieId,title,genres``; titles csv-quoted)."""
    movies = {}
    for line_number, row in csv_rows(release, "movies.csv", ("movieId", "title", "genres"), errors):
        if not id_number(row["movieId"]):
            errors.add("movies.csv", line_number, f"movie id {row['movieId']!r} is not an integer")
            continue
        title, year = split_title(row["title"])
        genres = [label_token(g) for g in row["genres"].split("|") if g.strip() and g != NO_GENRES]
        _add_once(movies, str(int(row["movieId"])), (title, year, genres), "movies.csv", line_number, errors)
    return movies


def read_links(release, errors):
    """``{item_id: {"imdb": id, "tmdb": id}}`` from links.csv (ml-20m and later), ids without leading zeros or
    ``tt``; empty when the release has no links file. Posters named by IMDb or TMDb id are matched through it."""
    if not release.has("links.csv"):
        return {}
    links = {}
    for line_number, row in csv_rows(release, "links.csv", ("movieId", "imdbId", "tmdbId"), errors):
        if not id_number(row["movieId"]):
            errors.add("links.csv", line_number, f"movie id {row['movieId']!r} is not an integer")
            continue
        ids = {"imdb": id_number(row["imdbId"], "tt"), "tmdb": id_number(row["tmdbId"])}
        _add_once(links, str(int(row["movieId"])), {k: v for k, v in ids.items() if v}, "links.csv", line_number, errors)
    return links


def id_number(value, prefix=""):
    """The number an id names, leading zeros and ``prefix`` (IMDb's ``tt``) ignored: ``'tt0114709'`` -> ``'114709'``
    (prefix ``tt``), ``'0001'`` -> ``'1'``; ``''`` when it is no such number."""
    text = value.strip().lower()
    text = text.removeprefix(prefix) if prefix else text
    return str(int(text)) if text.isascii() and text.isdecimal() else ""


def match_posters(rated_items, links, posters, key):
    """``({item_id: poster path}, key, {key: movies matched})``: each rated movie's poster, by the file name's id.

    ``posters`` maps file stems to paths. ``movie``: ``<MovieID>.jpg``; ``imdb``: ``<IMDb id>.jpg`` (``tt`` optional);
    ``tmdb``: ``<TMDb id>.jpg``, the ids from links.csv; leading zeros are ignored. ``auto``: the key that matches the
    most rated movies, MovieID on a tie, so a poster folder of any of the three sources is read without a flag.
    """
    by_id = {k: {} for k in ("movie", "imdb")}
    for stem, path in posters.items():  # sorted stems: of 1.jpg and 01.png the first is kept
        by_id["movie"].setdefault(id_number(stem), path)
        by_id["imdb"].setdefault(id_number(stem, "tt"), path)
    by_id["tmdb"] = by_id["movie"]

    def matched(k):
        ids = {item: item if k == "movie" else links.get(item, {}).get(k) for item in rated_items}
        return {item: by_id[k][i] for item, i in ids.items() if i and i in by_id[k]}

    keys = [key] if key != "auto" else ["movie", "imdb", "tmdb"] if links else ["movie"]
    found = {k: matched(k) for k in keys}
    best = max(keys, key=lambda k: len(found[k]))  # the first of equals: MovieID
    return found[best], best, {k: len(v) for k, v in found.items()}


def read_release(release, errors):
    """Ratings, movies and users (``None`` when the release has no user file) of any layout."""
    if release.has("ratings.csv"):  # ml-20m, ml-25m, ml-32m, ml-latest(-small): no user file
        return read_ratings_csv(release, errors), read_movies_csv(release, errors) if release.has("movies.csv") else {}, None
    if release.has("ratings.dat"):  # ml-1m; ml-10m has no users.dat
        ratings = read_ratings(release, "ratings.dat", "::", errors)
        movies = read_movies_1m(release, errors) if release.has("movies.dat") else {}
        order = ("user_id", "gender", "age", "occupation", "zip_code")
        users = (
            name_ml1m_codes(read_users(release, "users.dat", "::", order, errors)) if release.has("users.dat") else None
        )
    elif release.has("u.data"):
        ratings = read_ratings(release, "u.data", "\t", errors)
        movies = read_movies_100k(release, errors) if release.has("u.item") else {}
        order = ("user_id", "age", "gender", "occupation", "zip_code")
        users = read_users(release, "u.user", "|", order, errors) if release.has("u.user") else None
    else:
        raise InputError(release.path, "holds no ratings.csv (ml-20m and later), ratings.dat (ml-1m, ml-10m) or "
                                              "u.data (ml-100k) (--input)")
    return ratings, movies, users


def convert(args, build):
    errors = LineErrors()
    with Release(args.input) as release:
        ratings, movies, users = read_release(release, errors)
        links = read_links(release, errors)
    errors.report()
    if not ratings:
        raise InputError(args.input, "holds no valid rating line (--input)")
    ratings, duplicates = drop_duplicates(ratings, args.duplicates)

    # ids are integers (read_ratings); same-second ratings in seeded-hash order, not by MovieID (tie_key)
    ratings.sort(key=lambda r: (int(r[0]), float(r[3]), tie_key(args.tie_seed, r[0], r[1])))
    rated_items = sorted({r[1] for r in ratings}, key=int)
    rated_users = sorted({r[0] for r in ratings}, key=int)

    if args.image_key in ("imdb", "tmdb") and not links:
        raise InputError(args.input, f"has no links.csv, which --image-key {args.image_key} needs")
    posters = find_images(args.images)
    sources, image_key, counts = match_posters(rated_items, links, posters, args.image_key)
    if args.images:
        others = ", ".join(f"{IMAGE_KEYS[k]}: {n:,}" for k, n in counts.items() if k != image_key)
        unused = len(set(posters.values()) - set(sources.values()))
        print(f"posters: {len(sources):,} of {len(rated_items):,} rated movies, matched by {IMAGE_KEYS[image_key]}"
              + (f" (by {others}; --image-key chooses)" if others else "")
              + (f"; {unused:,} poster files name no rated movie" if unused else ""))
    images, missing = normalise_images(sources, build.dir / "images")
    for item in rated_items:
        if item not in images and item not in missing:
            missing[item] = f"no poster named by its {IMAGE_KEYS[image_key]} in --images" if args.images else "no --images folder given"

    name = build.name
    write_atomic_file(build.dir / f"{name}.inter", INTER_FIELDS, ratings)
    no_movie = ("", "", [])
    item_rows = []
    for item in rated_items:
        title, year, genres = movies.get(item, no_movie)
        item_rows.append((item, title, year, " ".join(genres), images.get(item, "")))
    write_atomic_file(build.dir / f"{name}.item", ITEM_FIELDS, item_rows)
    if users is not None:
        no_user = ("", "", "", "")
        user_rows = [(user, *users.get(user, no_user)) for user in rated_users]
        write_atomic_file(build.dir / f"{name}.user", USER_FIELDS, user_rows)
    else:
        (build.dir / f"{name}.user").unlink(missing_ok=True)
    write_missing_images(build.dir / "missing_images.txt", missing)

    item_images = {i: images.get(i, "") for i in rated_items}
    stats = dataset_stats(name, (r[0] for r in ratings), (r[1] for r in ratings), item_images, missing, errors)
    stats.update(
        source_movies=len(movies),
        source_users=len(users) if users is not None else None,
        rated_items_missing_from_movies=sum(1 for item in rated_items if item not in movies),
        users_missing_from_users_file=sum(1 for u in rated_users if u not in users) if users is not None else None,
        duplicates=duplicates,
        duplicates_choice=args.duplicates,
        tie_seed=args.tie_seed,
        image_key=image_key if args.images else None,
    )
    stats["dropped"] = row_counts(
        malformed_lines=errors.total,
        movies_never_rated=len(set(movies) - set(rated_items)),
        users_without_ratings=len(set(users or ()) - set(rated_users)),
    )
    stats["orphaned"] = row_counts(
        rated_movies_missing_from_the_movies_file=stats["rated_items_missing_from_movies"],
        rating_users_missing_from_the_users_file=stats["users_missing_from_users_file"] or 0,
    )
    files = {"inter": INTER_FIELDS, "item": ITEM_FIELDS, **({"user": USER_FIELDS} if users is not None else {})}
    write_dataset_yaml(build, "movielens.py", "MovieLens ratings with titles, years, genres and posters.", files,
                              "genres", stats)
    return stats


def parse_args(argv=None):
    images_help = "folder of posters named <MovieID>.jpg, or by IMDb/TMDb id (--image-key), any common image format"
    parser = argument_parser(__doc__, "ml-1m-mm", images_help)
    parser.add_argument(
        "--input", required=True, type=Path,
        help="a MovieLens release zip as downloaded (ml-100k, ml-1m, ml-10m, ml-20m, ml-25m, ml-32m, ml-latest[-small]), "
        "or the extracted folder",
    )
    parser.add_argument(
        "--image-key", choices=["auto", *IMAGE_KEYS], default="auto",
        help="what the poster files are named by: " + "; ".join(f"{k}: {v}" for k, v in IMAGE_KEYS.items())
        + "; auto: whichever matches the most rated movies",
    )
    return parser.parse_args(argv)


def main(argv=None):
    """Build the dataset (or find it up to date); returns the statistics, ``rebuilt`` among them.

    A missing, unreadable or damaged input ends in one line ``error: <file>: <problem>`` and exit status 2.
    """
    return run_main(_main, argv)


def _main(argv):
    args = parse_args(argv)
    if not args.input.is_dir():
        check_input_file(args.input, "--input")
    return run_script(args, [args.input, args.images], __file__, convert)


if __name__ == "__main__":
    main()
