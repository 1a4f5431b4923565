"""One run on disk: ``record.json`` (what the tables need) and ``per_user.npz`` (the per-user data).

So runs made by separate processes (one GPU job per model and seed) can be compared afterwards.
``per_user.npz`` holds one array per ``<part>/<protocol>/<field>``, ``part`` being ``per_user``,
``first_stage_per_user``, ``llm_alone_per_user`` or ``chosen_weight_per_user``. Both files are written atomically,
``record.json`` last: a folder with a ``record.json`` holds a whole record.
"""

import io
import json
from pathlib import Path

import numpy as np

from recbole_mllm.comparison.metrics import as_numpy
from recbole_mllm.evaluation import keeps_first_stage
from recbole_mllm.fileio import atomic_write

_ARRAY_PARTS = ("per_user", "first_stage_per_user", "llm_alone_per_user", "chosen_weight_per_user")
_COPIES = {"llm_alone_per_user": ("per_user",), "chosen_weight_per_user": ("per_user", "llm_alone_per_user")}
"""Parts that may be another part's data (the same objects: with_llm_alone, with_chosen_weight), saved once."""
_DERIVED = ("fallback_result", "fallback_per_user")  # rebuilt from the saved parts: with_first_stage_fallback
_NOT_SAVED = (*_ARRAY_PARTS, *_DERIVED, "config")


def _plain(value):
    """JSON for numpy scalars and arrays or torch tensors that arrive in a result."""
    return as_numpy(value).tolist()


def save_record(result, folder):
    """Write ``result`` (a ``quick_start.run`` dict) under ``folder``; the config is reduced to ``valid_metric``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {f"{part}/{protocol}/{field}": as_numpy(values)
              for part in _ARRAY_PARTS for protocol, fields in result.get(part, {}).items()
              if not any(fields is result.get(other, {}).get(protocol) for other in _COPIES.get(part, ()))  # rebuilt
              for field, values in fields.items()}
    if arrays:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        atomic_write(folder / "per_user.npz", buffer.getvalue())
    record = {key: value for key, value in result.items() if key not in _NOT_SAVED}
    if result.get("config") is not None:
        record["valid_metric"] = str(result["config"]["valid_metric"]).lower()
    atomic_write(folder / "record.json", json.dumps(record, indent=1, default=_plain).encode())


def _share_parts(record, parts, source):
    """Fill ``record``'s ``parts`` (result, per-user) per protocol with ``source``'s (the same objects, saved once)."""
    for part, tested in zip(parts, source):
        for protocol, value in record.get(tested, {}).items():
            record.setdefault(part, {}).setdefault(protocol, value)
    return record


def with_llm_alone(record):
    """``record`` with its ``(LLM alone)`` parts when its late fusion chose weight 0: the test then scored the LLM alone,
    so the test result and per-user data are that row too (no second pass ran, and records written before this was
    recorded lack the parts). Only beside a first stage (``report_first_stage``), where every other weight also gets
    the row: otherwise the seeds that chose 0 alone would make it up. A run whose fusion kept the first stage
    (``first_stage_fallback_alpha``) tested the first stage and ran the LLM-alone pass itself. Returns ``record``,
    completed in place."""
    selection = record.get("late_fusion_selection") or {}
    if selection.get("chosen") != 0 or selection.get("first_stage") or "first_stage_result" not in record:
        return record
    return _share_parts(record, ("llm_alone_result", "llm_alone_per_user"), ("test_result", "per_user"))


def with_chosen_weight(record):
    """``record`` with its ``(chosen weight)`` parts, the test at the late-fusion weight validation chose, for runs made
    with ``first_stage_fallback_alpha``: where the fallback kept the first stage the trainer scored that weight beside
    it (``chosen_weight_result``); elsewhere the test is that weight's, so every seed has the row. Returns ``record``,
    completed in place."""
    selection = record.get("late_fusion_selection") or {}
    if selection.get("first_stage_fallback_alpha") is None:
        return record
    if not selection.get("first_stage"):
        source = ("test_result", "per_user")
    elif selection.get("chosen") == 0:  # weight 0 is the LLM alone, scored as that
        source = ("llm_alone_result", "llm_alone_per_user")
    else:
        return record
    return _share_parts(record, ("chosen_weight_result", "chosen_weight_per_user"), source)


def falls_back(selection, alpha):
    """Whether ``first_stage_fallback_alpha = alpha`` keeps the first stage for a recorded late-fusion choice: its p
    over the first stage is at or above ``alpha``, or the chosen weight's validation score is not above the first
    stage's (the rule of ``MLLMSRecTrainer.select_fusion_weight``, on the scores as the record rounds them)."""
    chosen = selection["valid_scores"][selection["weights"].index(selection["chosen"])]
    return keeps_first_stage(selection["p_over_first_stage"], alpha, chosen, selection["first_stage_valid_score"])


