from .trainer import OptimConfig, Task, TrainConfig, TrainResult, batch_generator, train

__all__ = ["OptimConfig", "Task", "TrainConfig", "TrainResult", "batch_generator", "train"]
