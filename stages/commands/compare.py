"""`make compare`: what the teacher's reasoning and its log-probabilities are worth.

    python -m stages.commands.compare --config configs/demo.yaml --run demo --seeds 0,1,2 [key=value ...]

Trains three students on the same kept traces of one run, once per seed, each into its own
folder (`train-<variant>-s<seed>/`), scores them all on the held-out split and prints the
accuracy of each variant over the seeds:

- `answer-only`: SFT on the answers alone (`train.alpha=1`: only the `predict:` task);
- `dss`: Distilling Step-by-Step, `predict:` + `explain:` (the config's alpha), no KD;
- `dss+kd`: the same plus KD from the stored top-k on the explain targets (`train.kd_lam`);
- on request (`--variants`): `dss+answer-kd` (KD on the answer tokens, `answer_kd_lam=0.5`),
  `dss+cosine` (the margin cosine rationale loss), `dss+consistency` (consistency
  regularisation, `consistency_lam=0.5`), each one piece on top of `dss`; `explain-only`
  (`train.alpha=0`: the rationale alone), which with `answer-only` is one adapter per prefix
  (each mode served by the student trained for it alone); `dss+predict-weight` (DSS with
  `train.alpha=0.8`: the direct answer's loss weighted more).

All three see the same traces, steps, batches and seeds; DSS with and without KD train on the
same explain targets (the teacher's own tokens), so the difference between them is the loss.
Stages already done are reused, so a stopped comparison resumes where it stopped. The table
is also written to `<run>/compare.json`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from stages.commands.cli import run_options

VARIANTS = {  # after the user's overrides, so these win
    "answer-only": ["train.alpha=1.0", "train.kd_lam=0"],
    "dss": ["train.kd_lam=0"],
    "dss+kd": [],  # + train.kd_lam, from --kd-lam
    # the rest of the method family, each one piece on top of DSS (`--variants` picks them)
    "dss+answer-kd": ["train.kd_lam=0", "train.answer_kd_lam=0.5"],
    "dss+cosine": ["train.kd_lam=0", "train.rationale_loss=cosine"],
    "dss+consistency": ["train.kd_lam=0", "train.consistency_lam=0.5"],
    # the rationale alone (`train.alpha=0`): with answer-only, one adapter per prefix
    "explain-only": ["train.alpha=0.0", "train.kd_lam=0"],
    # DSS with the direct answer's loss weighted 0.8 (its training loss stays above
    # answer-only's at alpha 0.5: the predict task gets half the updates' weight)
    "dss+predict-weight": ["train.alpha=0.8", "train.kd_lam=0"],
}
DEFAULT_VARIANTS = ["answer-only", "dss", "dss+kd"]


def seed_list(text: str) -> list[int]:
    """`0,1,2` (or `0 1 2`) -> [0, 1, 2]."""
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are whole numbers, e.g. 0,1,2; got {text!r}")


def variant_list(text: str) -> list[str]:
    """`answer-only,dss` (or space-separated) -> the variants, each checked."""
    names = [x for x in text.replace(",", " ").split() if x]
    unknown = [x for x in names if x not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown or text!r}; choose from "
                                         f"{', '.join(VARIANTS)}")
    return names


def students_parser(description: str, seeds: str) -> argparse.ArgumentParser:
    """The options of a command that trains students on one run: config, run, seeds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="configs/demo.yaml")
    run_options(parser)
    parser.add_argument("--seeds", default=seeds, type=seed_list,
                        help=f"training seeds, comma-separated (default {seeds})")
    return parser


def variant_name(variant: str, seed: int) -> str:
    return f"{variant.replace('+', '-')}-s{seed}"


def variant_configs(config: str, overrides: list[str], variants: list[str], seeds: list[int],
                    kd_lam: float) -> dict:
    """{(variant, seed): its config}: the user's overrides, then the variant's own settings."""
    from pipeline.config import load_config

    configs = {}
    for v in variants:
        extra = VARIANTS[v] + ([f"train.kd_lam={kd_lam}"] if v == "dss+kd" else [])
        for s in seeds:
            configs[(v, s)] = load_config(config, overrides + extra + [
                f"train.seed={s}", f"train.name={variant_name(v, s)}"])
    return configs


