"""RecBole's ``Config`` with the plugin's YAML layers and model resolution.

Precedence, lowest first (later layers override earlier ones):

1. RecBole's own defaults: ``overall.yaml``, ``model/<Model>.yaml``, ``dataset/<dataset>.yaml`` and
   its quick-start defaults for the model type (e.g. sequential: leave-one-out in time order);
2. this plugin's ``properties/overall.yaml`` (the evaluation protocol every compared model shares),
   ``properties/stages.yaml`` (the LLM stages, for the plugin's own models only),
   ``properties/model/<Model>.yaml`` (after those of the model's base classes, so a subclass's file holds only
   its own keys: MLLMSRec's over FusedSASRec's) and ``properties/dataset/<dataset>.yaml`` (where none ships: the
   ``<dataset>.yaml`` that ``dataset_scripts`` wrote into ``<data_path>/<dataset>/``);
3. ``config_file_list`` (the user's YAML files, in order), then their ``per_model`` sections for the model
   being run;
4. ``config_dict`` (it may hold a ``per_model`` section too, applied above its shared keys);
5. command-line ``--key=value`` pairs, passed explicitly as ``cmd_args`` (never read from
   ``sys.argv`` behind the caller's back, so library use and tests are not affected by the shell).

A ``per_model`` section gives each model of a multi-model command its own keys (its training budget,
say) while every shared key, the split and the candidates stay common::

    epochs: 300                 # every model
    per_model:                  # (dict) Keys for one model only: {ModelName: {key: value}}.
      MLLMSRec: {epochs: 1}

Every key of layers 3 to 5 (every model's ``per_model`` section too) must be one some YAML declares, with a
value of its declared type (``config_check``), or ``Config`` raises ``ConfigKeyError`` before any data is read.
"""

from logging import getLogger
from pathlib import Path

import yaml
from recbole.config import Config as RecBoleConfig

from recbole_mllm import compat, distributed
from recbole_mllm.cli import one_line, parse_cli_value
from recbole_mllm.config_check import ConfigKeyError, check_config, check_renamed_keys
from recbole_mllm.properties_path import properties_dir
from recbole_mllm.utils import get_model


def host_gpu_count(dev="/dev"):
    """The NVIDIA GPUs of this host, counted from their device files (``/dev/nvidia0``, ...) so that CUDA is not
    initialised before RecBole sets ``CUDA_VISIBLE_DEVICES``; 0 where there are none."""
    folder = Path(dev)
    return len([p for p in folder.glob("nvidia*") if p.name[len("nvidia"):].isdigit()]) if folder.is_dir() else 0


def check_gpu_ids(gpu_id, given, gpus=None):
    """``gpu_id`` must name GPUs this host has: RecBole would hide every GPU behind ``CUDA_VISIBLE_DEVICES`` and run on
    the CPU without a word. An error where the host has GPUs; on a CPU-only host a warning, when the user gave it."""
    gpus = host_gpu_count() if gpus is None else gpus
    ids = [part.strip() for part in str(",".join(map(str, gpu_id)) if isinstance(gpu_id, (tuple, list)) else gpu_id).split(",")
           if part.strip()]
    missing = [i for i in ids if not i.isdigit() or int(i) >= gpus]
    if missing and gpus:
        raise ConfigKeyError(f"config key 'gpu_id' names GPU {', '.join(missing)}, but this host has {gpus} "
                             f"(ids 0 to {gpus - 1})")
    if missing and given:
        getLogger().warning(f"gpu_id {gpu_id}: this host has no GPU; running on the CPU")


INTERVAL_KEYS = ("user_inter_num_interval", "item_inter_num_interval")
"""RecBole's filters that read an interval string such as ``"[20,22]"`` or ``"[5,inf)"`` (``val_interval`` reads one
per field)."""


def _interval_string(value):
    """``[a, b]`` (two numbers) as RecBole's closed interval ``"[a,b]"``; anything else unchanged."""
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        return f"[{value[0]},{value[1]}]"
    return value


def _intervals_as_strings(layer):
    """A closed interval given as a list (``--user_inter_num_interval=[20,22]``: RecBole's command-line parser
    evaluates the string into a list, and so does an unquoted YAML value) becomes RecBole's ``"[20,22]"``; RecBole
    itself would fail deep in the dataset's filter, and a closed interval could not be given on the command line."""
    for key in INTERVAL_KEYS:
        if key in layer:
            layer[key] = _interval_string(layer[key])
    if isinstance(layer.get("val_interval"), dict):
        layer["val_interval"] = {field: _interval_string(v) for field, v in layer["val_interval"].items()}


