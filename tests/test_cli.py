"""The CLI dispatches to bench modules, and the bench package resolves without a top-level `bench`."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvstore import cli
from kvstore._locate import bench_dir, import_bench


def test_no_top_level_bench_package_is_importable():
    """No installed top-level ``bench``: the only one importable is the checkout's own folder
    (found through the current directory when the tests run from the checkout root, whatever
    the clone is named, e.g. ``kvstore``), never a copy in site-packages."""
    spec = importlib.util.find_spec("bench")
    if spec is not None:
        assert Path(spec.origin).resolve().parent == bench_dir().resolve(), spec.origin
        assert "site-packages" not in Path(spec.origin).resolve().parts, spec.origin
    assert import_bench("common").__name__ == "kvstore._bench.common"


def test_every_registered_benchmark_module_has_the_cli_contract():
    for name, module in cli._available().items():
        mod = import_bench(module)
        assert callable(mod.add_cli_args) and callable(mod.main), name
    assert (bench_dir() / "bench_store.py").is_file()


def test_bench_store_runs_and_writes_json(tmp_path):
    out = tmp_path / "store.json"
    rc = cli.main(["bench", "store", "--preset", "tiny", "--layers", "2", "--contexts", "256,1024", "--chunk", "128",
                   "--decode-steps", "10", "--repeat", "1", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert [r["context"] for r in data["results"]] == [256, 1024]
    for r in data["results"]:
        assert r["append_gbps"] > 0 and r["offload_gbps"] > 0 and r["load_gbps"] > 0 and r["step_bookkeeping_us"] > 0


def test_help_lists_defaults():
    proc = subprocess.run([sys.executable, "-m", "kvstore.cli", "bench", "store", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "(default: 32768)" in text and "--decode-steps DECODE_STEPS timed decode steps per context (default: 200)" in text


def test_long_context_help_keeps_the_mode_list_and_names_each_default_once():
    proc = subprocess.run([sys.executable, "-m", "kvstore.cli", "bench", "long-context", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    for mode in ("full", "pq", "pq-codes", "exact", "pqcache-ref", "lossless"):  # one per line, as in the docstring
        assert any(line.startswith(f"  {mode} ") for line in lines), mode
    text = " ".join(proc.stdout.split())
    assert "(default: tiny on CPU, llama3-8b on CUDA)" in text and "(default: None)" not in text.split("--preset")[1].split("--layers")[0]
    assert "--sinks SINKS sink tokens always kept (pq, pq-codes, exact) (default: SelectionConfig.num_sinks)" in text


_HEAVY = ("torch", "vllm", "matplotlib", "rich", "numpy", "lmcache")
#: replay lists the policy registry (kvstore/evict, numpy arrays throughout): numpy, 0.1 s, is allowed there
_ALLOWED = {"replay": {"numpy"}}


@pytest.mark.parametrize("command", [[], ["bench"], ["replay"], *(["bench", name] for name in cli.BENCHMARKS)])
def test_every_help_imports_nothing_heavy(command):
    """``python -m kvstore [COMMAND] --help`` builds the whole parser of that command (its
    benchmark module imported, every option added) without importing torch, numpy, vllm, rich
    or matplotlib: the cause of a slow ``--help``, checked instead of a timing."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['kvstore', *{command!r}, '--help']\n"
        "try:\n"
        "    runpy.run_module('kvstore', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({_HEAVY!r})), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert "usage: kvstore" in proc.stdout
    allowed = _ALLOWED.get(command[-1] if command else "", set())
    assert set(eval(proc.stderr.strip().splitlines()[-1])) <= allowed, proc.stderr


def test_preset_names_for_the_options_are_the_specs_presets():
    from kvstore.spec import PRESETS

    assert tuple(import_bench("common").PRESET_NAMES) == tuple(sorted(PRESETS))


def test_installed_console_script_runs_outside_the_checkout(tmp_path):
    """`kvstore` as pip installed it (editable or not), from a directory that is not the checkout."""
    import shutil

    exe = shutil.which("kvstore")
    if exe is None:
        pytest.skip("the kvstore console script is not installed")
    proc = subprocess.run([exe, "bench", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "long-context" in proc.stdout
