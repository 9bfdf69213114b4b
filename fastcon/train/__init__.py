"""fastcon.train: the reusable machinery of examples/pretrain.py and examples/evaluate.py.

The examples stay scripts a user reads top to bottom; what is not specific to one method lives here:

- ``config``: YAML configs checked against a defaults file, ``section.key=value`` overrides
  (``load_config``, ``save_config``, ``Config``).
- ``checkpoint``: atomic, checksummed checkpoints (``save_checkpoint``, ``load_checkpoint``,
  ``CheckpointDir`` keeping the newest few, ``CheckpointError``).
- ``schedules``: warmup + cosine learning rate as a resumable torch scheduler (``warmup_cosine``).
- ``metrics``: ``metrics.csv`` rows that survive crashes and resumes (``MetricsLog``) and the
  loss-curve figure (``plot_metrics``); a run's whole and last-window speed from it (``run_throughput``).
- ``runtime``: torchrun / DDP setup with a collective timeout (and a message naming a stuck
  collective), RNG states for exact resume, derived random streams, SIGTERM / SIGINT as a flag,
  data-wait vs compute timing, peak memory.
- ``methods``: the pretraining methods behind one interface (``Method``): ``SoftCon`` (masked
  student + EMA teacher, land-cover soft targets) and ``SwiMDiff`` (momentum key encoder, scene-aware
  key queue ``KeyQueue``, diffusion branch); ``build_method`` picks ``cfg.method``.
- ``trainer``: a run's set-up (``setup`` -> ``Run``: networks, DDP, compile, AdamW), the optimiser
  step (``train_step``), checkpoint state and exact resume (``checkpoint_state``, ``restore``).
- ``probe``: features of a frozen encoder, a linear multi-label classifier, average precision.
"""

from fastcon.train.checkpoint import CheckpointDir, CheckpointError, load_checkpoint, save_checkpoint
from fastcon.train.config import Config, ConfigError, load_config, parse_override, save_config
from fastcon.train.methods import METHODS, KeyQueue, Method, SoftCon, StepContext, SwiMDiff, build_method, ddp_objective
from fastcon.train.metrics import MetricsLog, plot_metrics, read_metrics, run_throughput
from fastcon.train.runtime import (
    CollectiveFailure,
    DistInfo,
    StepTimer,
    StopRequest,
    all_ranks_any,
    collective_failure,
    derived_seed,
    init_distributed,
    peak_memory_mib,
    rng_state,
    seed_everything,
    set_rng_state,
    shutdown_distributed,
    step_generator,
)
from fastcon.train.schedules import WarmupCosine, warmup_cosine
from fastcon.train.trainer import (
    NonFiniteLossError,
    Run,
    checkpoint_state,
    config_differences,
    endless,
    ops_backend,
    restore,
    run_summary,
    setup,
    train_step,
)

__all__ = [
    "METHODS",
    "KeyQueue",
    "Method",
    "NonFiniteLossError",
    "Run",
    "SoftCon",
    "StepContext",
    "SwiMDiff",
    "build_method",
    "checkpoint_state",
    "config_differences",
    "ddp_objective",
    "endless",
    "ops_backend",
    "restore",
    "run_summary",
    "setup",
    "train_step",
    "CheckpointDir",
    "CheckpointError",
    "CollectiveFailure",
    "Config",
    "ConfigError",
    "DistInfo",
    "MetricsLog",
    "StepTimer",
    "StopRequest",
    "WarmupCosine",
    "all_ranks_any",
    "collective_failure",
    "derived_seed",
    "init_distributed",
    "load_checkpoint",
    "load_config",
    "parse_override",
    "peak_memory_mib",
    "plot_metrics",
    "read_metrics",
    "rng_state",
    "run_throughput",
    "save_checkpoint",
    "save_config",
    "seed_everything",
    "set_rng_state",
    "shutdown_distributed",
    "step_generator",
    "warmup_cosine",
]
