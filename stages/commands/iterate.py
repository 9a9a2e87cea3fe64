"""`distill iterate` / `make iterate`: the student beyond its teacher.

    distill iterate --config configs/demo.yaml --run demo --rounds 3 [key=value ...]
    make iterate RUN=demo ROUNDS=3

Round 1 is the run's pipeline (generate, filter, train, eval; finished stages are reused).
Each later round r: the student of round r - 1 samples the training questions still short of
kept traces, the teacher scores its traces (top-k for KD), the filter pools every round's
kept traces, a new student trains from the base model on the pool, and eval scores it
(`stages.iterate.stage`; its stages live in `<run>/iterate/round-<r>/`). The loop stops after
`--rounds` (default `iterate.rounds`), or, with `iterate.until_flat`, after a round that
raised neither question coverage nor the `explain:` held-out accuracy, or when no question is
left to sample; it says which. `until_flat` judges accuracy on the validation split
(`task.validation_share` of the training questions, scored into each round's
`eval-validation/`), never on the held-out split; without one it judges by coverage alone
and says so. A round whose filter kept no trace more than the round before stops before
training (there is nothing new to learn from) and says why. Per round it prints and writes
to `<run>/iterate.json`: questions the student sampled, coverage, kept traces (teacher- and
student-made), the tokens of each, held-out accuracy (`predict:`, `explain:`, and maj@k with
`eval.vote_samples`) and the validation `explain:` accuracy.
"""

from __future__ import annotations

import time

from pipeline.log import log
from stages.commands.running import say

LOOP_FILE = "iterate.json"


def table(rows: list[dict]) -> str:
    validated = any(r.get("validation_explain") is not None for r in rows)
    head = (f"{'round':>5}{'sampled':>9}{'covered':>14}{'kept':>7}{'by student':>12}"
            f"{'teacher tok':>13}{'student tok':>13}{'predict':>9}{'explain':>9}{'maj@k':>9}"
            + (f"{'valid.':>9}" if validated else ""))
    lines = [head, "-" * len(head)]

    def pct(v):
        return f"{100 * v:>8.1f}%" if v is not None else f"{'-':>9}"

    for r in rows:
        share = f"{r['covered']} ({100 * r['covered'] / max(1, r['questions']):.0f}%)"
        votes = pct(r["explain_votes"])
        lines.append(f"{r['round']:>5}{r['sampled_questions']:>9}{share:>14}{r['kept']:>7}"
                     f"{r['student_kept']:>12}{r['teacher_tokens']:>13,}"
                     f"{r['student_tokens']:>13,}{pct(r['predict'])}{pct(r['explain'])}{votes}"
                     + (pct(r.get("validation_explain")) if validated else ""))
    return "\n".join(lines)


def validation_explain(cfg, run, force: bool = False) -> float | None:
    """The `explain:` accuracy of `run`'s student on the validation split (greedy, into
    `eval-validation/`), or None when the task has no validation split."""
    import dataclasses

    from pipeline.tasks import load_split
    from stages.eval.stage import folder_name
    from stages.eval.stage import main as evaluate

    if load_split(cfg.task, "validation").num_rows == 0:
        return None
    checked = cfg.replace(eval=dataclasses.replace(
        cfg.eval, split="validation", systems=["explain"], variants=[""], vote_samples=0,
        n=None))
    evaluate(checked, run, force=force)
    results = run.stage(folder_name(checked)).read_json("report.json")["results"]
    return next(r["accuracy"] for r in results if r["system"] == "explain")


