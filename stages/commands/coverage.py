"""`make coverage`: the ladder, what each way of spending the teacher (and the student) is worth.

    python -m stages.commands.coverage --config configs/harder.yaml --run harder [key=value ...]
    python -m stages.commands.coverage --config configs/word-problems.yaml --run wp \\
        --seeds 0,1,2 --loop-rounds 2 --votes 4

Generates once with the config's rounds and hints (`generate.max_samples`,
`generate.hint_template`) in `<run>/`, then trains and scores a student on what each rung of
the ladder keeps, every other setting the same:

- `fixed`: the first round alone (`generate.n_samples` per question, no rounds, no hints);
- `adaptive`: + the rounds (questions short of kept traces sampled again);
- `adaptive+hints`: + the hinted round (uncovered labelled questions asked with the answer);
- `+gold-predict`: the same traces, `predict:` examples from every labelled question
  (`train.predict_on=labelled`);
- `+loop round 2`, `+loop round 3`, ... (`--loop-rounds`): `distill iterate` from the
  `+gold-predict` rung, which is its round 1: the student samples the questions still
  uncovered, the teacher scores its traces, a new student trains on the pool.

Every student trains for the config's `train.epochs` over its own pool (a bigger pool is
trained for more steps, never a fixed count); `--seeds` trains each rung's student at more
seeds on the same pool (the first seed is the rung's `train/` student, the others
`train-seed<s>/`), and the table gives each accuracy as the mean and the spread over them.
`--votes K` also scores the first seed's `explain:` mode by a majority vote over K samples.

A rung's run folder (`<run>-<rung>/`) gets a copy of the generate folders, so the teacher is
paid once and each filter reads only the rounds its settings ask for. Finished stages are
reused, so a stopped ladder resumes where it stopped. Prints the table (teacher tokens,
question coverage, tokens per covered question, kept traces, held-out accuracy in both modes,
maj@K) and writes it to `<run>/coverage.json`. `--no-students` stops after the filters (what
the teacher made and what the filter kept, without training).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

from stages.commands.cli import run_options

RUNGS = {  # rung -> (run folder suffix, its settings on top of the config's)
    "fixed": ("fixed", ["generate.max_samples=0", "generate.hint_template=null",
                        "train.predict_on=kept"]),
    "adaptive": ("adaptive", ["generate.hint_template=null", "train.predict_on=kept"]),
    "adaptive+hints": ("hints", ["train.predict_on=kept"]),
    "+gold-predict": ("gold", ["train.predict_on=labelled"]),
}
GOLD = "+gold-predict"  # the rung the loop starts from (its round 1)


def copy_generated(source, target) -> None:
    """The generate folders of `source` (every round) into `target` (a stale copy replaced)."""
    from stages.iterate import copy_finished, teacher_folders

    for name in teacher_folders(source):
        copy_finished(source, target, name)


def seed_name(seeds: list[int], seed: int) -> str:
    """The student of `seed`: the first seed trains the rung's own `train/`."""
    return "" if seed == seeds[0] else f"seed{seed}"


def rung_row(rung: str, run, scores: dict[int, dict] | None, votes: dict | None = None) -> dict:
    """One line of the table: what the rung's filter counted and its students' accuracy
    (`scores`: seed -> {system: accuracy}; `votes`: the first seed's maj@k result)."""
    counters = run.stage("filter").manifest()["counters"]
    scores = scores or {}

    def spread(system: str) -> dict | None:
        values = [s[system] for s in scores.values() if s.get(system) is not None]
        if not values:
            return None
        return {"mean": statistics.fmean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                "per_seed": {str(seed): s.get(system) for seed, s in scores.items()}}

    teacher = counters.get("teacher_tokens") or 0
    covered = counters.get("covered") or 0
    return {"rung": rung, "teacher_tokens": teacher,
            "student_tokens": counters.get("student_tokens", 0),
            "questions": counters.get("questions"), "covered": covered,
            "tokens_per_covered": round(teacher / covered, 1) if covered else None,
            "covered_wanted": counters.get("covered_wanted"), "kept": counters.get("kept"),
            "hinted_kept": counters.get("hinted_kept", 0),
            "student_kept": counters.get("student_kept", 0),
            "predict": spread("predict"), "explain": spread("explain"),
            "explain_votes": votes["accuracy"] if votes else None,
            "votes": votes.get("votes") if votes else None}


