"""Helpers every benchmark shares: argument validators, timing (warm-up, CUDA events, median),
machine description, labelled progress, JSON output and printed tables.

Validators are argparse ``type=`` callables: a bad value raises ``argparse.ArgumentTypeError``
naming it, so ``kvstore`` reports ``kvstore: error: argument --NAME: ...`` and exits 2 before
any work starts. Output paths (``output_file``, ``plot_file``) are checked for writability at
parse time, so a long run never ends by losing its results. This module imports torch only
inside the functions that need it: building a parser (``--help``) stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence, TypeVar

from kvstore.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = [
    "Timing", "time_fn", "machine_info", "write_json", "print_table", "markdown_table", "add_common_args",
    "resolve_device", "parse_capacities", "Progress",
    # argparse validators
    "positive_int", "nonnegative_int", "seed", "positive_float", "fraction", "fraction_or_count", "capacity",
    "nonnegative_capacity",
    "comma_list", "int_list", "names", "device_name", "output_file", "plot_file",
]

T = TypeVar("T")

#: largest accepted ``--seed``: numpy, torch and faiss all take seeds in [0, 2**32); benchmarks
#: derive per-sequence seeds as ``seed * 7919 + i``, which stays far below torch's 2**64 limit.
MAX_SEED = 2**32 - 1


# ------------------------------------------------------------------------------ validators
def _bad(expected: str, text: object) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")


def _int(text: str, expected: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise _bad(expected, text) from None


def positive_int(text: str) -> int:
    """An integer >= 1 (``"0"``, ``"-3"``, ``"2.5"``, ``"x"`` are rejected)."""
    value = _int(text, "a positive integer")
    if value < 1:
        raise _bad("a positive integer", text)
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    value = _int(text, "an integer >= 0")
    if value < 0:
        raise _bad("an integer >= 0", text)
    return value


def seed(text: str) -> int:
    """A random seed: an integer in [0, 2**32 - 1] (see ``MAX_SEED``)."""
    expected = f"an integer seed in [0, {MAX_SEED}]"
    value = _int(text, expected)
    if not 0 <= value <= MAX_SEED:
        raise _bad(expected, text)
    return value


def _float(text: str, expected: str) -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        raise _bad(expected, text) from None
    if not math.isfinite(value):
        raise _bad(expected, text)
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (``nan`` and ``inf`` are rejected)."""
    value = _float(text, "a finite number > 0")
    if value <= 0:
        raise _bad("a finite number > 0", text)
    return value


def fraction(text: str) -> float:
    """A fraction in (0, 1]."""
    value = _float(text, "a fraction in (0, 1]")
    if not 0.0 < value <= 1.0:
        raise _bad("a fraction in (0, 1]", text)
    return value


def _is_integer_text(text: str) -> bool:
    return re.fullmatch(r"[+-]?\d[\d_]*", text.strip()) is not None


def fraction_or_count(text: str) -> int | float:
    """A count (an integer >= 1, e.g. ``512``) or a fraction in (0, 1] (``0.0625``, ``1/16``)."""
    expected = "a count >= 1 or a fraction in (0, 1]"
    text = str(text).strip()
    if _is_integer_text(text):
        value = int(text)
        if value < 1:
            raise _bad(expected, text)
        return value
    if "/" in text:
        num, _, den = text.partition("/")
        num_f, den_f = _float(num, expected), _float(den, expected)
        if den_f == 0:
            raise _bad(expected, text)
        value = num_f / den_f
    else:
        value = _float(text, expected)
    if not 0.0 < value <= 1.0:
        raise _bad(expected, text)
    return value


def capacity(text: str, *, allow_zero: bool = False) -> list[int | float]:
    """Comma-separated capacities, each a block count (``18279``) or a fraction of a trace's
    unique blocks (``0.1``); resolve them with ``parse_capacities(values, unique_blocks)``.
    ``allow_zero`` admits ``0`` (no tier). Rejects an empty list."""
    expected = "block counts >= 0 or fractions in (0, 1]" if allow_zero else "block counts >= 1 or fractions in (0, 1]"
    items = [item.strip() for item in str(text).split(",")]
    if not any(items):
        raise _bad(f"a comma-separated list of {expected}", text)
    out: list[int | float] = []
    for item in items:
        if allow_zero and _is_integer_text(item) and int(item) == 0:
            out.append(0)
            continue
        try:
            out.append(fraction_or_count(item))
        except argparse.ArgumentTypeError:
            raise _bad(f"a comma-separated list of {expected}", text) from None
    return out


