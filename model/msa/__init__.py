"""MSA, MiniMax sparse attention: per token and GQA group, exact attention over the top-k key
blocks that a small index branch selects.

- `api`: the functions below and their contracts (shapes, what is differentiable);
- `dispatch`: the one place that decides, per op and call, what runs it: the Triton kernels on
  CUDA, their sm90 Gluon versions on Hopper, the PyTorch reference elsewhere (`msa_backends`
  forces a choice);
- `ops/`: the kernels, one module per op (`plan`, `select`, `attention`, `indexer`), each Triton
  kernel with its launcher and autograd Function, and the sm90 Gluon variants beside them
  (`select_sm90`, `attention_sm90`);
- `reference`: plain PyTorch, chunked, the CPU path and the ground truth of the kernel tests;
- `layer`: the megatron-core layer (index branch, core attention, indexer loss);
- `cp`: MSA under context parallelism (selection with global block ids, attention on the ring).
"""

from model.msa.api import (
    attention_block_mass,
    dense_block_mass,
    dense_block_scores,
    dense_block_valid,
    indexer_kl_loss,
    msa_attention,
    msa_attention_with_lse,
    msa_attention_with_mass,
    msa_block_scores,
    msa_select,
    msa_select_with_scores,
    selection_recall,
)
from model.msa.dispatch import msa_backends

__all__ = [
    "attention_block_mass",
    "dense_block_mass",
    "dense_block_scores",
    "dense_block_valid",
    "indexer_kl_loss",
    "msa_attention",
    "msa_attention_with_lse",
    "msa_attention_with_mass",
    "msa_backends",
    "msa_block_scores",
    "msa_select",
    "msa_select_with_scores",
    "selection_recall",
]