def iterate(cfg, run, rounds: int, force: bool = False) -> dict:
    """The loop on `run` (see the module docstring); returns what `iterate.json` holds."""
    from pipeline.executors import run_stage
    from stages.commands.running import run_stages, say
    from stages.iterate.stage import (coverage_row, copy_pool, plan_round, round_run, sample_stage,
                                score_stage)
    from stages.filter.pool import scored
    from stages.generate.rounds import wanted

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
    if cfg.train.max_steps > 0:
        log("iterate", f"train.max_steps={cfg.train.max_steps} trains every round's student for "
            "that many steps whatever its pool, so a round with twice the traces trains each "
            "half as often; leave it unset to train for train.epochs over each round's pool")
    rows, reference, why = [], [], f"{rounds} rounds done (--rounds)"
    say(f"==> iterate round 1 of {rounds}: the teacher's pipeline ({run})")
    run_stages(["generate"], first, run)  # --force never redoes the teacher's (paid) traces
    run_stages(["filter", "train", "eval"], first, run, force=force)
    results = run.stage("eval").read_json("report.json")["results"]
    reference = [r for r in results if r["system"].split("@")[0] in ("teacher", "base")]
    rows.append(coverage_row(1, run, results, 0))
    if it.until_flat:
        rows[-1]["validation_explain"] = validation_explain(later, run, force)
        if rows[-1]["validation_explain"] is None:
            log("iterate", "no validation split (task.validation_share=0): "
                "iterate.until_flat judges a round by question coverage alone, never by the "
                "held-out accuracy")
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
        bare = rows[-1].get("explain_no_steps")
        if bare is not None and bare >= 0.5:
            log("iterate", f"the student of round {number - 1} writes no calculation step in "
                f"{100 * bare:.0f}% of its held-out explain: answers: most of its samples will "
                "fail the filter's step check")
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
        run_stages(["filter"], later, here, force=force)
        before = rows[-1]
        counters = here.stage("filter").manifest()["counters"]
        if counters.get("kept", 0) <= before["kept"]:
            rows.append(coverage_row(number, here, [], rnd.count))
            why = (f"round {number} kept no new trace: none of the {rnd.count * rnd.samples} "
                   f"traces the student of round {number - 1} wrote for {rnd.count} questions "
                   f"passed the filter ({_top_reasons(counters)}; see "
                   f"{here.stage('filter')}/funnel.json), so a new student would learn nothing "
                   "new: stopped before training")
            break
        run_stages(["train", "eval"], later, here, force=force)
        results = here.stage("eval").read_json("report.json")["results"]
        rows.append(coverage_row(number, here, results, rnd.count))
        now = rows[-1]
        if it.until_flat:
            now["validation_explain"] = validation_explain(later, here, force)
        _save(run, rows, reference, cfg, "", t0)
        if it.until_flat and now["covered"] <= before["covered"] and (
                now.get("validation_explain") is None
                or now["validation_explain"] <= (before.get("validation_explain") or 0)):
            judged = ("" if now.get("validation_explain") is None else
                      f" nor the validation explain: accuracy "
                      f"({100 * (before.get('validation_explain') or 0):.1f}% -> "
                      f"{100 * now['validation_explain']:.1f}%)")
            why = (f"round {number} raised neither question coverage ({before['covered']} -> "
                   f"{now['covered']}){judged} (iterate.until_flat)")
            break
    return _save(run, rows, reference, cfg, why, t0)


def more_seeds(cfg, run, done: dict, seeds: list[int]) -> dict:
    """Every trained round's pool trained again at the other `seeds` (`train-seed<s>/` in the
    round's folder, scored by its eval): each row gains `predict_seeds` and `explain_seeds`
    (mean, sd, per seed; the first seed is the loop's own student). Saved to iterate.json."""
    from stages.commands.seeds import spread, train_seeds
    from stages.iterate.stage import round_run

    later = _with(cfg, ["predict", "explain"])
    for row in done["rounds"]:
        if row["explain"] is None:  # stopped before training
            continue
        say(f"==> iterate round {row['round']}: its pool at seeds {seeds}")
        scores, _, _ = train_seeds(later, round_run(run, row["round"]), seeds, 0, [],
                                   skip_first=True)
        row["predict_seeds"], row["explain_seeds"] = (spread(scores, "predict"),
                                                      spread(scores, "explain"))
    run.write_json(LOOP_FILE, done)
    return done


def seeds_table(rows: list[dict]) -> str:
    """Per round: `predict:` and `explain:` over the seeds (mean ± sd, then each seed)."""
    from stages.commands.seeds import show

    lines = [f"{'round':>5}{'predict':>16}{'explain':>16}   per seed (predict / explain)"]
    for r in rows:
        if r.get("explain_seeds") is None:
            continue
        each = "  ".join(f"{100 * p:.1f}/{100 * e:.1f}" for p, e in zip(
            r["predict_seeds"]["per_seed"].values(), r["explain_seeds"]["per_seed"].values()))
        lines.append(f"{r['round']:>5}{show(r['predict_seeds'])}{show(r['explain_seeds'])}"
                     f"   {each}")
    return "\n".join(lines)


def _top_reasons(counters: dict, n: int = 3) -> str:
    """The filter's most frequent drop reasons, in words for a log line."""
    dropped = sorted(((v, k.split(":", 1)[1]) for k, v in counters.items()
                      if k.startswith("dropped:") and v), reverse=True)[:n]
    return "dropped most for " + ", ".join(f"{r} ({v})" for v, r in dropped) if dropped \
        else "nothing was dropped"


def _with(cfg, systems: list[str]):
    """`cfg` scoring the run's own train/ student in `systems` (checked like any setting)."""
    import dataclasses

    return cfg.replace(eval=dataclasses.replace(cfg.eval, systems=systems, variants=[""]))


def _yaml(cfg) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _save(run, rows, reference, cfg, why: str, t0: float) -> dict:
    data = {"rounds": rows, "reference": reference, "stopped": why,
            "settings": cfg.section("iterate"), "vote_samples": cfg.eval.vote_samples,
            "seconds": round(time.time() - t0, 1)}
    run.write_json(LOOP_FILE, data)
    return data
