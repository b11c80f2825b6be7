"""The ``kvstore`` command: parses arguments and dispatches to a benchmark module in bench/.

    kvstore bench [NAME] [options]     run bench/bench_NAME.py (default: long-context)
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
}
DEFAULT_BENCHMARK = "long-context"


def _available() -> dict[str, str]:
    """The registered benchmarks whose module exists in this checkout or wheel."""
    from kvstore._locate import bench_dir

    root = bench_dir()
    return {name: mod for name, mod in BENCHMARKS.items() if (root / f"{mod}.py").is_file()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore", description="kvstore: tiered KV-cache management benchmarks")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="run a benchmark (default: long-context)")
    names = bench.add_subparsers(dest="benchmark", metavar="NAME")
    for name, module_name in _available().items():
        module = import_bench(module_name)
        sub = names.add_parser(
            name,
            help=(module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else None,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
            description=module.__doc__,
        )
        module.add_cli_args(sub)
        sub.set_defaults(run=module.main)
        if name == "replay":
            top = commands.add_parser(
                "replay", help="replay a request trace (= kvstore bench replay)",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=module.__doc__,
            )
            module.add_cli_args(top)
            top.set_defaults(run=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `kvstore bench` and `kvstore bench --opt ...` run the default benchmark.
    if argv and argv[0] == "bench" and (len(argv) == 1 or argv[1].startswith("-") and argv[1] not in ("-h", "--help")):
        argv.insert(1, DEFAULT_BENCHMARK)
    args = build_parser().parse_args(argv)
    if getattr(args, "run", None) is None:
        build_parser().parse_args([args.command, "--help"])
        return 2
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
