"""The early-stopping floor (``stopping_min_steps``): no model stops before it has taken that many optimizer steps."""

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
    assert trainer.steps_taken == len(trainer.train_loss_dict) * steps_per_epoch
