"""Students at several training seeds on one pool: what `make coverage --seeds` and `distill
iterate --seeds` use to give each accuracy as a mean and a spread.

The first seed is the pool's own student (`train/`); every other seed trains into
`train-seed<s>/` on the same kept traces with only `train.seed` changed, and is scored by the
same eval (its predictions beside the first's).
"""

from __future__ import annotations

import dataclasses
import statistics


def seed_list(text: str) -> list[int]:
    """`0,1,2` -> [0, 1, 2]: distinct non-negative integers, or a ConfigError."""
    from pipeline.config import ConfigError

    try:
        seeds = [int(s) for s in text.replace(",", " ").split()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError([f"--seeds {text!r}: give distinct non-negative integers, "
                           "comma-separated (e.g. 0,1,2)"])
    return seeds


def seed_name(seeds: list[int], seed: int) -> str:
    """The student of `seed`: the first seed trains the pool's own `train/`."""
    return "" if seed == seeds[0] else f"seed{seed}"


def with_settings(cfg, **sections):
    """`cfg` with fields of some sections replaced: `with_settings(cfg, train={"seed": 1})`."""
    return cfg.replace(**{name: dataclasses.replace(getattr(cfg, name), **fields)
                          for name, fields in sections.items()})


def student_results(run, name: str) -> tuple[dict, dict | None]:
    """({system: accuracy}, its maj@k result or None) of student `name` in `run`'s eval."""
    results = run.stage("eval").read_json("report.json")["results"]
    mine = [r for r in results if r.get("variant", "") == name]
    scores = {r["system"]: r["accuracy"] for r in mine if "@" not in r["system"]}
    return scores, next((r for r in mine if r["system"].startswith("explain@")), None)


def train_seeds(cfg, run, seeds: list[int], votes: int, extra_systems: list[str],
                skip_first: bool = False) -> tuple[dict, dict | None, list[dict]]:
    """Each seed's student on `run`'s pool, trained and scored (`predict:`, `explain:`; maj@k
    of the first seed with `votes`): (seed -> {system: accuracy}, the first seed's maj@k, the
    results of `extra_systems` such as the teacher). `skip_first`: the first seed's student
    is trained and scored already (the loop did it); only `extra_systems` are scored then."""
    from stages.commands.running import run_stages

    scores, voted, extra = {}, None, []
    for seed in seeds:
        name = seed_name(seeds, seed)
        first = seed == seeds[0]
        systems = ["predict", "explain"] + (extra_systems if first else [])
        c = with_settings(cfg, train={"seed": seed, "name": name},
                          eval={"systems": systems, "variants": [name],
                                "vote_samples": votes if first else 0})
        if not (first and skip_first):
            run_stages(["train", "eval"], c, run)
        elif extra_systems:
            run_stages(["eval"], c, run)
        scores[seed], maj = student_results(run, name)
        if first:
            voted = maj
            results = run.stage("eval").read_json("report.json")["results"]
            extra = [r for r in results if r["system"] in extra_systems]
    return scores, voted, extra


def spread(scores: dict[int, dict], system: str) -> dict | None:
    """{mean, sd, per_seed} of `system`'s accuracy over the seeds (None: never scored)."""
    values = [s[system] for s in scores.values() if s.get(system) is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": {str(seed): s.get(system) for seed, s in scores.items()}}


def show(v: dict | None, width: int = 16) -> str:
    """`62.3% ± 4.1` (the spread only over more than one seed), right-aligned."""
    if v is None:
        return f"{'-':>{width}}"
    text = f"{100 * v['mean']:.1f}%" + (f" ± {100 * v['sd']:.1f}" if len(v["per_seed"]) > 1
                                        else "")
    return f"{text:>{width}}"
