"""The ``ekipl`` command line: ``ekipl data make ...``, ``ekipl models build ...``, ``ekipl plan ...``."""

from __future__ import annotations

import argparse
import sys


def _data_make(args) -> int:
    from ekipl.tasks.loader import load_task_file
    from ekipl.tasks.synth import make_dataset

    for task in args.task:
        paths = make_dataset(task, args.out, n_train=args.n_train, n_test=args.n_test, seed=args.seed)
        for split, path in paths.items():
            n = len(load_task_file(path))
            print(f"{task:9s} {split:9s} {n:6d} rows  {path}")
    return 0


def _models_build(args) -> int:
    from ekipl.models.tiny import build_tiny

    for name in args.name:
        print(build_tiny(name, seed=args.seed, force=args.force))
    return 0


def _plot(args) -> int:
    from ekipl.plot import plot_runs

    print(plot_runs(args.run_dirs, args.out, smoothing=args.smoothing))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ekipl", description="Vision-EKIPL trainer tools")
    sub = parser.add_subparsers(dest="cmd", required=True)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_cmd", required=True)
    make = data.add_parser("make", help="generate the synthetic Reason-RFT-CoT stand-in")
    make.add_argument("--task", nargs="+", default=["counting"], choices=["counting", "geometry", "trance"])
    make.add_argument("--out", required=True)
    make.add_argument("--n-train", type=int, default=200)
    make.add_argument("--n-test", type=int, default=50)
    make.add_argument("--seed", type=int, default=0)
    make.set_defaults(fn=_data_make)

    models = sub.add_parser("models", help="tiny local models").add_subparsers(
        dest="models_cmd", required=True
    )
    build = models.add_parser("build", help="build tiny models into the cache")
    build.add_argument("name", nargs="+")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--force", action="store_true")
    build.set_defaults(fn=_models_build)

    plot = sub.add_parser("plot", help="draw the curves of one or several runs to a PNG")
    plot.add_argument("run_dirs", nargs="+")
    plot.add_argument("--out", default="curves.png")
    plot.add_argument(
        "--smoothing", type=float, default=0.6, help="EMA weight of per-step curves, as W&B's (0: raw)"
    )
    plot.set_defaults(fn=_plot)

    sub.add_parser(
        "plan", help="where a run's actors would go and whether it fits (ekipl.plan)", add_help=False
    )

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plan"]:  # its own parser: Hydra overrides follow the flags
        from ekipl.plan import main as plan_main

        return plan_main(argv[1:])
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:  # bad data, unknown names, missing runs: exit code 2
        print(f"ekipl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
