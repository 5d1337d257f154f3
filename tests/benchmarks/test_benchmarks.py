"""The benchmarks' own logic (not their timings): which malloc each worker gets, how many rounds a point
is timed for, that a worker returns every mixer's time, that the target checks mark a miss, and how
gpu_check.py limits its parts and builds its target table."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_common  # noqa: E402
import bench_models  # noqa: E402
import bench_small  # noqa: E402
import bench_ttt  # noqa: E402
import gpu_check  # noqa: E402

MALLOC_VARS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


@pytest.fixture
def clean_malloc_env(monkeypatch):
    for k in MALLOC_VARS:
        monkeypatch.delenv(k, raising=False)


def test_worker_env_caching_for_time_returning_for_memory(clean_malloc_env):
    timing = bench_common.worker_env("time", system_malloc=False)
    assert all(timing[k] == v for k, v in bench_common.CACHING_MALLOC.items())
    assert "MALLOC_MMAP_THRESHOLD_" not in timing
    memory = bench_common.worker_env("memory", system_malloc=False)
    assert memory["MALLOC_MMAP_THRESHOLD_"] == "65536"
    assert not any(k in memory for k in bench_common.CACHING_MALLOC)
    system = bench_common.worker_env("time", system_malloc=True)
    assert not any(k in system for k in MALLOC_VARS)


def test_heap_keeps_small_attention_blocks_only():
    assert bench_ttt.heap_keeps(256, 6)
    assert not bench_ttt.heap_keeps(1 << 20, 6)  # 3 x 6 x 2^40 x 4 bytes: more than any machine has


def test_short_points_get_at_least_five_interleaved_rounds():
    calls = []
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    res = bench_common.interleaved_times_ms(steps, "cpu", min_time=0.0)
    assert len(calls) == 4 + 10  # two warm-up steps each, then five rounds
    assert calls[4:] == ["a", "b"] * 5  # interleaved, one step of each per round
    assert res["a"]["rounds"] == res["b"]["rounds"] == 5


def test_the_benchmarks_share_one_timer():
    timer = bench_common.interleaved_times_ms
    assert bench_models.interleaved_times_ms is bench_ttt.interleaved_times_ms is timer
    assert bench_small.interleaved_times_ms is timer
    assert not hasattr(bench_small, "statistics")  # its median_ms is that timer with fixed rounds


def test_small_bench_rounds_interleave_and_ops_count_by_phase():
    calls = []
    res = bench_small.median_ms({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=2)
    assert calls == ["a", "b"] * 4 and set(res) == {"a", "b"}  # 2 warm-up rounds (short ones), then 2 timed
    x = torch.ones(8)

    def step():
        with bench_small.record_function("one"):
            x.add(1)
        with bench_small.record_function("two"):
            x.add(1).mul(2)
    ops = bench_small.aten_ops(step, ("one", "two"))
    assert 0 < ops["one"] < ops["two"] and ops["total"] == ops["one"] + ops["two"]


def test_small_bench_steps_train_and_forms_agree():
    """The demo step trains (its loss on one fixed batch falls), and the two forced TTT forms compute the
    same layer (and leave the switch as it was)."""
    from vit3.ttt import fast

    step = bench_small.update_step(bench_small.DEMO, "DiT3-S/4")
    losses = [step().item() for _ in range(4)]
    assert losses[-1] < losses[0]
    before = dict(fast.DUAL_FORM)
    primal, dual = (bench_small.mixer_step("ttt", f, batch=2, side=3, dim=16, heads=2)() for f in ("primal", "dual"))
    assert torch.allclose(primal, dual, atol=1e-6) and fast.DUAL_FORM == before


def test_floors_run_the_demo_update_and_the_matmul_floor_keeps_every_gemm():
    """The floors are DiT³ updates with a stand-in layer (dit3's build_mixer restored after), and the "matmuls"
    floor runs as many GEMMs as the fast path's layer, forward and backward, so it bounds what the layer's
    maths can cost from below."""
    import collections

    from torch.profiler import ProfilerActivity, profile

    import dit3.models
    from vit3.ttt import TTT

    build = dit3.models.build_mixer
    for kind in ("matmuls", "none"):
        assert torch.isfinite(bench_small.floor_step(kind)())
        assert dit3.models.build_mixer is build

    def gemms(layer):
        x = torch.randn(8, 16, 96, requires_grad=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            layer(x, 4, 4).sum().backward()
        return collections.Counter(e.name for e in prof.events()
                                   if e.name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"))

    fast, floor = gemms(TTT(96, 2, impl="fast")), gemms(bench_small.floor_ttt("matmuls", 96, 2))
    assert sum(floor.values()) == sum(fast.values()) >= 15, (fast, floor)


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


def test_inner_step_floor_counts_qkv_and_output_per_pass():
    # C = 384, 6 heads: q, k, v and the output are 448 wide; forward 4, forward+backward 12 of them a token, bf16
    assert bench_ttt.inner_bytes(16384, 384, 6, 4, "infer", 2) == 4 * 16384 * 4 * 448 * 2
    assert bench_ttt.inner_bytes(16384, 384, 6, 4, "train", 2) == 3 * bench_ttt.inner_bytes(16384, 384, 6, 4,
                                                                                             "infer", 2)
    assert [bench_ttt.batch_for(n, 65536) for n in (256, 1024, 4096, 16384, 65536, 97344)] == [256, 64, 16, 4, 1, 1]


def test_inner_step_time_is_the_layer_minus_its_gemms():
    points = {"ttt_fast": {"time_ms": 10.0}, "attn_sdpa": {"time_ms": 3.0}}
    bench_ttt.inner_step_times(points, {"_gemms": 6.0}, 16384, "infer", 384, 6, 4, 2, gbps=1000.0)
    r = points["ttt_fast"]
    assert r["inner_ms"] == 4.0 and r["inner_method"] == "layer - qkv/proj GEMMs"
    assert r["inner_floor_ms"] == pytest.approx(1e3 * 4 * 16384 * 4 * 448 * 2 / 1e12)
    assert r["inner_floor_fraction"] == pytest.approx(r["inner_floor_ms"] / 4.0)
    assert "inner_ms" not in points["attn_sdpa"]


def cuda_results(triton_ms: float, triton_mb: float, floor_fraction: float) -> tuple[dict, dict]:
    """Fabricated bench_ttt and bench_models results on CUDA: TTT Triton at triton_ms / triton_mb against SDPA
    at 10 ms / 100 MB at every N; the whole-model points at fixed ratios."""
    ttt = {}
    for n in (1024, 4096, 16384):
        for mode in ("train", "infer"):
            ttt[f"ttt_triton/{n}/{mode}"] = {"time_ms": triton_ms, "peak_mb": triton_mb,
                                             "inner_floor_fraction": floor_fraction}
            ttt[f"attn_sdpa/{n}/{mode}"] = {"time_ms": 10.0, "peak_mb": 100.0}
    infer = {"vit3_tiny/ttt/1248": {"images_per_s": 500.0, "peak_mb": 50.0},
             "vit3_tiny/attn_math/1248": {"images_per_s": 100.0, "peak_mb": 1000.0},  # 5x, 0.05
             "vit3_tiny/attn_sdpa/1248": {"images_per_s": 200.0, "peak_mb": 40.0},  # 2.5x (missed), 1.25 (missed)
             "vit3_tiny/ttt/224": {"images_per_s": 950.0}, "vit3_tiny/attn_sdpa/224": {"images_per_s": 1000.0}}
    train = {"dit/dit3_b2/32": {"images_per_s": 95.0}, "dit/dit_b2_sdpa/32": {"images_per_s": 100.0},
             "dit/dit3_b2/64": {"images_per_s": 12.0}, "dit/dit_b2_sdpa/64": {"images_per_s": 10.0}}  # 1.2x: missed
    models = {"infer": infer, "train": train, "sample": {}}  # no sampling point: n/a
    return ttt, models


def test_cuda_targets_mark_met_missed_and_missing():
    ttt, models = cuda_results(triton_ms=2.0, triton_mb=100.0, floor_fraction=0.6)  # 5x over SDPA, same memory
    got = {label: (v, ok) for label, v, ok in bench_ttt.targets(ttt, "cuda")}
    assert got["speed-up of TTT Triton over SDPA, N=4096 (>= 3.0x)"] == (5.0, True)
    assert got["speed-up of TTT Triton over SDPA, N=16384 (>= 10.0x)"] == (5.0, False)
    assert got["fwd+bwd peak memory TTT Triton / SDPA, N=1024 (<= 1.0)"] == (1.0, True)
    assert got["fwd+bwd inner step of TTT Triton, fraction of its floor, N=16384 (>= 0.5)"] == (0.6, True)
    got = {label: (v, ok) for label, v, ok in bench_models.check_targets(models, "cuda")}
    assert got["ViT³-T / DeiT-T (materialised) inference throughput at 1248 (>= 4.6x)"] == (5.0, True)
    assert got["ViT³-T / DeiT-T (materialised) inference peak memory at 1248 (<= 0.10)"] == (0.05, True)
    assert got["ViT³-T / DeiT-T (SDPA) inference throughput at 1248 (>= 3.0x)"] == (2.5, False)
    assert got["ViT³-T / DeiT-T (SDPA) inference peak memory at 1248 (<= 1.0)"] == (1.25, False)
    assert got["ViT³-T / DeiT-T (SDPA) inference throughput at 224 (>= 0.9x)"] == (0.95, True)
    assert got["DiT3-B/2 / DiT-B/2 (SDPA) training throughput at latent 64 (>= 1.3x)"][1] is False
    assert math.isnan(got["DiT3-XL/2 / DiT-XL/2 (SDPA) 250-step guided DDPM sampling throughput at 256 px "
                          "(>= 0.9x)"][0])


def test_gpu_check_table_reads_the_results_and_marks_each_target(tmp_path):
    ttt, models = cuda_results(triton_ms=0.5, triton_mb=120.0, floor_fraction=0.3)  # 20x; 1.2x SDPA's memory
    (tmp_path / "bench_ttt_cuda.json").write_text(json.dumps({"results": ttt, "complete": False}))
    rows, notes = gpu_check.target_table(tmp_path, "cuda")
    lines = gpu_check.report({"tests": {"limit_s": 60, "seconds": 12.0, "error": None, "last_line": "3 passed"}},
                             rows, notes, "cuda")
    by_target = {line.split(" | ")[1]: line for line in lines if line.startswith("| bench_")}
    assert by_target["speed-up of TTT Triton over SDPA, N=16384 (>= 10.0x)"].endswith("| 20.00 | met |")
    assert by_target["fwd+bwd peak memory TTT Triton / SDPA, N=4096 (<= 1.0)"].endswith("| 1.20 | MISSED |")
    assert by_target["fwd+bwd inner step of TTT Triton, fraction of its floor, N=16384 (>= 0.5)"].endswith(
        "| 0.30 | MISSED |")
    # bench_models wrote nothing: its targets are listed, at n/a, and the notes say why
    assert by_target["ViT³-T / DeiT-T (SDPA) inference throughput at 224 (>= 0.9x)"].endswith("| n/a | n/a |")
    assert notes == ["bench_ttt_cuda.json: partial (the part was cut off)",
                     "bench_models_cuda.json: not read (FileNotFoundError)"]
    assert "| tests | 60 | 12 | ok | 3 passed |" in lines


def test_gpu_check_part_failure_and_time_limit_are_recorded(tmp_path):
    failed = gpu_check.run_part([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], 30, tmp_path / "a.log")
    assert failed["error"] == "exit code 3" and failed["last_line"] == "boom"
    slow = gpu_check.run_part([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                              1, tmp_path / "b.log")
    assert slow["error"] == "stopped at its time limit (1 s)" and slow["seconds"] < 10
    assert slow["last_line"] == "started"


def test_bench_sampling_writes_its_table_json_and_plot(tmp_path):
    """bench_sampling.py at two small token counts, one round: every mixer's time per image (50 steps over the
    batch) and a step's peak memory from its own process, the markdown table with the DiT / DiT3 ratio, the
    JSON with no absolute path, and the plot."""
    import bench_sampling

    res = bench_sampling.main(["--tokens", "16", "64", "--rounds", "1", "--batch", "1",
                               "--model-kwargs", "{hidden_size: 32, depth: 1, num_heads: 2}", "--out",
                               str(tmp_path / "bs")])
    assert set(res["points"]) == {f"{m}/{t}" for m in bench_sampling.MIXERS for t in (16, 64)}
    for p in res["points"].values():
        assert p["s_per_image"] == pytest.approx(50 * p["step_ms"] / 1e3) and p["step_ms"] > 0
        assert p["peak_mib"] >= p["held_mib"] > 0 and p["image_px"] == 2 * math.isqrt(p["tokens"])
    table = (tmp_path / "bs.md").read_text()
    ratio = res["points"]["DiT/64"]["s_per_image"] / res["points"]["DiT3/64"]["s_per_image"]
    assert "| 64 (16 px) |" in table and f"{ratio:.2f}x" in table
    assert str(tmp_path) not in (tmp_path / "bs.json").read_text()
    assert (tmp_path / "bs.png").stat().st_size > 10_000
    with pytest.raises(SystemExit):
        bench_sampling.main(["--tokens", "17"])
