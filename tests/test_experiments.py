"""Experiment entry points run end to end and print ONE JSON object as their last line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import moelens_jax as mj

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    """One calibration cache for this module's runs (calibrating costs ~30 s per model)."""
    return {**os.environ, "MOELENS_CACHE": str(tmp_path_factory.mktemp("calibration"))}


def _run(module: str, *flags: str) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-m", module, *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    return json.loads(last), proc.stdout


def test_run_throughput_engine_mode():
    result, stdout = _run("experiments.run_throughput", "--model=tiny-qwen2-moe",
                          "--num_requests=5", "--prompt_len=12", "--gen_len=5", "--seed=7",
                          "--kv_cache_gb=0.001")
    assert "== run_throughput card ==" in stdout
    assert result["mode"] == "serial"
    assert result["num_requests"] == 5 and result["generated_tokens"] == 25
    for key in ("generated_tokens_per_s", "processed_tokens_per_s", "iterations", "preemptions",
                "kv_peak_fraction", "mean_tokens_per_iteration", "h2d_gb_per_s"):
        assert key in result, key
    assert result["processed_tokens_per_s"] > result["generated_tokens_per_s"] > 0
    assert 0 < result["kv_peak_fraction"] <= 1
    assert result["compile_s"] > 0  # the warm-up compiled the run's shapes, timed apart
    # CPU backend, no cap: the layers are used in place, nothing streams.
    assert result["h2d_gb_per_s"] is None and result["h2d_bytes"] == 0
    assert "h2d_limit_gb_per_s" not in result
    assert result["flags"]["seed"] == 7


def test_run_throughput_reports_caps():
    result, _ = _run("experiments.run_throughput", "--model=tiny-mixtral", "--num_requests=2",
                     "--prompt_len=8", "--gen_len=2", "--h2d_limit_gb_per_s=0.5",
                     "--device_weight_layers=1", "--device_memory_gb=1", "--progress=false")
    assert result["h2d_limit_gb_per_s"] == 0.5 and result["device_memory_bytes"] == 10**9
    assert 0 < result["h2d_gb_per_s"] <= 0.5 * 1.02


def test_run_throughput_reference_mode():
    result, _ = _run("experiments.run_throughput", "--model=tiny-mixtral", "--mode=reference",
                     "--num_requests=3", "--prompt_len=12", "--gen_len=4")
    assert result["mode"] == "reference-recompute" and result["generated_tokens"] == 12


