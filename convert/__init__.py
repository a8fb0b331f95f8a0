"""Moving weights in and out: Hugging Face MiniMax-M2 checkpoints <-> checkpoints of ours.

`python -m convert import-hf|export-hf` (`__main__.py`); the import driver (`importer.py`), the
streaming exporter (`exporter.py`) and their progress display (`progress.py`). What an HF
checkpoint holds and how its names map to ours lives in model/hf/ (the trainer reads HF weights
through it too); docs/checkpoints.md is the user's guide.
"""
