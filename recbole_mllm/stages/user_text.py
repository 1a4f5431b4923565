"""Users and times as a language model reads them: profile sentences and dates, gaps, ages of summaries.

The user stage writes these into its prompts, and the ranker's prompt can use the same words.
Changing a rule here changes prompts: bump ``USER_TEXT_FORMAT`` (it is part of the user stage's
cache manifest, like the template hash).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Iterable, Mapping, Sequence

import numpy as np

from recbole_mllm.stages.common import RECBOLE_DATASET_DEFAULTS, config_value, dataset_location
from recbole_mllm.stages.items import AtomicTable, read_atomic_file

USER_TEXT_FORMAT = 1
"""Version of the rules of this module (in the user stage's manifest)."""

TIME_FORMATS = ("unix_s", "unix_ms", "none")

PROFILE_DEFAULTS = {
    "user_profile_fields": None,
    **{key: RECBOLE_DATASET_DEFAULTS[key] for key in ("USER_ID_FIELD", "field_separator", "encoding")},
}
"""Config keys :func:`user_profiles` reads (``user_profile_fields``: None means every field but the id)."""


def _get(config: Mapping, key: str):
    return config_value(config, key, PROFILE_DEFAULTS, {"user_profile_fields"})


_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven")


def _amount(n: int, unit: str) -> str:
    if n == 1:
        return f"{'an' if unit[0] in 'aeioh' else 'a'} {unit}"
    return f"{_NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) else n} {unit}s"


def duration_words(seconds: float) -> str:
    """A time span as words, rounded down: ``less than an hour``, ``a day``, ``two weeks``, ``five months``."""
    seconds = max(0.0, seconds)
    if seconds < 3600:
        return "less than an hour"
    if seconds < 86400:
        return _amount(int(seconds // 3600), "hour")
    days = seconds / 86400
    if days < 7:
        return _amount(int(days), "day")
    if days < 30.44:
        return _amount(int(days // 7), "week")
    if days < 365.25:
        return _amount(int(days // 30.44), "month")
    return _amount(int(days // 365.25), "year")


def month_year(seconds: float) -> str:
    """``March 2001`` (UTC) for a Unix time in seconds."""
    date = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return f"{_MONTHS[date.month - 1]} {date.year}"


class Clock:
    """Time phrases for positions of one history; every phrase reads only the positions it is given.

    ``unix_s`` / ``unix_ms``: dates (``March 2001``) and gaps (``two weeks later``); ``none``: positions.
    """

    def __init__(self, time_format: str):
        if time_format not in TIME_FORMATS:
            raise ValueError(f"user_time_format must be one of {TIME_FORMATS}; got {time_format!r}")
        self.format = time_format
        self.scale = 1000.0 if time_format == "unix_ms" else 1.0

    def check(self, timestamps: Iterable[float]) -> None:
        """Dates need Unix times between 1970 and 2100; anything else is a configuration error."""
        if self.format == "none":
            return
        values = np.fromiter(timestamps, dtype=np.float64) / self.scale
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() < 4102444800):
            raise ValueError(f"timestamps from {values.min()} to {values.max()} are not Unix {self.format[5:]}: set "
                             f"user_time_format (unix_s, unix_ms, none) and keep RecBole from normalising the time "
                             f"field (normalize_all: False)")

    def when(self, ts: Sequence[float], p: int) -> str:
        """Position ``p``: its month and its gap to position ``p - 1``."""
        if self.format == "none":
            return f"interaction {p + 1}"
        gap = "first interaction" if p == 0 else f"{duration_words((ts[p] - ts[p - 1]) / self.scale)} later"
        return f"{month_year(ts[p] / self.scale)}, {gap}"

    def span(self, ts: Sequence[float], lo: int, hi: int) -> str:
        """Positions [lo, hi) as ``from March 2001 to May 2001`` (the same month twice if so); ``""`` for positions."""
        if self.format == "none":
            return ""
        return "from {} to {}".format(*self._months(ts, lo, hi))

    def period(self, ts: Sequence[float], lo: int, hi: int) -> str:
        """Positions [lo, hi): ``from March 2001 to May 2001`` or ``in May 2001``."""
        if self.format == "none":
            return f"number {lo + 1} to {hi}"
        first, last = self._months(ts, lo, hi)
        return f"in {first}" if first == last else f"from {first} to {last}"

    def _months(self, ts: Sequence[float], lo: int, hi: int) -> tuple[str, str]:
        """Months of the first and last of positions [lo, hi)."""
        return month_year(ts[lo] / self.scale), month_year(ts[hi - 1] / self.scale)

    def end(self, ts: Sequence[float], hi: int) -> str:
        """Where a summary of positions [.., hi) ends."""
        return f"interaction {hi}" if self.format == "none" else month_year(ts[hi - 1] / self.scale)

    def age(self, ts: Sequence[float], previous_hi: int, hi: int) -> str:
        """How long before the last item of [.., hi) the summary of [.., previous_hi) ends."""
        if self.format == "none":
            return _amount(hi - previous_hi, "interaction")
        return duration_words((ts[hi - 1] - ts[previous_hi - 1]) / self.scale)


ML1M_AGES = {"1": "under 18", "18": "18-24", "25": "25-34", "35": "35-44", "45": "45-49", "50": "50-55", "56": "56+"}
ML1M_OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer", "programmer",
    "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer", "tradesman/craftsman",
    "unemployed", "writer")
"""The codes of MovieLens-1M's users.dat (its README), as RecBole's own ml-1m atomic files keep them."""


def _uses_ml1m_codes(table: AtomicTable) -> bool:
    """Whether ``age`` and ``occupation`` hold ML-1M codes (every value), not ages and names."""
    if not {"age", "occupation"} <= set(table.field_types):
        return False
    ages = {row["age"].strip() for row in table.rows.values()} - {""}
    jobs = {row["occupation"].strip() for row in table.rows.values()} - {""}
    return bool(ages) and ages <= set(ML1M_AGES) and all(j.isdigit() and int(j) < len(ML1M_OCCUPATIONS) for j in jobs)


def _profile_part(label: str, field_name: str, value: str, ml1m_codes: bool) -> str:
    name = field_name.lower()
    if name in ("gender", "sex"):
        return {"m": "male", "f": "female"}.get(value.lower(), value)
    if name == "age":
        return f"aged {ML1M_AGES.get(value, value) if ml1m_codes else value}"
    if name == "occupation" and ml1m_codes:
        value = ML1M_OCCUPATIONS[int(value)]
    return f"{label} {value}"


def user_profiles(config: Mapping) -> dict:
    """``{raw user token: profile sentence}`` from ``<dataset>.user`` (``{}`` when the dataset has none).

    ``aged 25-34, male, occupation programmer, zip code 55455``: fields in the configured order, ``_``
    read as a space, M/F as male/female, ML-1M age and occupation codes named. Users without a row or
    with only empty fields are left out: ``profiles.get(token, "unknown")`` (the stage's prompt says the
    template's ``[no_profile]`` text).
    """
    dataset, folder = dataset_location(config)
    path = folder / f"{dataset}.user"
    if not path.is_file():
        return {}
    table = read_atomic_file(path, _get(config, "USER_ID_FIELD"), _get(config, "field_separator"),
                             _get(config, "encoding"), kind="user", id_key="USER_ID_FIELD")
    fields = _profile_fields(config, table)
    codes = _uses_ml1m_codes(table)
    profiles = {}
    for token, row in table.rows.items():
        values = [(label, name, " ".join(row[name].replace("_", " ").split())) for label, name in fields]
        sentence = ", ".join(_profile_part(label, name, value, codes) for label, name, value in values if value)
        if sentence:
            profiles[token] = sentence
    return profiles


def _profile_fields(config: Mapping, table: AtomicTable) -> list:
    wanted = _get(config, "user_profile_fields")
    if wanted is None:
        pairs = [(f, f) for f in table.field_types if f != table.id_field]
    elif isinstance(wanted, Mapping):
        pairs = [(str(label), str(name)) for label, name in wanted.items()]
    else:
        pairs = [(str(f), str(f)) for f in ([wanted] if isinstance(wanted, str) else wanted)]
    absent = [name for _, name in pairs if name not in table.field_types]
    if absent:
        raise ValueError(f"{table.path} lacks the user profile field(s) {absent} (user_profile_fields); "
                         f"its fields are {list(table.field_types)}")
    return [(label.replace("_", " ") if label == name else label, name) for label, name in pairs]
