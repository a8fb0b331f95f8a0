"""The GPUs we know: peak FLOP/s (the denominator of MFU) and memory (what the planner fits
against), keyed by `cluster.gpu` and found from a CUDA device's name. The one table; the
trainer, the planner and the `cluster` config group read it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    """One GPU type."""

    key: str
    """`cluster.gpu` value."""
    peak_bf16_tflops: float
    """Dense (not 2:4 sparse) bf16 tensor-core peak, the vendor's number."""
    memory_gib: float
    """Device memory as the driver reports it (nvidia-smi's MiB / 1024)."""
    name_fragments: tuple[str, ...]
    """Lower-case fragments of torch.cuda.get_device_name that identify it."""


# Order matters for `gpu_of_device`: the more specific names first ("NVIDIA H100 PCIe" before
# "NVIDIA H100 80GB HBM3"). "h100" is the SXM part; GH200 matches "h200" (H100/H200 tensor
# cores). Memory: the 80 GB H100 shows 81559 MiB, the A100 80GB 81920, the H100 NVL 95830,
# the H200 143771.
GPUS: dict[str, GPU] = {
    g.key: g
    for g in (
        GPU("h100_pcie", 756.0, 79.65, ("h100 pcie",)),
        GPU("h100_nvl", 835.0, 93.58, ("h100 nvl",)),
        GPU("h200", 989.0, 140.40, ("h200",)),
        GPU("h100", 989.0, 79.65, ("h100",)),
        GPU("a100", 312.0, 80.0, ("a100",)),
    )
}
CPU = "cpu"
"""`cluster.gpu=cpu`: no table entry; MFU uses the measured CPU matmul rate, the planner needs
cluster.gpu_memory_gib for a fit verdict."""


def gpu_of_device(device_name: str) -> GPU | None:
    """The table entry of a CUDA device name (torch.cuda.get_device_name), or None."""
    name = device_name.lower()
    for gpu in GPUS.values():
        if any(fragment in name for fragment in gpu.name_fragments):
            return gpu
    return None
