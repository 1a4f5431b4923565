"""The one place where recbole_mllm adapts RecBole 1.2.1 to today's numpy and torch.

What breaks, and what this module does about it (nothing else in the project patches anything):

* numpy 2 removed ``np.float_``, ``np.complex_`` and ``np.unicode_``. RecBole's
  ``Config.compatibility_settings`` reads them (and then sets ``np.float`` etc., which its metrics use).
  :func:`apply_numpy_aliases` restores the three names as the aliases they were in numpy 1.x
  (``float64``, ``complex128``, ``str_``); on numpy 1.x it changes nothing.
* torch >= 2.6 loads checkpoints weights-only by default, but RecBole pickles its ``Config`` (and the
  model class, enums, a yaml loader class) into every checkpoint, with pickle protocol 4, which the
  weights-only unpickler cannot read at all. ``weights_only=False`` would run whatever a received file
  holds. :func:`load_checkpoint` unpickles through an allowlist instead: tensors, containers, torch
  and numpy dtypes, RecBole's enums; the ``Config`` and the classes it names load as inert
  :class:`CheckpointObject` stand-ins (no code of theirs runs; loading never needs them); any
  other global (``os.system``, ``builtins.eval``), or state set on a shared object such as an enum
  member, is refused with :class:`UnsafeCheckpointError` naming the file. Files the plugin writes itself (the encoder warm-up) are plain tensors:
  :func:`load_weights` reads them with ``torch.load(weights_only=True)``.

* Importing ``recbole.model.sequential_recommender`` runs ``sine.py``, which calls
  ``torch.autograd.set_detect_anomaly(True)`` for the whole process: every backward pass of every
  model then checks for NaNs and records stack traces (about 3x slower SASRec steps on a GPU).
  :func:`disable_anomaly_detection` turns it back off; ``utils.get_model`` calls it after an import.

``pandas>=3`` silently breaks RecBole's ``fillna`` and ``token_seq`` loading; it is excluded in
``setup.py`` rather than patched. ``recbole.quick_start`` (which imports ray) is never imported.
"""

import collections
import pickle
import re
import types

import numpy as np
import torch

_NUMPY_ALIASES = {"float_": "float64", "complex_": "complex128", "unicode_": "str_"}


def apply_numpy_aliases():
    """Give numpy 2 back the aliases RecBole 1.2.1 reads. Idempotent; called by ``Config``."""
    for old, new in _NUMPY_ALIASES.items():
        if not hasattr(np, old):
            setattr(np, old, getattr(np, new))


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds something other than what RecBole and this plugin store: it is not loaded."""


class CheckpointObject:
    """What a checkpoint's ``Config``, model class or yaml loader loads as: the pickled data, no behaviour."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


_RECBOLE_ENUMS = ("ModelType", "InputType", "EvaluatorType", "FeatureType", "FeatureSource", "KGDataLoaderState")
_STANDINS = {("recbole_mllm.config", "Config"), ("recbole.config.configurator", "Config"), ("yaml.loader", "FullLoader")}
_MODEL_MODULES = ("recbole.model.", "recbole_mllm.model.")


def _allowed_global(module: str, name: str):
    """The object a checkpoint may name as ``module.name``, a stand-in, or None (refused)."""
    import recbole.utils.enum_type as enums

    if (module, name) in _STANDINS or module.startswith(_MODEL_MODULES):
        return CheckpointObject
    if module == "recbole.utils.enum_type" and name in _RECBOLE_ENUMS:
        return getattr(enums, name)
    if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"):
        return getattr(torch._utils, name)
    if module == "torch" and (name in ("device", "Size") or isinstance(getattr(torch, name, None), torch.dtype)):
        return getattr(torch, name)
    if (module, name) == ("numpy", "dtype"):
        return np.dtype
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
        return _numpy_scalar()
    if module == "numpy.dtypes" and name.endswith("DType"):
        return getattr(np.dtypes, name, None)
    return None


def _numpy_scalar():
    """numpy's scalar rebuild function (``numpy._core`` in numpy 2, ``numpy.core`` before)."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:
        from numpy.core.multiarray import scalar
    return scalar


class _AllowlistUnpickler(pickle._Unpickler):
    """pickle's Python unpickler (a checkpoint's pickle is small: the tensors are separate records) that
    resolves only allowlisted names and sets state (BUILD) only on objects it just made, never on a
    shared one such as an enum member."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module, name):
        found = _allowed_global(module, name)
        if found is None:
            raise UnsafeCheckpointError(f"it holds {module}.{name}, which is not among what RecBole checkpoints hold")
        return found

    def load_build(self):
        target = self.stack[-2]
        # fresh objects only: a state_dict (an OrderedDict with _metadata), a dtype (its byte order), a stand-in
        if type(target) not in (CheckpointObject, collections.OrderedDict) and not isinstance(target, np.dtype):
            raise UnsafeCheckpointError(f"it sets the state of a {type(target).__name__}, which RecBole checkpoints never do")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


_allowlist_pickle = types.ModuleType("recbole_mllm_allowlist_pickle")
_allowlist_pickle.Unpickler = _AllowlistUnpickler
_allowlist_pickle.load = lambda file, **kwargs: _AllowlistUnpickler(file, **kwargs).load()
_allowlist_pickle.__dict__.update({k: getattr(pickle, k) for k in ("UnpicklingError", "HIGHEST_PROTOCOL")})


def load_checkpoint(path, map_location="cpu"):
    """Load a RecBole checkpoint (tensors, optimizer state, epoch, ...) without running code from the file.

    Raises ``UnsafeCheckpointError`` naming the file when it holds anything beyond the allowlist.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=False, pickle_module=_allowlist_pickle)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(f"refused to load {path}: {error}") from None


def load_weights(path, map_location="cpu"):
    """Load a file of tensors and plain values the plugin wrote (``torch.load(weights_only=True)``).

    numpy scalars are allowed too: RecBole's validation scores are ``numpy.float64``.
    """
    numpy_scalars = [_numpy_scalar(), np.dtype, *(getattr(np.dtypes, n) for n in ("Float64DType", "Float32DType")
                                                   if hasattr(np, "dtypes"))]
    try:
        with torch.serialization.safe_globals(numpy_scalars):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        named = re.search(r"GLOBAL ([\w.]+)", str(error))
        reason = f"it holds {named.group(1)}, which is not a tensor or a plain value" if named else "not a tensor file"
        raise UnsafeCheckpointError(f"refused to load {path}: {reason}") from None


def disable_anomaly_detection():
    """Undo the process-wide anomaly detection that importing RecBole's SINE model switches on."""
    torch.autograd.set_detect_anomaly(False)