def nonnegative_capacity(text: str) -> list[int | float]:
    """``capacity`` that also admits ``0`` (no tier)."""
    return capacity(text, allow_zero=True)


def comma_list(item: Callable[[str], T], *, allow_empty: bool = False, unique: bool = True) -> Callable[[str], list[T]]:
    """A comma-separated list whose items each pass ``item`` (another validator). Empty items
    (``"4,,8"``) and, unless ``allow_empty``, an empty list (``""``, ``","``) are rejected; so
    are repeated items when ``unique``."""

    def parse(text: str) -> list[T]:
        parts = [p.strip() for p in str(text).split(",")]
        if parts == [""] and allow_empty:
            return []
        if not any(parts):
            raise argparse.ArgumentTypeError(f"expected a non-empty comma-separated list, got {text!r}")
        if "" in parts:
            raise argparse.ArgumentTypeError(f"empty item in the list {text!r}")
        out = []
        for p in parts:
            try:
                out.append(item(p))
            except argparse.ArgumentTypeError as exc:
                raise argparse.ArgumentTypeError(f"{exc} (in {text!r})" if len(parts) > 1 else str(exc)) from None
        if unique and len(set(map(repr, out))) < len(out):
            raise argparse.ArgumentTypeError(f"an item is listed twice in {text!r}")
        return out

    parse.__name__ = f"list of {getattr(item, '__name__', 'items')}"
    return parse


#: comma-separated positive integers, e.g. ``--contexts 8192,32768``
int_list = comma_list(positive_int)