def table(rows: list[dict], reference: list[dict], wanted: int) -> str:
    votes = next((r["votes"] for r in rows if r.get("votes")), None)
    head = (f"{'rung':<16}{'teacher tokens':>16}{'covered':>14}{f'with {wanted}':>8}"
            f"{'tok/covered':>12}{'kept':>7}{'hinted':>7}{'by student':>11}"
            f"{'predict':>16}{'explain':>16}" + (f"{f'maj@{votes}':>9}" if votes else ""))
    lines = [head, "-" * len(head)]

    def acc(v) -> str:
        if v is None:
            return f"{'-':>16}"
        text = f"{100 * v['mean']:.1f}%" + (f" ± {100 * v['sd']:.1f}"
                                            if len(v["per_seed"]) > 1 else "")
        return f"{text:>16}"

    for r in rows:
        share = f"{r['covered']} ({100 * r['covered'] / max(1, r['questions']):.0f}%)"
        per = f"{r['tokens_per_covered']:,.0f}" if r["tokens_per_covered"] else "-"
        line = (f"{r['rung']:<16}{r['teacher_tokens']:>16,}{share:>14}{r['covered_wanted']:>8}"
                f"{per:>12}{r['kept']:>7}{r['hinted_kept']:>7}{r.get('student_kept', 0):>11}"
                f"{acc(r['predict'])}{acc(r['explain'])}")
        if votes:
            line += (f"{100 * r['explain_votes']:>8.1f}%" if r.get("explain_votes") is not None
                     else f"{'-':>9}")
        lines.append(line)
    seeds = max((len(r["predict"]["per_seed"]) for r in rows if r.get("predict")), default=0)
    if seeds > 1:
        lines.append(f"(accuracy: mean ± sd over {seeds} training seeds on each rung's pool)")
    for r in reference:
        lines.append(f"{r['system']} ({'few-shot CoT' if r['system'] == 'teacher' else 'predict'})"
                     f": {100 * r['accuracy']:.1f}%")
    return "\n".join(lines)


def _results(run, name: str) -> dict:
    """{system: accuracy} of student `name` in `run`'s last eval, and its maj@k result."""
    results = run.stage("eval").read_json("report.json")["results"]
    mine = [r for r in results if r.get("variant", "") == name]
    scores = {r["system"]: r["accuracy"] for r in mine if "@" not in r["system"]}
    return scores, next((r for r in mine if r["system"].startswith("explain@")), None)


def _with(cfg, **sections):
    """`cfg` with fields of some sections replaced: `_with(cfg, train={"seed": 1})`."""
    return dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **fields)
                                       for name, fields in sections.items()})


