"""The training loop, on megatron-core's DDP, optimizer, scheduler and pipeline schedules.

Legend: b micro-batch, s sequence.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper
from megatron.core.utils import get_batch_on_this_cp_rank

from data import batch_iterator, build_datasets, load_tokenizer
from model.msa.layer import MSACoreAttention
from parallel import gather
from pretrain import checkpoint, runtime, schedule, weights
from pretrain.config import RunConfig
from pretrain.settings import microbatches
from pretrain.flops import peak_tflops, throughput, train_flops_per_token
from pretrain.monitor import Monitor, memory_stats

log = logging.getLogger("pretrain")


@dataclass
class StepResult:
    lm_loss: float | None
    """Mean LM loss over the global batch (None on ranks without the loss)."""
    mtp_losses: list[float]
    indexer_loss: float | None
    """Mean MSA indexer KL loss over layers, micro-batches and ranks (None without MSA layers)."""
    grad_norm: float
    """Global gradient norm before clipping (NaN when the step was skipped)."""
    skipped: bool
    """Not applied: the loss or a gradient was not finite."""


class Trainer:
    """Builds everything from a RunConfig and runs `train.iters` steps (after the entry point's
    `parallel.patches.apply()`)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resolved_config: dict, source: weights.Source | None = None):
        """`source`: the weights the run loads (pretrain/weights.py `find_source`, whose model
        config `cfg.model` has adopted); None = look for them here."""
        self.cfg = cfg
        self.run_dir = run_dir
        self.resolved_config = resolved_config
        t = cfg.train
        rt = runtime.start(cfg)
        self.settings, self.device, self.layout, self.tconfig = rt.settings, rt.device, rt.layout, rt.tconfig
        self.backend = self.settings.backend
        self.dtype = self.settings.dtype
        self.num_microbatches = microbatches(cfg, self.layout)

        self.tokenizer = load_tokenizer(cfg.data, eod=cfg.model.eod_token_id)
        self.tokenizer.check_fits(cfg.model.vocab_size, f"model {cfg.model.name}")
        self.train_ds, self.valid_ds = build_datasets(
            cfg.data,
            seq_length=t.seq_length,
            seed=t.seed,
            train_samples=t.iters * t.global_batch_size,
            valid_samples=t.eval_iters * t.global_batch_size,
            tokenizer=self.tokenizer,
        )

        chunks = runtime.build_chunks(cfg, rt)
        self._msa_layers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, MSACoreAttention)]
        self.checkpoint_dir = weights.checkpoint_dir(cfg, run_dir)
        self.source = source if source is not None else weights.find_source(cfg, run_dir)
        if self.source is not None and not self.source.resume:
            self._init_from(chunks)  # before the optimizer copies the weights
        distributed_optimizer = self.settings.distributed_optimizer
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
        self.scheduler = schedule.build(self.optimizer, o, t.iters)
        self.moe_load: dict[str, torch.Tensor] = {}
        self.tconfig.finalize_model_grads_func = self._finalize_grads
        no_sync = [m.no_sync for m in self.model]
        self.tconfig.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        self.forward_backward = get_forward_backward_func()

        self.iteration = 0
        self.consumed_samples = 0
        self.skipped_iters = 0
        self.resumed_from: Path | None = None
        self.wandb_run_id: str | None = None
        if self.source is not None and self.source.resume:
            self._resume(self.source.path)
        self.is_logging_rank = (
            parallel_state.is_pipeline_last_stage()
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
        )
        self.monitor = Monitor(
            cfg, run_dir, enabled=self.is_logging_rank, total_iters=t.iters,
            start_iteration=self.iteration, wandb_run_id=self.wandb_run_id,
            resolved_config=resolved_config,
        )
        self.wandb_run_id = self.monitor.wandb_run_id
        self.flops_per_token = train_flops_per_token(cfg.model, t.seq_length)
        self.peak_tflops = peak_tflops(cfg.cluster, self.device)

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
        if self.iteration + 1 in self.cfg.train.fault_nan_iters:
            loss_bs = loss_bs * float("nan")
        return loss_bs, partial(loss_func, batch["loss_mask"])

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

    def _gather_moe_load(self) -> dict[str, float]:
        """MoE balance of the last step for a record: per layer group and over all layers.
        Collective over the pipeline group (each stage holds its own layers)."""
        local = {k: v.tolist() for k, v in self.moe_load.items()}
        stages = [None] * parallel_state.get_pipeline_model_parallel_world_size()
        torch.distributed.all_gather_object(stages, local, group=parallel_state.get_pipeline_model_parallel_group())
        groups = {k: v for stage in stages for k, v in stage.items()}
        record = {}
        for group, (max_load, min_load, bias_norm) in sorted(groups.items()):
            record[f"moe/max_load/{group}"] = max_load
            record[f"moe/min_load/{group}"] = min_load
            record[f"moe/bias_norm/{group}"] = bias_norm
        if groups:
            record["moe_max_load"] = max(v[0] for v in groups.values())
            record["moe_min_load"] = min(v[1] for v in groups.values())
        return record

    def train_step(self) -> StepResult:
        """One optimizer step over a global batch; skipped when the loss or a gradient is not finite."""
        step = self.compute_gradients()
        if self.cfg.train.full_state_dump:
            path = Path(self.cfg.train.full_state_dump) / f"iter_{self.iteration + 1:07d}.pt"
            gather.dump(self.model, path)
        return self.apply_gradients(step)

    def compute_gradients(self) -> StepResult:
        """Forward and backward of the next global batch, gradients reduced (DP, TP, PP
        embeddings) into megatron's grad buffers; nothing updated yet."""
        for m in self.model:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        microbatches = self._microbatches(self.train_ds, self.consumed_samples)
        outputs = self._run(microbatches, forward_only=False)
        lm_loss = self._reduce_loss(outputs)
        return StepResult(
            lm_loss, self._mtp_losses(), self._indexer_loss(), float("nan"),
            skipped=not self._all_finite(lm_loss),
        )

    def apply_gradients(self, step: StepResult) -> StepResult:
        """Clip and apply the gradients of `step` (unless it is skipped); advance the schedule."""
        if not step.skipped:
            ok, norm, _ = self.optimizer.step()
            assert ok, "the fp32/bf16 optimizers have no loss scaler that could reject a step"
            self.scheduler.step(increment=1)
            step.grad_norm = float(norm) if norm is not None else float("nan")
        return step

    def _all_finite(self, lm_loss: float | None) -> bool:
        """Whether every rank's gradients and the loss are finite (collective over all ranks).
        One min/max pass per gradient buffer, flags kept on the device, one host sync: no
        buffer-sized temporaries (`torch.isfinite(grads).all()` allocated 1.75x the fp32
        gradient buffers at the end of backward, 17 GiB at proxy_1gpu)."""
        bad = torch.zeros(1, device=self.device)
        if lm_loss is not None and not math.isfinite(lm_loss):
            bad += 1.0
        for chunk in self.model:
            for buffer in chunk.buffers + chunk.expert_parallel_buffers:
                if buffer.grad_data.numel():
                    lo, hi = torch.aminmax(buffer.grad_data)  # NaN propagates into both
                    bad += (~(torch.isfinite(lo) & torch.isfinite(hi))).float()
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        return bad.item() == 0.0

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

    def _indexer_loss(self) -> float | None:
        """The MSA indexer losses recorded during this step, averaged over every rank's layers
        (collective over all ranks: pipeline stages hold different layers)."""
        if not self.cfg.model.msa_layers():
            return None
        total, count = torch.zeros((), dtype=torch.float64, device=self.device), 0
        for layer in self._msa_layers:
            loss, n = layer.pop_indexer_loss()
            total, count = total + loss, count + n
        sums = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=self.device)])
        torch.distributed.all_reduce(sums)
        return (sums[0] / sums[1]).item() if sums[1] > 0 else None

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

    def _init_from(self, chunks) -> None:
        """Load the weights of checkpoint.init_from into the freshly initialised chunks; what
        the source lacks keeps its initialisation."""
        source = self.source
        mismatch = [k for k in weights.WEIGHT_KEYS if getattr(self.cfg.model, k) != source.model[k]]
        assert not mismatch, f"the model config has not adopted the source's {mismatch} (weights.adopt)"
        if source.hf:
            from model.hf.config import read_config
            from model.hf.load import load as load_hf

            plan = load_hf(chunks, self.cfg.model, source.path, read_config(source.path), seed=self.cfg.train.seed)
            missing, unused = sorted(plan.init_keys), []  # anything else in it is an error (ConvertError)
            if plan.skipped_note():
                log.info("%s: %s", source.path, plan.skipped_note())
        else:
            missing, unused = checkpoint.load_weights(source.path, chunks)
        log.info("initialised from %s%s", "hf:" if source.hf else "", source.path)
        if missing:
            log.warning("not in %s, initialised: %s", source.path, _summarise(missing))
        if unused:
            log.warning("in %s but not in this model, not used: %s", source.path, _summarise(unused))

    def _resume(self, path: Path) -> None:
        progress = checkpoint.load(path, self.model, self.optimizer, config=self.resolved_config)
        if progress["scheduler"] is not None:
            schedule.resume(self.scheduler, progress["scheduler"], self.cfg.optim.on_resume, where=str(path))
        self.iteration = progress["iteration"]
        self.consumed_samples = progress["consumed_samples"]
        self.wandb_run_id = progress["wandb_run_id"]
        self.resumed_from = path

    def save(self) -> None:
        path = checkpoint.save(
            self.checkpoint_dir, self.iteration, self.model, self.optimizer, self.scheduler,
            consumed_samples=self.consumed_samples, wandb_run_id=self.wandb_run_id,
            config=self.resolved_config, keep=self.cfg.checkpoint.keep,
        )
        self.monitor.event(f"saved checkpoint {path}")

    def fit(self) -> int:
        """Train to `train.iters`; returns the process exit code."""
        code = 1
        try:
            code = self._fit()
        finally:
            self.monitor.close(exit_code=code)
        return code

    def _fit(self) -> int:
        t, ckpt = self.cfg.train, self.cfg.checkpoint
        if self.resumed_from:
            self.monitor.event(f"resumed from {self.resumed_from} at iteration {self.iteration}")
        preempted = _PreemptionFlag()
        tokens_per_step = t.global_batch_size * t.seq_length
        window_start, window_steps, consecutive_skips = time.perf_counter(), 0, 0
        saved_at = self.iteration
        if ckpt.save_initial and self.iteration == 0:
            self.save()
        while self.iteration < t.iters:
            step = self.train_step()
            self.iteration += 1
            self.consumed_samples += t.global_batch_size
            window_steps += 1
            self.monitor.tick(self.iteration)
            if step.skipped:
                self.skipped_iters += 1
                consecutive_skips += 1
                log.warning("iteration %d skipped: loss or gradients not finite (%d in a row)",
                            self.iteration, consecutive_skips)
            else:
                consecutive_skips = 0
            last = self.iteration == t.iters
            valid = None
            due = (t.eval_interval and self.iteration % t.eval_interval == 0) or last
            if due and self.valid_ds is not None:
                valid = self.evaluate()
            if self.iteration % t.log_interval == 0 or last or valid is not None or step.skipped:
                elapsed = time.perf_counter() - window_start
                tokens_per_s = tokens_per_step * window_steps / elapsed
                tflops, mfu = throughput(
                    tokens_per_s, self.flops_per_token, self.layout.world, self.peak_tflops
                )
                record = {
                    "iteration": self.iteration,
                    "lm_loss": step.lm_loss,
                    **{f"mtp_{d + 1}_loss": v for d, v in enumerate(step.mtp_losses)},
                    **({"indexer_loss": step.indexer_loss} if step.indexer_loss is not None else {}),
                    "grad_norm": step.grad_norm,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "tokens_per_s": tokens_per_s,
                    "tflops_per_gpu": tflops,
                    "mfu": mfu,
                    "iter_time_s": elapsed / window_steps,
                    "skipped_iters": self.skipped_iters,
                    "consumed_samples": self.consumed_samples,
                    **self._gather_moe_load(),
                    **memory_stats(self.device),
                }
                if valid is not None:
                    record["valid_loss"] = valid
                self.monitor.log(record)
                window_start, window_steps = time.perf_counter(), 0
            if consecutive_skips > t.max_skipped:
                log.error(
                    "aborting: %d consecutive iterations had a NaN/Inf loss or gradient "
                    "(train.max_skipped=%d). The last checkpoint in %s is from before the "
                    "divergence; lower optim.lr or check the data, then resume.",
                    consecutive_skips, t.max_skipped, self.checkpoint_dir,
                )
                return 3
            stop = preempted.agreed(self.device)
            exiting = stop or (t.exit_interval and self.iteration % t.exit_interval == 0)
            interval_due = ckpt.interval and self.iteration % ckpt.interval == 0
            if ckpt.save and (interval_due or last or exiting):
                self.save()
                saved_at = self.iteration
            if stop:
                log.warning("received %s: saved iteration %d, exiting; resume with the same "
                            "command (checkpoint.load=auto)", preempted.name, saved_at)
                return 0
            if exiting:
                log.info("train.exit_interval=%d reached at iteration %d", t.exit_interval, self.iteration)
                return 0
        return 0


