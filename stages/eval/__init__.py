"""Stage 4, eval: `stage.py` (the stage, the systems it scores, their shards, majority voting,
the table)."""
