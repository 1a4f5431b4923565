from recbole_mllm.data.dataloader import FixedCandidateEvalDataLoader
from recbole_mllm.data.utils import create_dataset, data_preparation

__all__ = ["FixedCandidateEvalDataLoader", "create_dataset", "data_preparation"]
