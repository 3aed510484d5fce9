"""The run's length, batch sizes and cadence; its checkpoints, evaluations and logging."""

from __future__ import annotations

from dataclasses import dataclass

from mmpo_megatron.config.checks import require


@dataclass
class TrainerConfig:
    """Batch sizes, length of the run, evaluation cadence, and where the run folder goes."""

    global_batch_size: int = 128
    """Pairs per optimizer step over all DP ranks and micro-batches (paper: 128)."""

    micro_batch_size: int = 1
    """Pairs per micro-batch per rank (each pair is two rows)."""

    epochs: int = 5
    """Passes over the training pairs (paper: 5); max_steps overrides it."""

    max_steps: int | None = None
    """Stop after this many optimizer steps (None: epochs decide)."""

    eval_interval: int = 100
    """Evaluate on held-out pairs every N steps (and at step 0 and the end); 0 disables."""

    eval_max_pairs: int | None = None
    """Cap on held-out pairs per evaluation: a seeded sample (data.seed) across the held-out
    sources, the same at every evaluation (None: all)."""

    log_interval: int = 1
    """Write metrics every N steps."""

    output_dir: str = "outputs/mmpo"
    """Run folder: resolved config, data report, checkpoints, TensorBoard events, metrics.jsonl."""

    overwrite_output_dir: bool = False
    """Start afresh: delete what an earlier run wrote to output_dir (checkpoints, metrics, events,
    its reference cache) instead of resuming from it. False, so a real run resumes after a crash;
    the demo sets it, so every ``make demo`` shows the whole run."""

    max_nonfinite_steps: int = 5
    """Abort after this many consecutive steps with a non-finite loss or gradient (each is skipped)."""

    seed: int = 1234
    """Seed of data order and model initialisation."""

    max_wall_minutes: float | None = None
    """Wall-clock budget of this process, counted from its start: the run saves and stops (exit
    code 75, resumable) when the next step plus a save would not fit, estimated from the steps and
    saves measured so far. A Slurm job sets it from its remaining time
    (examples/slurm/train_mmpo.sbatch). None: no budget. SIGTERM and SIGUSR1 stop the same way."""

    def __post_init__(self) -> None:
        require(self.global_batch_size >= 1, "train.global_batch_size", f"must be >= 1, got {self.global_batch_size}")
        require(self.micro_batch_size >= 1, "train.micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        require(
            self.global_batch_size % self.micro_batch_size == 0,
            "train.global_batch_size",
            f"{self.global_batch_size} is not divisible by train.micro_batch_size={self.micro_batch_size}",
        )
        require(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        require(
            self.max_steps is None or self.max_steps >= 1, "train.max_steps", f"must be >= 1, got {self.max_steps}"
        )
        require(self.eval_interval >= 0, "train.eval_interval", f"must be >= 0, got {self.eval_interval}")
        require(self.log_interval >= 1, "train.log_interval", f"must be >= 1, got {self.log_interval}")
        require(self.max_wall_minutes is None or self.max_wall_minutes > 0, "train.max_wall_minutes",
                 f"must be > 0, got {self.max_wall_minutes}")


@dataclass
class CheckpointConfig:
    """megatron dist_checkpointing: saving, resuming, and starting from other weights."""

    save_interval: int = 0
    """Save every N steps; 0 saves only at the end."""

    keep_last: int = 2
    """How many step checkpoints to keep (older ones are deleted after a newer one is complete)."""

    resume: bool = True
    """Resume from the newest complete checkpoint in <output_dir>/checkpoints when there is one."""

    load_weights: str | None = None
    """Start the policy from these weights only (an SFT or converted HF checkpoint); any TP/PP."""

    async_save: bool = False
    """Write the periodic checkpoints in the background (dist_checkpointing's asynchronous save: a
    forked writer per rank) while training goes on; the folder is marked complete only once every
    rank's write has finished. The last save of a run, or of a stop, is waited for before exit.
    False: each save blocks training until written (docs/benchmarks/checkpoint_save.md measures both)."""

    def __post_init__(self) -> None:
        require(self.save_interval >= 0, "checkpoint.save_interval", f"must be >= 0, got {self.save_interval}")
        require(self.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {self.keep_last}")


@dataclass
class EvalConfig:
    """What every evaluation (train.eval_interval) watches besides the held-out preference metrics."""

    lm_data: str | None = None
    """A local corpus (.txt: one document a line; .jsonl: a ``text`` field), e.g. the SFT data or
    any general text. At every evaluation the policy's mean per-token NLL on it is logged as
    ``lm/nll``, the reference's (scored once) as ``lm/nll_ref`` and the difference as
    ``lm/nll_delta``: how far preference training moves the model's language modelling (the
    paper's second claim, watched during the run). None: not measured."""

    lm_max_documents: int = 512
    """The first this many documents are scored (a forward pass over them per evaluation)."""

    lm_max_length: int | None = None
    """Tokens kept of a document; None means data.max_length."""

    def __post_init__(self) -> None:
        require(self.lm_max_documents >= 1, "eval.lm_max_documents", f"must be >= 1, got {self.lm_max_documents}")
        require(self.lm_max_length is None or self.lm_max_length >= 2, "eval.lm_max_length",
                 f"must be >= 2, got {self.lm_max_length}")


@dataclass
class LoggingConfig:
    """Where metrics go besides metrics.jsonl (always written)."""

    tensorboard: bool = True
    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install wandb` and a login)."""

    wandb_project: str = "mmpo-megatron"
    progress_bar: bool = True
