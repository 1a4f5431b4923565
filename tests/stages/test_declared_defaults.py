"""Every stage key the code reads has one declared default: its line in ``properties/stages.yaml``."""

import yaml

from recbole_mllm.config import properties_dir
from recbole_mllm.config_check import known_keys
from recbole_mllm.data.split import LLM_TRAIN_TARGETS_PER_USER
from recbole_mllm.stages import common, item_fusion_cache, user_profile_cache, user_text

RECBOLE_DATASET_KEYS = {"data_path", "ITEM_ID_FIELD", "USER_ID_FIELD", "field_separator", "seq_separator", "encoding"}
"""Keys the stages read with RecBole's own defaults (declared in RecBole's YAML, not the plugin's)."""


def test_code_defaults_are_the_yaml_defaults():
    declared = yaml.safe_load((properties_dir() / "stages.yaml").read_text())
    for defaults in (common.STAGE_DEFAULTS, item_fusion_cache.DEFAULTS, user_profile_cache.DEFAULTS,
                     user_text.PROFILE_DEFAULTS):
        for key, value in defaults.items():
            if key in RECBOLE_DATASET_KEYS:
                continue
            assert key in declared, f"{key} is read by the stages but not declared in properties/stages.yaml"
            assert value == declared[key], f"{key}: code default {value!r}, stages.yaml {declared[key]!r}"
    assert LLM_TRAIN_TARGETS_PER_USER == declared["llm_train_targets_per_user"]


def test_the_config_check_knows_every_key_the_stages_read():
    """The check reads the YAML files, not the stage modules: a key a stage reads must be declared there."""
    known = known_keys()
    for defaults in (common.STAGE_DEFAULTS, item_fusion_cache.DEFAULTS, user_profile_cache.DEFAULTS,
                     user_text.PROFILE_DEFAULTS):
        for key, value in defaults.items():
            assert key in known, f"{key} is read by the stages but the config check does not know it"
            assert value is not None or known[key].accepts(None), f"{key}: default None, refused by the check"


def test_every_declared_stage_key_has_a_type_and_help_comment():
    for line in (properties_dir() / "stages.yaml").read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            assert "# (" in line, f"stages.yaml: {line.split(':')[0]} has no '# (type) help' comment"
