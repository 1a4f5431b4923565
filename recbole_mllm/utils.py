"""Model and trainer resolution (the plugin's own classes first, then RecBole's), and the one atomic file write.

So ``--model=SASRec,BERT4Rec,MLLMSRec`` runs through one entry point: baselines come from RecBole
unchanged, MLLM models from ``recbole_mllm.model``. The module of a model is its class name
lower-cased (RecBole's convention), e.g. ``MLLMSRec`` is the package ``recbole_mllm/model/mllmsrec/``.

Nothing heavy is imported at module level (RecBole on first use), so the dataset scripts can share
:func:`atomic_output` without loading RecBole.
"""

import importlib
import os
import uuid
from contextlib import contextmanager
from pathlib import Path

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
    training policies (``trainer.TRAINING_POLICIES``: learning-rate warm-up, early-stopping floor) for every model alike."""
    from recbole.utils import get_trainer as get_recbole_trainer

    trainer_module = importlib.import_module("recbole_mllm.trainer")
    trainer_class = getattr(trainer_module, model_name + "Trainer", None) or get_recbole_trainer(model_type, model_name)
    return trainer_module.data_parallel(trainer_module.with_training_policies(trainer_class))


@contextmanager
def atomic_output(path, mode="wb", **open_kwargs):
    """A file object to write ``path`` through, so that ``path`` holds either its old content or all of the new.

    The block writes a temp file beside ``path``; when it ends without error the file is flushed, fsynced and
    renamed over ``path`` (and the folder fsynced, so the rename is durable too); on an error it is removed.
    The temp name carries the pid and a random part, so processes writing the same file never share one, also
    on other hosts of a shared filesystem; a killed process leaves ``<name>.tmp<pid>-<hex>``, which the stage cache
    clears.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write(path, data: bytes) -> None:
    """Write ``data`` to ``path`` all or nothing (see :func:`atomic_output`)."""
    with atomic_output(path) as f:
        f.write(data)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
