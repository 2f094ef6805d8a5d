"""Pre-training runs: config, loop, checkpoints, distributed set-up, metrics and plots."""

from anaus_core.train.checkpoint import load_checkpoint, resolve_resume_path, save_checkpoint
from anaus_core.train.config import DataConfig, OptimConfig, PretrainConfig, RunConfig, validate_config
from anaus_core.train.distributed import DistributedContext, init_distributed, teardown_distributed
from anaus_core.train.metrics import MetricsWriter, read_metrics
from anaus_core.train.plots import plot_loss_curve
from anaus_core.train.trainer import (
    PretrainDataSource,
    PretrainResult,
    export_encoder,
    export_encoder_from_checkpoint,
    pretrain,
)

__all__ = [
    "DataConfig", "OptimConfig", "PretrainConfig", "RunConfig", "validate_config",
    "DistributedContext", "init_distributed", "teardown_distributed",
    "MetricsWriter", "read_metrics", "plot_loss_curve",
    "load_checkpoint", "resolve_resume_path", "save_checkpoint",
    "PretrainDataSource", "PretrainResult", "export_encoder", "export_encoder_from_checkpoint", "pretrain",
]
