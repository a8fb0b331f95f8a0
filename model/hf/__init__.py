"""Hugging Face checkpoints of MiniMax-M2 (and M3's sparse-attention names): what this project
knows about them, below the training run so that `pretrain` can load HF weights on the fly and
`convert` can import and export them.

- `config.py`: config.json <-> `ModelConfig`;
- `names.py`: HF tensor names <-> our checkpoint keys (megatron's layout-independent
  `sharded_state_dict` keys) and the transform of each, and the checks that every tensor is
  expected, present and of the right shape;
- `safetensors.py`: sharded safetensors read one tensor at a time (block-FP8 dequantised) and
  written as a stream of bounded shards;
- `load.py`: fill built model chunks, in any parallel layout, from an HF checkpoint (the import's
  core, and what training calls to start from HF weights).

docs/checkpoints.md is the user-facing description.
"""

from __future__ import annotations


class ConvertError(ValueError):
    """An HF checkpoint (or a checkpoint to export) that cannot be converted: the message names
    the tensor or config field and what to do."""