def summarize(results: list[dict], variants: list[str], seeds: list[int]) -> list[dict]:
    """Per variant and mode: accuracy per seed, mean and standard deviation."""
    by_key = {(r["system"], r.get("variant", "")): r for r in results}
    rows = []
    for v in variants:
        for mode in ("predict", "explain"):
            accs = [by_key[(mode, variant_name(v, s))]["accuracy"] for s in seeds
                    if (mode, variant_name(v, s)) in by_key]
            toks = [by_key[(mode, variant_name(v, s))]["mean_tokens"] for s in seeds
                    if (mode, variant_name(v, s)) in by_key]
            if (v, mode) in (("answer-only", "explain"), ("explain-only", "predict")):
                continue  # never trained in that mode
            if accs:
                rows.append({"variant": v, "mode": mode, "accuracy": accs,
                             "mean": statistics.fmean(accs),
                             "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                             "mean_tokens": statistics.fmean(toks)})
    return rows


def mode_agreement(run, variants: list[str], seeds: list[int]) -> list[dict]:
    """Per DSS-style variant, over its seeds: on how many held-out rows the `predict:` answer
    and the `explain:` answer of the same student are right, both, one or neither (does the
    direct answer know what the reasoning finds?)."""
    folder = run.stage("eval")
    out = []
    for v in variants:
        counts = {"both": 0, "explain_only": 0, "predict_only": 0, "neither": 0}
        for s in seeds:
            name = variant_name(v, s)
            if not (folder.exists(f"predict-{name}.parquet")
                    and folder.exists(f"explain-{name}.parquet")):
                continue
            p = folder.read_table(f"predict-{name}.parquet", ["id", "correct"]).to_pylist()
            e = {r["id"]: r["correct"] for r in
                 folder.read_table(f"explain-{name}.parquet", ["id", "correct"]).to_pylist()}
            for r in p:
                if r["id"] in e:
                    key = ("both" if r["correct"] and e[r["id"]] else "predict_only"
                           if r["correct"] else "explain_only" if e[r["id"]] else "neither")
                    counts[key] += 1
        if sum(counts.values()):
            out.append({"variant": v, **counts})
    return out


def late_predict_loss(run, variants: list[str], seeds: list[int]) -> dict[str, float]:
    """Per variant: the training `predict:` loss late in training (the mean of `loss_predict`
    over the logged steps in the last fifth of the steps, then over the seeds), from each
    student's `log.jsonl`: does the direct answer end up fitted as well as answer-only's?"""
    out = {}
    for v in variants:
        means = []
        for s in seeds:
            folder = run.student(variant_name(v, s))
            if not folder.exists("log.jsonl"):
                continue
            rows = [r for r in folder.read_jsonl("log.jsonl") if "loss_predict" in r]
            last = max((r["step"] for r in rows), default=0)
            late = [r["loss_predict"] for r in rows if r["step"] >= 0.8 * last]
            if late:
                means.append(statistics.fmean(late))
        if means:
            out[v] = statistics.fmean(means)
    return out


def agreement_table(rows: list[dict]) -> str:
    w = max([18] + [len(r["variant"]) + 2 for r in rows])
    lines = [f"{'student':<{w}}{'both right':>11}{'explain only':>14}{'predict only':>14}"
             f"{'neither':>9}", "-" * (w + 48)]
    for r in rows:
        lines.append(f"{r['variant']:<{w}}{r['both']:>11}{r['explain_only']:>14}"
                     f"{r['predict_only']:>14}{r['neither']:>9}")
    return "\n".join(lines)


def table(rows: list[dict], reference: list[dict], n: int) -> str:
    """The accuracy table; the columns widen for long variant names and seed lists."""
    w = max([14] + [len(r["variant"]) + 1 for r in rows])
    seeds_w = max([14] + [5 * len(r["accuracy"]) - 1 for r in rows])
    lines = [f"{'student':<{w}}{'mode':<13}{'accuracy, mean ± sd':>19}   "
             f"{'per seed':<{seeds_w}}{'tokens':>7}", "-" * (w + 13 + 19 + 3 + seeds_w + 7)]
    for r in reference:
        name = {"teacher": "teacher", "base": "base student"}[r["system"]]
        mode = "few-shot CoT" if r["system"] == "teacher" else "predict"
        lines.append(f"{name:<{w}}{mode:<13}{100 * r['accuracy']:>18.1f}%"
                     f"{'':>{3 + seeds_w}}{r['mean_tokens']:>7.1f}")
    for r in rows:
        per_seed = " ".join(f"{100 * a:>4.1f}" for a in r["accuracy"])
        lines.append(f"{r['variant']:<{w}}{r['mode']:<13}"
                     f"{100 * r['mean']:>11.1f}% ± {100 * r['sd']:>4.1f}   {per_seed:<{seeds_w}}"
                     f"{r['mean_tokens']:>7.1f}")
    lines.append(f"held-out rows: {n}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import load_config
    from pipeline.run_folder import RunFolder
    from stages.commands.cli import reported, run_stages

    parser = students_parser(__doc__.splitlines()[0], "0,1,2")
    parser.add_argument("--kd-lam", type=float, default=0.5,
                        help="train.kd_lam of the dss+kd students")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), type=variant_list,
                        help="the students to compare, comma-separated (default: "
                        f"{','.join(DEFAULT_VARIANTS)}; also "
                        f"{','.join(v for v in VARIANTS if v not in DEFAULT_VARIANTS)})")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="settings for every stage and student (e.g. train.epochs=1)")
    args = parser.parse_args(argv)
    run = RunFolder.at(args.runs_dir, args.run)
    t0 = time.time()

    def work() -> None:
        base = load_config(args.config, args.overrides)
        configs = variant_configs(args.config, args.overrides, args.variants, args.seeds,
                                  args.kd_lam)
        from stages.generate.stage import imported

        run_stages(["filter"] if imported(run) else ["generate", "filter"], base, run)
        for i, ((v, s), cfg) in enumerate(configs.items(), 1):
            print(f"==> student {i}/{len(configs)}: {v}, seed {s}", file=sys.stderr, flush=True)
            run_stages(["train"], cfg, run)
        names = [variant_name(v, s) for v, s in configs]
        systems = [x for x in base.eval.systems if x in ("teacher", "base")]
        ev = load_config(args.config, args.overrides + [
            f"eval.systems=[{','.join(systems + ['predict', 'explain'])}]",
            f"eval.variants=[{','.join(names)}]"])
        run_stages(["eval"], ev, run)

    code = reported(work)
    if code:
        return code
    report = run.stage("eval").read_json("report.json")
    rows = summarize(report["results"], args.variants, args.seeds)
    reference = [r for r in report["results"] if r["system"] in ("teacher", "base")]
    text = table(rows, reference, report["n"])
    agreement = mode_agreement(run, [v for v in args.variants
                                     if v not in ("answer-only", "explain-only")], args.seeds)
    late_loss = late_predict_loss(run, args.variants, args.seeds)
    out = {"variants": rows, "reference": reference, "seeds": args.seeds,
           "mode_agreement": agreement, "late_predict_loss": late_loss,
           "kd_lam": args.kd_lam, "n": report["n"], "config": args.config,
           "overrides": args.overrides, "seconds": round(time.time() - t0, 1)}
    run.write_json("compare.json", out)
    print(text)
    if agreement:
        print("\nthe same student's predict: and explain: answers, held-out rows over the seeds:")
        print(agreement_table(agreement))
    if late_loss:
        print("\ntraining predict: loss in the last fifth of the steps, mean over the seeds: "
              + ", ".join(f"{v} {x:.2f}" for v, x in late_loss.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
