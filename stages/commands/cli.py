"""The `distill` command: one subcommand per stage, `all` for the four in order, `gc` to free
what the stages keep aside, `config` to see the settings.

    distill generate --config configs/demo.yaml --run demo [section.key=value ...]
    distill filter   --config configs/demo.yaml --run demo filter.min_steps=2
    distill generate --run demo --retry-failed     # re-send only the rows that failed
    distill gc --run demo [--yes]                  # other settings' output, kept aside
    distill convert-shards --run demo [--to 2]     # shards in the compact top-k format
    distill import --run mine --kind table --from traces.jsonl   # traces made elsewhere
    distill iterate --run demo --rounds 3 eval.vote_samples=4     # the student samples next
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import yaml

from pipeline.config import ConfigError, describe, load_config, section_types
from pipeline.executors.array import ArrayRole
from pipeline.log import set_verbosity
from pipeline.run_folder import RunFolder

from stages.commands.running import (STAGES, StageFailed, forget_empty_run,  # noqa: F401
                                     reported, run_stages, say)

ARRAY_STAGES = ("generate", "filter")  # the stages a job array can split


EXAMPLES = {
    "generate": ["distill generate --run demo",
                 "distill generate --run mine generate.backend=openai "
                 "generate.base_url=http://127.0.0.1:8000/v1 generate.model=my-teacher",
                 "distill generate --run demo --retry-failed",
                 "distill generate --run mine --estimate generate.pilot_questions=16 "
                 "generate.price_input=0.15 generate.price_output=0.6"],
    "filter": ["distill filter --run demo filter.min_steps=2"],
    "train": ["distill train --run demo",
              "distill train --run demo train.name=kd train.kd_lam=0.5",
              "distill train --run demo train.args.lr_scheduler_type=linear "
              "train.report_to=[tensorboard,wandb]"],
    "eval": ["distill eval --run demo \"eval.systems=[base,predict,explain]\""],
    "all": ["distill all --config configs/demo.yaml --run demo"],
    "gc": ["distill gc --run demo            # list what is kept aside",
           "distill gc --run demo --yes      # remove it"],
    "convert-shards": ["distill convert-shards --run demo --to 2"],
    "import": ["distill import --run mine --kind table --from traces.jsonl",
               "distill import --run mine --kind dss --from llm/train_CoT_0.json "
               "--questions svamp_train.json",
               "distill import --run mine --kind hf --from distilabel-out/ "
               "--map question=instruction"],
    "report": ["distill report --run demo      # then open data/runs/demo/report.html"],
    "export": ["distill export --run demo --student dss-s0",
               "distill export --run demo --adapter-only --out my-adapter",
               "distill export --run demo --push-to-hub me/my-student"],
    "iterate": ["distill iterate --run demo --rounds 3 eval.vote_samples=4",
                "distill iterate --config configs/harder.yaml --run harder iterate.samples=8"],
    "config": ["distill config --keys", "distill config --config configs/gsm8k.yaml "
               "train.alpha=0.3"],
}


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each option's help (where there is one to show); descriptions and
    examples as written."""

    def _get_help_string(self, action):
        if action.nargs == 0 or action.default in (None, "", []) or not action.help:
            return action.help
        return super()._get_help_string(action)


def _verbosity() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("output").add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1,
                       default=0, help="only warnings and errors, no progress bars")
    group.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1,
                       help="also debug lines and the libraries' own messages")
    return common


def run_options(parser: argparse.ArgumentParser) -> None:
    """`--run` and `--runs-dir`, which every command that works on a run takes."""
    parser.add_argument("--run", default="demo", help="run name (its folder under --runs-dir)")
    parser.add_argument("--runs-dir", default=os.environ.get("STEPDISTILL_RUNS", "data/runs"),
                        help="where run folders live ($STEPDISTILL_RUNS)")


