"""recbole_mllm: multimodal LLMs for sequential recommendation, as a RecBole plugin."""

__version__ = "0.1.0"
