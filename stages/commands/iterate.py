"""`distill iterate` / `make iterate`: the student beyond its teacher.

    distill iterate --config configs/demo.yaml --run demo --rounds 3 [key=value ...]
    make iterate RUN=demo ROUNDS=3

Round 1 is the run's pipeline (generate, filter, train, eval; finished stages are reused).
Each later round r: the student of round r - 1 samples the training questions still short of
kept traces, the teacher scores its traces (top-k for KD), the filter pools every round's
kept traces, a new student trains from the base model on the pool, and eval scores it
(`stages.iterate`; its stages live in `<run>/iterate/round-<r>/`). The loop stops after
`--rounds` (default `iterate.rounds`), or, with `iterate.until_flat`, after a round that
raised neither question coverage nor the `explain:` held-out accuracy, or when no question is
left to sample; it says which. Per round it prints and writes to `<run>/iterate.json`:
questions the student sampled, coverage, kept traces (teacher- and student-made), the tokens
of each, and held-out accuracy (`predict:`, `explain:`, and maj@k with `eval.vote_samples`).
"""

from __future__ import annotations

import time

LOOP_FILE = "iterate.json"


def table(rows: list[dict]) -> str:
    head = (f"{'round':>5}{'sampled':>9}{'covered':>14}{'kept':>7}{'by student':>12}"
            f"{'teacher tok':>13}{'student tok':>13}{'predict':>9}{'explain':>9}{'maj@k':>9}")
    lines = [head, "-" * len(head)]

    def pct(v):
        return f"{100 * v:>8.1f}%" if v is not None else f"{'-':>9}"

    for r in rows:
        share = f"{r['covered']} ({100 * r['covered'] / max(1, r['questions']):.0f}%)"
        votes = pct(r["explain_votes"])
        lines.append(f"{r['round']:>5}{r['sampled_questions']:>9}{share:>14}{r['kept']:>7}"
                     f"{r['student_kept']:>12}{r['teacher_tokens']:>13,}"
                     f"{r['student_tokens']:>13,}{pct(r['predict'])}{pct(r['explain'])}{votes}")
    return "\n".join(lines)


def iterate(cfg, run, rounds: int, force: bool = False) -> dict:
    """The loop on `run` (see the module docstring); returns what `iterate.json` holds."""
    from pipeline.executors import run_stage
    from pipeline.log import log
    from stages.commands.running import run_stages, say
    from stages.iterate import (coverage_row, copy_pool, plan_round, round_run, sample_stage,
                                score_stage)
    from stages.pool import scored
    from stages.rounds import wanted

    t0 = time.time()
    it = cfg.iterate
    # round 1 scores what eval.systems asks for (the teacher and the base student are the
    # references), and the student in both modes, as every later round does
    first_systems = list(dict.fromkeys(list(cfg.eval.systems) + ["predict", "explain"]))
    later = _with(cfg, ["predict", "explain"])
    first = _with(cfg, first_systems)
    if cfg.train.name:
        from pipeline.config import ConfigError

        raise ConfigError(["distill iterate trains each round's student in its train/ folder: "
                           "leave train.name unset"])
    rows, reference, why = [], [], f"{rounds} rounds done (--rounds)"
    say(f"==> iterate round 1 of {rounds}: the teacher's pipeline ({run})")
    run_stages(["generate"], first, run)  # --force never redoes the teacher's (paid) traces
    run_stages(["filter", "train", "eval"], first, run, force=force)
    results = run.stage("eval").read_json("report.json")["results"]
    reference = [r for r in results if r["system"].split("@")[0] in ("teacher", "base")]
    rows.append(coverage_row(1, run, results, 0))
    _save(run, rows, reference, cfg, "", t0)
    for number in range(2, rounds + 1):
        prev = round_run(run, number - 1)
        here = copy_pool(run, number)
        rnd = plan_round(later, run, number)
        if not rnd.count:
            why = (f"no question to sample in round {number}: every question has "
                   f"{wanted(cfg)} kept trace(s) (iterate.covered_share=0)")
            break
        say(f"==> iterate round {number} of {rounds}: the student of round {number - 1} "
            f"samples {rnd.count} questions ({rnd.samples} each, temperature "
            f"{rnd.temperature:g}) -> {here}")
        here.write_text("config.yaml", _yaml(later))
        run_stage(sample_stage(later, prev, rnd), here.stage(rnd.folder), force)
        scores, why_not = scored(later, here, number)
        if scores:
            say(f"==> iterate round {number}: the teacher scores the student's traces")
            run_stage(score_stage(later, here, number), here.stage(f"scored-round-{number}"),
                      force)
        else:
            log("iterate", f"the teacher does not score the student's traces ({why_not}): "
                "they train by cross-entropy, and KD skips them")
        run_stages(["filter", "train", "eval"], later, here, force=force)
        results = here.stage("eval").read_json("report.json")["results"]
        rows.append(coverage_row(number, here, results, rnd.count))
        _save(run, rows, reference, cfg, "", t0)
        before, now = rows[-2], rows[-1]
        if it.until_flat and now["covered"] <= before["covered"] and \
                (now["explain"] or 0) <= (before["explain"] or 0):
            why = (f"round {number} raised neither question coverage ({before['covered']} -> "
                   f"{now['covered']}) nor the explain: accuracy (iterate.until_flat)")
            break
    return _save(run, rows, reference, cfg, why, t0)


def _with(cfg, systems: list[str]):
    """`cfg` scoring the run's own train/ student in `systems` (checked like any setting)."""
    import dataclasses

    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, systems=systems,
                                                             variants=[""]))


def _yaml(cfg) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _save(run, rows, reference, cfg, why: str, t0: float) -> dict:
    data = {"rounds": rows, "reference": reference, "stopped": why,
            "settings": cfg.section("iterate"), "vote_samples": cfg.eval.vote_samples,
            "seconds": round(time.time() - t0, 1)}
    run.write_json(LOOP_FILE, data)
    return data
