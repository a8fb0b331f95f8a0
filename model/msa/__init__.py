"""MSA, MiniMax sparse attention: per token and GQA group, exact attention over the top-k key
blocks that a small index branch selects.

`api` holds the functions below and their contracts (Triton on CUDA, else `reference`);
`reference` is plain PyTorch, chunked, the ground truth of the tests; `triton_*` are the kernels.
"""

from model.msa.api import (
    attention_block_mass,
    dense_block_mass,
    dense_block_scores,
    dense_block_valid,
    indexer_kl_loss,
    msa_attention,
    msa_attention_with_lse,
    msa_block_scores,
    msa_select,
)

__all__ = [
    "attention_block_mass",
    "dense_block_mass",
    "dense_block_scores",
    "dense_block_valid",
    "indexer_kl_loss",
    "msa_attention",
    "msa_attention_with_lse",
    "msa_block_scores",
    "msa_select",
]
