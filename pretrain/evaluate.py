"""`python -m pretrain.evaluate checkpoint.dir=CKPT_DIR data.prefixes=[P] data.tokenizer=T
train.seq_length=S [eval.max_tokens=N] [parallel.* ...]`: the language-model loss of a checkpoint.

Takes the newest complete checkpoint in checkpoint.dir (or checkpoint.load=PATH); the model's
shape comes with its weights (pretrain/weights.py). Reads every document of each prefix in
order (documents concatenated with their end-of-document token, as data.prepare writes them;
data.split is not used): window w holds tokens [w*S, (w+1)*S], S inputs and their S next tokens
as labels (consecutive windows share one token); the tail that does not fill a window is
dropped; with eval.max_tokens it stops after the first window that reaches that many predicted
tokens. Runs under any parallel layout (torchrun) and on CPU; windows are dealt round-robin to
the data-parallel ranks, eval.micro_batch_size per forward pass.

The last line is JSON: {loss, tokens, perplexity, windows, seq_length, iteration}, loss the mean
over the `tokens` predicted tokens (the main head; MTP heads are not scored); with
eval.indexer_recall=true also `indexer_recall`, the full attention mass the MSA selections keep.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from functools import partial
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.config import RunConfig, register
from pretrain.resolvers import register_resolvers

log = logging.getLogger("pretrain")

register()
register_resolvers()


def evaluate(run: RunConfig, path: Path) -> dict:
    """Loss of checkpoint `path` over the windows of run.data.prefixes. Collective."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_batch_on_this_cp_rank

    from data import load_tokenizer
    from data.loader import document_windows
    from pretrain import checkpoint, runtime
    from pretrain.trainer import loss_func

    rt = runtime.start(run)
    S, mbs = run.train.seq_length, run.eval.micro_batch_size
    tokenizer = load_tokenizer(run.data, eod=run.model.eod_token_id)
    tokenizer.check_fits(run.model.vocab_size, f"the checkpoint's model ({path})")
    chunks = runtime.build_chunks(run, rt)
    missing, unused = checkpoint.load_weights(path, chunks)
    if missing or unused:
        raise checkpoint.CheckpointError(
            f"{path}: does not hold this model's weights (missing {missing[:4]}, unused {unused[:4]})"
        )
    from model.msa.layer import MSACoreAttention

    msa_layers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, MSACoreAttention)]
    for chunk in chunks:
        chunk.eval()
    for layer in msa_layers:
        layer.measure_recall = run.eval.indexer_recall

    windows = list(document_windows(run.data.prefix_paths(), S, run.eval.max_tokens))
    if not windows:
        raise ValueError(f"data.prefixes hold fewer than train.seq_length + 1 = {S + 1} tokens: no window")
    dp, dp_rank = rt.layout.dp, parallel_state.get_data_parallel_rank()
    mine = windows[dp_rank::dp]
    steps = math.ceil(math.ceil(len(windows) / dp) / mbs)  # every rank runs as many (pipeline schedules)
    batches = [_batch(mine[i * mbs : (i + 1) * mbs], mbs, S) for i in range(steps)]

    def forward_step(data_iterator, model):
        batch = {k: v.to(rt.device) for k, v in next(data_iterator).items()}
        if rt.layout.cp > 1:
            batch = get_batch_on_this_cp_rank(batch)
        loss_bs = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                        loss_mask=batch["loss_mask"])
        return loss_bs, partial(loss_func, batch["loss_mask"])

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches),
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=steps,
            seq_length=S // rt.layout.cp,
            micro_batch_size=mbs,
            forward_only=True,
        )
    # [loss sum, tokens]: the last stage's ranks hold it per data/context-parallel shard; one
    # rank per shard (tensor-parallel rank 0) contributes, summed over all ranks.
    sums = torch.zeros(2, dtype=torch.float64, device=rt.device)
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        sums += torch.stack([o["lm loss"] for o in outputs]).sum(0).to(sums)
    torch.distributed.all_reduce(sums)
    loss = (sums[0] / sums[1]).item()
    result = {
        "loss": loss, "tokens": int(sums[1].item()), "perplexity": math.exp(loss), "windows": len(windows),
        "seq_length": S, "iteration": checkpoint.iteration_of(path),
    }
    if run.eval.indexer_recall:
        # layers (pipeline stages), groups (tensor parallel) and windows (data parallel) are
        # disjoint over ranks; padded windows are measured too, but each is a copy of a real one
        recall = torch.zeros(2, dtype=torch.float64, device=rt.device)
        for layer in msa_layers:
            total, rows = layer.pop_recall()
            recall += torch.stack([torch.as_tensor(total, dtype=torch.float64, device=rt.device),
                                   torch.tensor(float(rows), dtype=torch.float64, device=rt.device)])
        torch.distributed.all_reduce(recall)
        result["indexer_recall"] = (recall[0] / recall[1]).item() if recall[1] > 0 else None
    return result


