"""`nmoe`: the command line of nmoe-edge."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from toolkit.config import (
    BASELINE_METHODS,
    GATE_METHODS,
    STAGE1_METHODS,
    ConfigError,
    describe,
    load,
)
from toolkit.data import DataError
from toolkit.errors import DamagedFile, NoQuorumError, RunDirConflict
from toolkit.extras import EXTRA_MODULES, extra_providing, missing_extras_error

TRAIN_HELP = f"""\
Train and evaluate a Networked Mixture-of-Experts and its baselines on non-IID federated data.

A run has three federated stages: (1) a shared feature extractor ({", ".join(STAGE1_METHODS)}),
(2) one expert per client trained on its own data with the extractor frozen, (3) a gate
({", ".join(GATE_METHODS)}); plus the baselines {", ".join(BASELINE_METHODS)}.
Every combination of stage1.methods x gate.methods is evaluated as nmoe_<stage1>_<gate>.

The run dir gets: config.json (resolved), checkpoints/ (one file per job, saved every round),
metrics.json, report.md, plots/*.png and run.log. Re-running the same command after a crash or
Ctrl-C resumes from the last completed round; nothing finished is recomputed. A run dir holding
a different config is refused.
"""

TRAIN_EPILOG = """\
examples:
  nmoe train configs/quick.toml --out runs/quick
  nmoe train configs/quick.toml --out runs/iid --set data.partition=iid
  nmoe train configs/fmnist-dir0.1.toml --out runs/d01 --set 'gate.methods=["fedgate","fedavggate"]'
  nmoe train configs/quick.toml --out /tmp/x --dry-run     # validate and print the resolved config
  nmoe results runs/quick                                    # the results table of a finished run
"""


def _train(args: argparse.Namespace) -> int:
    cfg = load(args.config, args.set)
    if args.ray_address and args.executor != "ray":
        raise ConfigError("--ray-address needs --executor ray")
    if args.dry_run:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from toolkit.report import results_table
    from toolkit.rundir import train

    if args.executor == "inprocess":
        metrics = train(cfg, Path(args.out), show_progress=not args.quiet)
    else:
        missing = missing_extras_error("`nmoe train --executor ray`", EXTRA_MODULES["scale"])
        if missing is not None:
            print(f"nmoe: error: {missing}", file=sys.stderr)
            return 2
        import torch

        from toolkit.federated.ray_executor import RayExecutor

        ray, threads = RayExecutor(args.ray_address), torch.get_num_threads()
        torch.set_num_threads(1)  # this process asks and evaluates the clients from parallel threads
        try:
            metrics = train(cfg, Path(args.out), show_progress=not args.quiet, executor=ray, place=ray.place)
        finally:
            torch.set_num_threads(threads)
            ray.close()
    print(results_table(metrics))
    print(f"\nreport: {Path(args.out) / 'report.md'}")
    return 0


def _results(args: argparse.Namespace) -> int:
    from toolkit.report import results_table
    from toolkit.run_files import read_metrics

    path = Path(args.run_dir) / "metrics.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: has `nmoe train ... --out {args.run_dir}` finished?")
    print(results_table(read_metrics(Path(args.run_dir))))
    print(f"\nreport: {Path(args.run_dir) / 'report.md'}")
    return 0


# The optional modules each subcommand needs (a bundle format's runtime is checked when a model of
# that format is opened); `nmoe` names the extras that bring the missing ones.
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "train": EXTRA_MODULES["train"], "results": ("matplotlib",), "trial": ("paho", "torch", "matplotlib"),
    "export": EXTRA_MODULES["train"] + EXTRA_MODULES["export"], "broker": (), "agent": ("paho",),
    "federate": ("paho", "torch", "matplotlib"), "fleet-data": ("torch",), "fleet": ("paho", "rich"),
    "loadgen": ("paho",)}

# Subcommands of other packages, found by name so that `toolkit` never depends on them (import-linter
# checks that) and a device without torch can still run `nmoe` for the agent. Each module has
# `register(subparsers)`, which adds its parser with `func` set, and imports nothing heavy at load.
PLUGINS = ("toolkit.fleet.trial_cli", "toolkit.fleet.federate_cli", "toolkit.fleet.watch_cli", "export.cli", "broker.cli",
           "device_agent.cli", "toolkit.fleet.loadgen_cli")


def register_plugin(sub: argparse._SubParsersAction[argparse.ArgumentParser], module: str) -> None:
    """Add a plugin's subcommand if its package is installed."""
    try:
        plugin = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            return  # that part of nmoe-edge is not installed here
        raise
    plugin.register(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nmoe", description="nmoe-edge: federated Networked Mixture-of-Experts, from training to devices.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train and evaluate NMoE variants and baselines",
                           description=TRAIN_HELP,
                           epilog="config keys and their defaults (a TOML file sets any subset):\n"
                                  + describe() + "\n\n" + TRAIN_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("config", help="TOML config file, e.g. configs/quick.toml")
    train.add_argument("--out", required=True, metavar="DIR", help="run dir to create or resume")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key; VALUE is parsed as TOML (repeatable), "
                            "e.g. --set gate.rounds=5 --set data.alpha=0.1")
    train.add_argument("--dry-run", action="store_true", help="validate the config, print it resolved, and stop")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.add_argument("--executor", choices=("inprocess", "ray"), default="inprocess",
                       help="where the clients' updates run: one after another in this process (default), "
                            "or as Ray tasks, one torch thread each, on a local Ray (every core) or the "
                            "cluster of --ray-address (needs the [scale] extra); same numbers either way "
                            "at the same torch thread count")
    train.add_argument("--ray-address", metavar="ADDR",
                       help="with --executor ray: join this running Ray cluster ('auto' or HOST:PORT, "
                            "see docs/scale.md) instead of starting a local one")
    train.set_defaults(func=_train)

    results = sub.add_parser("results", help="print the results table of a run dir")
    results.add_argument("run_dir", help="a run dir written by `nmoe train`")
    results.set_defaults(func=_results)
    for module in PLUGINS:
        register_plugin(sub, module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = f"`nmoe {args.command}`"
    missing = missing_extras_error(command, COMMAND_MODULES.get(args.command, ()))
    if missing is not None:
        print(f"nmoe: error: {missing}", file=sys.stderr)
        return 2
    try:
        status: int = args.func(args)
        return status
    except ModuleNotFoundError as e:  # an optional module imported on demand: still one line
        missing = None if extra_providing(e.name or "") is None else missing_extras_error(
            command, [(e.name or "").partition(".")[0]])
        if missing is None:
            raise
        print(f"nmoe: error: {missing}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nnmoe: interrupted; run the same command again to resume from the last completed round",
              file=sys.stderr)
        return 130
    except (ConfigError, DataError, RunDirConflict, NoQuorumError, DamagedFile, FileNotFoundError,
            ConnectionError) as e:
        print(f"nmoe: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
