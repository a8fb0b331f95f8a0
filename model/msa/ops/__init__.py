"""MSA's kernels, one module per op, each with its sm90 (Gluon) variant beside it:

- `plan`: per query row tile, the union of the key blocks its tokens selected (a Triton kernel),
  and the helpers by which the query-outer kernels walk it;
- `select` / `select_sm90`: fused index scoring, causal block max and top-k block selection;
- `attention` / `attention_sm90`: sparse attention over the selected blocks, forward and
  backward (`attention.MSAAttention` runs the launchers it is given);
- `indexer`: the indexer-loss terms, attention mass per selected block and index block scores
  (forward and backward);
- `common`, `common_sm90`: tile configurations and helpers the Triton / Gluon kernels share.

This is the bottom layer: it imports torch, triton and its own modules only
(tests/test_imports.py). Launchers run what they are told; which kernels run for a call
(the PyTorch reference, these Triton kernels, or the sm90 ones) is decided in one place,
`model.msa.dispatch`. Nothing is imported here, so that importing one op does not import Gluon.
"""
