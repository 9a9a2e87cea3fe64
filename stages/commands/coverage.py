"""`make coverage`: what sampling in rounds, hints and gold `predict:` examples are worth.

    python -m stages.commands.coverage --config configs/harder.yaml --run harder [key=value ...]

Generates once with the config's rounds and hints (`generate.max_samples`,
`generate.hint_template`) in `<run>/`, then trains and scores four students, each on what one
rung of the ladder keeps, every other setting the same:

- `fixed`: the first round alone (`generate.n_samples` per question, no rounds, no hints);
- `adaptive`: + the rounds (questions short of kept traces sampled again);
- `adaptive+hints`: + the hinted round (uncovered labelled questions asked with the answer);
- `+gold-predict`: the same traces, `predict:` examples from every labelled question
  (`train.predict_on=labelled`).

A rung's run folder (`<run>-<rung>/`) gets a copy of the generate folders, so the teacher is
paid once and each filter reads only the rounds its settings ask for. Finished stages are
reused, so a stopped ladder resumes where it stopped. Prints the table (teacher tokens,
question coverage, kept traces, held-out accuracy in both modes) and writes it to
`<run>/coverage.json`. `--no-students` stops after the filters (what the teacher made and
what the filter kept, without training).
"""

from __future__ import annotations

import argparse
import sys
import time

from stages.commands.cli import run_options

RUNGS = {  # rung -> (run folder suffix, student name, its settings on top of the config's)
    "fixed": ("fixed", "", ["generate.max_samples=0", "generate.hint_template=null"]),
    "adaptive": ("adaptive", "", ["generate.hint_template=null"]),
    "adaptive+hints": ("hints", "", []),
    "+gold-predict": ("hints", "gold", ["train.predict_on=labelled", "train.name=gold"]),
}


def copy_generated(source, target) -> None:
    """The generate folders of `source` (every round) into `target` (a stale copy replaced)."""
    from stages.iterate import copy_finished, teacher_folders

    for name in teacher_folders(source):
        copy_finished(source, target, name)


def rung_row(rung: str, run, student: str, results: list[dict]) -> dict:
    """One line of the table: what the rung's filter counted and its student's accuracy."""
    counters = run.stage("filter").manifest()["counters"]
    acc = {r["system"]: r["accuracy"] for r in results or [] if r.get("variant", "") == student
           and r["system"] in ("predict", "explain")}
    return {"rung": rung, "teacher_tokens": counters.get("teacher_tokens"),
            "questions": counters.get("questions"), "covered": counters.get("covered"),
            "covered_wanted": counters.get("covered_wanted"), "kept": counters.get("kept"),
            "hinted_kept": counters.get("hinted_kept", 0),
            "predict": acc.get("predict"), "explain": acc.get("explain")}


def table(rows: list[dict], reference: list[dict], wanted: int) -> str:
    head = (f"{'rung':<16}{'teacher tokens':>16}{'covered':>16}{f'with {wanted}':>9}"
            f"{'kept':>7}{'hinted':>8}{'predict':>9}{'explain':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        share = f"{r['covered']} ({100 * r['covered'] / max(1, r['questions']):.0f}%)"
        lines.append(f"{r['rung']:<16}{r['teacher_tokens']:>16,}{share:>16}"
                     f"{r['covered_wanted']:>9}{r['kept']:>7}{r['hinted_kept']:>8}"
                     + "".join(f"{100 * r[m]:>8.1f}%" if r[m] is not None else f"{'-':>9}"
                               for m in ("predict", "explain")))
    for r in reference:
        lines.append(f"{r['system']} ({'few-shot CoT' if r['system'] == 'teacher' else 'predict'})"
                     f": {100 * r['accuracy']:.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import ConfigError, load_config
    from pipeline.run_folder import RunFolder
    from stages.commands.cli import reported, run_stages
    from stages.rounds import wanted

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/harder.yaml")
    run_options(parser)
    parser.add_argument("--no-students", action="store_true",
                        help="stop after the filters: no training, no evaluation")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="settings for every rung (e.g. train.max_steps=60)")
    args = parser.parse_args(argv)
    run = RunFolder.at(args.runs_dir, args.run)
    t0 = time.time()
    rows: list[dict] = []
    reference: list[dict] = []

    def work() -> None:
        base = load_config(args.config, args.overrides)
        if not base.generate.max_samples or not base.generate.hint_template:
            raise ConfigError(["the ladder compares rounds and hints: set generate.max_samples "
                               "above generate.n_samples and generate.hint_template (see "
                               "configs/harder.yaml)"])
        run_stages(["generate"], base, run)
        done_folders = set()
        for i, (rung, (suffix, student, extra)) in enumerate(RUNGS.items()):
            print(f"==> rung {i + 1}/{len(RUNGS)}: {rung}", file=sys.stderr, flush=True)
            target = RunFolder.at(args.runs_dir, f"{args.run}-{suffix}")
            copy_generated(run, target)
            systems = ["predict", "explain"] + (["teacher", "base"] if i == 0 else [])
            cfg = load_config(args.config, args.overrides + extra + [
                f"eval.systems=[{','.join(systems)}]", f"eval.variants=['{student}']"])
            run_stages(["filter"] if suffix not in done_folders else [], cfg, target)
            done_folders.add(suffix)
            if args.no_students:
                rows.append(rung_row(rung, target, student, None))
                continue
            run_stages(["train", "eval"], cfg, target)
            results = target.stage("eval").read_json("report.json")["results"]
            rows.append(rung_row(rung, target, student, results))
            if i == 0:
                reference.extend(r for r in results if r["system"] in ("teacher", "base"))

    code = reported(work)
    if code:
        return code
    k = wanted(load_config(args.config, args.overrides))
    text = table(rows, reference, k)
    run.write_json("coverage.json", {"rungs": rows, "reference": reference, "wanted": k,
                                     "config": args.config, "overrides": args.overrides,
                                     "seconds": round(time.time() - t0, 1)})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