def names(choices: Iterable[str] | Callable[[], Iterable[str]]) -> Callable[[str], list[str]]:
    """A non-empty comma-separated list of distinct names out of ``choices`` (or of what
    ``choices()`` returns at parse time, so a registry is imported only when parsing)."""

    def item(text: str) -> str:
        allowed = sorted(choices() if callable(choices) else choices)
        if text not in allowed:
            raise argparse.ArgumentTypeError(f"unknown name {text!r}; choose from {', '.join(allowed)}")
        return text

    item.__name__ = "name"
    return comma_list(item)


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_name(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether it exists is checked by ``resolve_device``)."""
    if _DEVICE.fullmatch(text.strip()) is None:
        raise _bad("a device: auto, cpu, cuda or cuda:N", text)
    return text.strip()


def _check_writable(text: str) -> Path:
    """Raise unless a file can be written at ``text`` (missing parent folders are created at
    write time, so the nearest existing ancestor must be a writable folder: a file is created
    there and removed at once). Leaves nothing behind."""
    if not str(text).strip():
        raise argparse.ArgumentTypeError("expected a file path, got ''")
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{str(text)!r} is a directory, expected a file path")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise argparse.ArgumentTypeError(f"{str(text)!r} is not writable")
        return path
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {str(text)!r}: {str(parent)!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {str(text)!r}: directory {str(parent)!r} is not writable")
    from kvstore import validate  # here, not at the top: it imports numpy, and --help imports this module

    try:
        validate.probe_write(parent)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write {str(text)!r}: {e.strerror} in {str(parent)!r}") from None
    return path


def output_file(text: str) -> str:
    """A path a result file (JSON, markdown) can be written to, checked before the run."""
    _check_writable(text)
    return text


def plot_file(text: str) -> str:
    """A writable path whose suffix is an image format matplotlib writes (``.png``, ``.pdf``, ...)."""
    path = _check_writable(text)
    from matplotlib.backend_bases import FigureCanvasBase  # lazy: only when a plot is asked for

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if path.suffix.lstrip(".").lower() not in formats:
        raise argparse.ArgumentTypeError(f"cannot plot to {text!r}: the suffix must be one of {', '.join('.' + f for f in formats)}")
    return text


# ----------------------------------------------------------------------------------- timing
class Timing:
    """Samples of one timed function, in milliseconds."""

    def __init__(self, samples_ms: Sequence[float]) -> None:
        self.samples_ms = list(samples_ms)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def p99_ms(self) -> float:
        s = sorted(self.samples_ms)
        return s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)

    def __repr__(self) -> str:
        return f"Timing(median={self.median_ms:.4f} ms, p99={self.p99_ms:.4f} ms, n={len(self.samples_ms)})"


def time_fn(fn: Callable[[], object], *, warmup: int = 3, repeat: int = 10, device: "torch.device | str" = "cpu") -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeat`` (>= 1) timed ones.

    On CUDA each call is bracketed by CUDA events on the current stream (GPU time, no host
    sync inside the loop); on CPU by ``time.perf_counter``.
    """
    import torch

    if repeat < 1 or warmup < 0:
        raise ConfigError(f"time_fn needs repeat >= 1 and warmup >= 0, got repeat={repeat}, warmup={warmup}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        return Timing([s.elapsed_time(e) for s, e in zip(starts, ends)])
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return Timing(samples)


def machine_info(device: "torch.device | str" = "cpu") -> dict:
    """What the numbers were measured on."""
    import torch

    device = torch.device(device)
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def resolve_device(name: str) -> "torch.device":
    """``"auto"`` -> cuda when available else cpu; otherwise the named device, which must exist
    (ConfigError naming it otherwise)."""
    import torch

    if _DEVICE.fullmatch(str(name)) is None:
        raise ConfigError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from kvstore import validate

    return validate.device(name, "--device")  # exists here (ConfigError naming it otherwise)


#: the names of kvstore.spec.PRESETS, sorted, for ``--preset`` choices: listed here so that building a
#: benchmark's options imports no torch (tests/test_cli.py keeps the two equal)
PRESET_NAMES = ("llama3-70b", "llama3-8b", "qwen2.5-7b", "tiny")


def selection_defaults(args) -> None:
    """``--sinks`` / ``--window`` left unset take kvstore.pq.select.SelectionConfig's defaults,
    read when the benchmark runs (its options are listed without importing torch)."""
    from kvstore.pq.select import SelectionConfig

    if args.sinks is None:
        args.sinks = SelectionConfig.num_sinks
    if args.window is None:
        args.window = SelectionConfig.recent_window


def add_common_args(parser, *, json_default: str | None = None) -> None:
    """Options every benchmark takes: --device, --seed, --json."""
    parser.add_argument("--device", type=device_name, default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("--seed", type=seed, default=0, help="random seed")
    parser.add_argument("--json", dest="json_out", type=output_file, default=json_default, metavar="OUT",
                        help="write results as JSON to OUT (checked writable before the run)")


def write_json(path: str | os.PathLike | None, payload: dict) -> None:
    """Write ``payload`` (plus nothing else) as indented JSON; no-op when ``path`` is None."""
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write a matplotlib figure to ``path`` (checked by :func:`plot_file` before the run),
    creating missing parent folders as :func:`write_json` does, and close it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)


# --------------------------------------------------------------------------------- progress
class Progress:
    """Labelled progress of a run on stderr: a rich bar on a terminal, one plain line per step
    when stderr is not one (logs, CI), so every step says what runs (e.g. which policy and
    capacity).

        with Progress("bench pq", total=len(methods)) as progress:
            for name in methods:
                progress.step(f"{name}: train, time, score")
                ...

    ``step(label)`` completes the previous step and starts the next; leaving the block
    completes the last one.
    """

    def __init__(self, title: str, total: int | None, *, stream=None) -> None:
        self.title, self.total = title, total
        self.stream = sys.stderr if stream is None else stream
        self._bar = None
        self._task = None
        self._started = 0

    def __enter__(self) -> "Progress":
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._bar = RichProgress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=Console(file=self.stream), transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.title, total=self.total)
        return self

    def step(self, label: str) -> None:
        """Complete the running step (if any) and announce ``label`` as the next."""
        if self._bar is not None:
            if self._started:
                self._bar.advance(self._task)
            self._bar.update(self._task, description=f"{self.title}: {label}")
        else:
            of = f"/{self.total}" if self.total is not None else ""
            print(f"[{self.title} {self._started + 1}{of}] {label}", file=self.stream, flush=True)
        self._started += 1

    def over(self, items: Iterable[T], label: Callable[[T], str]) -> Iterator[T]:
        """Each of ``items``, announced as ``label(item)``."""
        for item in items:
            self.step(label(item))
            yield item

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            if self._started:
                self._bar.advance(self._task)
            self._bar.stop()


