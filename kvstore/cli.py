"""The ``kvstore`` command: parses arguments and dispatches to a benchmark module in bench/.

    kvstore bench [NAME] [options]     run a benchmark (default: long-context)
    kvstore replay [options]           same as ``kvstore bench replay``

Every bench module exports ``add_cli_args(parser)`` and ``main(args) -> int | None``.
"""

from __future__ import annotations

import argparse
import sys

from kvstore._locate import import_bench

#: benchmark name -> module in bench/ (importable as kvstore._bench.<module>)
BENCHMARKS: dict[str, str] = {
    "long-context": "bench_long_context",
    "store": "bench_store",
    "pq": "bench_pq",
    "replay": "bench_replay",
    "attn": "bench_attn",
    "decode": "bench_decode",
    "connector": "bench_connector",
    "engine": "bench_engine",
}
#: ``kvstore bench`` with no name runs the first of these that exists
DEFAULT_BENCHMARKS = ("long-context", "store")


def _available() -> dict[str, str]:
    """The registered benchmarks whose module exists in this checkout or wheel."""
    from kvstore._locate import bench_dir

    root = bench_dir()
    return {name: mod for name, mod in BENCHMARKS.items() if (root / f"{mod}.py").is_file()}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """A benchmark's docstring as written, and every option's default unless its help names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_benchmark(subparsers, name: str, module_name: str):
    module = import_bench(module_name)
    doc = (module.__doc__ or "").strip()
    sub = subparsers.add_parser(
        name,
        help=doc.splitlines()[0] if doc else None,
        description=doc,
        formatter_class=_HelpFormatter,
    )
    module.add_cli_args(sub)
    sub.set_defaults(run=module.main)
    return sub


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``only``, just that benchmark's module is imported (fast start-up)."""
    parser = argparse.ArgumentParser(prog="kvstore", description="kvstore: tiered KV-cache management benchmarks")
    commands = parser.add_subparsers(dest="command", required=True)
    available = _available()
    bench = commands.add_parser(
        "bench", help="run a benchmark (default: long-context)",
        description="benchmarks: " + ", ".join(available) + "; `kvstore bench NAME --help` lists each one's options",
    )
    names = bench.add_subparsers(dest="benchmark", metavar="NAME")
    for name, module_name in available.items():
        if only is None or only == name:
            _add_benchmark(names, name, module_name)
        else:
            names.add_parser(name, help=f"see `kvstore bench {name} --help`")
    if "replay" in available and only in (None, "replay"):
        _add_benchmark(commands, "replay", available["replay"])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    available = _available()
    # `kvstore bench` and `kvstore bench --opt ...` run the default benchmark.
    if argv and argv[0] == "bench" and (len(argv) == 1 or argv[1].startswith("-") and argv[1] not in ("-h", "--help")):
        argv.insert(1, next(name for name in DEFAULT_BENCHMARKS if name in available))
    only = None
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in available:
        only = argv[1]
    elif argv and argv[0] == "replay":
        only = "replay"
    args = build_parser(only).parse_args(argv)
    if getattr(args, "run", None) is None:
        build_parser(only).parse_args([args.command, "--help"])
        return 2
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
