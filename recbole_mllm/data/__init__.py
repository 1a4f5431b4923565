from recbole_mllm.data.dataloader import FixedCandidateEvalDataLoader
from recbole_mllm.data.utils import create_dataset, data_preparation, held_out_count

__all__ = ["FixedCandidateEvalDataLoader", "create_dataset", "data_preparation", "held_out_count"]
