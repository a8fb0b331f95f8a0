"""Typed configs of the training run, one dataclass per Hydra config group, and the root.

YAML under conf/ only composes and overrides these; Hydra rejects keys that are not fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from data.config import DataConfig
from model.config import ModelConfig
from parallel.config import ParallelConfig
from pretrain.hardware import CPU, GPUS

PRECISIONS = ("auto", "bf16", "fp32")
WANDB_MODES = ("online", "offline", "disabled")
CONSOLE_MODES = ("auto", "bar", "lines")
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
FP8_AMAX_ALGOS = ("max", "most_recent")
RECOMPUTE = ("none", "selective", "full")
RECOMPUTE_MODULES = ("core_attn", "moe_act", "moe_dispatch", "layernorm", "moe")
SCHEDULES = ("cosine", "linear", "constant", "wsd")
WSD_DECAY_STYLES = ("linear", "cosine", "minus_sqrt", "exponential")
ON_RESUME = (None, "checkpoint", "config")


@dataclass
class TrainConfig:
    """Length, batch and cadence of the run."""

    iters: int = 40
    """Optimizer steps to run (the run ends at this iteration)."""
    seq_length: int = 256
    """Tokens per sequence."""
    micro_batch_size: int = 4
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks (gradient accumulation fills the gap)."""
    seed: int = 1234
    """Seed of initialisation and data order."""
    log_interval: int = 5
    """Iterations between metric records (metrics.jsonl, console)."""
    eval_interval: int = 20
    """Iterations between validation-loss evaluations (0 = never; the last iteration always evaluates)."""
    eval_iters: int = 2
    """Global batches of the validation split per evaluation."""
    precision: str = "auto"
    """Parameter/compute precision: bf16 on GPU and fp32 on CPU when auto."""
    exit_interval: int | None = None
    """Save a checkpoint and exit when the iteration is a multiple of this (Megatron's
    --exit-interval); the LR schedule still spans train.iters, so a later run resumes exactly."""
    max_skipped: int = 3
    """Abort after this many consecutive iterations skipped for a NaN/Inf loss or gradient."""
    fault_nan_iters: list[int] = field(default_factory=list)
    """Fault injection: make the loss NaN at these iterations (exercises the skip/abort path)."""
    full_state_dump: str | None = None
    """Debugging aid: a directory where rank 0 writes, at every iteration, the full parameters
    (before the update) and gradients, gathered over all parallel dimensions, as iter_<n>.pt
    (parallel/gather.py). Slow: for small models (the layout-equivalence tests); on GPU it
    needs optim.distributed=false (the distributed optimizer keeps only a shard of each gradient)."""
    deterministic: bool | None = None
    """Deterministic algorithms and megatron's deterministic mode; None = on for CPU (bitwise
    reproducible runs), off for GPU (slower there)."""
    fp8: str | None = None
    """FP8 GEMMs through Transformer Engine (model.backend=te): null = off, e4m3, or hybrid
    (e4m3 forward, e5m2 gradients). Weights, norms, MSA and the router stay bf16."""
    fp8_recipe: str = "delayed"
    """FP8 scaling: delayed (amax history), tensorwise (current scaling), blockwise, mxfp8 (Blackwell)."""
    fp8_bf16_edge_layers: int = 0
    """With fp8: keep this many decoder layers at the start and at the end in bf16 (0 = none;
    the MTP modules stay FP8)."""
    fp8_amax_history_len: int = 1024
    """With fp8_recipe=delayed: steps of amax history each tensor's scale is computed from."""
    fp8_amax_compute_algo: str = "max"
    """With fp8_recipe=delayed: max (largest amax of the history) or most_recent."""
    recompute: str = "none"
    """Activation recompute: none; selective = the modules in train.recompute_modules are rerun
    in backward; full = whole layers (their inputs kept, train.recompute_num_layers per unit)."""
    recompute_modules: list[str] = field(default_factory=lambda: ["moe_act"])
    """With recompute=selective: core_attn (dense SDPA or MSA core attention), moe_act (the expert
    SwiGLU; needs model.moe_grouped_gemm), moe_dispatch (the dispatched token copies the experts
    read, rebuilt from the MoE block's input: model/moe.py), layernorm (the input and pre-MLP
    norms; needs Transformer Engine installed), moe (the whole MoE block: routing, dispatch, experts)."""
    recompute_num_layers: int = 1
    """With recompute=full: layers per recompute unit (megatron's uniform method)."""

    def __post_init__(self):
        for key in ("iters", "seq_length", "micro_batch_size", "global_batch_size", "log_interval", "eval_iters"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}={getattr(self, key)} must be >= 1")
        if self.eval_interval < 0:
            raise ValueError(f"train.eval_interval={self.eval_interval} must be >= 0")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} must be a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )
        if self.exit_interval is not None and self.exit_interval < 1:
            raise ValueError(f"train.exit_interval={self.exit_interval} must be >= 1 (or null)")
        if self.max_skipped < 0:
            raise ValueError(f"train.max_skipped={self.max_skipped} must be >= 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision={self.precision!r}: choose one of {PRECISIONS}")
        if self.fp8 is not None and self.fp8 not in FP8_FORMATS:
            raise ValueError(f"train.fp8={self.fp8!r}: choose null or one of {FP8_FORMATS}")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ValueError(f"train.fp8_recipe={self.fp8_recipe!r}: choose one of {FP8_RECIPES}")
        if self.fp8_bf16_edge_layers < 0:
            raise ValueError(f"train.fp8_bf16_edge_layers={self.fp8_bf16_edge_layers} must be >= 0")
        if self.fp8_amax_history_len < 1:
            raise ValueError(f"train.fp8_amax_history_len={self.fp8_amax_history_len} must be >= 1")
        if self.fp8_amax_compute_algo not in FP8_AMAX_ALGOS:
            raise ValueError(f"train.fp8_amax_compute_algo={self.fp8_amax_compute_algo!r}: choose one of {FP8_AMAX_ALGOS}")
        if self.fp8_bf16_edge_layers and self.fp8_recipe == "delayed":
            raise ValueError(
                "train.fp8_bf16_edge_layers needs a per-layer FP8 recipe (megatron wraps the whole "
                "block in one delayed-scaling context): set train.fp8_recipe=tensorwise or blockwise"
            )
        if self.fp8 is not None and self.precision == "fp32":
            raise ValueError("train.fp8 needs bf16 weights: set train.precision=bf16 (or auto on GPU)")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"train.recompute={self.recompute!r}: choose one of {RECOMPUTE}")
        bad = sorted(set(self.recompute_modules) - set(RECOMPUTE_MODULES))
        if bad:
            raise ValueError(f"train.recompute_modules has {bad}: choose from {RECOMPUTE_MODULES}")
        if self.recompute == "selective" and not self.recompute_modules:
            raise ValueError("train.recompute=selective with empty train.recompute_modules: name at "
                             f"least one of {RECOMPUTE_MODULES}, or set train.recompute=none")
        if self.recompute_num_layers < 1:
            raise ValueError(f"train.recompute_num_layers={self.recompute_num_layers} must be >= 1")