def _command(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand with its description, defaults shown and examples."""
    return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                          epilog="examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES[name]),
                          formatter_class=_Help, parents=[_verbosity()])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill", formatter_class=_Help,
        description="Distil a teacher LLM into a small student: generate -> filter -> train "
                    "-> eval, each stage cached in a run folder (data/runs/<run>/).",
        epilog="start here:\n  distill all --run demo            # the whole pipeline on the "
               "embedded default\n  distill config --keys             # every setting\n  "
               "distill <command> --help          # a command's options and examples")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    _stage_commands(sub)
    _run_commands(sub)
    _other_commands(sub)
    return parser


def _stage_commands(sub) -> None:
    """`distill generate`, `filter`, `train`, `eval` and `all`."""
    for name in STAGES + ["all"]:
        p = _command(sub, name, "run all four stages" if name == "all" else
                     f"run the {name} stage")
        p.add_argument("--config", default="configs/demo.yaml", help="the run's YAML config")
        run_options(p)
        p.add_argument("--force", action="store_true",
                       help="redo the stage; its previous output is kept aside (`distill gc` "
                       "removes it) and an API teacher's cached responses are reused")
        if name in ("generate", "all"):
            p.add_argument("--retry-failed", action="store_true",
                           help="re-send only the rows whose generation ended with an error")
        if name == "generate":
            p.add_argument("--estimate", action="store_true",
                           help="print the requests, tokens and cost the stage would take, "
                           "and stop (no request sent, or generate.pilot_questions sent as a "
                           "pilot whose responses the run reuses)")
        if name in ARRAY_STAGES:
            g = p.add_argument_group(
                "job arrays", "split the stage over processes a scheduler starts (Slurm "
                "--array, Kubernetes indexed jobs), with the same config and overrides in each")
            g.add_argument("--num-workers", type=int, metavar="N",
                           help="how many workers share the stage")
            g.add_argument("--worker-index", type=int, metavar="I",
                           help="this worker's index, 0..N-1: it does shards I, I+N, ...")
            g.add_argument("--finalize", action="store_true",
                           help="after every worker is done: check all shards, write the "
                           "manifest")
            g.add_argument("--plan-only", action="store_true",
                           help="write the stage's plan and stop (with --force: after "
                           "setting its previous output aside); run once before an array")
        p.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="settings that override the config file")


def _run_commands(sub) -> None:
    """The commands that work on a run's folders: gc, convert-shards, import, report, export."""
    p = _command(sub, "gc", "list (and with --yes remove) the output a run keeps "
                       "aside: other settings' output and quarantined files")
    run_options(p)
    p.add_argument("--yes", action="store_true", help="remove them (without it: only list)")
    p.add_argument("--quarantine", action="store_true",
                   help="also the damaged files moved to <stage>/quarantine/")
    p = _command(sub, "convert-shards", "rewrite a run's generate and filter shards in "
                       "another format (2: compact top-k, 1: float32), verified, without the "
                       "teacher; the old files are kept aside")
    run_options(p)
    p.add_argument("--to", type=int, choices=[1, 2], default=2, help="the format")
    p = _command(sub, "import", "bring traces made elsewhere (the DSS repository's "
                       "LLM outputs, a JSONL/Parquet of question, answer and rationale, a "
                       "distilabel or curator dataset folder) into a run as its generate stage")
    p.add_argument("--config", default="configs/demo.yaml", help="the run's YAML config")
    run_options(p)
    p.add_argument("--kind", required=True, choices=["dss", "table", "hf"],
                   help="dss: DSS LLM-output JSON (+ --questions); table: JSONL/JSON/Parquet "
                   "rows; hf: a Hugging Face dataset folder")
    p.add_argument("--from", dest="sources", nargs="+", required=True, metavar="PATH",
                   help="the file(s) or folder to import")
    p.add_argument("--questions", metavar="PATH",
                   help="dss: the examples the LLM outputs answer, in order")
    p.add_argument("--map", nargs="*", default=[], metavar="FIELD=COLUMN",
                   help="name the column of a field (question, rationale, answer, gold, "
                   "completion, id) where the usual names do not fit")
    p.add_argument("--force", action="store_true",
                   help="import again; the previous traces are kept aside")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p = _command(sub, "report", "write report.html in the run folder: funnel, loss "
                       "curves, accuracy, sweep, example and rejected traces")
    run_options(p)
    p.add_argument("--examples", type=int, default=4, help="kept traces shown")
    p = _command(sub, "export", "write a trained student as a merged transformers "
                       "model (or its PEFT adapter) with a model card")
    run_options(p)
    p.add_argument("--student", default="", metavar="NAME",
                   help="the student's train.name ('' = the run's train/ folder)")
    p.add_argument("--out", help="the folder to write (without it: export/<student folder> "
                   "in the run folder)")
    p.add_argument("--adapter-only", action="store_true",
                   help="keep the LoRA adapter (a PEFT folder naming its real base model) "
                   "instead of merging it")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the merged weights")
    p.add_argument("--check", type=int, default=10, metavar="N",
                   help="after a merged export, compare its greedy answers with the adapter's "
                   "on N kept questions in both modes (0: no check)")
    p.add_argument("--push-to-hub", metavar="REPO",
                   help="also upload the folder to this Hub repository (token from HF_TOKEN "
                   "or `hf auth login`); a path or file:// URL copies it there instead")


def _other_commands(sub) -> None:
    """`distill iterate` and `distill config`."""
    p = _command(sub, "iterate", "the student beyond its teacher: each round's distilled "
                 "student samples the questions still short of kept traces, the teacher scores "
                 "them, the next student trains on the pool (ReST-EM); a table per round")
    p.add_argument("--config", default="configs/demo.yaml", help="the run's YAML config")
    run_options(p)
    p.add_argument("--rounds", type=int, metavar="R",
                   help="rounds in all, the teacher's first included (default: iterate.rounds)")
    p.add_argument("--force", action="store_true", help="redo every stage of the loop but "
                   "the teacher's generate (`distill generate --force` does that one); the "
                   "previous output is kept aside")
    p.add_argument("--seeds", metavar="S,S,...",
                   help="training seeds: the loop trains with the first, then each round's "
                   "pool is trained again at the others (train-seed<s>/), and the table gives "
                   "each round's accuracy over them")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="settings that override the config file")
    p = _command(sub, "config", "print the resolved config (after overrides)")
    p.add_argument("--config", default="configs/demo.yaml", help="the run's YAML config")
    p.add_argument("--keys", action="store_true",
                   help="list every key of every section with its default and meaning")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")


