"""The benchmarks' own logic (not their timings): which malloc each worker gets, how many rounds a point
is timed for, that a worker returns every mixer's time, and that the target checks mark a miss."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_models  # noqa: E402
import bench_ttt  # noqa: E402

MALLOC_VARS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


@pytest.fixture
def clean_malloc_env(monkeypatch):
    for k in MALLOC_VARS:
        monkeypatch.delenv(k, raising=False)


def test_worker_env_caching_for_time_returning_for_memory(clean_malloc_env):
    timing = bench_ttt.worker_env("time", system_malloc=False)
    assert all(timing[k] == v for k, v in bench_ttt.CACHING_MALLOC.items())
    assert "MALLOC_MMAP_THRESHOLD_" not in timing
    memory = bench_ttt.worker_env("memory", system_malloc=False)
    assert memory["MALLOC_MMAP_THRESHOLD_"] == "65536"
    assert not any(k in memory for k in bench_ttt.CACHING_MALLOC)
    system = bench_ttt.worker_env("time", system_malloc=True)
    assert not any(k in system for k in MALLOC_VARS)


def test_heap_keeps_small_attention_blocks_only():
    assert bench_ttt.heap_keeps(256, 6)
    assert not bench_ttt.heap_keeps(1 << 20, 6)  # 3 x 6 x 2^40 x 4 bytes: more than any machine has


@pytest.mark.parametrize("module", [bench_ttt, bench_models])
def test_short_points_get_at_least_five_interleaved_rounds(module):
    calls = []
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    res = module.interleaved_times_ms(steps, "cpu", min_time=0.0)
    assert len(calls) == 4 + 10  # two warm-up steps each, then five rounds
    assert calls[4:] == ["a", "b"] * 5  # interleaved, one step of each per round
    if module is bench_models:
        assert res["a"]["rounds"] == res["b"]["rounds"] == 5


def test_ttt_worker_times_every_mixer_in_one_process():
    res = bench_ttt.worker("time", ["ttt_fast", "ttt_reference", "attn_sdpa"], 64, "train", "cpu", 32, 2,
                           min_time=0.0)
    assert set(res) == {"ttt_fast", "ttt_reference", "attn_sdpa"}
    assert all(r["time_ms"] > 0 for r in res.values())


def test_ttt_targets_mark_a_miss():
    res = {f"{m}/{n}/{mode}": {"time_ms": t, "peak_mb": p}
           for m, t, p in (("ttt_fast", 100.0, 200.0), ("ttt_reference", 110.0, 600.0), ("attn_sdpa", 2000.0, 250.0))
           for n in (4096, 16384) for mode in ("train", "infer")}
    lines = bench_ttt.check_targets(res, "cpu")
    by_label = {line.split(" | ")[0].lstrip("| "): line for line in lines}
    assert by_label["speed-up of TTT fast over reference, N=16384 (>= 1.25x)"].endswith("| MISSED |")  # 1.10x
    assert by_label["speed-up of TTT fast over reference, N=4096 (>= 1.0x)"].endswith("| met |")
    assert by_label["peak memory TTT fast / reference, N=16384 (<= 0.5)"].endswith("| met |")  # 0.33
    assert by_label["speed-up of TTT fast over SDPA, N=16384 (>= 12.0x)"].endswith("| met |")  # 20x
