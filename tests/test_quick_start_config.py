"""The README's main command and its quick-start YAML: loadable, every key known and documented, no key shadowed."""

import re
from pathlib import Path

import pytest
import recbole
import yaml

from recbole_mllm.config import Config, properties_dir
from recbole_mllm.stages import item_fusion, user_profile
from tests.conftest import REPO_ROOT

QUICK_START = REPO_ROOT / "properties" / "quick_start.yaml"
TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool, "list": list, "dict": dict}


def _main_command():
    lines = [line for line in (REPO_ROOT / "README.md").read_text().splitlines() if line.startswith("pip install")]
    return lines[0]


def _known_keys():
    """Keys of the plugin's YAML layers (MLLMSRec's with FusedSASRec's below it), RecBole's defaults for ml-100k and the stages' documented defaults."""
    recbole_properties = Path(recbole.__file__).parent / "properties"
    files = [properties_dir() / "overall.yaml", properties_dir() / "stages.yaml", properties_dir() / "model" / "MLLMSRec.yaml",
             properties_dir() / "model" / "FusedSASRec.yaml",  # MLLMSRec's encoder keys, which its YAML layers over
             properties_dir() / "dataset" / "ml-100k.yaml", recbole_properties / "overall.yaml",
             recbole_properties / "dataset" / "ml-100k.yaml", recbole_properties / "dataset" / "sample.yaml"]
    keys = set(item_fusion.DEFAULTS) | set(user_profile.DEFAULTS)
    for path in files:
        keys |= set(yaml.safe_load(path.read_text()) or {})
    return keys


def test_readme_main_command_runs_mllmsrec_with_the_quick_start_yaml():
    command = _main_command()
    models = re.search(r"--model=(\S+)", command).group(1).split(",")
    assert models[0] == "MLLMSRec" and len(models) > 1, command
    assert "--dataset=ml-100k" in command
    assert re.search(r"--config_files=(\S+)", command).group(1) == "properties/quick_start.yaml"


def test_every_quick_start_key_is_known():
    settings = yaml.safe_load(QUICK_START.read_text())
    per_model_keys = {key for section in settings.get("per_model", {}).values() for key in section}
    unknown = sorted((set(settings) | per_model_keys) - _known_keys() - {"per_model"})
    assert not unknown, f"keys no YAML layer or stage documents (a typo is silently ignored by RecBole): {unknown}"


def _key_comments(text):
    """``{key: its comment}``, continuation lines (indented ``#`` lines right below a key) included."""
    comments, key = {}, None
    for line in text.splitlines():
        if re.match(r"^[A-Za-z_]\w*:", line):
            key = line.split(":", 1)[0]
            comments[key] = line.split("#", 1)[1].strip() if "#" in line else ""
        elif key and re.match(r"^\s+#", line):
            comments[key] += " " + line.split("#", 1)[1].strip()
        else:
            key = None
    return comments


def test_every_quick_start_key_is_commented_with_its_type():
    settings = yaml.safe_load(QUICK_START.read_text())
    comments = _key_comments(QUICK_START.read_text())
    assert set(comments) == set(settings)
    for key, comment in comments.items():
        match = re.match(r"^\((\w+)\)\s+\S.*\.$", comment)
        assert match, f"{key} is not commented as '# (type) meaning.': {comment!r}"
        kind = match.group(1)
        value = settings[key]
        is_kind = isinstance(value, TYPES.get(kind, ())) and not (kind != "bool" and isinstance(value, bool))
        assert is_kind, f"{key}: {value!r} is not a {kind}"


@pytest.mark.parametrize("model", re.search(r"--model=(\S+)", _main_command()).group(1).split(","))
def test_quick_start_yaml_loads_and_wins_over_the_default_layers(model):
    settings = yaml.safe_load(QUICK_START.read_text())
    config = Config(model, "ml-100k", config_file_list=[str(QUICK_START)])
    own = settings.pop("per_model", {}).get(model, {})
    for key, value in {**settings, **own}.items():
        assert config[key] == value, f"{model}: {key} is {config[key]!r}, the quick start sets {value!r}"
    assert config["per_model"] is None  # folded into the model's own layer, never left as a key
    assert config["test_protocols"] == ["uni100", "full"]  # the shared protocol is untouched
