"""Stage 3, train: `stage.py` (the stage, the kept traces it reads, the held-out and
validation shares, its targets, the one shard that writes the adapter)."""
