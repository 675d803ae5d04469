"""Training glue on top of detectron2's engine: trainer step, checkpointing, data loading, checks, processes."""
from .checkpointer import DetrCheckpointer
from .config_checks import apply_overrides_checked, check_train_config, load_lazy_config
from .hooks import ParametersInSyncCheck, check_parameters_in_sync
from .launch import create_ddp_model, launch_cli, log_to_file, set_cpu_threads
from .train_loader import ResumableTrainLoader, build_resumable_train_loader
from .trainer import DetrTrainer

__all__ = [
    "DetrCheckpointer",
    "DetrTrainer",
    "ParametersInSyncCheck",
    "ResumableTrainLoader",
    "apply_overrides_checked",
    "build_resumable_train_loader",
    "check_parameters_in_sync",
    "check_train_config",
    "create_ddp_model",
    "launch_cli",
    "load_lazy_config",
    "log_to_file",
    "set_cpu_threads",
]
