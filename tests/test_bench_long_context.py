"""`kvstore bench long-context` on a small workload: every mode runs, JSON has the documented shape,
lossless equals full, and kvstore's PQ selection is at least as good as PQCache's at equal budget."""

from __future__ import annotations

import json

import pytest

from kvstore import cli

KEYS = {"mode", "context", "budget", "tpot_ms", "recall", "attention_mass", "rel_error", "needle_hit_rate", "device_bytes", "host_bytes"}


def test_long_context_modes_side_by_side(tmp_path):
    out, plot = tmp_path / "lc.json", tmp_path / "lc.png"
    rc = cli.main(["bench", "long-context", "--device", "cpu", "--contexts", "4096", "--steps", "8", "--budget", "0.125",
                   "--json", str(out), "--plot", str(plot)])
    assert rc == 0 and plot.stat().st_size > 0
    rows = {r["mode"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"full", "pq", "pq-codes", "exact", "pqcache-ref", "lossless"}
    for r in rows.values():
        assert KEYS <= set(r) and r["context"] == 4096 and r["tpot_ms"] > 0 and r["device_bytes"] > 0
    assert rows["full"]["rel_error"] == 0 and rows["full"]["recall"] is None
    assert rows["lossless"]["rel_error"] <= 1e-4  # attends to every token: equals full
    assert rows["lossless"]["host_bytes"] > 0  # its device tier is smaller than the context
    ref = rows["pqcache-ref"]
    for mode in ("pq", "pq-codes"):  # kvstore's selection, with and without re-ranking, against PQCache's
        pq = rows[mode]
        assert pq["budget"] == ref["budget"] == 0.125
        assert pq["recall"] >= ref["recall"] and pq["attention_mass"] >= ref["attention_mass"]
        assert pq["rel_error"] <= ref["rel_error"] and pq["needle_hit_rate"] >= ref["needle_hit_rate"]
    # Re-ranking with exact keys moves pq toward the exact-score oracle, which no selector beats.
    refined, codes, exact = rows["pq"], rows["pq-codes"], rows["exact"]
    assert codes["attention_mass"] <= refined["attention_mass"] <= exact["attention_mass"] + 1e-6
    assert codes["recall"] <= refined["recall"] <= exact["recall"] + 1e-6
    assert refined["rel_error"] <= codes["rel_error"] and refined["needle_hit_rate"] >= codes["needle_hit_rate"]


def test_a_batch_is_decoded_together_and_matches_its_sequences_alone(tmp_path):
    """--batch 2 decodes two sequences in one store (selection scored in one call per layer):
    its quality is the mean of the two sequences decoded alone, and lossless still equals full."""
    def run(*extra: str) -> dict:
        out = tmp_path / f"lc{'_'.join(extra)}.json"
        argv = ["bench", "long-context", "--device", "cpu", "--contexts", "2048", "--steps", "4", "--budget", "0.125",
                "--modes", "full,pq,pq-codes,lossless", "--json", str(out), *extra]
        assert cli.main(argv) == 0
        return {r["mode"]: r for r in json.loads(out.read_text())["results"]}

    batch, alone = run("--batch", "2"), [run("--seed", str(seed)) for seed in (0, 1)]
    assert batch["lossless"]["rel_error"] <= 1e-4
    assert batch["full"]["device_bytes"] == 2 * alone[0]["full"]["device_bytes"]  # both contexts are held
    for mode in ("pq", "pq-codes"):
        for column in ("recall", "attention_mass", "rel_error", "needle_hit_rate"):
            mean = (alone[0][mode][column] + alone[1][mode][column]) / 2
            assert abs(batch[mode][column] - mean) <= 1e-3 * max(1.0, abs(mean)), (mode, column)


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "argument --batch: expected a positive integer, got '0'"),
    (["--steps", "1"], "--steps must be >= 2, got 1"),  # the last step is counted, not timed
    (["--chunk", "0"], "argument --chunk: expected a positive integer, got '0'"),
    (["--contexts", "2048,abc"], "argument --contexts: expected a positive integer, got 'abc' (in '2048,abc')"),
    (["--modes", "full,sparse"], "unknown name 'sparse'"),
    (["--modes", ","], "argument --modes"),
    (["--budget", "0"], "argument --budget: expected a count >= 1 or a fraction in (0, 1], got '0'"),
    (["--budget", "1.5"], "got '1.5'"),
    (["--refine", "0.5"], "argument --refine: expected a finite number >= 1, got '0.5'"),
    (["--row-cache", "-1"], "argument --row-cache"),
    (["--sinks", "-2"], "argument --sinks: expected an integer >= 0, got '-2'"),
    (["--preset", "gpt5"], "argument --preset: invalid choice: 'gpt5'"),
])
def test_bad_arguments_exit_with_a_message_naming_the_value(argv, message, capsys):
    assert cli.main(["bench", "long-context", "--device", "cpu", "--contexts", "2048", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvstore: error: ") and message in err and err.count("\n") == 1, err
