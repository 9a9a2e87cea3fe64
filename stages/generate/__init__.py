"""Stage 1, generate, and what it needs: `stage.py` (the stage, its shard function
`generate_shard`, the teacher's factory, the ledger of a shard), `rounds.py` (the later rounds
and the hinted round: the plan of each from the traces before it, their fingerprints, what the
filter reads of them) and `estimate.py` (`distill generate --estimate`)."""