def _batch(windows: list[torch.Tensor], mbs: int, S: int) -> dict[str, torch.Tensor]:
    """A micro-batch of `mbs` windows (padded with masked-out copies of the first, or of zeros)."""
    rows = windows + [windows[0] if windows else torch.zeros(S + 1, dtype=torch.int64)] * (mbs - len(windows))
    stacked = torch.stack(rows)  # [b, S + 1]
    mask = torch.zeros(mbs, S, dtype=torch.float32)
    mask[: len(windows)] = 1.0
    return {
        "tokens": stacked[:, :-1].contiguous(),
        "labels": stacked[:, 1:].contiguous(),
        "loss_mask": mask,
        "position_ids": torch.arange(S).expand(mbs, S).contiguous(),
    }


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from parallel import patches, setup
    from pretrain import weights
    from pretrain.checkpoint import CheckpointError, resolve_load
    from pretrain.settings import check_layout

    patches.apply()
    hydra_cfg = HydraConfig.get()
    try:
        run: RunConfig = OmegaConf.to_object(cfg)
        if run.data.prefixes is None:
            raise ValueError("data.prefixes is required: the indexed datasets to evaluate on (python -m data.prepare)")
        run.data.validate_paths()
        directory = weights.checkpoint_dir(run, Path(hydra_cfg.runtime.output_dir))
        path = resolve_load(run.checkpoint.load or "auto", directory)
        if path is None:
            raise ValueError(f"checkpoint.dir={str(directory)!r} holds no complete checkpoint to evaluate")
        explicit = weights.explicit_model_keys(run.model, dict(hydra_cfg.runtime.choices),
                                               list(hydra_cfg.overrides.task))
        run.model, notes = weights.adopt(run.model, weights.saved_model_config(path), explicit, path)
        for note in notes:
            log.info("%s", note)
        layout = check_layout(run, setup.world_size_from_env())
        if run.eval.indexer_recall and not run.model.msa_layers():
            raise ValueError("eval.indexer_recall=true but the model has no MSA layer (model.attention.type)")
        if run.eval.indexer_recall and layout.cp > 1:
            raise ValueError("eval.indexer_recall needs each sequence's whole attention on one rank: set parallel.cp=1")
        result = evaluate(run, path)
    except (ValueError, OmegaConfBaseException, CheckpointError) as e:
        cause = e.__cause__ if isinstance(e, OmegaConfBaseException) and e.__cause__ else e
        log.error("evaluate error: %s", cause)
        sys.exit(2)
    if torch.distributed.get_rank() == 0:
        log.info("%s: loss %.6f over %d tokens (%d windows of %d)", path, result["loss"], result["tokens"],
                 result["windows"], result["seq_length"])
        print(json.dumps(result), flush=True)
    setup.destroy()


if __name__ == "__main__":
    main()
