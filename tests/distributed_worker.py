"""Run by ``tests/test_distributed.py`` under ``torchrun --nproc_per_node=2`` (gloo on CPU): trains and tests through
``quick_start.run`` and writes, from rank 0, what every rank ended with.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/distributed_worker.py DATA LLM OUT.json
"""

import json
import sys

import torch

import recbole_mllm.quick_start as quick_start
from recbole_mllm import distributed
from tests.conftest import TINY_MODEL, tiny_loading

TINY = {**tiny_loading(), **TINY_MODEL, "train_batch_size": 64}


def checksums(model):
    """Per trained parameter, a float that differs when the tensors differ."""
    return {name: float((p.detach().double() * torch.arange(1, p.numel() + 1).view_as(p)).sum())
            for name, p in model.named_parameters() if p.requires_grad}


def capture_after_fit(trained):
    """``quick_start``'s trainers, each recording its model's checksums when ``fit`` returns (before the best
    checkpoint, which rank 0 wrote, is loaded on every rank)."""
    get_trainer = quick_start.get_trainer

    def trainer_class(*args):
        cls = get_trainer(*args)

        def make(config, model):
            trainer = cls(config, model)
            fit = trainer.fit

            def fit_and_record(*fit_args, **fit_kwargs):
                out = fit(*fit_args, **fit_kwargs)
                trained.append(checksums(model))
                return out

            trainer.fit = fit_and_record
            return trainer

        return make

    quick_start.get_trainer = trainer_class


def main(data, llm, out):
    trained = []
    capture_after_fit(trained)
    runs = {
        "untrained": ("SASRec", {"epochs": 0}),
        "sasrec": ("SASRec", {"epochs": 3}),
        "mllmsrec": ("MLLMSRec", {
            "epochs": 1, "encoder_warmup_epochs": 1, "encoder_warmup_stopping_step": 0, "encoder_warmup_cache": False,
            "mllm": llm, "item_text_fields": ["title", "genres"], "item_title_field": "title",
            "item_category_field": "genres", "item_image_field": None, "stage_batch_size": 8,
            "item_fusion_max_new_tokens": 6, "user_summary_max_new_tokens": 6, "user_window_size": 4,
            "user_window_step": 4, "rerank_top_k": 5, "ranker_train_negatives": 2, "ranker_eval_batch_size": 128,
            "lora_target_modules": ["q_proj", "v_proj"], "ranker_train_candidates": "top_k",
            "encoder_frozen_after_warmup": True, "ranker_residual": True, "ranker_train_batch_size": 4,
            "ranker_scoring": "pointwise", "late_fusion_grid": None}),  # the residual gate is pointwise only
    }
    results = {}
    for name, (model, keys) in runs.items():
        config = {**TINY, **keys, "data_path": data, "checkpoint_dir": f"{out}.{name}.ck", "stage_cache_dir": f"{out}.cache"}
        record = quick_start.run(model, "tiny", config_dict=config)
        per_rank = distributed.gather(trained[-1])
        results[name] = {"test_result": {p: {k: float(v) for k, v in m.items()} for p, m in record["test_result"].items()},
                         "fingerprints": record["fingerprints"],
                         "users": {p: record["per_user"][p]["user_id"].tolist() for p in record["per_user"]},
                         "checksums": per_rank, "world_size": record["config"]["world_size"]}
    if distributed.is_main():
        with open(out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