def array_role(args: argparse.Namespace) -> ArrayRole | None:
    """The job-array part the options ask for, or None (the whole stage)."""
    if args.command not in ARRAY_STAGES:
        return None
    n, i = args.num_workers, args.worker_index
    modes = sum([n is not None or i is not None, args.finalize, args.plan_only])
    if modes > 1:
        raise ConfigError(["--num-workers/--worker-index, --finalize and --plan-only are "
                           "separate steps of a job array; give one of them"])
    if args.finalize:
        return ArrayRole(finalize=True)
    if args.plan_only:
        return ArrayRole(plan_only=True)
    if n is None and i is None:
        return None
    if n is None or i is None:
        raise ConfigError(["--num-workers and --worker-index go together (worker I of N)"])
    try:
        return ArrayRole(n, i)
    except ValueError as e:
        raise ConfigError([str(e)]) from None


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with a command's options after its overrides read as well
    (`distill generate --run r generate.model=x --estimate`)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:  # options after the overrides: the command's own parser reads them intermixed
        argv = list(sys.argv[1:] if argv is None else argv)
        commands = next(a for a in parser._actions
                        if isinstance(a, argparse._SubParsersAction)).choices
        at = argv.index(args.command)
        args = commands[args.command].parse_intermixed_args(argv[at + 1:],
                                                            argparse.Namespace(**vars(args)))
    return args


def _gc(args: argparse.Namespace) -> None:
    from stages.commands.gc import gc

    gc(RunFolder.at(args.runs_dir, args.run), args.yes, args.quarantine)


