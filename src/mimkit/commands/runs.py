"""`mimkit runs show RUN` and `mimkit runs compare RUN...`: read run folders without opening their networks."""

from __future__ import annotations

import argparse


def add(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("runs", help="inspect run folders: show one, compare several")
    sub = p.add_subparsers(title="runs commands", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="method, backbone, data, progress, last loss, evaluations, checkpoints")
    show.add_argument("run_dir", metavar="RUN", help="a run folder (the output_dir of mimkit pretrain)")
    show.set_defaults(run=run_show)
    compare = sub.add_parser("compare", help="the config values that differ and the results, one column per run")
    compare.add_argument("run_dirs", metavar="RUN", nargs="+", help="run folders")
    compare.set_defaults(run=run_compare)


def run_show(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from mimkit.run_summary import summarize

    summary = summarize(args.run_dir)
    table = Table(title=f"run {summary.run_dir}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for label, text in summary.facts().items():
        table.add_row(label, text)
    Console().print(table)
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from mimkit.run_summary import config_differences, result_rows, summarize

    summaries = [summarize(path) for path in args.run_dirs]
    names = [s.run_dir.name for s in summaries]
    console = Console()
    differences = config_differences(summaries)
    configs = Table(title="config values that differ" if differences else "the configs are the same")
    results = Table(title="results")
    for table in (configs, results):
        table.add_column("", no_wrap=True)
        for name in names:
            table.add_column(name, justify="right", overflow="fold")
    for key, values in differences.items():
        configs.add_row(key, *("-" if v is None else str(v) for v in values))
    for label, values in result_rows(summaries).items():
        digits = 4 if label == "last loss" else 2
        results.add_row(label, *("-" if v is None else f"{v:.{digits}f}" for v in values))
    console.print(configs)
    console.print(results)
    return 0
