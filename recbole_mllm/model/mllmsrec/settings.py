"""MLLMSRec's own settings, read once from RecBole's config and checked together (the shape of peft's ``LoraConfig``).

Each default and its full meaning is declared once, in ``properties/model/MLLMSRec.yaml``; the fields here carry no
defaults, so a key that file stops declaring fails at once instead of falling back to a second, silent default.
Keys RecBole or the shared protocol own (field names, ``hidden_size``, ``mask_history``) are read from the config
where they are used.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

import torch

from recbole_mllm.model.mllmsrec.prompting import OPTION_LETTERS

GPU_RANKER_EVAL_BATCH_SIZE, CPU_RANKER_EVAL_BATCH_SIZE = 512, 32
"""``ranker_eval_batch_size: None`` on a GPU and on a CPU. On a 2-core CPU (float32) a full-ranking test of 79 users x 5
candidates took 135 s and 4.0 GB of RSS in forwards of 512 candidates, 98 s and 1.4 GB in forwards of 32: the
activations of a wide forward outgrow the caches and every one of them is fresh memory (docs/performance.md)."""


def _help(text):
    return field(metadata={"help": text})


SCORING_PROMPTS = {"pointwise": "v2", "listwise": "list_v1"}
"""Values of ``ranker_scoring``, each with its own prompt template: what ``ranker_prompt: None`` means."""

SHUFFLED_LIST_PROMPT = "list_shuffled_v1"
"""``ranker_prompt: None`` of a list-wise ranker whose lists are shuffled: it does not call them the encoder's order."""

LIST_ORDERS = ("encoder", "shuffled")
"""Values of ``ranker_list_order``."""

TRAIN_ROWS = ("all", "trained")
"""Values of ``ranker_train_rows``."""


