"""The ``kvstore`` command: parses arguments and dispatches to a benchmark module in bench/.

    kvstore bench [NAME] [options]     run a benchmark (default: long-context)
    kvstore replay [options]           same as ``kvstore bench replay``
    kvstore --version

Every bench module exports ``add_cli_args(parser)`` and ``main(args) -> int | None``.

One error path: a bad option, a ``KVStoreError`` (or an ``OSError``, or a ``SystemExit`` with a
message) from a benchmark prints ``kvstore: error: <message>`` on stderr and exits 2, with no
traceback; ``--debug`` re-raises it with its traceback instead. Only the module of the
benchmark named on the command line is imported, and help texts come from the modules'
docstrings read without importing them, so ``kvstore --help`` and ``kvstore bench --help``
import neither torch nor vllm.
"""

from __future__ import annotations

import argparse
import ast
import sys

from kvstore._locate import bench_dir, import_bench
from kvstore.errors import KVStoreError

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

#: exit status of every reported error (argparse's own for a usage error)
EXIT_ERROR = 2


class UsageError(Exception):
    """A bad command line (unknown option, a value a validator rejected, ...)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with errors raised (reported once by ``main``) instead of printed with the usage."""

    def error(self, message: str):
        raise UsageError(message)


def _available() -> dict[str, str]:
    """The registered benchmarks whose module exists in this checkout or wheel."""
    root = bench_dir()
    return {name: mod for name, mod in BENCHMARKS.items() if (root / f"{mod}.py").is_file()}


def _summary(module_name: str) -> str | None:
    """First line of a benchmark module's docstring, read without importing the module."""
    path = bench_dir() / f"{module_name}.py"
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return doc.strip().splitlines()[0] if doc else None


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """A benchmark's docstring as written, and every option's default unless its help names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_benchmark(subparsers, name: str, module_name: str, *, load: bool):
    """The subcommand ``name``; with ``load``, its module is imported and adds its options."""
    if not load:
        return subparsers.add_parser(name, help=_summary(module_name), add_help=False)
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


def _version() -> str:
    import kvstore

    return f"kvstore {kvstore.__version__}"


def build_parser(only: str | None = None, *, load_all: bool = False) -> argparse.ArgumentParser:
    """The ``kvstore`` parser. Only benchmark ``only``'s module is imported (fast start-up);
    with ``load_all``, every benchmark's."""
    parser = _Parser(prog="kvstore", description="kvstore: tiered KV-cache management benchmarks")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    available = _available()
    bench = commands.add_parser(
        "bench", help="run a benchmark (default: long-context)",
        description="benchmarks: " + ", ".join(available) + "; `kvstore bench NAME --help` lists each one's options",
    )
    names = bench.add_subparsers(dest="benchmark", metavar="NAME")
    for name, module_name in available.items():
        _add_benchmark(names, name, module_name, load=load_all or only == name)
    if "replay" in available:
        _add_benchmark(commands, "replay", available["replay"], load=load_all or only == "replay")
    return parser


def _selected(argv: list[str], available: dict[str, str]) -> str | None:
    """The benchmark ``argv`` runs (or asks help for), if it names one."""
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in available:
        return argv[1]
    if argv and argv[0] == "replay" and "replay" in available:
        return "replay"
    return None


def _run(argv: list[str]) -> int:
    available = _available()
    # `kvstore bench` and `kvstore bench --opt ...` run the default benchmark.
    if argv and argv[0] == "bench" and (len(argv) == 1 or argv[1].startswith("-") and argv[1] not in ("-h", "--help")):
        argv.insert(1, next(name for name in DEFAULT_BENCHMARKS if name in available))
    only = _selected(argv, available)
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        raise UsageError(f"no benchmark named; choose from {', '.join(available)}")
    return int(args.run(args) or 0)


def _message(exc: BaseException) -> str:
    text = str(exc) if not isinstance(exc, SystemExit) else str(exc.code)
    return " ".join(text.split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    try:
        return _run(argv)
    except SystemExit as exc:  # --help, --version (code 0), or a benchmark's SystemExit("message")
        if not isinstance(exc.code, str) or debug:
            raise
        print(f"kvstore: error: {_message(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except (UsageError, KVStoreError, OSError) as exc:
        if debug:
            raise
        print(f"kvstore: error: {_message(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print("kvstore: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
