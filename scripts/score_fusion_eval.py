"""Train MLLMSRec once and test it as the LLM alone, the encoder alone, and late fusion at several weights.

Late fusion (``late_fusion_weight``: score = LLM + w * encoder score) is the fallback the design is
compared against. Training once and scoring the LLM once per protocol makes the whole comparison
cost one run: the LLM's scores do not depend on ``w``, so the fusion passes reuse them and only the
encoder runs again. One joint training pass, no validation pass; the encoder warm-up still validates, as
in ``run_recbole_mllm.py``, so it is the same warm-up (and warm-up cache entry) as the main runs'::

    python scripts/score_fusion_eval.py --dataset=ml-1m-mm --data_path=dataset \\
        --fusion_weights=0.3,1,3,10 [--key=value ...]

Prints one ``[fusion]`` line per protocol and scorer with its NDCG@10, Hit@10 and the full result.
"""

import sys
import time

import torch
from recbole.utils import init_logger, init_seed

from recbole_mllm.cli import exit_on_help, safe_cmd_args, split_own_keys
from recbole_mllm.config import Config
from recbole_mllm.data import create_dataset
from recbole_mllm.quick_start import protocol_fingerprint, split_and_build_model
from recbole_mllm.utils import get_trainer


DEFAULTS = {"fusion_weights": "0.3,1,3,10"}
"""This script's own keys (kept from ``Config``, which rejects keys it does not know); every MLLMSRec key
(``properties/model/MLLMSRec.yaml``) applies too."""


def _weights(value):
    """``--fusion_weights=0.3,1`` arrives read as a literal: a tuple, a single number, or a string."""
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return [float(v) for v in str(value if value is not None else "").split(",") if v]


def main(argv):
    exit_on_help(argv, __doc__, DEFAULTS)
    own, argv = split_own_keys(argv, DEFAULTS)
    config = Config("MLLMSRec", None, cmd_args=safe_cmd_args(argv))
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    model, train_data, valid_data, test_data = split_and_build_model(config, create_dataset(config))
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    trainer.eval_step = 0  # RecBole's fit then skips validating the joint pass; the warm-up validates on its own
    model.late_fusion_grid = None  # and no weight is chosen on validation: every weight is tested below
    start = time.time()
    trainer.fit(train_data, valid_data, saved=False, show_progress=config["show_progress"])
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    print(f"[fusion] trained in {time.time() - start:.1f} s, skipped updates {trainer.skipped_steps}, "
          f"peak {peak:.2f} GiB", flush=True)

    scorers = [("llm", False, 0.0), ("encoder", True, 0.0)]
    scorers += [(f"fusion w={w:g}", False, w) for w in _weights(own["fusion_weights"] or DEFAULTS["fusion_weights"])]
    results = {}
    with model.reuse_llm_scores():  # the LLM's scores do not depend on w: each block is scored once
        for protocol, loader in test_data.items():
            for name, encoder_only, weight in scorers:
                begin = time.time()
                with model.scoring(encoder_only=encoder_only, fusion_weight=weight):
                    result = dict(trainer.evaluate(loader, load_best_model=False, show_progress=config["show_progress"]))
                results[(protocol, name)] = result
                print(f"[fusion] {protocol} {protocol_fingerprint(loader)} {name}: ndcg@10 {result['ndcg@10']:.4f} "
                      f"hit@10 {result['hit@10']:.4f} ({time.time() - begin:.0f} s) {result}", flush=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