@dataclass(frozen=True)
class MLLMSRecSettings:
    rerank_top_k: int = _help("the LLM scores an item only within the encoder's catalogue top-K for the user")
    ranker_scoring: str = _help("pointwise (a Yes/No prompt per candidate) or listwise (one lettered list per user)")
    ranker_prompt: Optional[str] = _help("prompt template version or .txt path (None: the scoring's own)")
    ranker_list_order: str = _help("listwise: the listed items in the encoder's order or shuffled (seeded)")
    ranker_train_candidates: str = _help("the LLM's training lists: top_k (as tested) or sampled")
    ranker_train_rows: str = _help("a frozen encoder's joint batches: all rows the LLM may train on, or the trained alone")
    encoder_loss_weight: float = _help("weight of the encoder's cross-entropy in the joint loss (unfrozen encoder)")
    ranker_use_images: bool = _help("target item image as projected visual tokens")
    ranker_use_summaries: bool = _help("temporal preference summary in the prompt")
    ranker_use_soft_tokens: bool = _help("hybrid prompting: user, item and match soft tokens")
    ranker_use_cot: bool = _help("chain-of-thought steps: evolution, target analysis, match")
    ranker_use_rank: bool = _help("the encoder's rank of the target in the prompt")
    ranker_use_recent_states: bool = _help("each recent item's encoder state as a soft token after its title")
    ranker_residual: bool = _help("score = encoder score + learnt gate x LLM log-odds")
    ranker_recent_items: int = _help("recent items named in the prompt and used by the match step")
    ranker_item_summary_tokens: int = _help("fused item summary tokens kept in a candidate's prompt")
    ranker_preference_tokens: int = _help("preference summary tokens kept in a user's prompt")
    ranker_item_text_tokens: int = _help("item description tokens kept in a candidate's prompt")
    ranker_eval_batch_size: Optional[int] = _help("candidates per LLM forward when scoring (None: by device)")
    late_fusion_weight: float = _help("score = LLM + w x encoder score (0: LLM alone)")
    late_fusion_grid: Optional[tuple] = _help("late-fusion weights tried on validation; the best scores the test")
    first_stage_fallback_alpha: Optional[float] = _help("keep the first stage unless the LLM beats it on validation at p < this")
    ranker_train_negatives: int = _help("negatives per positive for the Yes/No fine-tuning")
    ranker_hard_negatives: int = _help("of those, how many come from the encoder's top-K (sampled lists only)")
    lora_rank: int = _help("LoRA rank")
    lora_alpha: int = _help("LoRA alpha")
    lora_dropout: float = _help("LoRA dropout")
    lora_target_modules: tuple = _help("modules of the LLM that get LoRA adapters")
    gradient_checkpointing: bool = _help("recompute the LLM's activations in backward (scores unchanged)")

    @classmethod
    def from_config(cls, config):
        """Every field from ``config`` (a RecBole ``Config`` or a mapping), where the model YAML's default sits."""
        values = {f.name: config[f.name] for f in fields(cls)}
        values["lora_target_modules"] = tuple(values["lora_target_modules"] or ())
        grid = values["late_fusion_grid"]
        values["late_fusion_grid"] = None if grid is None else tuple(grid) if isinstance(grid, (list, tuple)) else (grid,)
        return cls(**values)

    def __post_init__(self):
        if not self.lora_target_modules or not all(isinstance(m, str) for m in self.lora_target_modules):
            raise ValueError(f"lora_target_modules: a list of module names, got {list(self.lora_target_modules)!r}")
        if self.late_fusion_grid is not None and (not self.late_fusion_grid or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in self.late_fusion_grid)):
            raise ValueError(f"late_fusion_grid: a list of weights >= 0 (or ~ for none), got {list(self.late_fusion_grid)!r}")
        alpha = self.first_stage_fallback_alpha
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1):
            raise ValueError(f"first_stage_fallback_alpha: a significance level in (0, 1] (or ~ for none), got {alpha!r}")
        if self.ranker_scoring not in SCORING_PROMPTS:
            raise ValueError(f"ranker_scoring: {self.ranker_scoring!r} is none of {', '.join(SCORING_PROMPTS)}")
        if self.ranker_train_rows not in TRAIN_ROWS:
            raise ValueError(f"ranker_train_rows: {self.ranker_train_rows!r} is none of {', '.join(TRAIN_ROWS)}")
        if self.ranker_list_order not in LIST_ORDERS:
            raise ValueError(f"ranker_list_order: {self.ranker_list_order!r} is none of {', '.join(LIST_ORDERS)}")
        if self.ranker_list_order != "encoder" and self.ranker_scoring != "listwise":
            raise ValueError(f"ranker_list_order: {self.ranker_list_order} orders the list-wise ranker's lists; "
                             f"ranker_scoring: {self.ranker_scoring} has none")
        if self.ranker_scoring == "listwise":
            clashes = {"ranker_residual": self.ranker_residual,
                       "rerank_top_k": not 1 <= self.rerank_top_k <= len(OPTION_LETTERS)}
            if any(clashes.values()):
                raise ValueError(f"ranker_scoring: listwise letters at most {len(OPTION_LETTERS)} items and has no "
                                 f"residual gate; it needs ranker_residual: False and rerank_top_k <= {len(OPTION_LETTERS)} "
                                 f"(got {', '.join(k + ': ' + repr(getattr(self, k)) for k, bad in clashes.items() if bad)})")
            if self.ranker_train_candidates == "sampled" and self.ranker_train_negatives + 1 > self.rerank_top_k:
                raise ValueError(f"ranker_train_candidates: sampled trains the list-wise ranker on lists of the target and "
                                 f"ranker_train_negatives ({self.ranker_train_negatives}) items, longer than the "
                                 f"rerank_top_k ({self.rerank_top_k}) it ranks at test; set ranker_train_negatives <= "
                                 f"{self.rerank_top_k - 1}")
        if self.ranker_hard_negatives > self.ranker_train_negatives:
            raise ValueError(f"ranker_hard_negatives ({self.ranker_hard_negatives}) is more than ranker_train_negatives "
                             f"({self.ranker_train_negatives}), the negatives they are part of")

    def candidates_per_forward(self, device) -> int:
        """``ranker_eval_batch_size``, or when it is None the default of ``device`` (the model's)."""
        if self.ranker_eval_batch_size is not None:
            return int(self.ranker_eval_batch_size)
        return GPU_RANKER_EVAL_BATCH_SIZE if torch.device(device).type == "cuda" else CPU_RANKER_EVAL_BATCH_SIZE

    @property
    def prompt(self) -> str:
        """The ranker's template: ``ranker_prompt``, or when it is None the scoring's own (``SCORING_PROMPTS``: v2 for
        pointwise, list_v1 for listwise; ``SHUFFLED_LIST_PROMPT`` for shuffled lists). The one place ``ranker_prompt:
        None`` is resolved."""
        if self.ranker_prompt is not None:
            return str(self.ranker_prompt)
        return SHUFFLED_LIST_PROMPT if self.ranker_list_order == "shuffled" else SCORING_PROMPTS[self.ranker_scoring]

    @property
    def switches(self):
        """The prompt's ablation switches, in the order checkpoints record them (``inputs_identity``)."""
        return [self.ranker_use_images, self.ranker_use_summaries, self.ranker_use_soft_tokens, self.ranker_use_cot,
                self.ranker_use_rank, self.ranker_residual] + ([True] if self.ranker_use_recent_states else [])
