"""Helpers every benchmark shares: timing (warm-up, CUDA events, median), machine description,
JSON output and printed tables."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from kvstore.errors import ConfigError

__all__ = [
    "Timing", "time_fn", "machine_info", "write_json", "print_table", "add_common_args", "resolve_device", "parse_capacities",
]


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


def time_fn(fn: Callable[[], object], *, warmup: int = 3, repeat: int = 10, device: torch.device | str = "cpu") -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeat`` timed ones.

    On CUDA each call is bracketed by CUDA events on the current stream (GPU time, no host
    sync inside the loop); on CPU by ``time.perf_counter``.
    """
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


def machine_info(device: torch.device | str = "cpu") -> dict:
    """What the numbers were measured on."""
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


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda when available else cpu; otherwise the named device (must exist)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def add_common_args(parser, *, json_default: str | None = None) -> None:
    """Options every benchmark takes: --device, --seed, --json."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--json", dest="json_out", default=json_default, metavar="OUT", help="write results as JSON to OUT")


def write_json(path: str | os.PathLike | None, payload: dict) -> None:
    """Write ``payload`` (plus nothing else) as indented JSON; no-op when ``path`` is None."""
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1e4 or abs(value) < 1e-3:
            return f"{value:.3g}"
        return f"{value:.4g}"
    return str(value)


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Print a table with rich (plain text when stdout is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right" if c not in ("mode", "policy", "op", "name") else "left")
    for r in rows:
        table.add_row(*[_fmt(v) for v in r])
    Console(width=max(100, min(200, 12 * len(columns) + 20))).print(table)


def parse_capacities(text: str, unique_blocks: int, *, allow_zero: bool = False) -> list[int]:
    """``"18279,0.1"`` -> block counts; a value with a ``.`` is a fraction of ``unique_blocks``."""
    out = []
    for item in text.split(","):
        item = item.strip()
        try:
            value = float(item) if "." in item else int(item)
        except ValueError:
            raise ConfigError(f"capacity {item!r} is neither a block count nor a fraction") from None
        blocks = int(round(value * unique_blocks)) if isinstance(value, float) else value
        if isinstance(value, float) and not 0.0 < value <= 1.0 or blocks < (0 if allow_zero else 1):
            raise ConfigError(f"capacity {item!r} must be a positive block count or a fraction in (0, 1]")
        out.append(blocks)
    return out