@dataclass
class OptimConfig:
    """AdamW with a learning-rate schedule (megatron-core optimizer and scheduler)."""

    lr: float = 3e-3
    """Peak learning rate."""
    min_lr: float = 3e-4
    """Learning rate at the end of the decay."""
    schedule: str = "cosine"
    """After warm-up: cosine or linear decay to min_lr over optim.decay_iters; constant (lr until
    the end); wsd (warmup-stable-decay: lr until the last optim.wsd_decay_iters iterations of
    the schedule, which decay to min_lr)."""
    warmup_iters: int = 4
    """Iterations of linear warm-up from optim.warmup_start_lr to lr (re-warm-up when a run
    starts from other weights: checkpoint.init_from)."""
    warmup_start_lr: float = 0.0
    """Learning rate the warm-up starts from."""
    decay_iters: int | None = None
    """Iterations of decay after warm-up ends (cosine, linear; the length of the stable + decay
    phases for wsd); None = until train.iters."""
    wsd_decay_iters: int | None = None
    """With schedule=wsd: iterations of the final decay (required)."""
    wsd_decay_style: str = "linear"
    """With schedule=wsd: shape of the final decay (linear, cosine, minus_sqrt, exponential)."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to norms and biases)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    distributed: bool = True
    """Shard optimizer state over data-parallel ranks (megatron's distributed optimizer; GPU only)."""
    on_resume: str | None = None
    """When a resumed checkpoint's schedule (lr, min_lr, warm-up, decay steps and style, weight
    decay) differs from the one this config derives, e.g. after raising train.iters to extend a
    run: checkpoint = keep the checkpoint's schedule, config = follow this config's schedule from
    the checkpoint's iteration on; null = stop with an error naming the fields."""

    def __post_init__(self):
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"optim.lr={self.lr} / optim.min_lr={self.min_lr}: need 0 <= min_lr <= lr, lr > 0")
        if not 0 <= self.warmup_start_lr <= self.lr:
            raise ValueError(f"optim.warmup_start_lr={self.warmup_start_lr} must be in [0, optim.lr={self.lr}]")
        if self.warmup_iters < 0:
            raise ValueError(f"optim.warmup_iters={self.warmup_iters} must be >= 0")
        if self.decay_iters is not None and self.decay_iters < 1:
            raise ValueError(f"optim.decay_iters={self.decay_iters} must be >= 1 (or null: until train.iters)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r}: choose one of {SCHEDULES}")
        if self.schedule == "wsd" and (self.wsd_decay_iters is None or self.wsd_decay_iters < 1):
            raise ValueError(f"optim.schedule=wsd needs optim.wsd_decay_iters >= 1 (got {self.wsd_decay_iters})")
        if self.wsd_decay_style not in WSD_DECAY_STYLES:
            raise ValueError(f"optim.wsd_decay_style={self.wsd_decay_style!r}: choose one of {WSD_DECAY_STYLES}")
        if self.clip_grad < 0:
            raise ValueError(f"optim.clip_grad={self.clip_grad} must be >= 0")
        if self.on_resume not in ON_RESUME:
            raise ValueError(f"optim.on_resume={self.on_resume!r}: choose one of checkpoint, config (or null)")