# ----------------------------------------------------------------------------------- tables
def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 1e4 or abs(value) < 1e-3:
            return f"{value:.3g}"
        return f"{value:.4g}"
    return str(value)


_LEFT = ("mode", "policy", "op", "name", "measure", "path", "error", "leaves only", "value", "target")


def _left(column: str, cells: Sequence[str]) -> bool:
    """Text columns align left, numeric ones right."""
    if column in _LEFT:
        return True
    numeric = re.compile(r"[-+]?(\d[\d,]*\.?\d*(e[-+]?\d+)?|nan|inf)")
    return any(c != "-" and numeric.fullmatch(c) is None for c in cells)


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain markdown table (numbers right-aligned), as the README and RESULTS.md show them."""
    cells = [[_fmt(v) for v in r] for r in rows]
    align = ["---" if _left(c, [r[i] for r in cells]) else "---:" for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines)


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[object]], *, file=None) -> None:
    """Print a table: on a terminal a rich table that fits its width; otherwise (piped,
    redirected) the title and a plain markdown table, with no box characters."""
    out = sys.stdout if file is None else file
    rows = [list(r) for r in rows]
    if not out.isatty():
        print(f"{title}\n\n{markdown_table(columns, rows)}\n", file=out, flush=True)
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out)
    cells = [[_fmt(v) for v in r] for r in rows]
    left = [_left(c, [r[i] for r in cells]) for i, c in enumerate(columns)]
    # Numbers keep their width (min_width); headers wrap at spaces, text columns anywhere. A
    # boxed table when its narrowest layout fits the terminal, else one without vertical rules;
    # a terminal too narrow for either gets the markdown table (lines wrap, cells stay whole).
    # The estimate adds one column of slack each: rich's shrinking rounds to whole characters.
    words = [max([len(w) for w in c.split()] + [1]) for c in columns]
    widths = [min(w, 12) if is_left else max([len(r[i]) for r in cells] + [w]) for i, (w, is_left) in enumerate(zip(words, left))]
    for boxed, per_column in ((True, 4), (False, 3)):
        if sum(widths) + per_column * len(widths) + 1 > console.width:
            continue
        table = Table(title=title) if boxed else Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for c, is_left, width in zip(columns, left, widths):
            table.add_column(c, justify="left" if is_left else "right", overflow="fold", min_width=None if is_left else width)
        for r in cells:
            table.add_row(*r)
        console.print(table)
        return
    print(f"{title}\n\n{markdown_table(columns, rows)}\n", file=out, flush=True)


def parse_capacities(values: str | Sequence[int | float], unique_blocks: int, *, allow_zero: bool = False) -> list[int]:
    """Capacities -> block counts; a fraction (a float, or text with a ``.``) is a fraction of
    ``unique_blocks``. ``values`` is the text (``"18279,0.1"``) or what ``capacity`` parsed."""
    if isinstance(values, str):
        try:
            values = capacity(values, allow_zero=allow_zero)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"capacity: {exc}") from None
    out = []
    for value in values:
        if isinstance(value, float):
            if unique_blocks < 1:
                raise ConfigError(f"capacity {value:g} is a fraction of the trace's unique blocks, but the trace has none")
            blocks = int(round(value * unique_blocks))
            if blocks < 1:
                raise ConfigError(f"capacity {value:g} x {unique_blocks} unique blocks rounds to {blocks} blocks; give at least 1")
        else:
            blocks = value
            if blocks < (0 if allow_zero else 1):
                raise ConfigError(f"capacity {blocks} must be a positive block count or a fraction in (0, 1]")
        out.append(blocks)
    return out
