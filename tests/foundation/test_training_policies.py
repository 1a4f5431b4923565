"""The training policies every trainer gets: the early-stopping floor (``stopping_min_steps``) and the learning-rate
warm-up (``lr_warmup_steps``)."""

import json
import math

import pytest

from recbole_mllm.config import Config
from recbole_mllm.data import create_dataset
from recbole_mllm.quick_start import split_and_build_model
from recbole_mllm.utils import get_trainer


@pytest.mark.parametrize("floor_epochs", [0, 5])
def test_early_stopping_waits_for_the_minimum_number_of_steps(tiny_data, floor_epochs):
    """Validation only worsens after the first epoch, so RecBole's patience of one validation stops SASRec after its
    third epoch; a floor of five epochs' steps keeps it training until the fifth."""
    config = Config("SASRec", "tiny", config_dict=dict(tiny_data, epochs=20, stopping_step=1))
    model, train_data, valid_data, _ = split_and_build_model(config, create_dataset(config))
    steps_per_epoch = len(train_data)
    config["stopping_min_steps"] = floor_epochs * steps_per_epoch
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    scores = iter([0.5 - 0.01 * k for k in range(100)])
    trainer._valid_epoch = lambda valid_data, show_progress=False: (next(scores), {"ndcg@10": 0.0})
    trainer.fit(train_data, valid_data, saved=False)
    assert len(trainer.train_loss_dict) == max(3, math.ceil(floor_epochs * steps_per_epoch / steps_per_epoch))
    assert trainer.steps_taken == len(trainer.train_loss_dict) * steps_per_epoch  # one optimizer step per batch


def test_the_learning_rate_rises_linearly_over_the_warm_up_steps(tiny_data):
    """``lr_warmup_steps: 4``: the k-th optimizer step (from 1) runs at k/4 of the learning rate, then at all of it."""
    config = Config("SASRec", "tiny", config_dict=dict(tiny_data, learning_rate=0.01, lr_warmup_steps=4))
    model, train_data, _, _ = split_and_build_model(config, create_dataset(config))
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    rates = []
    for _ in range(6):
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
    assert rates == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])


def test_without_a_warm_up_the_learning_rate_is_constant(tiny_data):
    config = Config("SASRec", "tiny", config_dict=dict(tiny_data, learning_rate=0.01, lr_warmup_steps=0))
    model = split_and_build_model(config, create_dataset(config))[0]
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    trainer.optimizer.step()
    assert trainer.optimizer.param_groups[0]["lr"] == 0.01


def test_runs_started_in_the_same_second_write_separate_checkpoints(tiny_data, tmp_path):
    """RecBole names a checkpoint by model and second only; seeds of one model queued together shared one file."""
    import subprocess
    import sys

    code = ("import json, sys; import recbole.trainer.trainer as recbole_trainer; "
            "recbole_trainer.get_local_time = lambda: 'the-same-second'; from recbole_mllm.config import Config; from recbole_mllm.data import create_dataset; "
            "from recbole_mllm.quick_start import split_and_build_model; from recbole_mllm.utils import get_trainer; "
            "c = Config('SASRec', 'tiny', config_dict=json.loads(sys.argv[1])); m = split_and_build_model(c, create_dataset(c))[0]; "
            "print(get_trainer(c['MODEL_TYPE'], c['model'])(c, m).saved_model_file)")
    names = []
    for seed in (1, 1, 2):
        settings = json.dumps({**tiny_data, "seed": seed, "checkpoint_dir": str(tmp_path)})
        out = subprocess.run([sys.executable, "-c", code, settings], capture_output=True, text=True, check=True).stdout
        names.append(out.strip().splitlines()[-1])
    assert len(set(names)) == 3 and all(name.startswith(str(tmp_path)) for name in names)
    assert all("the-same-second" in name for name in names) and "-seed1-" in names[0] and "-seed2-" in names[2]
