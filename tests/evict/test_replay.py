"""Replay simulator: libCacheSim equivalence (LRU with requests; every policy per block in
test_libcachesim.py), the Belady bound, cost accounting, the CLI's report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.errors import ConfigError
from kvstore.evict import POLICIES
from kvstore.evict.cost import CostModel
from kvstore.evict.replay import ReplayConfig, block_info, replay
from kvstore.evict.trace import Trace, load_mooncake
from kvstore.spec import KVSpec

TINY = Path(__file__).parent / "data" / "tiny_mooncake.jsonl"
MOONCAKE = Path(__file__).parents[2] / ".." / "shared" / "traces" / "mooncake_conversation.jsonl"
ONLINE = sorted(n for n, cls in POLICIES.items() if not cls.offline)


def libcachesim_hits(blocks: np.ndarray, capacity: int) -> int:
    lcs = pytest.importorskip("libcachesim")
    cache, req = lcs.LRU(cache_size=capacity), lcs.Request()
    req.obj_size = 1
    hits = 0
    for i, b in enumerate(blocks.tolist()):
        req.obj_id, req.clock_time = b, i
        hits += cache.get(req)
    return hits


@pytest.mark.parametrize("capacity", [24, 31, 60])
def test_lru_matches_libcachesim_on_tiny_trace(capacity):
    trace = load_mooncake(TINY)
    assert replay(trace, "lru", ReplayConfig(capacity_blocks=capacity)).device_hits == libcachesim_hits(trace.blocks, capacity)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), extra=st.integers(0, 30))
def test_lru_matches_libcachesim_on_random_traces(seed, extra):
    trace = Trace.from_requests(_prefix_requests(seed, 40), block_tokens=16)
    capacity = trace.max_request_blocks + extra
    assert replay(trace, "lru", ReplayConfig(capacity_blocks=capacity, model="tiny")).device_hits == libcachesim_hits(trace.blocks, capacity)


@pytest.mark.skipif(not MOONCAKE.is_file(), reason="the shared Mooncake trace is not present")
def test_lru_matches_libcachesim_on_mooncake_prefix():
    trace = load_mooncake(MOONCAKE, limit=1500)
    capacity = int(0.1 * trace.num_unique_blocks)
    ours = replay(trace, "lru", ReplayConfig(capacity_blocks=capacity))
    assert ours.device_hits == libcachesim_hits(trace.blocks, capacity)


@pytest.mark.parametrize("capacity", [24, 40])
def test_belady_bounds_every_policy_on_tiny_trace(capacity):
    """Per-policy hit counts are checked against libCacheSim in test_libcachesim.py (one block
    per request); here, with requests and their protected blocks, Belady still hits the most,
    at most every non-compulsory read, and at most libCacheSim's unprotected Belady."""
    trace = load_mooncake(TINY)
    config = ReplayConfig(capacity_blocks=capacity)
    got = {name: replay(trace, name, config).device_hits for name in POLICIES}
    assert max(got.values()) == got["belady"] <= trace.num_block_requests - trace.num_unique_blocks
    lcs = pytest.importorskip("libcachesim")
    cache, req = lcs.Belady(cache_size=capacity), lcs.Request()
    req.obj_size = 1
    bound = 0
    for i, (b, nxt) in enumerate(zip(trace.blocks.tolist(), trace.next_use().tolist())):
        req.obj_id, req.clock_time, req.next_access_vtime = b, i, nxt
        bound += cache.get(req)
    assert got["belady"] <= bound


def _prefix_requests(seed: int, n: int) -> list[list[int]]:
    """Random conversations growing their prefixes (Mooncake-like ids), interleaved."""
    rng = np.random.default_rng(seed)
    convs: list[list[int]] = []
    next_id, out = 0, []
    for _ in range(n):
        if not convs or rng.random() < 0.3:
            convs.append([])
        c = convs[int(rng.integers(len(convs)))]
        for _ in range(int(rng.integers(1, 4))):
            c.append(next_id)
            next_id += 1
        out.append(list(c))
    return out


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), extra=st.integers(0, 25), host=st.sampled_from([0, 8]))
def test_belady_hits_at_least_every_online_policy(seed, extra, host):
    trace = Trace.from_requests(_prefix_requests(seed, 30), block_tokens=16)
    config = ReplayConfig(capacity_blocks=trace.max_request_blocks + extra, host_blocks=host, model="tiny")
    bound = replay(trace, "belady", config).device_hits
    for name in ONLINE:
        assert replay(trace, name, config).device_hits <= bound, name


