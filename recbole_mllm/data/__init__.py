from recbole_mllm.data.dataloader import FixedCandidateEvalDataLoader
from recbole_mllm.data.histories import UserHistory, user_histories
from recbole_mllm.data.split import held_out_count, needed_positions, user_split
from recbole_mllm.data.utils import create_dataset, data_preparation

__all__ = ["FixedCandidateEvalDataLoader", "UserHistory", "create_dataset", "data_preparation", "held_out_count",
           "needed_positions", "user_histories", "user_split"]