def with_first_stage_fallback(record, alpha):
    """``record`` with the test ``first_stage_fallback_alpha = alpha`` would have given it (``fallback_result``,
    ``fallback_per_user``): the first stage's where :func:`falls_back`, the run's own test elsewhere. Only for runs
    that recorded their first stage on validation (``p_over_first_stage``) and on the test; a run that kept its first
    stage under another alpha and would not here takes the weight it set aside (``chosen_weight_result``), and gets no
    row where that was not scored (runs before it was). Returns ``record``, completed in place."""
    selection = record.get("late_fusion_selection") or {}
    if selection.get("p_over_first_stage") is None or "first_stage_result" not in record:
        return record
    first_stage = falls_back(selection, alpha)
    if first_stage:
        parts = ("first_stage_result", "first_stage_per_user")
    elif selection.get("first_stage"):
        if "chosen_weight_result" not in record:
            return record
        parts = ("chosen_weight_result", "chosen_weight_per_user")
    else:
        parts = ("test_result", "per_user")
    record["fallback_result"], record["fallback_per_user"] = record[parts[0]], record.get(parts[1], {})
    return record


def load_record(folder):
    """Read back what ``save_record`` wrote: the result dict without its config, arrays as numpy (and the LLM-alone
    row of a run whose fusion chose weight 0: :func:`with_llm_alone`)."""
    folder = Path(folder)
    record = json.loads((folder / "record.json").read_text(encoding="utf-8"))
    if (folder / "per_user.npz").is_file():
        with np.load(folder / "per_user.npz") as arrays:
            for key in arrays.files:
                part, rest = key.split("/", 1)
                protocol, field = rest.rsplit("/", 1)
                record.setdefault(part, {}).setdefault(protocol, {})[field] = arrays[key]
    return with_chosen_weight(with_llm_alone(record))


def find_records(paths, skip=None):
    """Every folder holding a ``record.json`` at or below each of ``paths``, each once.

    ``skip``: a folder whose records are left out unless a path lies at or inside it (the comparison's own
    ``<output>/runs`` copies, so rerunning ``... outputs/ml-100k-* --output=outputs/ml-100k-comparison`` does not read
    every run twice); a path holding nothing but those is passed over. Raises ``FileNotFoundError`` naming the first
    path below which there is none.
    """
    skip = Path(skip).resolve() if skip is not None else None
    folders = []
    for path in map(Path, paths):
        found = sorted(file.parent.resolve() for file in path.rglob("record.json"))
        if skip is not None and not path.resolve().is_relative_to(skip):
            kept = [folder for folder in found if not folder.is_relative_to(skip)]
            if found and not kept:
                continue  # the output folder itself, matched by the same pattern as the runs
            found = kept
        if not found:
            raise FileNotFoundError(f"no run record (record.json) in {path}")
        folders += found
    if not folders:
        raise FileNotFoundError(f"no run record (record.json) in {', '.join(map(str, paths))} outside {skip}")
    return list(dict.fromkeys(folders))