def test_run_throughput_bad_model_is_a_clear_error():
    proc = subprocess.run([sys.executable, "-m", "experiments.run_throughput",
                           "--model=no-such-preset"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "neither an existing checkpoint folder nor a preset" in proc.stderr


def test_bench_cpu_attention_small():
    result, stdout = _run("experiments.bench_cpu_attention", "--num_seqs=4", "--seq_len=100",
                          "--kv_heads=2", "--head_dim=64", "--group=4", "--repeats=1",
                          "--numpy_seqs=2")
    assert "== bench_cpu_attention card ==" in stdout
    for key in ("kv_read_gb_per_s", "memory_read_gb_per_s", "bandwidth_fraction",
                "speedup_vs_xla", "threads", "isa"):
        assert key in result, key
    assert result["kv_read_gb_per_s"] > 0 and result["memory_read_gb_per_s"] > 0
    assert 0 < result["bandwidth_fraction"] < 5
    assert result["max_abs_diff_vs_xla"] < 1e-4  # the kernel and XLA agree on the same data
    assert len(result["thread_scaling"]) == result["threads"]


def test_bench_experts_small():
    result, stdout = _run("experiments.bench_experts", "--shapes=small-mixtral",
                          "--rows=64,512", "--skews=uniform,hot", "--repeats=1")
    assert "== bench_experts card ==" in stdout
    assert result["routed_row_overhead"] == 1.0  # the CPU kernel computes exactly the routed rows
    assert len(result["cases"]) == 4
    for case in result["cases"]:
        assert case["grouped"]["gflop_per_s"] > 0 and case["dense_gflop_per_s"] > 0
        assert case["blocked"]["row_overhead"] >= 1.0
    assert result["expert_roof_fraction"] > 0 and result["stream_read_gb_per_s"] > 0


def test_run_throughput_streams_and_resumes(tmp_path):
    out, trace = tmp_path / "r.jsonl", tmp_path / "trace.json"
    flags = ["--model=tiny-mixtral", "--num_requests=4", "--prompt_len=10", "--gen_len=3",
             f"--out={out}", "--progress=false"]
    result, _ = _run("experiments.run_throughput", *flags, f"--trace_out={trace}")
    assert result["computed_requests"] == 4 and result["skipped_requests"] == 0
    lines = out.read_text().splitlines()
    assert sorted(json.loads(x)["id"] for x in lines) == [0, 1, 2, 3]
    assert json.loads(trace.read_text())["traceEvents"]
    again, _ = _run("experiments.run_throughput", *flags)
    assert again["computed_requests"] == 0 and again["skipped_requests"] == 4
    assert out.read_text().splitlines() == lines  # nothing recomputed or duplicated


def test_run_throughput_vslpipe_with_prediction(tmp_path, cache_env):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.run_throughput", "--model=tiny-mixtral",
         "--num_requests=6", "--prompt_len=10", "--gen_len=4", "--pipeline=vslpipe",
         "--predict", "--progress=false", f"--trace_out={tmp_path / 't.json'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=cache_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mode"] == "vslpipe" and result["generated_tokens"] == 24
    assert result["predicted_generated_tokens_per_s"] > 0
    assert result["prediction_accuracy"] <= 1
    assert set(result["stage_seconds"]) == {"GA", "C", "GB", "IO"}
    names = {e.get("args", {}).get("name") for e in
             json.loads((tmp_path / "t.json").read_text())["traceEvents"]}
    assert {"C group 0", "C group 1"} <= names  # the two VSLPipe groups have their own tracks
    cached = os.listdir(cache_env["MOELENS_CACHE"])
    assert any(p.startswith("calibration-") for p in cached)


def test_predict_paper_setting():
    result, stdout = _run("experiments.predict", "--model=mixtral-8x7b", "--hardware=a40",
                          "--kv_cache_gb=70", "--prompt_len=98", "--gen_len=32",
                          "--num_requests=4000")
    assert "== predict ==" in stdout
    for key in ("tokens_to_saturate", "pme", "kv_tokens", "stage1_processed_tokens_per_s",
                "stage1_generated_tokens_per_s", "stage2_generated_tokens_per_s", "binding"):
        assert key in result, key
    assert abs(result["pme"] - 0.0356) < 1e-4 and result["binding"] == "kv_capacity"
    assert 0 < result["stage2_generated_tokens_per_s"] <= result["stage1_generated_tokens_per_s"]


def test_validate_model_quick(tmp_path, cache_env):
    png = tmp_path / "v.png"
    proc = subprocess.run(
        # small-mixtral: its runs last seconds, so a shared box's noise stays within a few
        # percent (tiny-qwen3-moe's 0.1-0.5 s runs spread up to ~45 % between repeats).
        [sys.executable, "-m", "experiments.validate_model", "--quick",
         "--presets=small-mixtral", f"--plot_out={png}"], cwd=ROOT, capture_output=True,
        text=True, timeout=600, env=cache_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["n_configs"] == 4 and len(result["configs"]) == 4
    # An accuracy floor a wrong model fails (held-out configs, a fresh calibration; the full
    # grid is judged against 0.97 / 0.90 in the README). Measured on the 2-core dev box: mean
    # 0.86-0.92 over repeated runs of this grid (the box's speed drifts between calibration and
    # measurement); charging no per-group fixed costs took one such run from 0.861 to 0.637.
    assert result["mean_accuracy"] >= 0.80, result["configs"]
    assert {row["pipeline"] for row in result["configs"]} == {"serial", "vslpipe"}
    for row in result["configs"]:  # the scheduler is simulated exactly
        assert row["predicted_iterations"] == row["iterations"]
        assert row["predicted_preemptions"] == row["preemptions"]
        assert len(row["timed_walls_s"]) == row["timed_runs"] >= 3
        assert row["repeat_spread"] >= 0
    assert result["calibration"]["small-mixtral"]["first_config_remeasured_ratio"] > 0
    probe_cal = result["calibration"]["small-mixtral"]["probe_s"]
    assert probe_cal > 0
    for row in result["configs"]:  # the probe ran next to each measurement; drift = its ratio
        assert len(row["probe_s"]) == 2 and min(row["probe_s"]) > 0
        assert row["probe_drift"] == pytest.approx(np.mean(row["probe_s"]) / probe_cal)
        measured = row["measured_generated_tokens_per_s"]
        corrected = row["predicted_generated_tokens_per_s"] / row["probe_drift"]
        assert row["accuracy_drift_corrected"] == pytest.approx(
            1 - abs(corrected - measured) / measured)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_compare_policies_small(cache_env):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.compare_policies", "--model=tiny-mixtral",
         "--workloads=mtbench", "--num_requests=6", "--dtype=float32"], cwd=ROOT,
        capture_output=True, text=True, timeout=600, env=cache_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    (row,) = result["workloads"]
    for key in ("moe_lens_generated_tokens_per_s", "moe_lightning_generated_tokens_per_s",
                "speedup", "predicted_speedup"):
        assert row[key] > 0, key
    assert row["identical_requests"] == 6  # float32: same greedy tokens under both policies
    assert row["moe_lightning"]["preemptions"] == 0
    assert result["mean_speedup"] == row["speedup"]


def test_reproduce_paper_reduced(tmp_path, cache_env):
    out = tmp_path / "paper"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.reproduce_paper", f"--out={out}", "--reduced"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=cache_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for png in ("table2.png", "fig3a.png", "fig3b.png", "headline.png", "measured.png",
                "accuracy.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
    data = json.loads((out / "results.json").read_text())
    assert {"table2", "fig3a", "fig3b", "headline", "measured", "accuracy", "seed",
            "hardware_fingerprint"} <= set(data)
    assert abs(data["table2"][0]["tokens_to_saturate"] - 19200) < 1e-6
    assert "Predicted" in (out / "REPORT.md").read_text()
    assert result["predicted_mean_speedup"] > 0


def test_bench_peers_engine_and_hf():
    result, stdout = _run("experiments.bench_peers", "--model=tiny-mixtral", "--num_requests=3",
                          "--prompt_len=8", "--gen_len=3", "--vllm_python=",
                          "--dtypes=float32,bfloat16")
    assert stdout.index("== bench_peers card ==") < stdout.index("== results ==")
    assert "GEMM roof" in stdout
    assert result["vllm_skipped"] and result["speedup_vs_vllm_fp32"] is None
    assert result["speedup_vs_vllm_bf16"] is None and result["identical_to_vllm_fp32"] is None
    assert result["identical_to_hf_fp32"] == 1.0  # float32: HF's greedy tokens are the engine's
    assert result["generated_tokens"] == 9
    for tag in ("fp32", "bf16"):
        for side in ("engine", "hf"):
            assert (result[f"{side}_processed_tokens_per_s_{tag}"]
                    > result[f"{side}_generated_tokens_per_s_{tag}"] > 0)
    assert result["speedup_vs_hf"] > 0 and result["gemm_roof_gflop_per_s"] > 0
    assert 0 < result["engine_gemm_roof_fraction"] < 1
    assert result["engine_gemm_tflop"] < result["hf_gemm_tflop"]  # HF pads to the longest prompt


def test_gpu_check_dry_run(tmp_path, cache_env):
    """`gpu_check --dry_run` runs every step at tiny sizes on this CPU and writes every key
    (the command a GPU session runs is the same code at real sizes)."""
    out = tmp_path / "gpu"
    proc = subprocess.run([sys.executable, "-m", "experiments.gpu_check", "--dry_run",
                           f"--out={out}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=cache_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads((out / "gpu_check.json").read_text()) == result
    assert result["dry_run"] and result["machine"]["backend"] == "cpu"
    for name, step in result["steps"].items():
        assert "error" not in step, (name, step["error"])
    assert result["engine_equals_oracle"] is True
    assert len(result["steps"]["oracle"]["runs"]) == 4  # 2 models x 2 pipelines
    assert result["steps"]["overlap"]["same_tokens_fraction"] == 1.0  # float32 on a CPU
    assert result["activation_bound_ratio"] >= 1.0
    # experts kept quantised through "blocked" compute what dequantising them first does
    # (float32 on a CPU: the same weights and GEMMs); every format and shape timed
    assert result["quantised_experts_rel_err"] < 1e-6
    assert set(result["steps"]["quantised"]["shapes"]) == {"small/int8", "small/int4"}
    for key in ("h2d_gb_per_s", "link_datasheet_gb_per_s", "expert_gemm_fraction_of_dense",
                "prefill_attention_tflops", "overlap_efficiency", "prediction_mean_accuracy",
                "prediction_min_accuracy", "quantised_experts_speedup"):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert result["prediction_mean_accuracy"] <= 1


def test_predict_moe_lightning_plan():
    """`predict --policy moe-lightning` prints MoE-Lightning's own plan: the README's worked
    example through the command line (L4 constants, 184.29 GiB of host memory)."""
    result, stdout = _run("experiments.predict", "--policy=moe-lightning", "--hardware=l4",
                          f"--cpu_memory_gb={197880360960.0 / 1e9}", "--prompt_len=77",
                          "--gen_len=32")
    assert "== MoE-Lightning plan ==" in stdout
    assert (result["micro_batch"], result["num_micro_batches"]) == (324, 14)
    assert result["batch_size"] == 4536 and result["kv_on_gpu"] == 0.0
    assert abs(result["generated_tokens_per_s"] - 944.66) < 0.1
    assert 0 < result["cpu_memory_utilisation"] <= 0.8
    assert result["gpu_memory_bytes"] <= 0.86 * 24 * 2**30


# Bounds of the KV formats' cost on the tiny presets (float32 weights, 8 x 48 prompts): a
# factor ~2 above what they measured (2026-12-01: rel-L2 bf16 0.0009-0.0015, int8 0.0064-0.0075,
# e4m3 0.016-0.022; top-1 >= 0.992 / 0.987 / 0.958), ordered as the formats' precision is.
KV_QUALITY = {"bfloat16": (0.004, 0.99), "int8": (0.015, 0.97), "float8_e4m3fn": (0.045, 0.92)}


@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-qwen3-moe"])
def test_quant_accuracy_bounds(preset):
    from experiments.quant_accuracy import measure
    model = mj.load_model(preset, dtype="float32", seed=0)
    rows = {r["kv_dtype"]: r for r in measure(model, list(KV_QUALITY), 8, 48, 8, 0)}
    for d, (max_rel, min_top1) in KV_QUALITY.items():
        assert rows[d]["logit_rel_l2"] <= max_rel, (d, rows[d])
        assert rows[d]["top1_agreement"] >= min_top1, (d, rows[d])
        assert rows[d]["kv_bytes_per_token"] == model.config.kv_bytes_per_token(d)
    rel = [rows[d]["logit_rel_l2"] for d in KV_QUALITY]
    assert 0 < rel[0] < rel[1] < rel[2]
    assert rows["int8"]["greedy_prefix_agreement"] >= 0.9


def test_quant_accuracy_cli():
    result, stdout = _run("experiments.quant_accuracy", "--models=tiny-mixtral",
                          "--num_prompts=2", "--prompt_len=16", "--gen_len=4",
                          "--kv_dtypes=int8", "--weight_dtypes=model,int8")
    assert "== quant_accuracy card ==" in stdout
    model_row, int8_row = result["settings"]
    assert model_row["kv_dtype"] == int8_row["kv_dtype"] == "int8"
    assert model_row["weight_dtype"] == "bfloat16" and int8_row["weight_dtype"] == "int8"
    assert 0 < model_row["logit_rel_l2"] < 0.05 and 0 < int8_row["logit_rel_l2"] < 0.05
    assert int8_row["layer_bytes"] < 0.6 * model_row["layer_bytes"]
