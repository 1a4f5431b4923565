"""YAML defaults of recbole_mllm, installed as the package ``recbole_mllm.properties``."""
