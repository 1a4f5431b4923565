"""Train and evaluate one or more models through recbole_mllm.

    python run_recbole_mllm.py --model=SASRec,BERT4Rec --dataset=ml-100k --epochs=1

Any other ``--key=value`` overrides a config key (highest precedence, as in RecBole).
"""

import argparse

from recbole_mllm.quick_start import run_comparison

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", default="SASRec", help="model name, or a comma-separated list to compare")
    parser.add_argument("-d", "--dataset", default="ml-100k", help="dataset name (RecBole atomic files)")
    parser.add_argument("--config_files", default=None, help="YAML config files, separated by spaces or commas")
    args, overrides = parser.parse_known_args()

    models = [m.strip() for m in args.model.split(",") if m.strip()]
    config_files = args.config_files.replace(",", " ").split() if args.config_files else None
    run_comparison(models, args.dataset, config_file_list=config_files, cmd_args=overrides)
