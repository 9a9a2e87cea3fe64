"""`make sweep`: the data-efficiency sweep of Distilling Step-by-Step (Hsieh et al., 2023,
Figure 2) on a run's own traces.

    python -m stages.commands.sweep --config configs/demo.yaml --run demo --seeds 0 \\
        --shares 0.125,0.25,0.5,1 [section.key=value ...]

Trains answer-only SFT (`train.alpha=1`) and DSS (the config's alpha, no KD) on 12.5%, 25%,
50% and 100% of the kept traces (`train.data_fraction`: whole questions chosen by a hash of
their id, so each share is a subset of the next, the same for every seed), with the config's
epochs, so every share sees each of its examples equally often (steps grow with the data).
Each student is scored in `predict:` mode (the answer alone, what DSS deploys) on the
held-out split. Writes `<run>/sweep.json` and the plot `<run>/sweep.png` (accuracy against
the share of the data, mean and spread over the seeds) and prints the table. The students at
100% are those of `make compare` (`answer-only-s<seed>`, `dss-s<seed>`), so one run of either
is reused by the other; stopped sweeps resume where they stopped.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from stages.commands.compare import VARIANTS, students_parser, variant_list, variant_name

METHODS = ["answer-only", "dss"]


def share_list(text: str) -> list[float]:
    try:
        shares = sorted({float(x) for x in text.replace(",", " ").split()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"shares are numbers in (0, 1], e.g. 0.25,0.5,1; "
                                         f"got {text!r}")
    if not shares or any(not 0 < s <= 1 for s in shares):
        raise argparse.ArgumentTypeError(f"shares must lie in (0, 1]; got {text!r}")
    return shares


def student_name(method: str, share: float, seed: int) -> str:
    """`dss-s0` at 100% (the students of `make compare`), `dss-p12.5-s0` below."""
    if share >= 1:
        return variant_name(method, seed)
    return f"{method.replace('+', '-')}-p{100 * share:g}-s{seed}"


def sweep_configs(config: str, overrides: list[str], methods: list[str], shares: list[float],
                  seeds: list[int]) -> dict:
    """{(method, share, seed): its config}: the user's overrides, then the method's own."""
    from pipeline.config import load_config

    return {(m, p, s): load_config(config, overrides + VARIANTS[m] + [
        f"train.data_fraction={p}", f"train.seed={s}", f"train.name={student_name(m, p, s)}"])
        for m in methods for p in shares for s in seeds}


def summarize(results: list[dict], methods: list[str], shares: list[float],
              seeds: list[int], traces: dict) -> list[dict]:
    by_variant = {r.get("variant"): r for r in results if r["system"] == "predict"}
    rows = []
    for m in methods:
        for p in shares:
            accs = [by_variant[n]["accuracy"] for s in seeds
                    if (n := student_name(m, p, s)) in by_variant]
            if accs:
                rows.append({"method": m, "share": p, "traces": traces.get((m, p)),
                             "accuracy": accs, "mean": statistics.fmean(accs),
                             "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0})
    return rows


def table(rows: list[dict], n: int) -> str:
    lines = [f"{'method':<14}{'share':>7}{'traces':>8}{'predict: accuracy':>20}   per seed",
             "-" * 66]
    for r in rows:
        per_seed = " ".join(f"{100 * a:.1f}" for a in r["accuracy"])
        lines.append(f"{r['method']:<14}{100 * r['share']:>6g}%{r['traces'] or 0:>8}"
                     f"{100 * r['mean']:>12.1f}% ± {100 * r['sd']:>4.1f}   {per_seed}")
    lines.append(f"held-out rows: {n}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import load_config
    from pipeline.run_folder import RunFolder
    from stages.commands.cli import reported, run_stages

    parser = students_parser(__doc__.splitlines()[0], "0")
    parser.add_argument("--shares", default="0.125,0.25,0.5,1", type=share_list,
                        help="shares of the kept traces (default 0.125,0.25,0.5,1)")
    parser.add_argument("--methods", default=",".join(METHODS), type=variant_list,
                        help="the students at each share, comma-separated (default "
                        f"{','.join(METHODS)}; any of make compare's variants)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="settings for every stage and student (e.g. train.dtype=float32)")
    args = parser.parse_args(argv)
    run = RunFolder.at(args.runs_dir, args.run)
    t0 = time.time()
    traces: dict = {}

    def work() -> None:
        base = load_config(args.config, args.overrides)
        configs = sweep_configs(args.config, args.overrides, args.methods, args.shares,
                                args.seeds)
        from stages.generate.stage import imported

        run_stages(["filter"] if imported(run) else ["generate", "filter"], base, run)
        for i, ((m, p, s), cfg) in enumerate(configs.items(), 1):
            print(f"==> student {i}/{len(configs)}: {m}, {100 * p:g}% of the traces, seed {s}",
                  file=sys.stderr, flush=True)
            run_stages(["train"], cfg, run)
            manifest = run.student(cfg.train.name).manifest() or {}
            traces[(m, p)] = manifest.get("counters", {}).get("traces")
        names = [c.train.name for c in configs.values()]
        ev = load_config(args.config, args.overrides + [
            "eval.systems=[predict]", f"eval.variants=[{','.join(names)}]"])
        run_stages(["eval"], ev, run)

    code = reported(work)
    if code:
        return code
    report = run.stage("eval").read_json("report.json")
    rows = summarize(report["results"], args.methods, args.shares, args.seeds, traces)
    from stages.commands.report import sweep_plot

    run.write_bytes("sweep.png", sweep_plot(rows, f"data efficiency on {args.run} "
                                      f"({len(args.seeds)} seed{'s' * (len(args.seeds) > 1)})"))
    run.write_json("sweep.json", {
        "rows": rows, "seeds": args.seeds, "shares": args.shares, "methods": args.methods,
        "n": report["n"], "config": args.config, "overrides": args.overrides,
        "seconds": round(time.time() - t0, 1)})
    print(table(rows, report["n"]))
    print(f"plot: {run.where('sweep.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