@dataclass
class CheckpointConfig:
    """Where and how often checkpoints are written."""

    dir: str | None = None
    """Checkpoint directory; None = `checkpoints/` inside the run directory."""
    interval: int = 0
    """Iterations between checkpoints (0 = only at the end of the run and on preemption)."""
    save: bool = True
    """Write checkpoints at all."""
    save_initial: bool = False
    """Also save the freshly initialised model as iter_0000000 (to start runs of other parallel
    layouts from identical weights)."""
    keep: int | None = 2
    """Complete checkpoints kept (newest first); None keeps all."""
    load: str | None = "auto"
    """auto = resume from the newest complete checkpoint in `dir` if there is one; a path = that
    checkpoint (an error if it is not complete); null = always start fresh."""
    init_from: str | None = None
    """Weights to start from when `dir` holds no complete checkpoint of this run yet (afterwards
    the run resumes from its own): a checkpoint of this project (an iter_* directory, or a
    directory of them: the newest), or hf:DIR, a Hugging Face checkpoint read on the fly. Weights
    only: a fresh optimizer and schedule; the model's shape comes with the weights; tensors the
    source lacks (e.g. MSA's index branch on a dense M2) are initialised and logged."""

    def __post_init__(self):
        if self.init_from is not None and not self.init_from.removeprefix("hf:"):
            raise ValueError(f"checkpoint.init_from={self.init_from!r}: give a checkpoint directory or hf:DIR")
        if self.interval < 0:
            raise ValueError(f"checkpoint.interval={self.interval} must be >= 0")
        if self.keep is not None and self.keep < 1:
            raise ValueError(f"checkpoint.keep={self.keep} must be >= 1 (or null to keep all)")


@dataclass
class EvalConfig:
    """`python -m pretrain.evaluate`: loss of a checkpoint over every document of data.prefixes."""

    max_tokens: int | None = None
    """Stop after the first window that brings the predicted tokens to at least this many;
    None = every full window."""
    micro_batch_size: int = 1
    """Windows per forward pass on each data-parallel rank."""
    indexer_recall: bool = False
    """Also measure the MSA index branches' recall: the full attention mass (head-averaged per
    group) inside the blocks they select, averaged over layers, groups and the tokens with more
    than model.msa.topk causal blocks (one extra pass over all keys per MSA layer)."""

    def __post_init__(self):
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"eval.max_tokens={self.max_tokens} must be >= 1 (or null: every window)")
        if self.micro_batch_size < 1:
            raise ValueError(f"eval.micro_batch_size={self.micro_batch_size} must be >= 1")


