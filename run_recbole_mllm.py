"""Train and evaluate one or more models through recbole_mllm, side by side on one split and one set of candidates.

    python run_recbole_mllm.py --model=SASRec,BERT4Rec,MLLMSRec --dataset=ml-100k --seeds=2020,2021,2022

Any other --key=value sets a config key for every model (the highest layer, as in RecBole): e.g.
--epochs=50, --gpu_id=1, --learning_rate=0.002. Per-model keys go in a YAML's per_model section. The keys,
their defaults and meanings are in properties/overall.yaml (the shared protocol), properties/stages.yaml,
properties/model/<Model>.yaml and RecBole's own properties; the comparison (mean and std over seeds,
paired p-values against every baseline, cold-item and short-history slices) goes to
<output_dir>/<dataset>-<time>/. An input error (a missing dataset or file, a bad key, value or data line) is one
line and exit status 2; --debug shows its traceback.
"""

import argparse
import sys

import yaml

from recbole_mllm.cli import HelpFormatter, config_file_list, help_text, input_error
from recbole_mllm.config import properties_dir
from recbole_mllm.quick_start import run_comparison
from recbole_mllm.stages.cache import StageCacheError


def parse_seeds(text):
    """'2020,2021' -> [2020, 2021]; a non-integer is an argparse error naming it."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers; got {text!r}") from None


def main(argv=None):
    """Exit status 2, with one line on stderr, for an input error: a missing dataset, file or cache, a bad key,
    value, model name or data line (``--debug`` shows the traceback)."""
    shared = yaml.safe_load((properties_dir() / "overall.yaml").read_text(encoding="utf-8"))
    epilog = help_text("The shared protocol (properties/overall.yaml); model keys: properties/model/<Model>.yaml.", shared)
    parser = argparse.ArgumentParser(description=__doc__, epilog=epilog, formatter_class=HelpFormatter,
                                     allow_abbrev=False)  # --seed=3 is the config key, no abbreviation of --seeds
    parser.add_argument("-m", "--model", default="SASRec", help="model name, or a comma-separated list to compare")
    parser.add_argument("-d", "--dataset", default="ml-100k", help="dataset name (RecBole atomic files)")
    parser.add_argument("--config_files", default=None, help="YAML config files, separated by spaces or commas")
    parser.add_argument("--seeds", type=parse_seeds, default=None,
                        help="run every model once per seed, e.g. 2020,2021,2022; none: the config's seed")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    args, overrides = parser.parse_known_args(argv)

    models = [m.strip() for m in args.model.split(",") if m.strip()]
    config_files = config_file_list(args.config_files)
    try:
        if not models:
            raise ValueError(f"--model names no model ({args.model!r}); give one, or a comma-separated list")
        run_comparison(models, args.dataset, config_file_list=config_files, cmd_args=overrides, seeds=args.seeds)
    except (ValueError, OSError, StageCacheError, yaml.YAMLError) as error:  # checked before any training
        return input_error(error, args.debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
