"""Find csrc/ and bench/ in an installed wheel (kvstore/_csrc, kvstore/_bench) or a source checkout.

The wheel maps the top-level ``csrc/`` and ``bench/`` folders into the package; in a source
checkout or an editable install they sit beside ``kvstore/``. Either way the benchmarks are
imported as the package ``kvstore._bench`` (never as a top-level ``bench``), so their relative
imports (``from .common import ...``, ``from .baselines import pqcache_ref``) work in both.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_PKG = Path(__file__).resolve().parent

__all__ = ["csrc_dir", "csrc_path", "bench_dir", "import_bench", "TRACE_DIR_ENV", "DEFAULT_TRACE", "trace_dirs", "default_trace"]

#: environment variable naming a folder of traces, searched first
TRACE_DIR_ENV = "KVSTORE_TRACE_DIR"
#: the trace ``kvstore replay`` reads by default (it ships beside the project, in ``shared/traces/``)
DEFAULT_TRACE = "mooncake_conversation.jsonl"


def _find(installed: str, checkout: str) -> Path:
    for candidate in (_PKG / installed, _PKG.parent / checkout):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"kvstore: neither {_PKG / installed} nor {_PKG.parent / checkout} exists")


def csrc_dir() -> Path:
    """Folder holding the CUDA sources (``*.cu``)."""
    return _find("_csrc", "csrc")


def csrc_path(name: str) -> Path:
    """Path of one CUDA source, e.g. ``csrc_path("multi_segment_attention.cu")``."""
    path = csrc_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"kvstore: CUDA source {name!r} not found in {csrc_dir()}")
    return path


def bench_dir() -> Path:
    """Folder holding the benchmark modules."""
    return _find("_bench", "bench")


def _bench_package() -> ModuleType:
    name = "kvstore._bench"
    if name in sys.modules:
        return sys.modules[name]
    root = bench_dir()
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def import_bench(name: str) -> ModuleType:
    """Import ``bench/<name>.py`` (dotted for subfolders: ``"baselines.pqcache_ref"``)."""
    _bench_package()
    return importlib.import_module(f"kvstore._bench.{name}")


def trace_dirs() -> list[Path]:
    """Folders searched for a named trace, in order: ``$KVSTORE_TRACE_DIR``, then ``shared/traces``
    beside the checkout (``<checkout>/../shared/traces``) and inside it, then ``../shared/traces``
    and ``shared/traces`` from the current directory. Independent of the current directory
    except for the last two."""
    import os

    dirs = [Path(os.environ[TRACE_DIR_ENV]).expanduser()] if os.environ.get(TRACE_DIR_ENV) else []
    checkout = _PKG.parent
    dirs += [checkout.parent / "shared" / "traces", checkout / "shared" / "traces"]
    dirs += [Path.cwd().parent / "shared" / "traces", Path.cwd() / "shared" / "traces"]
    return list(dict.fromkeys(d.resolve() for d in dirs))


def default_trace(name: str = DEFAULT_TRACE) -> Path:
    """The trace file ``name`` in the first of ``trace_dirs()`` holding it (ConfigError listing
    the folders searched otherwise)."""
    from kvstore.errors import ConfigError

    searched = trace_dirs()
    for folder in searched:
        if (folder / name).is_file():
            return folder / name
    raise ConfigError(
        f"trace {name!r} not found in {', '.join(map(str, searched))}; pass --trace PATH or set {TRACE_DIR_ENV}"
    )
