"""Train and test one model, or several side by side, through the plugin.

Every model (``MLLMSRec`` or a RecBole baseline) goes through the same steps: the plugin ``Config``,
the same dataset files and leave-one-out split, the stage caches the model reads (built or checked
before the model: ``stages.prepare``), the same fixed evaluation candidates, RecBole's trainer loop and
evaluator, and one test per protocol in ``test_protocols``. Unlike
``recbole.quick_start`` this imports no ray and runs no thop pass over the model.
"""

import ctypes
import gc
import hashlib
import os
import time
from contextlib import nullcontext
from datetime import datetime
from logging import getLogger

import numpy as np
import torch
from recbole.utils import init_logger, init_seed, set_color

from recbole_mllm import compat, distributed, phase_timing
from recbole_mllm.attention import use_attention
from recbole_mllm.comparison import default_slices, write_comparison
from recbole_mllm.comparison.records import with_chosen_weight, with_llm_alone
from recbole_mllm.config import Config
from recbole_mllm.data import create_dataset, data_preparation, user_histories
from recbole_mllm.data.utils import parse_protocol
from recbole_mllm.evaluation import PerUserCollector, per_user_record, user_item_statistics
from recbole_mllm.phase_timing import PhaseTimer
from recbole_mllm.search_space import search_space_keys
from recbole_mllm.stages.prepare import prepare_stages, required_stages
from recbole_mllm.train_positions import check_train_positions, trains_on_windows
from recbole_mllm.trainer import check_encoder_freezing
from recbole_mllm.utils import get_model, get_trainer


def protocol_fingerprint(eval_data):
    """Hash of every (user, candidate item) pair an evaluation loader yields, in order, and of the items it masks.

    Two models whose fingerprints match were tested on exactly the same users, targets and candidates, with the same
    items masked (``mask_history``): masked and unmasked full ranking never share a hash. The batches are built here
    in the loader's own order from all of its rows, so a rank of a ``torchrun`` job (whose sampler serves it a share)
    hashes what one process does.
    """
    uid_field, iid_field = eval_data._dataset.uid_field, eval_data._dataset.iid_field
    users, items, targets, masked = [], [], [], []
    rows, step = eval_data.sample_size, max(1, eval_data.step)
    for interaction, history_index, _, positive_i in (eval_data.collate_fn(list(range(start, min(start + step, rows))))
                                                      for start in range(0, rows, step)):
        # full ranking's second part is RecBole's history_index (masked rows, items); a sampled loader's is its row index
        users.append(interaction[uid_field].numpy())
        if iid_field in interaction:
            items.append(interaction[iid_field].numpy())
        targets.append(positive_i.numpy())
        if isinstance(history_index, tuple):  # (row in the batch, item): as (user, item) pairs
            masked.append(np.stack([interaction[uid_field].numpy()[history_index[0].numpy()], history_index[1].numpy()]))
    digest = hashlib.sha256()
    for parts in (users, items, targets):  # whole arrays, so batching does not change the hash
        if parts:
            digest.update(np.concatenate(parts).astype(np.int64).tobytes())
    if masked:
        digest.update(b"masked history")
        digest.update(np.concatenate(masked, axis=1).astype(np.int64).tobytes())
    return digest.hexdigest()[:16]