class _PreemptionFlag:
    """SIGTERM / SIGUSR1 (Slurm's --signal before the time limit) ask for save-and-exit after
    the current step. The flag is agreed on by all ranks, since the signal may reach only some."""

    def __init__(self):
        self.name: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.name = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.name else 0.0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and not self.name:
            self.name = "a preemption signal on another rank"
        return bool(flag.item())


def _summarise(keys: list[str], most: int = 12) -> str:
    """Checkpoint keys for a log line: per-layer keys folded into one pattern each."""
    import re

    folded = sorted({re.sub(r"\.layers\.\d+\.", ".layers.*.", k) for k in keys})
    more = f" (+{len(folded) - most} more)" if len(folded) > most else ""
    return f"{len(keys)} tensors: " + ", ".join(folded[:most]) + more


def loss_func(loss_mask_bs: torch.Tensor, loss_bs: torch.Tensor):
    """megatron's 3-tuple loss contract: (loss sum, token count, values to report)."""
    mask = loss_mask_bs.reshape(-1).float()
    loss = torch.sum(loss_bs.reshape(-1).float() * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss.detach(), num_tokens.float()])
    return loss, num_tokens, {"lm loss": report}


def _moe_load(model) -> dict[str, torch.Tensor]:
    """Per router on this rank: [tokens/mean max, tokens/mean min, expert-bias norm], keyed by
    its layer group (8 consecutive layers, e.g. `L00-07`; `mtp` for the MTP modules)."""
    rows: dict[str, list[torch.Tensor]] = {}
    for chunk in model:
        for name, module in chunk.module.named_modules():
            if getattr(module, "local_tokens_per_expert", None) is None:
                continue
            if name.startswith("mtp."):
                group = "mtp"
            else:
                first = (module.layer_number - 1) // 8 * 8
                group = f"L{first:02d}-{first + 7:02d}"
            counts = module.local_tokens_per_expert.clone().float()
            rows.setdefault(group, []).append((counts, module.expert_bias.norm()))
    if not rows:
        return {}
    # Token counts of one layer are split over TP x DP x CP ranks: sum them.
    flat = torch.stack([c for group in rows.values() for c, _ in group])  # [routers, experts]
    torch.distributed.all_reduce(
        flat, group=parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    )
    ratio = flat / flat.mean(-1, keepdim=True).clamp(min=1)
    out, i = {}, 0
    for group, members in rows.items():
        n = len(members)
        bias = torch.stack([b for _, b in members])
        out[group] = torch.stack(
            [ratio[i : i + n].max(-1).values.mean(), ratio[i : i + n].min(-1).values.mean(), bias.mean()]
        )
        i += n
    return out
