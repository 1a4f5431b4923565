"""The one place where recbole_mllm adapts RecBole 1.2.1 to today's numpy and torch.

What breaks, and what this module does about it (nothing else in the project patches anything):

* numpy 2 removed ``np.float_``, ``np.complex_`` and ``np.unicode_``. RecBole's
  ``Config.compatibility_settings`` reads them (and then sets ``np.float`` etc., which its metrics use).
  :func:`apply_numpy_aliases` restores the three names as the aliases they were in numpy 1.x
  (``float64``, ``complex128``, ``str_``); on numpy 1.x it changes nothing.
* torch >= 2.6 loads checkpoints weights-only by default, but RecBole pickles its ``Config`` into
  every checkpoint, so ``torch.load`` of a file RecBole just wrote fails. :func:`load_checkpoint`
  loads such a file with ``weights_only=False``. Use it only for checkpoints this project wrote.

* Importing ``recbole.model.sequential_recommender`` runs ``sine.py``, which calls
  ``torch.autograd.set_detect_anomaly(True)`` for the whole process: every backward pass of every
  model then checks for NaNs and records stack traces (about 3x slower SASRec steps on a GPU).
  :func:`disable_anomaly_detection` turns it back off; ``utils.get_model`` calls it after an import.

``pandas>=3`` silently breaks RecBole's ``fillna`` and ``token_seq`` loading; it is excluded in
``setup.py`` rather than patched. ``recbole.quick_start`` (which imports ray) is never imported.
"""

import numpy as np
import torch

_NUMPY_ALIASES = {"float_": "float64", "complex_": "complex128", "unicode_": "str_"}


def apply_numpy_aliases():
    """Give numpy 2 back the aliases RecBole 1.2.1 reads. Idempotent; called by ``Config``."""
    for old, new in _NUMPY_ALIASES.items():
        if not hasattr(np, old):
            setattr(np, old, getattr(np, new))


def load_checkpoint(path, map_location="cpu"):
    """Load a RecBole checkpoint written by this run (it holds a pickled ``Config``)."""
    return torch.load(path, map_location=map_location, weights_only=False)


def disable_anomaly_detection():
    """Undo the process-wide anomaly detection that importing RecBole's SINE model switches on."""
    torch.autograd.set_detect_anomaly(False)