def release_memory():
    """Free what a finished part of a run held: a run's trainer and model hold each other (optimizer hooks), so only
    the cycle collector frees them; and glibc keeps freed heap memory in the process (on the quick start 2.3 GB of RSS
    after MLLMSRec's run, which SASRec's would have carried, and 1.8 GB after the stages in bfloat16), which
    ``malloc_trim`` hands back where there is glibc."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc (macOS, Windows, musl): nothing to hand back this way
        pass


def check_run_config(config):
    """Refuse what the settings alone make impossible (the test protocols, the model's own keys, training positions,
    encoder freezing) before the dataset loads: seconds, where loading a large dataset or building stages takes
    minutes. ``run`` calls it first; ``split_and_build_model`` again, for callers that start there."""
    model_class = get_model(config["model"])
    for mode in [config["eval_args"]["mode"]["valid"], *(config["test_protocols"] or [])]:
        parse_protocol(mode)
    check_train_positions(model_class, config)
    check_encoder_freezing(config)
    if hasattr(model_class, "check_config"):  # a model's own settings, checked before its stages run
        model_class.check_config(config)
    return model_class


def split_and_build_model(config, dataset):
    """Split ``dataset``, make the stage caches the model reads ready, then build the model (seeded as RecBole
    seeds it): data flows dataset -> stages -> model. Returns ``(model, train_data, valid_data, test_data)``."""
    model_class = check_run_config(config)
    stages = required_stages(model_class, config)
    with phase_timing.phase("split"):
        histories = user_histories(dataset) if stages else None  # the split's build() turns them into training rows
        train_data, valid_data, test_data = data_preparation(config, dataset,
                                                             window_rows=trains_on_windows(model_class, config))
    with phase_timing.phase("stages"):
        prepare_stages(config, stages, histories)  # the model reads stage caches and never builds them
        if stages:
            release_memory()  # what building a stage held (its LLM, its batches) before the model loads its own
    with phase_timing.phase("build_model"):
        model = build_model(config, train_data._dataset, histories)
        use_attention(model, config["transformer_attention"])  # RecBole's transformer layers: eager or fused SDPA
    return model, train_data, valid_data, test_data


def build_model(config, train_dataset, histories=None):
    """``config["model"]`` on ``train_dataset`` (RecBole's training split), seeded as RecBole seeds it, on the config's
    device. A model with a ``prepare`` classmethod (the plugin's: FusedSASRec, MLLMSRec) gets the parts it reads from
    the stage caches prepared first and passed in, so its constructor opens no file; ``histories`` are the un-split
    users' histories (``data.user_histories``) when the caller holds them."""
    model_class = get_model(config["model"])
    init_seed(config["seed"] + distributed.rank_and_world()[0], config["reproducibility"])
    prepare = getattr(model_class, "prepare", None)
    parts = prepare(config, train_dataset, histories) if prepare is not None else {}
    return model_class(config, train_dataset, **parts).to(config["device"])


def run(model, dataset, config_file_list=None, config_dict=None, cmd_args=None, saved=True):
    """Train ``model`` on ``dataset``, select the best epoch on validation, test under every protocol.

    Returns the run record ``recbole_mllm.comparison`` reads: ``model``, ``label`` (its row in the tables:
    ``run_label``, else the model's name), ``dataset``, ``seed``,
    ``best_valid_score`` (None when no epoch was validated, e.g. ``eval_step: 0``), ``best_valid_result``,
    ``test_result`` (protocol -> metrics), ``fingerprints``
    (protocol -> candidate hash), ``per_user`` (protocol -> RecBole's ``rec.topk`` rows with user ids,
    targets and slice features), ``epochs``, ``train_seconds``, ``peak_gpu_memory_gb``, ``phase_seconds`` (wall time
    of each phase of this process: ``phase_timing``), MLLMSRec's
    ``late_fusion_selection`` (with ``late_fusion_grid``),
    ``hyper_parameters`` (the values of the model's tuning-space keys) and the resolved ``config``. A
    model whose trainer also scores its first stage alone (MLLMSRec) adds ``first_stage_result`` and
    ``first_stage_per_user`` from the same checkpoint, and for full ranking ``first_stage_seen_share`` (the share of
    its unmasked top 10 and top 20 that the user had already interacted with) and ``first_stage_recall`` (the share
    of targets in its top ``rerank_top_k``, 50 and 100, the room a larger list would give); under late fusion also
    ``llm_alone_result`` and ``llm_alone_per_user`` (the LLM's score alone; the test's own when validation chose
    weight 0), and with ``first_stage_fallback_alpha`` ``chosen_weight_result`` and ``chosen_weight_per_user`` (the
    weight validation chose; the test's own where that weight ranked it).
    """
    with PhaseTimer().active() as timer:
        return _timed_run(timer, model, dataset, config_file_list, config_dict, cmd_args, saved)


def _timed_run(timer, model, dataset, config_file_list, config_dict, cmd_args, saved):
    """``run``'s work, its phases timed on ``timer`` (``phase_timing``)."""
    run_started = time.perf_counter()
    config = Config(model, dataset, config_file_list, config_dict, cmd_args)
    init_seed(config["seed"], config["reproducibility"])
    with distributed.main_first():  # ./log/<model> is made once
        init_logger(config)
    logger = getLogger()
    logger.info(config)
    check_run_config(config)

    with timer.phase("dataset"):
        dataset = create_dataset(config)
        item_train_count, history_length = user_item_statistics(dataset, config)
    model, train_data, valid_data, test_data = split_and_build_model(config, dataset)
    logger.info(model)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    trainer.eval_collector = collector = PerUserCollector(config)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"]
    )
    train_seconds = time.time() - start
    distributed.barrier()  # rank 0 has written the best checkpoint before any rank reads it

    if saved and os.path.isfile(trainer.saved_model_file):
        checkpoint = compat.load_checkpoint(trainer.saved_model_file, map_location=config["device"])
        model.load_state_dict(checkpoint["state_dict"])
        model.load_other_parameter(checkpoint.get("other_parameter"))
        logger.info(f"Loaded the best model from {trainer.saved_model_file}")

    record = {"test_result": {}, "fingerprints": {}, "per_user": {}}
    fusion_selection = getattr(trainer, "fusion_selection", None)  # MLLMSRec's late_fusion_grid, chosen on validation
    if fusion_selection is not None:
        record["late_fusion_selection"] = fusion_selection
    collector.recording = True
    reuse = getattr(model, "reuse_llm_scores", nullcontext)  # MLLMSRec: an item scored once per user and position
    with reuse(), timer.phase("test"):
        for protocol, loader in test_data.items():
            collector.evaluations.clear()
            record["test_result"][protocol] = dict(trainer.evaluate(loader, load_best_model=False,
                                                                    show_progress=config["show_progress"]))
            record["fingerprints"][protocol] = protocol_fingerprint(loader)
            record["per_user"][protocol] = per_user_record(collector.evaluations[0], item_train_count, history_length)
            logger.info(set_color(f"test result [{protocol}]", "yellow") + f": {record['test_result'][protocol]}")
            passes = iter(collector.evaluations[1:])  # the trainer's further passes, in its order
            first_stage = getattr(trainer, "last_first_stage_result", None)  # MLLMSRecTrainer: the same checkpoint,
            if first_stage is not None:                                        # scored by its first stage alone
                record.setdefault("first_stage_result", {})[protocol] = dict(first_stage)
                # under the first-stage fallback the test pass was the first stage's and is not run twice
                first_stage_pass = collector.evaluations[0] if trainer.last_first_stage_is_test else next(passes)
                record.setdefault("first_stage_per_user", {})[protocol] = per_user_record(
                    first_stage_pass, item_train_count, history_length)
            chosen = getattr(trainer, "last_chosen_weight_result", None)  # the first stage ranked: the weight set aside
            if chosen is not None:
                record.setdefault("chosen_weight_result", {})[protocol] = dict(chosen)
                record.setdefault("chosen_weight_per_user", {})[protocol] = per_user_record(
                    next(passes), item_train_count, history_length)
            llm_alone = getattr(trainer, "last_llm_alone_result", None)  # under late fusion: the LLM's score alone
            if llm_alone is not None:
                record.setdefault("llm_alone_result", {})[protocol] = dict(llm_alone)
                record.setdefault("llm_alone_per_user", {})[protocol] = per_user_record(
                    collector.evaluations[-1], item_train_count, history_length)
            seen_share = getattr(trainer, "last_first_stage_seen_share", None)  # full ranking: seen items in its top-k
            if seen_share is not None:
                record.setdefault("first_stage_seen_share", {})[protocol] = dict(seen_share)
            recall = getattr(trainer, "last_first_stage_recall", None)  # full ranking: targets in its top 20, 50, 100
            if recall is not None:
                record.setdefault("first_stage_recall", {})[protocol] = dict(recall)
    collector.recording = False
    with_llm_alone(record)  # late fusion that chose weight 0 tested the LLM alone: that row is the test's
    with_chosen_weight(record)  # where the fallback let the chosen weight rank, the test is that row
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    record["phase_seconds"] = timer.account(time.perf_counter() - run_started)
    logger.info(set_color("phase seconds", "blue") + f": {phase_timing.describe(record['phase_seconds'])}")

    return {
        "model": config["model"],
        "label": config["run_label"] or config["model"],
        "dataset": config["dataset"],
        "seed": config["seed"],
        "hyper_parameters": {key: config[key] for key in search_space_keys(config["model"])},
        **record,
        "valid_metric": config["valid_metric"].lower(),
        "valid_metric_bigger": config["valid_metric_bigger"],
        "best_valid_score": best_valid_score if best_valid_result is not None else None,  # None: never validated
        "best_valid_result": dict(best_valid_result or {}),
        "epochs": len(trainer.train_loss_dict),
        "train_seconds": train_seconds,
        "peak_gpu_memory_gb": peak_gb,
        "config": config,
    }


def run_comparison(models, dataset, config_file_list=None, config_dict=None, cmd_args=None, saved=True, seeds=None):
    """Run each model in ``models`` on ``dataset`` (once per seed in ``seeds``) and write the comparison.

    Every run shares the split and, per seed, the candidates (the seed also fixes the sampled ones).
    Returns ``(results, output_dir)``; ``output_dir`` holds ``comparison.md``, ``.csv`` and ``.png``, the
    slices and every run's record (``recbole_mllm.comparison``).
    """
    if seeds and any(arg.startswith("--seed=") for arg in cmd_args or []):
        raise ValueError("give either --seed or --seeds, not both")
    seed_dicts = [{"seed": seed} for seed in seeds] if seeds else [{}]
    if len(models) > 1:  # every model's settings before the first one trains: a mistake in the last must not wait
        for m in models:
            check_run_config(Config(m, dataset, config_file_list, config_dict, cmd_args))
    results = []
    for m in models:
        for seed_dict in seed_dicts:
            results.append(run(m, dataset, config_file_list, {**(config_dict or {}), **seed_dict}, cmd_args, saved))
            release_memory()  # before the next model is built
    config = results[0]["config"]
    stamp = distributed.broadcast(datetime.now().strftime("%Y%m%d-%H%M%S"))
    output_dir = os.path.join(config["output_dir"], f"{config['dataset']}-{stamp}")
    if not distributed.is_main():  # under torchrun every rank holds the same results; rank 0 writes them
        return results, output_dir
    slices = default_slices(config["slice_cold_item_max"], config["slice_short_history_max"])
    table = write_comparison(results, output_dir, topk=config["topk"], slices=slices)
    getLogger().info(set_color("Comparison", "green") + f" (written to {output_dir}):\n{table}")
    return results, output_dir
