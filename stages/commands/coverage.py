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
`--rungs gold` trains only the named rungs' students (the others show what their filter kept):
on a big set each student costs what the teacher did.

A rung's run folder (`<run>-<rung>/`) gets a copy of the generate folders, so the teacher is
paid once and each filter reads only the rounds its settings ask for. Finished stages are
reused, so a stopped ladder resumes where it stopped. Prints the table (teacher tokens,
question coverage, tokens per covered question, kept traces, held-out accuracy in both modes,
maj@K) and writes it to `<run>/coverage.json`. `--no-students` stops after the filters (what
the teacher made and what the filter kept, without training).
"""

from __future__ import annotations

import argparse
import sys
import time

from pipeline.config import Config
from stages.commands.cli import run_options
from stages.commands.seeds import seed_list, show, spread, train_seeds, with_settings

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
    from stages.iterate.stage import copy_finished, teacher_folders

    for name in teacher_folders(source):
        copy_finished(source, target, name)


def rung_row(rung: str, run, scores: dict[int, dict] | None, votes: dict | None = None) -> dict:
    """One line of the table: what the rung's filter counted and its students' accuracy
    (`scores`: seed -> {system: accuracy}; `votes`: the first seed's maj@k result)."""
    counters = run.stage("filter").manifest()["counters"]
    scores = scores or {}
    teacher = counters.get("teacher_tokens") or 0
    covered = counters.get("covered") or 0
    return {"rung": rung, "teacher_tokens": teacher,
            "student_tokens": counters.get("student_tokens", 0),
            "questions": counters.get("questions"), "covered": covered,
            "tokens_per_covered": round(teacher / covered, 1) if covered else None,
            "covered_wanted": counters.get("covered_wanted"), "kept": counters.get("kept"),
            "hinted_kept": counters.get("hinted_kept", 0),
            "student_kept": counters.get("student_kept", 0),
            "predict": spread(scores, "predict"), "explain": spread(scores, "explain"),
            "explain_votes": votes["accuracy"] if votes else None,
            "votes": votes.get("votes") if votes else None}


def table(rows: list[dict], reference: list[dict], wanted: int) -> str:
    votes = next((r["votes"] for r in rows if r.get("votes")), None)
    head = (f"{'rung':<16}{'teacher tokens':>16}{'covered':>14}{f'with {wanted}':>8}"
            f"{'tok/covered':>12}{'kept':>7}{'hinted':>7}{'by student':>11}"
            f"{'predict':>16}{'explain':>16}" + (f"{f'maj@{votes}':>9}" if votes else ""))
    lines = [head, "-" * len(head)]
    for r in rows:
        share = f"{r['covered']} ({100 * r['covered'] / max(1, r['questions']):.0f}%)"
        per = f"{r['tokens_per_covered']:,.0f}" if r["tokens_per_covered"] else "-"
        line = (f"{r['rung']:<16}{r['teacher_tokens']:>16,}{share:>14}{r['covered_wanted']:>8}"
                f"{per:>12}{r['kept']:>7}{r['hinted_kept']:>7}{r.get('student_kept', 0):>11}"
                f"{show(r['predict'])}{show(r['explain'])}")
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


def _parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--rungs", default=",".join(r[0] for r in RUNGS.values()),
                        help="the rungs whose students are trained and scored, by folder "
                        "suffix, comma-separated (default all: fixed,adaptive,hints,gold); "
                        "the others show what their filter kept")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="settings for every rung (e.g. train.epochs=3)")
    return parser


def _checked(args: argparse.Namespace) -> tuple[Config, list[str]]:
    """The ladder's base settings and the rungs it trains, or a clear error."""
    from pipeline.config import ConfigError, load_config

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
    trained = [r.strip() for r in args.rungs.split(",") if r.strip()]
    unknown = sorted(set(trained) - {suffix for suffix, _ in RUNGS.values()})
    if unknown or not trained:
        raise ConfigError([f"--rungs {args.rungs!r}: name rungs by their folder suffix, "
                           "from fixed, adaptive, hints, gold"])
    if args.loop_rounds and RUNGS[GOLD][0] not in trained:
        raise ConfigError(["--loop-rounds starts from the gold rung's student: add gold "
                           "to --rungs"])
    return base, trained


def _rungs(args: argparse.Namespace, run, trained: list[str], seeds: list[int],
           rows: list[dict], reference: list[dict]) -> list[str]:
    """Filter (and train and score) each rung; the reference systems still to score."""
    from pipeline.config import load_config
    from pipeline.run_folder import RunFolder
    from stages.commands.running import run_stages, say

    done_folders = set()
    refs = ["teacher", "base"]  # scored once, beside the first student
    for i, (rung, (suffix, extra)) in enumerate(RUNGS.items()):
        say(f"==> rung {i + 1}/{len(RUNGS) + args.loop_rounds}: {rung}")
        target = RunFolder.at(args.runs_dir, f"{args.run}-{suffix}")
        copy_generated(run, target)
        cfg = load_config(args.config, args.overrides + extra)
        run_stages(["filter"] if suffix not in done_folders else [], cfg, target)
        done_folders.add(suffix)
        if args.no_students or suffix not in trained:
            rows.append(rung_row(rung, target, None))
            continue
        if rung == GOLD and args.loop_rounds:
            break  # the loop trains this rung's student as its round 1
        scores, voted, extra_results = train_seeds(cfg, target, seeds, args.votes, refs)
        reference.extend(extra_results)
        refs = []
        rows.append(rung_row(rung, target, scores, voted))
    return refs


def _loop_rungs(args: argparse.Namespace, seeds: list[int], refs: list[str],
                rows: list[dict], reference: list[dict]) -> None:
    """The gold rung's student as round 1 of the loop, and each later round's student."""
    from pipeline.config import load_config
    from pipeline.run_folder import RunFolder
    from stages.commands.iterate import iterate
    from stages.commands.running import say
    from stages.iterate.stage import round_run

    gold = RunFolder.at(args.runs_dir, f"{args.run}-gold")
    cfg = load_config(args.config, args.overrides + RUNGS[GOLD][1])
    cfg = with_settings(cfg, train={"seed": seeds[0]}, iterate={"until_flat": False},
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
        scores, voted, extra_results = train_seeds(cfg, here, seeds, args.votes,
                                                   refs if number == 1 else [],
                                                   skip_first=True)
        reference.extend(extra_results)
        rows.append(rung_row(rung, here, scores, voted))


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import load_config
    from pipeline.run_folder import RunFolder
    from stages.commands.cli import reported
    from stages.commands.running import run_stages
    from stages.generate.rounds import wanted

    args = _parser().parse_args(argv)
    run = RunFolder.at(args.runs_dir, args.run)
    t0 = time.time()
    rows: list[dict] = []
    reference: list[dict] = []

    def work() -> None:
        seeds = seed_list(args.seeds)
        base, trained = _checked(args)
        run_stages(["generate"], base, run)
        refs = _rungs(args, run, trained, seeds, rows, reference)
        if not args.no_students and args.loop_rounds:
            _loop_rungs(args, seeds, refs, rows, reference)

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
