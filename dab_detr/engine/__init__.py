"""Training glue on top of detectron2's engine: trainer step, checkpointing, resumable data loading, processes."""
from .checkpointer import DetrCheckpointer
from .hooks import ParametersInSyncCheck, check_parameters_in_sync
from .launch import create_ddp_model, keep_freed_memory, launch_cli, log_to_file, set_cpu_threads
from .train_loader import ResumableTrainLoader, build_resumable_train_loader
from .trainer import DetrTrainer

__all__ = [
    "DetrCheckpointer", "DetrTrainer", "ParametersInSyncCheck", "ResumableTrainLoader", "build_resumable_train_loader",
    "check_parameters_in_sync", "create_ddp_model", "keep_freed_memory", "launch_cli", "log_to_file",
    "set_cpu_threads",
]