def _report(args: argparse.Namespace) -> None:
    from stages.commands.report import write_report

    write_report(RunFolder.at(args.runs_dir, args.run), args.examples)


def _export(args: argparse.Namespace) -> None:
    from stages.commands.export import export

    run = RunFolder.at(args.runs_dir, args.run)
    if not run.fs.isdir(run.root):
        raise FileNotFoundError(f"no run folder {run.url}; check --run and --runs-dir")
    export(run, args.student, Path(args.out) if args.out else None,
           args.adapter_only, args.dtype, args.push_to_hub, args.check)


def _convert(args: argparse.Namespace) -> None:
    from stages.commands.convert import convert_run

    convert_run(RunFolder.at(args.runs_dir, args.run), args.to)


def _import(args: argparse.Namespace) -> None:
    from stages.commands.import_traces import import_traces

    # `--from a.json b.json key=value`: the settings apart
    setting = re.compile(r"[A-Za-z_]+\.[A-Za-z_]+=")
    moved = [x for x in args.sources if setting.match(x) and not Path(x).exists()]
    args.sources = [x for x in args.sources if x not in moved]
    args.overrides = moved + args.overrides
    if not args.sources:
        raise ConfigError(["distill import: give the file(s) to import after --from"])
    cfg = load_config(args.config, args.overrides)
    mapping = {}
    for item in args.map:
        field, sep, column = item.partition("=")
        if not sep or not column:
            raise ConfigError([f"--map {item!r}: write FIELD=COLUMN, e.g. question=problem"])
        mapping[field] = column
    run = RunFolder.at(args.runs_dir, args.run)
    run.write_text("config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    import_traces(cfg, run, args.kind, args.sources, args.questions, mapping, args.force)


def _iterate(args: argparse.Namespace) -> None:
    from stages.commands.iterate import iterate, more_seeds, seeds_table, table
    from stages.commands.seeds import seed_list, with_settings

    cfg = load_config(args.config, args.overrides)
    if args.rounds is not None and args.rounds < 1:
        raise ConfigError(["--rounds: give 1 or more (round 1 is the teacher's)"])
    run = RunFolder.at(args.runs_dir, args.run)
    seeds = seed_list(args.seeds) if args.seeds else []
    if seeds:
        cfg = with_settings(cfg, train={"seed": seeds[0]})
    done = iterate(cfg, run, args.rounds or cfg.iterate.rounds, args.force)
    if len(seeds) > 1:
        done = more_seeds(cfg, run, done, seeds)
    print(table(done["rounds"]))
    if len(seeds) > 1:
        print(seeds_table(done["rounds"]))
    for r in done["reference"]:
        print(f"{r['system']}: {100 * r['accuracy']:.1f}%")
    print(f"stopped: {done['stopped']}")


def _config(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    if args.keys:
        for name, section in section_types().items():
            print(f"{name}:\n{describe(section)}\n")
    else:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")


def _stages(args: argparse.Namespace) -> None:
    """A stage (`distill generate`, ...) or the four in order (`distill all`)."""
    cfg = load_config(args.config, args.overrides)
    if args.command == "generate" and args.estimate:
        from stages.generate.estimate import estimate, lines

        for line in lines(estimate(cfg, RunFolder.at(args.runs_dir, args.run)), cfg):
            print(line)
        return
    names = STAGES if args.command == "all" else [args.command]
    run_stages(names, cfg, RunFolder.at(args.runs_dir, args.run), force=args.force,
               role=array_role(args), separate_processes=args.command == "all",
               retry_failed=getattr(args, "retry_failed", False))


# what each command runs; a stage's name (and `all`) runs `_stages`
COMMANDS = {"gc": _gc, "report": _report, "export": _export, "convert-shards": _convert,
            "import": _import, "iterate": _iterate, "config": _config}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    set_verbosity(args.verbosity)
    return reported(lambda: COMMANDS.get(args.command, _stages)(args))


if __name__ == "__main__":
    sys.exit(main())