class Config(RecBoleConfig):
    """RecBole ``Config`` that also layers the plugin's ``properties/`` and resolves plugin models."""

    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None, cmd_args=None):
        compat.apply_numpy_aliases()
        self._cmd_args = list(cmd_args or [])
        self._model_name = model if isinstance(model, str) or model is None else model.__name__
        super().__init__(model, dataset, config_file_list, config_dict)

    def _convert_config_dict(self, config_dict):
        """String values (command line and ``config_dict``) read as literals, never ``eval``-ed as RecBole does."""
        return {key: parse_cli_value(value) for key, value in config_dict.items()}

    def _load_cmd_line(self):
        """Parse ``--key=value`` pairs from ``cmd_args`` (values read by ``cli.parse_cli_value``)."""
        cmd_config_dict = {}
        for arg in self._cmd_args:
            key, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
            if not key or not sep:
                raise ValueError(f"Command-line argument '{arg}' is not of the form --key=value.")
            if key in cmd_config_dict and cmd_config_dict[key] != value:
                raise ValueError(f"Command-line key '{key}' is given twice with different values.")
            cmd_config_dict[key] = value
        return self._convert_config_dict(cmd_config_dict)

    def _load_config_files(self, file_list):
        """RecBole's file layer, remembering which file set each key (an unknown key's error names it)."""
        merged, self._key_files = {}, {}
        for file in file_list or []:
            try:
                layer = super()._load_config_files([file])
            except FileNotFoundError as error:
                raise FileNotFoundError(f"the config file {file} does not exist (--config_files)") from error
            except yaml.YAMLError as error:  # e.g. a !!python tag: RecBole's loader refuses it, without the file
                raise ValueError(f"{file}: {one_line(error)}") from error
            merged.update(layer)
            self._key_files.update(dict.fromkeys(layer, str(file)))
        return merged

    def _merge_external_config_dict(self):
        """RecBole's merge, after folding each layer's ``per_model`` section for this model into that layer;
        then every key the user gave (every model's sections included) is checked, before anything is loaded."""
        super()._merge_external_config_dict()
        model = self._model_name or self.external_config_dict.get("model")
        given, self._model_keys = [], []  # (key, value, origin) of every user-given key; of those set for this model
        for layer, origin in ((self.file_config_dict, None), (self.variable_config_dict, "config_dict"),
                              (self.cmd_config_dict, "the command line")):
            sections = layer.pop("per_model", None) or {}
            if not isinstance(sections, dict) or not all(isinstance(v, dict) for v in sections.values()):
                raise ValueError(f"per_model must map model names to {{key: value}} sections; got {sections!r}")
            for part in (layer, *sections.values()):
                _intervals_as_strings(part)
            where = origin or self._key_files.get("per_model")
            given += [(key, value, origin or self._key_files[key]) for key, value in layer.items()]
            given += [(key, value, f"per_model section '{name}' of {where}")
                      for name, section in sections.items() for key, value in section.items()]
            self._model_keys += [(key, value, origin or self._key_files[key]) for key, value in layer.items()]
            self._model_keys += [(key, value, f"per_model section '{model}' of {where}")
                                 for key, value in (sections.get(model) or {}).items()]
            layer.update(sections.get(model) or {})
        super()._merge_external_config_dict()
        if self.external_config_dict.get("check_config_keys", True):
            check_config(given)

    def _init_device(self):
        """RecBole's device setup; under ``torchrun`` the process group and rank keys come from ``distributed.start``
        (RecBole's own path would start NCCL at its ``ip``/``port`` and hide every GPU but ``gpu_id``)."""
        if not distributed.launched():
            if self.final_config_dict.get("use_gpu", True):
                check_gpu_ids(self.final_config_dict["gpu_id"], self.external_config_dict.get("gpu_id") is not None)
            return super()._init_device()
        self.final_config_dict["gpu_id"] = str(self.final_config_dict["gpu_id"])
        self.final_config_dict.update(distributed.start(bool(self.final_config_dict.get("use_gpu", True))))

    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model")
            if model is None:
                raise KeyError("No model given: pass --model=<Name> (or model: in a config file).")
        if dataset is None:
            dataset = self.external_config_dict.get("dataset")
            if dataset is None:
                raise KeyError("No dataset given: pass --dataset=<name> (or dataset: in a config file).")
        if isinstance(model, str):
            return model, get_model(model), dataset
        return model.__name__, model, dataset

    def _dataset_yaml(self, root, dataset):
        """``properties/dataset/<dataset>.yaml``, else the ``<dataset>.yaml`` that ``dataset_scripts`` wrote beside
        the atomic files (``<data_path>/<dataset>/``): a dataset built under a new name loads its timestamps, text
        and images rather than RecBole's ids-only default."""
        shipped = root / "dataset" / f"{dataset}.yaml"
        if shipped.is_file():
            return shipped
        data_path = self.external_config_dict.get("data_path") or self.internal_config_dict.get("data_path") or "dataset/"
        return Path(data_path) / dataset / f"{dataset}.yaml"

    def _load_internal_config_dict(self, model, model_class, dataset):
        check_renamed_keys(model_class, self._model_keys)  # e.g. dropout_prob for FusedSASRec: one error naming the new keys
        super()._load_internal_config_dict(model, model_class, dataset)
        root = properties_dir()
        stages = [root / "stages.yaml"] if model_class.__module__.startswith("recbole_mllm.") else []
        dataset_yaml = self._dataset_yaml(root, dataset)
        bases = [cls.__name__ for cls in reversed(model_class.__mro__[1:])]  # a base class's keys below the model's
        models = [root / "model" / f"{name}.yaml" for name in (*bases, model)]
        for path in (root / "overall.yaml", *stages, *models, dataset_yaml):
            if path.is_file():
                layer = self._update_internal_config_dict(path) or {}
                if path == dataset_yaml:
                    self.parameters["Dataset"] += [k for k in layer if k not in self.parameters["Dataset"]]
                    if not path.is_relative_to(root) and self.external_config_dict.get("check_config_keys", True):
                        check_config([(key, value, str(path)) for key, value in layer.items()])  # a dataset folder's