def test_cost_accounting_by_hand():
    """First reads are prefill, not recompute; re-reads of evicted blocks are both."""
    trace = Trace.from_requests([[0, 1], [5], [0, 1, 2]], block_tokens=16)
    cost = CostModel.preset("tiny")
    r = replay(trace, "lru", ReplayConfig(capacity_blocks=4, model="tiny"))
    f0, f1, f2 = (float(cost.recompute_flops(16 * i, 16)) for i in range(3))
    # capacity 4 holds everything: only first reads miss (block 5 sits at position 0)
    assert (r.device_hits, r.costs["multi-segment"].recompute_flops) == (2, 0.0)
    assert r.costs["multi-segment"].prefill_flops == pytest.approx(f0 + f1 + f0 + f2)

    trace = Trace.from_requests([[0, 1], [2, 3], [0, 1]], block_tokens=16)
    r = replay(trace, "lru", ReplayConfig(capacity_blocks=2, model="tiny"))
    assert r.device_hits == 0
    assert r.costs["multi-segment"].recompute_flops == pytest.approx(f0 + f1)
    ttft = r.costs["multi-segment"].ttft_s
    assert ttft[2] == pytest.approx((f0 + f1) / cost.compute_throughput)


def test_prefix_semantics_recompute_after_first_miss():
    """asym, capacity 3: [0,1,2] then [3] evicts 0 (the cheapest: position 0); [0,1,2] misses
    0 and evicts 3 (position 0 too) for it, then hits 1 and 2. Multi-segment recomputes block
    0 only; prefix semantics recomputes 0, 1 and 2 although 1 and 2 are resident."""
    bt = 65536  # long blocks: position dominates the cost, so the late blocks outweigh aging
    trace = Trace.from_requests([[0, 1, 2], [3], [0, 1, 2]], block_tokens=bt)
    cost = CostModel.preset("tiny")
    flops = [float(cost.recompute_flops(bt * i, bt)) for i in range(3)]
    r = replay(trace, "asym", ReplayConfig(capacity_blocks=3, model="tiny"))
    assert (r.device_hits, r.prefix_hits) == (2, 0)
    assert r.costs["multi-segment"].recompute_flops == pytest.approx(flops[0])
    assert r.costs["prefix"].recompute_flops == pytest.approx(sum(flops))
    assert r.costs["prefix"].ttft_s[2] > r.costs["multi-segment"].ttft_s[2]


def test_host_tier_loads_and_bytes():
    trace = Trace.from_requests([[0, 1], [2, 3], [0, 1]], block_tokens=16)
    spec, cost = KVSpec.preset("tiny"), CostModel.preset("tiny")
    r = replay(trace, "lru", ReplayConfig(capacity_blocks=2, host_blocks=2, model="tiny"))
    assert (r.device_hits, r.host_hits) == (0, 2)
    assert r.costs["multi-segment"].recompute_flops == 0.0
    assert r.costs["multi-segment"].bytes_loaded == 2 * 16 * spec.bytes_per_token
    assert r.costs["multi-segment"].ttft_s[2] == pytest.approx(2 * float(cost.reload_seconds(16 * spec.bytes_per_token)))


def test_block_info_filled_from_trace_and_cost():
    trace = load_mooncake(TINY)
    config = ReplayConfig(capacity_blocks=30)
    info = block_info(trace, config)
    u = trace.num_unique_blocks
    assert np.array_equal(info.position[:u], trace.position)
    assert np.allclose(info.recompute_cost[:u], config.cost.recompute_flops(trace.position, trace.num_tokens))
    assert np.isinf(info.reload_cost[:u]).all()  # no host tier: nothing to reload from
    assert (info.tier[:u] == info.TIER_NONE).all()


def test_config_errors():
    trace = load_mooncake(TINY)
    with pytest.raises(ConfigError, match="cannot hold the longest request"):
        replay(trace, "lru", ReplayConfig(capacity_blocks=trace.max_request_blocks - 1))
    with pytest.raises(ConfigError, match="capacity_blocks"):
        ReplayConfig(capacity_blocks=0)
    with pytest.raises(ConfigError, match="host_blocks"):
        ReplayConfig(capacity_blocks=4, host_blocks=-1)
    with pytest.raises(ConfigError, match="unknown KVSpec preset"):
        ReplayConfig(capacity_blocks=4, model="gpt-9")
    with pytest.raises(ConfigError, match="offline"):
        replay(trace, "lru", ReplayConfig(capacity_blocks=30, host_blocks=4, host_policy="belady"))


def test_recompute_flops_formula_matches_per_token_sum():
    cost = CostModel.preset("llama3-8b")
    m = cost.model
    p, n = 1000, 512
    brute = sum(m.linear_flops_per_token + m.attention_flops_per_token_position * t for t in range(p, p + n))
    assert float(cost.recompute_flops(p, n)) == pytest.approx(brute, rel=1e-12)
    assert float(cost.recompute_flops(2 * p, n)) > float(cost.recompute_flops(p, n))  # late blocks cost more


