"""The training loop, on megatron-core's DDP, optimizer, scheduler and pipeline schedules.

Legend: b micro-batch, s sequence.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper
from megatron.core.utils import get_batch_on_this_cp_rank

from data import batch_iterator, build_datasets, load_tokenizer
from model.builder import build_model, transformer_config
from model.specs import resolve_backend
from parallel import setup
from pretrain.config import RunConfig
from pretrain.metrics import MetricsLog

log = logging.getLogger("pretrain")


@dataclass
class StepResult:
    lm_loss: float | None
    """Mean LM loss over the global batch (None on ranks without the loss)."""
    mtp_losses: list[float]
    grad_norm: float
    skipped: bool
    moe_load: dict[str, float]


class Trainer:
    """Builds everything from a RunConfig and runs `train.iters` steps."""

    def __init__(self, cfg: RunConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = run_dir
        t = cfg.train
        self.backend = resolve_backend(cfg.model.backend)
        self.device = setup.init_distributed(cfg.parallel)
        self.layout = setup.layout_for(
            cfg.parallel, cfg.model, torch.distributed.get_world_size(), t.seq_length, self.backend
        )
        if t.global_batch_size % (t.micro_batch_size * self.layout.dp):
            raise ValueError(
                f"train.global_batch_size={t.global_batch_size} must be a multiple of "
                f"train.micro_batch_size*dp = {t.micro_batch_size}*{self.layout.dp}"
            )
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * self.layout.dp)
        cpu = self.device.type == "cpu"
        precision = t.precision if t.precision != "auto" else ("fp32" if cpu else "bf16")
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        deterministic = t.deterministic if t.deterministic is not None else cpu
        if deterministic:
            torch.use_deterministic_algorithms(True)
        setup.init_model_parallel(cfg.parallel, t.seed)

        self.tokenizer = load_tokenizer(cfg.data)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ValueError(
                f"the tokenizer ({cfg.data.tokenizer or 'default corpus'}) has "
                f"{self.tokenizer.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}: "
                "raise model.vocab_size or use a smaller tokenizer (data.tokenizer / data.vocab_size)"
            )
        self.train_ds, self.valid_ds = build_datasets(
            cfg.data,
            seq_length=t.seq_length,
            seed=t.seed,
            train_samples=t.iters * t.global_batch_size,
            valid_samples=t.eval_iters * t.global_batch_size,
            tokenizer=self.tokenizer,
        )

        self.tconfig = transformer_config(
            cfg.model, cfg.parallel, params_dtype=self.dtype, cpu=cpu, deterministic=deterministic
        )
        chunks = build_model(cfg.model, self.tconfig, self.backend)
        for chunk in chunks:
            chunk.to(self.device)
        distributed_optimizer = cfg.optim.distributed and not cpu
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=distributed_optimizer,
            average_in_collective=False,  # gloo has no AVG reduction
        )
        self.model = [
            DistributedDataParallel(config=self.tconfig, ddp_config=ddp_config, module=chunk)
            for chunk in chunks
        ]
        o = cfg.optim
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=o.lr,
                min_lr=o.min_lr,
                weight_decay=o.weight_decay,
                adam_beta1=o.beta1,
                adam_beta2=o.beta2,
                adam_eps=o.eps,
                clip_grad=o.clip_grad,
                bf16=self.dtype == torch.bfloat16,
                params_dtype=self.dtype,
                use_distributed_optimizer=distributed_optimizer,
            ),
            self.model,
            use_gloo_process_groups=False,
        )
        decay = o.decay_iters if o.decay_iters is not None else max(t.iters - o.warmup_iters, 1)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=o.lr,
            min_lr=o.min_lr,
            lr_warmup_steps=o.warmup_iters,
            lr_decay_steps=o.warmup_iters + decay,
            lr_decay_style="cosine",
            start_wd=o.weight_decay,
            end_wd=o.weight_decay,
            wd_incr_steps=t.iters,
            wd_incr_style="constant",
        )
        self.moe_load: dict[str, float] = {}
        self.tconfig.finalize_model_grads_func = self._finalize_grads
        no_sync = [m.no_sync for m in self.model]
        self.tconfig.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        self.forward_backward = get_forward_backward_func()

        self.iteration = 0
        self.consumed_samples = 0
        self.is_logging_rank = (
            parallel_state.is_pipeline_last_stage()
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
        )
        self.metrics = MetricsLog(run_dir, enabled=self.is_logging_rank, total_iters=t.iters)

    # ---- one step -------------------------------------------------------------------------

    def _microbatches(self, dataset, consumed: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the global batch that starts at sample `consumed`."""
        t = self.cfg.train
        it = batch_iterator(
            dataset,
            micro_batch_size=t.micro_batch_size,
            global_batch_size=t.global_batch_size,
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=self.layout.dp,
            consumed_samples=consumed,
        )
        return [next(it) for _ in range(self.num_microbatches)]

    def _forward_step(self, data_iterator, model):
        batch = {k: v.to(self.device, non_blocking=True) for k, v in next(data_iterator).items()}
        if self.layout.cp > 1:
            batch = get_batch_on_this_cp_rank(batch)
        loss_bs = model(
            batch["tokens"],
            batch["position_ids"],
            None,
            labels=batch["labels"],
            loss_mask=batch["loss_mask"],
        )
        return loss_bs, partial(_loss_func, batch["loss_mask"])

    def _run(self, microbatches, forward_only: bool):
        iters = [iter(microbatches) for _ in self.model]
        return self.forward_backward(
            forward_step_func=self._forward_step,
            data_iterator=iters if len(iters) > 1 else iters[0],
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=self.num_microbatches,
            seq_length=self.cfg.train.seq_length // self.layout.cp,
            micro_batch_size=self.cfg.train.micro_batch_size,
            forward_only=forward_only,
        )

    def _finalize_grads(self, model, num_tokens=None, **kwargs):
        self.moe_load = _moe_load(model)  # before megatron resets the token counts
        finalize_model_grads(model, num_tokens, **kwargs)

    def train_step(self) -> StepResult:
        for m in self.model:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        microbatches = self._microbatches(self.train_ds, self.consumed_samples)
        outputs = self._run(microbatches, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        return StepResult(
            lm_loss=self._reduce_loss(outputs),
            mtp_losses=self._mtp_losses(),
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            skipped=not ok,
            moe_load=self.moe_load,
        )

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean LM loss over the first `train.eval_iters` global batches of the validation split:
        the same batches at every evaluation, so the curve compares like with like."""
        for m in self.model:
            m.eval()
        t = self.cfg.train
        losses = [
            self._reduce_loss(self._run(self._microbatches(self.valid_ds, i * t.global_batch_size), forward_only=True))
            for i in range(t.eval_iters)
        ]
        for m in self.model:
            m.train()
        return None if losses[0] is None else sum(losses) / len(losses)

    def _reduce_loss(self, outputs) -> float | None:
        """Token-weighted mean LM loss over micro-batches and data-parallel ranks."""
        if not parallel_state.is_pipeline_last_stage():
            return None
        sums = torch.stack([o["lm loss"] for o in outputs]).sum(0).to(self.device)  # [loss, tokens]
        torch.distributed.all_reduce(sums, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        return (sums[0] / sums[1].clamp(min=1)).item()

    def _mtp_losses(self) -> list[float]:
        """Per-depth MTP losses megatron's GPTModel recorded during this step."""
        tracker = MTPLossLoggingHelper.tracker
        if "values" not in tracker or not parallel_state.is_pipeline_last_stage():
            return []
        values = tracker["values"].clone() / self.num_microbatches
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        torch.distributed.all_reduce(values, group=group)  # SUM then divide: gloo has no AVG
        MTPLossLoggingHelper.clean_loss_in_tracker()
        return (values / group.size()).tolist()

    # ---- the loop -------------------------------------------------------------------------

    def fit(self) -> None:
        t = self.cfg.train
        tokens_per_step = t.global_batch_size * t.seq_length
        window_start, window_steps = time.perf_counter(), 0
        while self.iteration < t.iters:
            step = self.train_step()
            self.iteration += 1
            self.consumed_samples += t.global_batch_size
            window_steps += 1
            last = self.iteration == t.iters
            valid = None
            due = (t.eval_interval and self.iteration % t.eval_interval == 0) or last
            if due and self.valid_ds is not None:
                valid = self.evaluate()
            if self.iteration % t.log_interval == 0 or last or valid is not None:
                elapsed = time.perf_counter() - window_start
                record = {
                    "iteration": self.iteration,
                    "lm_loss": step.lm_loss,
                    **{f"mtp_{d + 1}_loss": v for d, v in enumerate(step.mtp_losses)},
                    "grad_norm": step.grad_norm,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "tokens_per_s": tokens_per_step * window_steps / elapsed,
                    "skipped": step.skipped,
                    "consumed_samples": self.consumed_samples,
                    **step.moe_load,
                }
                if valid is not None:
                    record["valid_loss"] = valid
                self.metrics.write(record)
                window_start, window_steps = time.perf_counter(), 0
        self.metrics.close()


def _loss_func(loss_mask_bs: torch.Tensor, loss_bs: torch.Tensor):
    """megatron's 3-tuple loss contract: (loss sum, token count, values to report)."""
    mask = loss_mask_bs.reshape(-1).float()
    loss = torch.sum(loss_bs.reshape(-1).float() * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss.detach(), num_tokens.float()])
    return loss, num_tokens, {"lm loss": report}


def _moe_load(model) -> dict[str, float]:
    """Tokens per expert over their mean, max and min over experts, averaged over layers."""
    counts = [
        module.local_tokens_per_expert.clone()
        for chunk in model
        for module in chunk.modules()
        if getattr(module, "local_tokens_per_expert", None) is not None
    ]
    if not counts:
        return {}
    stacked = torch.stack(counts).float()  # [layers, experts]
    torch.distributed.all_reduce(
        stacked, group=parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    )
    ratio = stacked / stacked.mean(-1, keepdim=True).clamp(min=1)
    return {
        "moe_max_load": ratio.max(-1).values.mean().item(),
        "moe_min_load": ratio.min(-1).values.mean().item(),
    }
