"""``benchmarks/joint_step_host.py`` times a real list-wise joint step's host path on the tiny dataset."""

import runpy
from pathlib import Path

from recbole_mllm.config import Config
from tests.model.test_mllmsrec import mllm_config  # noqa: F401 (the fixture)

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "joint_step_host.py"


def test_it_times_the_prompts_a_step_builds_and_embeds(mllm_config):  # noqa: F811
    measure = runpy.run_path(str(BENCHMARK))["measure"]
    config = Config("MLLMSRec", "tiny", config_dict=dict(mllm_config, ranker_scoring="listwise"))
    figures = measure(config, rows=2, repeats=1)
    assert figures["lists"] == 2 and figures["rerank_top_k"] == 5
    assert figures["tokens"] == figures["prompt_tokens"] > 2 * 5  # what embed padded is what list_prompt built
    assert 0 < figures["build_s"] and 0 < figures["host_s"]
