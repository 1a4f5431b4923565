"""Where a RecBole baseline's training epoch goes: batch building, GPU step, precision.

The honest comparison trains every baseline to early stopping (40-60 epochs on ML-1M), for 8 trials
and 3 seeds each, so the epoch time of RecBole's own models decides what a comparison costs. For each
setting this prints, per training epoch of the real dataset and split:

- ``loader``: building the epoch's batches alone (RecBole's ``TrainDataLoader``, no model);
- ``step fp32`` / ``step tf32`` / ``step bf16``: the GPU step alone (forward, backward, Adam; batches already
  on the device), in float32, with TF32 matmuls, and under bf16 autocast; extrapolated to one epoch;
- ``epoch``: one real epoch through RecBole's ``Trainer._train_epoch`` (loader + step, as a run does it).

    python benchmarks/train_step.py --dataset=ml-1m-mm --data_path=dataset [--models SASRec GRU4Rec] [--steps 30]

Each transformer runs with RecBole's attention (``eager``) and with PyTorch's fused kernel (``sdpa``,
``transformer_attention``; ``recbole_mllm/attention.py``), unless ``--attention`` picks one.

Settings span the tuning space (``properties/tuning/``): its cheapest (length 50, width 64, 2 layers) and
its most expensive (length 200, width 128, 3 layers; GRU4Rec 2) corner.
"""

import argparse
import time

import torch
from recbole.utils import init_seed

from recbole_mllm.attention import IMPLEMENTATIONS, use_attention
from recbole_mllm.cli import HelpFormatter
from recbole_mllm.config import Config
from recbole_mllm.data import create_dataset, data_preparation
from recbole_mllm.quick_start import build_model
from recbole_mllm.utils import get_trainer

CORNERS = {"small": {"MAX_ITEM_LIST_LENGTH": 50, "hidden_size": 64, "inner_size": 256, "n_layers": 2},
           "large": {"MAX_ITEM_LIST_LENGTH": 200, "hidden_size": 128, "inner_size": 512, "n_layers": 3}}
GRU_LAYERS = {"small": 1, "large": 2}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_seconds(model, batches, device, steps, autocast_dtype=None):
    """Seconds per training step with batches already on ``device`` (the GPU's share of an epoch)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()

    def step(batch):
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = model.calculate_loss(batch)
        loss.backward()
        optimizer.step()
        return loss.item()  # RecBole's trainer reads every step's loss (a device sync)

    for batch in batches[:3]:
        step(batch)  # warm-up: kernels, allocator
    synchronize(device)
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    synchronize(device)
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dataset", default="ml-100k", help="RecBole dataset name")
    parser.add_argument("--data_path", default=None, help="folder holding the dataset folder (RecBole's data_path)")
    parser.add_argument("--models", nargs="+", default=["SASRec", "BERT4Rec", "GRU4Rec"], help="RecBole models")
    parser.add_argument("--corners", nargs="+", default=list(CORNERS), choices=list(CORNERS), help="tuning-space corners")
    parser.add_argument("--steps", type=int, default=30, help="timed GPU steps per precision")
    parser.add_argument("--gpu_id", default="0", help="GPU to use (RecBole's gpu_id)")
    parser.add_argument("--attention", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS,
                        help="self-attention implementations of the transformers (transformer_attention)")
    parser.add_argument("--load_col_inter_only", action="store_true",
                        help="load only the .inter columns the sequence models read (no item/user features joined per batch)")
    args = parser.parse_args()
    torch.set_float32_matmul_precision("highest")
    print("model      corner  attention  batches/epoch  loader s  step fp32 s  step tf32 s  step bf16 s  epoch s  (per epoch)")
    for corner in args.corners:
        for model_name in args.models:
            settings = dict(CORNERS[corner])
            if model_name == "GRU4Rec":
                settings = {"MAX_ITEM_LIST_LENGTH": settings["MAX_ITEM_LIST_LENGTH"],
                            "hidden_size": settings["hidden_size"], "embedding_size": settings["hidden_size"],
                            "num_layers": GRU_LAYERS[corner]}
            overrides = {"show_progress": False, "test_protocols": ["full"], "gpu_id": args.gpu_id, **settings}
            if args.data_path:
                overrides["data_path"] = args.data_path
            if args.load_col_inter_only:
                overrides["load_col"] = {"inter": ["user_id", "item_id", "timestamp"]}
            config = Config(model_name, args.dataset, config_dict=overrides)
            init_seed(config["seed"], config["reproducibility"])
            train_data, _, _ = data_preparation(config, create_dataset(config))
            device = config["device"]

            start = time.perf_counter()
            batches = [batch for batch in train_data]
            loader = time.perf_counter() - start
            on_device = [batch.to(device) for batch in batches[:max(4, min(len(batches), 16))]]
            for attention in args.attention:
                model = build_model(config, train_data._dataset).to(device)
                if not use_attention(model, attention) and attention != args.attention[0]:
                    continue  # no transformer layers (GRU4Rec): one row is enough
                timings = []
                for precision in ("fp32", "tf32", "bf16"):
                    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
                    dtype = torch.bfloat16 if precision == "bf16" else None
                    timings.append(step_seconds(model, on_device, device, args.steps, dtype) * len(batches))
                torch.set_float32_matmul_precision("highest")
                trainer = get_trainer(config["MODEL_TYPE"], model_name)(config, model)
                start = time.perf_counter()
                trainer._train_epoch(train_data, 0, show_progress=False)
                synchronize(device)
                epoch = time.perf_counter() - start
                print(f"{model_name:10s} {corner:6s} {attention:9s} {len(batches):14d} {loader:9.2f} "
                      + " ".join(f"{t:12.2f}" for t in timings) + f" {epoch:8.2f}", flush=True)


if __name__ == "__main__":
    main()