def test_prefix_parents_link_each_block_to_its_predecessor():
    from kvstore.evict.replay import prefix_parents

    trace = Trace.from_requests([[5, 6, 7], [5, 6, 8], [9], [5, 10]], block_tokens=16)
    parent = prefix_parents(trace)
    ids = {int(b): i for i, b in enumerate(trace.block_ids)}  # original id -> dense index
    want = {5: None, 6: 5, 7: 6, 8: 6, 9: None, 10: 5}
    for b, p in want.items():
        assert parent[ids[b]] == (-1 if p is None else ids[p])


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), extra=st.integers(0, 30), policy=st.sampled_from(["lru", "asym", "gdsf", "arc", "s3fifo", "belady"]))
def test_leaves_only_never_cuts_a_resident_block_off_its_prefix(seed, extra, policy):
    """With the device tier evicting leaves only, every resident block's prefix is resident, so a
    prefix lookup reaches every hit: prefix hits equal block hits, for any policy."""
    trace = Trace.from_requests(_prefix_requests(seed, 40), block_tokens=16)
    capacity = trace.max_request_blocks + extra
    r = replay(trace, policy, ReplayConfig(capacity_blocks=capacity, model="tiny", leaves_only=True))
    assert r.prefix_hits == r.device_hits
    assert r.costs["prefix"].recompute_flops == pytest.approx(r.costs["multi-segment"].recompute_flops)


def test_leaves_only_config_errors():
    with pytest.raises(ConfigError, match="device tier only"):
        ReplayConfig(capacity_blocks=8, host_blocks=4, leaves_only=True)
    with pytest.raises(ConfigError, match="leaves_only"):
        ReplayConfig(capacity_blocks=8, leaves_only="yes")


def _cli_replay(tmp_path, *argv: str) -> list[dict]:
    """``kvstore replay`` on the tiny trace's first 30 requests: its JSON rows."""
    from kvstore import cli

    out = tmp_path / "replay.json"
    assert cli.main(["replay", "--trace", str(TINY), "--limit", "30", "--json", str(out), *argv]) == 0
    return json.loads(out.read_text())["results"]


def _table_rows(text: str) -> list[dict]:
    """The rows of the markdown table in ``text``, as header -> cell."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_cli_reports_gap_closed_in_table_and_json(tmp_path, capsys):
    rows = _cli_replay(tmp_path, "--policies", "lru,asym,belady,arc", "--capacity-blocks", "24,36")
    table = _table_rows(capsys.readouterr().out)
    by = {(r["policy"], r["capacity_blocks"]): r for r in rows}
    for (name, cap), r in by.items():
        lru, bound = by["lru", cap]["block_hit_ratio"], by["belady", cap]["block_hit_ratio"]
        assert bound > lru  # the gap is defined at both capacities
        assert r["gap_closed"] == pytest.approx((r["block_hit_ratio"] - lru) / (bound - lru), rel=1e-12)
    assert [by["lru", c]["gap_closed"] for c in (24, 36)] == [0.0, 0.0]
    assert [by["belady", c]["gap_closed"] for c in (24, 36)] == [1.0, 1.0]
    assert len({round(r["gap_closed"], 6) for r in rows}) > 3  # asym and arc land elsewhere
    assert len(table) == len(rows)
    for t, r in zip(table, rows):
        assert (t["policy"], int(t["capacity"])) == (r["policy"], r["capacity_blocks"])
        assert float(t["gap closed"]) == pytest.approx(r["gap_closed"], rel=1e-3, abs=1e-12)


def test_cli_gap_closed_is_undefined_without_belady(tmp_path, capsys):
    rows = _cli_replay(tmp_path, "--policies", "lru,asym", "--capacity-blocks", "24")
    assert [r["gap_closed"] for r in rows] == [None, None]
    assert [t["gap closed"] for t in _table_rows(capsys.readouterr().out)] == ["-", "-"]


def test_plot_shows_gap_closed_per_policy(tmp_path):
    from bench.bench_replay import figure, gap_closed

    trace = load_mooncake(TINY, limit=30)
    results = [replay(trace, name, ReplayConfig(capacity_blocks=cap)) for cap in (24, 30, 36) for name in ("lru", "asym", "belady", "arc")]
    fig = figure(results, "multi-segment", "tiny")
    (ax_gap,) = [ax for ax in fig.axes if "gap closed" in ax.get_title()]
    lines = {line.get_label(): line for line in ax_gap.get_lines()}
    gaps = dict(zip(map(id, results), gap_closed(results)))
    for name in ("asym", "arc"):
        rs = [r for r in results if r.policy == name]
        assert list(lines[name].get_xdata()) == [24, 30, 36]
        assert np.allclose(lines[name].get_ydata(), [gaps[id(r)] for r in rs])
    assert list(lines["belady"].get_ydata()) == [1.0, 1.0] and list(lines["lru"].get_ydata()) == [0.0, 0.0]  # the reference lines

    png = tmp_path / "replay.png"
    _cli_replay(tmp_path, "--policies", "lru,asym,belady", "--capacity-blocks", "24,36", "--plot", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_bar_names_policy_and_capacity(capsys):
    trace = load_mooncake(TINY, limit=30)
    replay(trace, "asym", ReplayConfig(capacity_blocks=24, host_blocks=8), progress=True)
    assert "replay asym @ 24 blocks, host 8" in capsys.readouterr().err
