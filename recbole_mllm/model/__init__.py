"""The plugin's models (``utils.get_model`` finds each by its lower-cased class name)."""

from recbole_mllm.model.fusedsasrec import FusedSASRec
from recbole_mllm.model.mllmsrec import MLLMSRec

__all__ = ["FusedSASRec", "MLLMSRec"]
