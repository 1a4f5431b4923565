"""Model and trainer resolution: the plugin's own classes first, then RecBole's.

So ``--model=SASRec,BERT4Rec,MLLMSRec`` runs through one entry point: baselines come from RecBole
unchanged, MLLM models from ``recbole_mllm.model``. The module of a model is its class name
lower-cased (RecBole's convention), e.g. ``MLLMSRec`` is the package ``recbole_mllm/model/mllmsrec/``.

Nothing heavy is imported at module level (RecBole on first use).
"""

import importlib

MODEL_PACKAGES = (
    "recbole_mllm.model",
    "recbole.model.sequential_recommender",
    "recbole.model.general_recommender",
    "recbole.model.context_aware_recommender",
    "recbole.model.knowledge_aware_recommender",
    "recbole.model.exlib_recommender",
)


def get_model(model_name):
    """Return the model class named ``model_name`` (plugin first, then RecBole's packages).

    Unlike ``recbole.utils.get_model`` an unknown name never imports ``exlib_recommender`` (which
    needs lightgbm and xgboost) and always ends in a ``ValueError`` that names the model.
    """
    for package in MODEL_PACKAGES:
        module_path = f"{package}.{model_name.lower()}"
        try:
            found = importlib.util.find_spec(module_path) is not None
        except ModuleNotFoundError:  # a package whose optional dependency is not installed
            found = False
        if found and hasattr(module := importlib.import_module(module_path), model_name):
            from recbole_mllm import compat

            compat.disable_anomaly_detection()  # RecBole's sine.py turned it on during the import
            return getattr(module, model_name)
    raise ValueError(
        f"Unknown model '{model_name}': it is neither a recbole_mllm model nor a RecBole model. "
        f"Model names are case-sensitive class names, e.g. MLLMSRec, SASRec, BERT4Rec, GRU4Rec."
    )


def get_trainer(model_type, model_name):
    """Return ``<model_name>Trainer`` from the plugin if it defines one, else RecBole's choice, with the plugin's
    training policies (``trainer.TRAINING_POLICIES``: learning-rate warm-up, early-stopping floor, the loss of
    ``train_positions: all``) for every model alike."""
    from recbole.utils import get_trainer as get_recbole_trainer

    from recbole_mllm import distributed
    from recbole_mllm import trainer as trainer_module  # deferred: torch and RecBole's trainer

    trainer_class = getattr(trainer_module, model_name + "Trainer", None) or get_recbole_trainer(model_type, model_name)
    return distributed.data_parallel(trainer_module.with_training_policies(trainer_class))

