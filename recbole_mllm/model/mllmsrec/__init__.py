"""MLLMSRec, one concept per file: ``model.py`` holds RecBole's contract and the paper's reference."""

from recbole_mllm.model.mllmsrec.model import MLLMSRec
from recbole_mllm.model.mllmsrec.scorer import RERANK_FLOOR

__all__ = ["MLLMSRec", "RERANK_FLOOR"]