@dataclass
class WandbConfig:
    """Weights & Biases."""

    mode: str = "offline"
    """online | offline | disabled; the WANDB_MODE environment variable wins when set."""
    project: str = "m2-pretrain"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user); None = the default of the logged-in user."""
    name: str | None = None
    """Run name; None = the run directory's name."""

    def __post_init__(self):
        if self.mode not in WANDB_MODES:
            raise ValueError(f"logger.wandb.mode={self.mode!r}: choose one of {WANDB_MODES}")


@dataclass
class LoggerConfig:
    """Where metrics go besides `metrics.jsonl` in the run directory."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases settings."""
    console: str = "auto"
    """auto (progress bar on a terminal, log lines otherwise) | bar | lines."""

    def __post_init__(self):
        if self.console not in CONSOLE_MODES:
            raise ValueError(f"logger.console={self.console!r}: choose one of {CONSOLE_MODES}")


@dataclass
class ClusterConfig:
    """Nodes, GPUs and scheduler settings."""

    nodes: int = 1
    """Nodes in the job."""
    gpus_per_node: int = 8
    """GPUs (processes) per node."""
    gpu: str = "h100"
    """GPU type the job asks the scheduler for: a key of pretrain/hardware.py `GPUS`, or cpu."""
    peak_tflops: float | None = None
    """Peak TFLOP/s per device behind MFU; None = the `GPUS` entry of the CUDA device's name, or
    the measured fp32 matmul rate on CPU (pretrain/flops.py `peak_tflops`)."""
    partition: str | None = None
    """Slurm partition."""
    account: str | None = None
    """Slurm account."""
    time: str = "04:00:00"
    """Slurm time limit."""
    container_image: str | None = None
    """Container image (pyxis/enroot) to run in; None = the host environment."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for every rank."""
    dry_run: bool = False
    """Print the sbatch script instead of submitting it."""
    container_mounts: list[str] = field(default_factory=list)
    """More pyxis --container-mounts (src:dst); the repo and submission dir are always mounted."""
    python: str | None = None
    """Python on the nodes; None = this interpreter, or `python` inside container_image."""
    rdzv_port: int = 29500
    """Port of torchrun's c10d rendezvous store on the job's first node."""
    signal_seconds: int = 300
    """Slurm sends SIGUSR1 this long before the time limit; the trainer saves and exits 0."""
    logs_dir: str = "outputs/slurm"
    """sbatch scripts and per-job logs (<job name>-<job id>.out/.err), under the submission dir."""
    job_name: str | None = None
    """Slurm job name; None = model.name."""
    sbatch_args: list[str] = field(default_factory=list)
    """More sbatch options, one per entry (e.g. --qos=high)."""
    gpu_memory_gib: float | None = None
    """Memory per GPU that launch.plan fits against; None = the size of `gpu` (`GPUS`)."""

    def __post_init__(self):
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(
                f"cluster.nodes={self.nodes} and cluster.gpus_per_node={self.gpus_per_node} must be >= 1"
            )
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"cluster.peak_tflops={self.peak_tflops} must be positive (or null: from the device)")
        if self.gpu != CPU and self.gpu not in GPUS:
            raise ValueError(
                f"cluster.gpu={self.gpu!r} is not a known GPU: choose one of {sorted(GPUS)} or {CPU} "
                "(pretrain/hardware.py holds the table)"
            )


@dataclass
class RunConfig:
    """The whole run: one field per config group."""

    defaults: list[Any] = field(default_factory=lambda: ["_self_"])
    model: ModelConfig = MISSING
    parallel: ParallelConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    train: TrainConfig = MISSING
    checkpoint: CheckpointConfig = MISSING
    logger: LoggerConfig = MISSING
    cluster: ClusterConfig = MISSING
    eval: EvalConfig = MISSING


def repo_conf_dir() -> Path:
    """conf/ at the repository root (the project runs from its checkout or an editable install)."""
    return Path(__file__).resolve().parent.parent / "conf"


def register() -> None:
    """Register the schemas; conf/<group>/*.yaml name them in their defaults lists."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for group, node in (
        ("model", ModelConfig), ("parallel", ParallelConfig), ("data", DataConfig),
        ("optim", OptimConfig), ("train", TrainConfig), ("checkpoint", CheckpointConfig),
        ("logger", LoggerConfig), ("cluster", ClusterConfig), ("eval", EvalConfig),
    ):
        cs.store(group=group, name=f"{group}_schema", node=node)