def train_seeds(cfg, run, seeds: list[int], votes: int, extra_systems: list[str],
                skip_first: bool = False) -> tuple[dict, dict | None, list[dict]]:
    """Each seed's student on `run`'s pool, trained and scored (`predict:`, `explain:`; maj@k
    of the first seed with `votes`): (seed -> scores, the first seed's maj@k, the results of
    `extra_systems` such as the teacher). `skip_first`: the first seed's student is trained and
    scored already (the loop did it)."""
    from stages.commands.running import run_stages

    scores, voted, extra = {}, None, []
    for seed in seeds:
        name = seed_name(seeds, seed)
        first = seed == seeds[0]
        systems = ["predict", "explain"] + (extra_systems if first else [])
        c = _with(cfg, train={"seed": seed, "name": name},
                  eval={"systems": systems, "variants": [name],
                        "vote_samples": votes if first else 0})
        if not (first and skip_first):
            run_stages(["train", "eval"], c, run)
        scores[seed], maj = _results(run, name)
        if first:
            voted = maj
            results = run.stage("eval").read_json("report.json")["results"]
            extra = [r for r in results if r["system"] in extra_systems]
    return scores, voted, extra


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import ConfigError, load_config
    from pipeline.run_folder import RunFolder
    from stages.commands.cli import reported
    from stages.commands.iterate import iterate
    from stages.commands.running import run_stages, say
    from stages.iterate import round_run
    from stages.rounds import wanted

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/harder.yaml")
    run_options(parser)
    parser.add_argument("--no-students", action="store_true",
                        help="stop after the filters: no training, no evaluation")
    parser.add_argument("--seeds", default="0",
                        help="training seeds of every rung's student, comma-separated "
                        "(default 0)")
    parser.add_argument("--loop-rounds", type=int, default=0,
                        help="rounds of `distill iterate` after the +gold-predict rung "
                        "(default 0: none)")
    parser.add_argument("--votes", type=int, default=0,
                        help="also score the first seed's explain: mode by a majority vote "
                        "over this many samples (maj@k; default 0: off)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="settings for every rung (e.g. train.epochs=3)")
    args = parser.parse_args(argv)
    run = RunFolder.at(args.runs_dir, args.run)
    t0 = time.time()
    rows: list[dict] = []
    reference: list[dict] = []

    def work() -> None:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            seeds = []
        if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ConfigError([f"--seeds {args.seeds!r}: give distinct non-negative integers, "
                               "comma-separated (e.g. 0,1,2)"])
        if args.loop_rounds < 0 or args.votes < 0:
            raise ConfigError(["--loop-rounds and --votes take 0 or more"])
        base = load_config(args.config, args.overrides)
        if not base.generate.max_samples or not base.generate.hint_template:
            raise ConfigError(["the ladder compares rounds and hints: set generate.max_samples "
                               "above generate.n_samples and generate.hint_template (see "
                               "configs/harder.yaml)"])
        if base.train.max_steps > 0:
            raise ConfigError([f"train.max_steps={base.train.max_steps}: the ladder trains "
                               "every student for train.epochs over its own pool, so that a "
                               "bigger pool is not trained less per trace; leave max_steps "
                               "unset"])
        if base.train.name:
            raise ConfigError(["the ladder names its students itself: leave train.name unset"])
        run_stages(["generate"], base, run)
        done_folders = set()
        for i, (rung, (suffix, extra)) in enumerate(RUNGS.items()):
            say(f"==> rung {i + 1}/{len(RUNGS) + args.loop_rounds}: {rung}")
            target = RunFolder.at(args.runs_dir, f"{args.run}-{suffix}")
            copy_generated(run, target)
            cfg = load_config(args.config, args.overrides + extra)
            run_stages(["filter"] if suffix not in done_folders else [], cfg, target)
            done_folders.add(suffix)
            if args.no_students:
                rows.append(rung_row(rung, target, None))
                continue
            if rung == GOLD and args.loop_rounds:
                break  # the loop trains this rung's student as its round 1
            refs = ["teacher", "base"] if i == 0 else []
            scores, voted, extra_results = train_seeds(cfg, target, seeds, args.votes, refs)
            reference.extend(extra_results)
            rows.append(rung_row(rung, target, scores, voted))
        if args.no_students or not args.loop_rounds:
            return
        gold = RunFolder.at(args.runs_dir, f"{args.run}-gold")
        cfg = load_config(args.config, args.overrides + RUNGS[GOLD][1])
        cfg = _with(cfg, train={"seed": seeds[0]}, iterate={"until_flat": False},
                    eval={"systems": ["predict", "explain"], "vote_samples": args.votes})
        loop = iterate(cfg, gold, 1 + args.loop_rounds)
        say(f"==> the loop: {loop['stopped']}")
        for r in loop["rounds"]:
            number = r["round"]
            here = round_run(gold, number)
            rung = GOLD if number == 1 else f"+loop round {number}"
            if r["explain"] is None:  # the round stopped before training: nothing to score
                rows.append(rung_row(rung, here, None))
                continue
            scores, voted, _ = train_seeds(_with(cfg, eval={"vote_samples": args.votes}),
                                           here, seeds, args.votes, [], skip_first=True)
            rows.append(rung_row(rung, here, scores, voted))

    code = reported(work)
    if code:
        return code
    k = wanted(load_config(args.config, args.overrides))
    text = table(rows, reference, k)
    run.write_json("coverage.json", {"rungs": rows, "reference": reference, "wanted": k,
                                     "config": args.config, "overrides": args.overrides,
                                     "seeds": args.seeds, "loop_rounds": args.loop_rounds,
                                     "votes": args.votes,
                                     "seconds": round(time.time() - t0, 1)})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
