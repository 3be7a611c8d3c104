"""The benchmark scripts stay runnable: each runs end to end at toy sizes (not a measurement)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(args: list[str], env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_train_step_benchmark_compares_every_path():
    toy = ["benchmarks/train_step.py", "--latents", "256", "--d-in", "32", "--tokens", "64", "--k", "4",
           "--repeats", "1", "--threads", "1"]
    out = run_script(toy + ["--no-memory"])
    for path in ("floor", "dense", "ours", "ours+auxk", "saelens", "saelens+auxk", "sparsify", "sparsify+auxk",
                 "batchtopk", "mutual_choice", "feature_choice"):
        assert any(line.split()[:1] == [path] for line in out.splitlines()), path
    assert "selection rules against our TopK step" in out
    # the peak-memory probe (one fresh process per path) prints a number for each path
    out = run_script(toy + ["--paths", "ours"])
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["floor"], ["ours"])]
    assert len(rows) == 2 and all(float(row[-1]) >= 0 for row in rows)


def test_gpu_benchmark_smoke_runs_under_the_interpreter():
    out = run_script(["benchmarks/gpu_kernels.py", "--device", "cpu", "--tokens", "8", "--d-in", "16", "--latents", "64",
                      "--step-latents", "64", "--k", "4", "--repeats", "1", "--copy-mib", "1"],
                     env={"TRITON_INTERPRET": "1"})
    assert "decode grad weight" in out and "encoder backward" in out and "ours+auxk" in out


def test_in_model_eval_benchmark_compares_the_three_paths():
    out = run_script(["benchmarks/in_model_eval.py", "--hook", "blocks.2.hook_resid_post", "--tokens", "32",
                      "--context", "16", "--batch-size", "2", "--repeats", "1", "--threads", "1"],
                     env={"HF_HUB_OFFLINE": "1"})
    for path in ("full passes", "shared prefix (cold)", "shared prefix (warm)"):
        assert path in out, path
    assert "largest metric difference from the full passes" in out and "load average after" in out


def test_steer_load_benchmark_runs_concurrent_requests_against_a_tiny_server():
    out = run_script(["benchmarks/steer_load.py", "--tiny", "--requests", "6", "--reference", "1",
                      "--max-new-tokens", "3", "--threads", "1"], env={"HF_HUB_OFFLINE": "1"})
    assert "succeeded: 6/6" in out and "gave the same texts: 1/1" in out and "throughput vs serial" in out and "p95 latency vs one request alone" in out
    assert "load average before" in out and "machine:" in out


def test_soak_runs_a_mixed_load_and_finds_nothing_lost(tmp_path):
    out = run_script(["benchmarks/soak.py", "--minutes", "0.05", "--clients", "2", "--run-every", "1", "--run-steps", "5",
                      "--json", str(tmp_path / "soak.json")], env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert "5xx: 0 " in out and "all terminal: yes" in out and "verdict: ok" in out, out[-3000:]
    import json

    figures = json.loads((tmp_path / "soak.json").read_text())
    assert figures["server_errors_5xx"] == 0 and figures["hostile_accepted"] == 0 and figures["runs_created"] >= 1
    assert not figures["runs_not_terminal"] and not figures["run_folder_problems"] and figures["feature_stores"] >= 1
    # every kind of request was sent, hostile ones included
    for label in ("POST steer", "POST encode", "POST search", "GET explanations/search", "POST runs (create)"):
        assert figures["latency_s"][label]["n"] >= 1, label
    assert any(label.startswith("hostile") for label in figures["latency_s"])
