"""Helpers of the user stage tests: a prompt-echoing backend and a toy dataset folder."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from stage_doubles import FakeBackend

from recbole_mllm.stages.item_fusion import run_item_fusion

ITEM_LINE = re.compile(r"^\d+\. [^:\n]*: Title: ([^.;\n]+)", re.MULTILINE)
T0 = 978_300_760.0  # 2000-12-31, the first ML-1M rating


def shown_items(prompt: str) -> list:
    """The item titles of a window prompt, in order (the toy items' title is their token)."""
    return ITEM_LINE.findall(prompt)


class EchoBackend(FakeBackend):
    """A deterministic stand-in for an LLM whose 'summary' is a hash of the whole prompt plus the items
    it was shown: any change of anything a summary reads changes it, and it changes nothing else."""

    def generate(self, requests, config=None, progress=False):
        if self.generate_calls == self.fail_after:
            raise RuntimeError("simulated interruption")
        self.generate_calls += 1
        self.requests.extend(requests)
        return [f"{hashlib.sha256((r.system or '').encode() + r.prompt.encode()).hexdigest()[:12]} "
                f"saw {','.join(shown_items(r.prompt))}" for r in requests]


def write_items(folder: Path, name: str, tokens) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["item_id:token\ttitle:token_seq\tgenres:token_seq"] + [f"{t}\t{t}\tDrama" for t in tokens]
    (folder / f"{name}.item").write_text("\n".join(lines) + "\n", encoding="utf-8")


def toy_config(root: Path, name: str = "toy", **overrides) -> dict:
    """A plain config dict for a dataset folder ``root/name`` and caches under ``root/cache``."""
    return {"dataset": name, "data_path": str(root / name), "stage_cache_dir": str(root / "cache"),
            "item_image_field": None, "stage_batch_size": 4, "user_shard_size": 2,
            "user_summary_max_new_tokens": 8, "item_fusion_max_new_tokens": 4, **overrides}


def build_items(config: dict, backend) -> None:
    run_item_fusion(config, backend, progress=False)
