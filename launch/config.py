"""The `cluster` config group: the machines a run is launched on."""

from __future__ import annotations

from dataclasses import dataclass, field

# Dense bf16 tensor-core peak per GPU, for MFU: the vendor's dense (not 2:4 sparse) numbers,
# "h100" being the SXM part. pretrain/flops.py picks the entry from the CUDA device's name.
PEAK_BF16_TFLOPS = {
    "h100": 989.0, "h100_pcie": 756.0, "h100_nvl": 835.0, "h200": 989.0, "a100": 312.0, "cpu": 0.0,
}


@dataclass
class ClusterConfig:
    """Nodes, GPUs and scheduler settings."""

    nodes: int = 1
    """Nodes in the job."""
    gpus_per_node: int = 8
    """GPUs (processes) per node."""
    gpu: str = "h100"
    """GPU type the job asks the scheduler for (one of PEAK_BF16_TFLOPS, or set peak_tflops)."""
    peak_tflops: float | None = None
    """Peak TFLOP/s per device behind MFU; None = PEAK_BF16_TFLOPS of the CUDA device's name, or
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
    """Memory per GPU that launch.plan fits against; None = the size of `gpu`."""

    def __post_init__(self):
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(
                f"cluster.nodes={self.nodes} and cluster.gpus_per_node={self.gpus_per_node} must be >= 1"
            )
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"cluster.peak_tflops={self.peak_tflops} must be positive (or null: from the device)")
        if self.peak_tflops is None and self.gpu not in PEAK_BF16_TFLOPS:
            raise ValueError(
                f"cluster.gpu={self.gpu!r} has no known peak: choose one of {sorted(PEAK_BF16_TFLOPS)} "
                "or set cluster.peak_tflops"
            )

    @property
    def peak(self) -> float:
        """The table peak of `gpu` (what a job asks for); a run's MFU uses flops.peak_tflops,
        which reads the device it got."""
        return self.peak_tflops if self.peak_tflops is not None else PEAK_BF16_TFLOPS[self.gpu]
