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
- ``probe``: features of a frozen encoder, a linear multi-label classifier, average precision.
"""

from fastcon.train.checkpoint import CheckpointDir, CheckpointError, load_checkpoint, save_checkpoint
from fastcon.train.config import Config, ConfigError, load_config, parse_override, save_config
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

__all__ = [
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
