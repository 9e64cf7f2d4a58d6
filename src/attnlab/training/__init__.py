from .distributed import is_main
from .rundir import claim_run_dir
from .trainer import OptimConfig, Task, TrainConfig, TrainResult, batch_generator, train

__all__ = ["OptimConfig", "Task", "TrainConfig", "TrainResult", "batch_generator", "claim_run_dir", "is_main", "train"]
