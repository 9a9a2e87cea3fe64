"""Stage 2, filter, and what it needs: `stage.py` (the stage, its shard function, the funnel and
its table and figure), `pool.py` (what a filter reads: every generate round and the student
rounds of `distill iterate`) and `dataset_card.py` (the filter folder as a Hugging Face
dataset). Which traces are kept is decided one floor down (`stages.checks.keep`), where
generate's rounds count with the same decision."""
