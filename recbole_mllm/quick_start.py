"""Train and test one model, or several side by side, through the plugin.

Every model (``MLLMSRec`` or a RecBole baseline) goes through the same steps: the plugin ``Config``,
the same dataset files and leave-one-out split, the same fixed evaluation candidates, RecBole's
trainer loop and evaluator, and one test per protocol in ``test_protocols``. Unlike
``recbole.quick_start`` this imports no ray and runs no thop pass over the model.
"""

import hashlib
import os
import time
from datetime import datetime
from logging import getLogger

import numpy as np
import torch
from recbole.utils import init_logger, init_seed, set_color

from recbole_mllm import compat
from recbole_mllm.comparison import write_comparison
from recbole_mllm.config import Config
from recbole_mllm.data import create_dataset, data_preparation
from recbole_mllm.utils import get_model, get_trainer


def protocol_fingerprint(eval_data):
    """Hash of every (user, candidate item) pair an evaluation loader yields, in order.

    Two models whose fingerprints match were tested on exactly the same users, targets and candidates.
    """
    uid_field, iid_field = eval_data._dataset.uid_field, eval_data._dataset.iid_field
    users, items, targets = [], [], []
    for interaction, _, _, positive_i in eval_data:
        users.append(interaction[uid_field].numpy())
        if iid_field in interaction:
            items.append(interaction[iid_field].numpy())
        targets.append(positive_i.numpy())
    digest = hashlib.sha256()
    for parts in (users, items, targets):  # whole arrays, so batching does not change the hash
        if parts:
            digest.update(np.concatenate(parts).astype(np.int64).tobytes())
    return digest.hexdigest()[:16]


def run(model, dataset, config_file_list=None, config_dict=None, cmd_args=None, saved=True):
    """Train ``model`` on ``dataset``, select the best epoch on validation, test under every protocol.

    Returns a dict with ``best_valid_score``, ``best_valid_result``, ``test_result`` (protocol ->
    metrics), ``fingerprints`` (protocol -> candidate hash), ``epochs``, ``train_seconds``,
    ``peak_gpu_memory_gb`` and the resolved ``config``.
    """
    config = Config(model, dataset, config_file_list, config_dict, cmd_args)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(config)

    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    logger.info(model)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"]
    )
    train_seconds = time.time() - start

    if saved and os.path.isfile(trainer.saved_model_file):
        checkpoint = compat.load_checkpoint(trainer.saved_model_file, map_location=config["device"])
        model.load_state_dict(checkpoint["state_dict"])
        model.load_other_parameter(checkpoint.get("other_parameter"))
        logger.info(f"Loaded the best model from {trainer.saved_model_file}")

    test_result, fingerprints = {}, {}
    for protocol, loader in test_data.items():
        test_result[protocol] = dict(trainer.evaluate(loader, load_best_model=False, show_progress=config["show_progress"]))
        fingerprints[protocol] = protocol_fingerprint(loader)
        logger.info(set_color(f"test result [{protocol}]", "yellow") + f": {test_result[protocol]}")
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None

    return {
        "model": config["model"],
        "dataset": config["dataset"],
        "best_valid_score": best_valid_score,
        "best_valid_result": dict(best_valid_result or {}),
        "test_result": test_result,
        "fingerprints": fingerprints,
        "epochs": len(trainer.train_loss_dict),
        "train_seconds": train_seconds,
        "peak_gpu_memory_gb": peak_gb,
        "config": config,
    }


def run_comparison(models, dataset, config_file_list=None, config_dict=None, cmd_args=None, saved=True):
    """Run each model in ``models`` on ``dataset`` and write the comparison table and chart.

    Returns ``(results, output_dir)``; ``output_dir`` holds ``comparison.md``, ``.csv`` and ``.png``.
    """
    results = [run(m, dataset, config_file_list, config_dict, cmd_args, saved) for m in models]
    config = results[0]["config"]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    output_dir = os.path.join(config["output_dir"], f"{config['dataset']}-{stamp}")
    table = write_comparison(results, output_dir, topk=config["topk"])
    logger = getLogger()
    logger.info(set_color("Comparison", "green") + f" (written to {output_dir}):\n{table}")
    for protocol in results[0]["fingerprints"]:
        if len({r["fingerprints"].get(protocol) for r in results}) > 1:
            logger.warning(f"Models were not tested on identical [{protocol}] candidates: {[r['fingerprints'] for r in results]}")
    return results, output_dir
