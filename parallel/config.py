"""The `parallel` config group: how the model is split over GPUs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    """Parallel layout. Data parallelism takes the ranks left over: dp = world / (tp * pp * cp)."""

    tp: int = 1
    """Tensor parallel size (attention heads and dense weights split)."""
    pp: int = 1
    """Pipeline parallel stages (layers split); MTP modules live on the last stage."""
    vpp: int | None = None
    """Virtual pipeline stages per pipeline rank (interleaved schedule); None = off."""
    ep: int = 1
    """Expert parallel size (experts split over data-parallel x context-parallel ranks)."""
    etp: int | None = None
    """Expert tensor parallel size (each expert's weights split); None = same as tp."""
    cp: int = 1
    """Context parallel size (sequence split into 2*cp load-balanced chunks)."""
    sp: bool | None = None
    """Sequence parallel (activations split over tp between TP regions); None = on when tp > 1."""
    distributed_backend: str = "auto"
    """torch.distributed backend: nccl on GPU, gloo on CPU when auto."""

    def __post_init__(self):
        for key in ("tp", "pp", "ep", "cp"):
            if getattr(self, key) < 1:
                raise ValueError(f"parallel.{key}={getattr(self, key)} must be >= 1")
        if self.etp is not None and self.etp < 1:
            raise ValueError(f"parallel.etp={self.etp} must be >= 1 (or null = parallel.tp)")
        if self.vpp is not None and (self.vpp < 2 or self.pp < 2):
            raise ValueError(
                f"parallel.vpp={self.vpp} needs parallel.pp >= 2 and vpp >= 2 (null turns it off)"
            )
        if self.sp is False and self.tp > 1:
            raise ValueError(
                "parallel.sp=false with parallel.tp > 1: megatron-core's MoE layers need sequence "
                "parallelism under tensor parallelism; set parallel.sp=true (or leave it null)"
            )
        if self.distributed_backend not in ("auto", "nccl", "gloo"):
            raise ValueError(
                f"parallel.distributed_backend={self.distributed_backend!r}: choose auto, nccl or gloo"
            )

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def sequence_parallel(self) -> bool:
        return self.tp > 1 if self.sp is None else self.sp
