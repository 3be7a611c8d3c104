"""Soak test: a bounded mixed load against a local ``sae-kit serve`` that also trains, then checks that
nothing was lost.

Builds a tiny data folder (tests/tiny_served.py's random 2-layer model with an analysed TopK SAE, a
32-wide planted activation store for runs), serves it on loopback with ``--max-runs``, and for
``--minutes`` sends from ``--clients`` threads a weighted mix of feature pages and feature search,
explanation search, text features (search, encode), steering, token-rule explanations (they write
the feature store) and hostile requests (path escapes, NUL and lone surrogates, oversized and chunked
bodies, bad JSON, out-of-range values, runs with paths outside the folder); one more thread creates
runs and cancels them (at once, after a moment, or after a resume; one at a time is let finish).

Reports every status code, the 5xx count (must be 0), hostile requests that were accepted (must be
0), other unexpected statuses, latency percentiles per endpoint; then, after the load, waits for
every run to end and checks that each reached a terminal state, that no run folder is half written
(config.json reads, a checkpoint loads, an SAE loads, finished <=> SAE), and that every feature
store still opens and passes SQLite's integrity check. Exit status 1 if any check fails.

    nice -n 10 python benchmarks/soak.py --minutes 3 --clients 4 --threads 1

Not a speed benchmark: latencies are for spotting stalls under mixed load, on this machine's load.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import quote

# The shared bench_env.py beside this script (PYTHONSAFEPATH=1 drops the script folder from sys.path).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_env import load_average, machine  # noqa: E402  (benchmarks/ is the script's folder)
from local_server import start_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TERMINAL = ("finished", "failed", "cancelled", "interrupted")
TEXTS = ["It was a bright cold day in April, and the clocks were striking thirteen.",
         "The quick brown fox jumps over the lazy dog.", "Once upon a time, in a kingdom by the sea,",
         "To be, or not to be: that is the question.", "My favourite food is pasta with tomatoes."]
WORDS = ["the", "a", "of", "day", "time", "and", "clock", "fox", "sea", "to"]
D_IN = 32  # the planted store's width (runs train on it)


# ------------------------------------------------------------------ the data folder
def build_root(root: Path) -> Path:
    """tests/tiny_served.py's folder (model/, saes/main analysed, saes/fresh) plus stores/synth."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_served import build_served_root

    from sae_kit.eval.synthetic import SyntheticSource, make_dataset
    from sae_kit.store import write_store

    build_served_root(root, analysis_tokens=512)
    rows = SyntheticSource(make_dataset("sharkey", d=D_IN, n_features=64)).sample(4096, seed=0)
    write_store(root / "stores" / "synth", rows, shard_tokens=1024, model_name="synthetic:sharkey", hook_name="synthetic")
    return root


def run_config(steps: int) -> dict:
    return {"activations": "stores/synth", "architecture": "topk", "k": 4, "expansion": 2, "batch_size": 128,
            "tokens": 128 * steps, "log_every": 5, "eval_every": steps, "eval_tokens": 512,
            "checkpoint_every": max(1, steps // 4), "init_tokens": 1024, "warmup_steps": 2, "threads": 1}


# ------------------------------------------------------------------ requests
def request(port: int, method: str, path: str, body=None, *, raw: bytes | None = None, chunked: bool = False,
            timeout: float = 300) -> tuple[int, object, float]:
    """(status, decoded JSON or None, seconds). ``raw`` is sent as is; ``chunked`` without a Content-Length."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    started = time.perf_counter()
    try:
        if chunked:
            connection.request(method, path, body=iter([data[i:i + 4096] for i in range(0, len(data), 4096)]),
                               headers=headers, encode_chunked=True)
        else:
            connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        payload = response.read()
        seconds = time.perf_counter() - started
    finally:
        connection.close()
    try:
        decoded = json.loads(payload) if payload else None
    except ValueError:
        decoded = None
    return response.status, decoded, seconds


class Recorder:
    """Every request's endpoint label, status and latency; which statuses were wrong."""

    def __init__(self):
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.statuses: dict[str, Counter] = defaultdict(Counter)
        self.server_errors: list[str] = []
        self.hostile_accepted: list[str] = []
        self.unexpected: list[str] = []
        self.connection_errors: list[str] = []

    def call(self, port: int, label: str, method: str, path: str, body=None, *, expect=(200,), hostile=False,
             **options) -> tuple[int, object]:
        try:
            status, payload, seconds = request(port, method, path, body, **options)
        except OSError as exc:
            with self.lock:
                self.connection_errors.append(f"{label}: {exc!r}")
            return 0, None
        with self.lock:
            self.latency[label].append(seconds)
            self.statuses[label][status] += 1
            note = f"{label} {method} {path[:120]} -> {status} {str(payload)[:200]}"
            if status >= 500:
                self.server_errors.append(note)
            elif hostile and status < 400:
                self.hostile_accepted.append(note)
            elif hostile:
                pass  # refused with a 4xx, as it should be
            elif status not in expect:
                self.unexpected.append(note)
        return status, payload


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# ------------------------------------------------------------------ the mix
def hostile_requests(sae: str, outside: str, run_steps: int) -> list[tuple[str, str, str, dict]]:
    """(label, method, path, options) of requests that must get a 4xx."""
    big = b'{"sae": "' + sae.encode() + b'", "text": "' + b"y" * (70 * 1024) + b'"}'
    run = run_config(run_steps)
    nul = "It was\x00 a day"
    return [
        ("hostile sae id", "GET", "/api/saes/..%2F..%2Fetc/features", {}),
        ("hostile sae id", "GET", f"/api/saes/{quote('saes.main/../../etc')}/features/1", {}),
        ("hostile feature index", "GET", f"/api/saes/{sae}/features/99999999", {}),
        ("hostile feature index", "GET", f"/api/saes/{sae}/features/-3", {}),
        ("hostile query", "GET", f"/api/saes/{sae}/features?limit=100000", {}),
        ("hostile query", "GET", f"/api/saes/{sae}/explanations/search?q={quote('x' * 500)}", {}),
        ("hostile query", "GET", f"/api/saes/{sae}/explanations/search?q=", {}),
        ("hostile query", "GET", f"/api/saes/{sae}/features?q=%00", {}),
        ("hostile body", "POST", "/api/search", {"body": {"sae": sae, "text": nul}}),
        ("hostile body", "POST", "/api/encode", {"raw": b'{"sae": "' + sae.encode() + b'", "text": "caf\\ud800"}'}),
        ("hostile body", "POST", "/api/search", {"raw": b'{"sae": "saes.main", "text": '}),
        ("hostile body", "POST", "/api/search", {"body": {"sae": sae, "text": "hi", "top_k": 10**9}}),
        ("hostile body", "POST", "/api/steer", {"body": {"prompt": "Hi", "features": [
            {"sae": sae, "index": 10**6, "strength": 4}], "max_new_tokens": 2}}),
        ("hostile body", "POST", "/api/steer", {"raw": b'{"prompt": "Hi", "features": [{"sae": "saes.main", '
                                                        b'"index": 1, "strength": NaN}]}'}),
        ("hostile oversized", "POST", "/api/search", {"raw": big}),
        ("hostile oversized", "POST", "/api/encode", {"raw": big, "chunked": True}),
        ("hostile oversized", "POST", "/api/runs", {"raw": big, "chunked": True}),
        ("hostile run", "POST", "/api/runs", {"body": {"config": {**run, "activations": "/etc"}}}),
        ("hostile run", "POST", "/api/runs", {"body": {"config": {**run, "activations": "../../.."}}}),
        ("hostile run", "POST", "/api/runs", {"body": {"config": {**run, "activations": "stores/synth\x00"}}}),
        ("hostile run", "POST", "/api/runs", {"body": {"config": {**run, "plugins": [f"color_filter:target={outside}"]}}}),
        ("hostile run", "POST", "/api/runs", {"body": {"config": {**run, "targets": "~"}}}),
        ("hostile run", "POST", "/api/runs", {"body": {"config": {**run, "k": 5000}}}),
        ("hostile run", "POST", "/api/runs", {"body": {"config": {**run, "lr": "fast"}}}),
        ("hostile run", "POST", "/api/runs", {"body": {"config": {**run, "out": "/tmp/x"}}}),
        ("hostile run", "POST", "/api/runs/19700101-000000-000000/cancel", {}),
        ("hostile run", "GET", "/api/runs/..%2F..%2Fetc", {}),
    ]


def client_loop(port: int, recorder: Recorder, sae: str, d_sae: int, explainable: list[int], outside: str,
                run_steps: int, until: float, seed: int, explain_lock: threading.Lock) -> None:
    rng = random.Random(seed)
    hostile = hostile_requests(sae, outside, run_steps)

    def feature_list():
        sort = rng.choice(["id", "density", "max_act", "fire_count"])
        recorder.call(port, "GET features (page)", "GET", f"/api/saes/{sae}/features?sort={sort}&order="
                      f"{rng.choice(['asc', 'desc'])}&offset={rng.randrange(0, d_sae)}&limit={rng.choice([10, 50])}")

    def feature_search():
        recorder.call(port, "GET features?q (search)", "GET", f"/api/saes/{sae}/features?q={rng.choice(WORDS)}&limit=20")

    def feature_page():
        recorder.call(port, "GET feature", "GET", f"/api/saes/{sae}/features/{rng.randrange(d_sae)}")

    def explanation_search():
        recorder.call(port, "GET explanations/search", "GET",
                      f"/api/saes/{sae}/explanations/search?q={rng.choice(WORDS)}&limit=10")

    def text_search():
        recorder.call(port, "POST search", "POST", "/api/search", {"sae": sae, "text": rng.choice(TEXTS), "top_k": 3})

    def encode():
        recorder.call(port, "POST encode", "POST", "/api/encode",
                      {"sae": sae, "text": rng.choice(TEXTS), "features": rng.sample(range(d_sae), 4)})

    def steer():
        recorder.call(port, "POST steer", "POST", "/api/steer", {
            "prompt": rng.choice(TEXTS)[:30], "max_new_tokens": 4, "seed": rng.randrange(1000),
            "method": rng.choice(["additive", "clamp"]),
            "features": [{"sae": sae, "index": rng.randrange(d_sae), "strength": rng.choice([-8.0, 4.0, 20.0])}]})

    def explain():
        # Features with held-out examples only (the others are a 422 by design); one writer at a time
        # from the soak (the server serialises them too).
        if explainable and explain_lock.acquire(blocking=False):
            try:
                recorder.call(port, "POST explain (writes store)", "POST",
                              f"/api/saes/{sae}/features/{rng.choice(explainable)}/explain", {"explainer": "token-rule"})
            finally:
                explain_lock.release()

    def health():
        recorder.call(port, "GET health/saes/runs", "GET", rng.choice(["/api/health", "/api/saes", "/api/runs"]))

    def attack():
        label, method, path, options = rng.choice(hostile)
        options = dict(options)
        recorder.call(port, label, method, path, options.pop("body", None), hostile=True, **options)

    mix = [(feature_list, 3), (feature_search, 2), (feature_page, 3), (explanation_search, 2), (text_search, 2),
           (encode, 2), (steer, 1), (explain, 1), (health, 1), (attack, 3)]
    operations, weights = zip(*mix)
    while time.monotonic() < until:
        rng.choices(operations, weights)[0]()


def runs_loop(port: int, recorder: Recorder, run_steps: int, until: float, every: float, seed: int,
              created: list[str]) -> None:
    """Create a run every ``every`` seconds; cancel it at once, after a moment, or after cancel+resume;
    one run at a time is let finish."""
    rng = random.Random(seed)
    finishing: str | None = None
    while time.monotonic() < until:
        status, payload = recorder.call(port, "POST runs (create)", "POST", "/api/runs",
                                        {"config": run_config(run_steps), "name": "soak"}, expect=(201,))
        if status == 201:
            run_id = payload["id"]
            created.append(run_id)
            if finishing is not None:
                state = recorder.call(port, "GET run", "GET", f"/api/runs/{finishing}")[1]
                if isinstance(state, dict) and state.get("status") in TERMINAL:
                    finishing = None
            mode = rng.choice(["now", "soon", "resume"] + ([] if finishing else ["finish"]))
            if mode == "finish":
                finishing = run_id
            else:
                if mode != "now":
                    time.sleep(rng.uniform(0.2, 3.0))
                # 409: it ended in between (a tiny run can finish within the pause)
                recorder.call(port, "POST runs/cancel", "POST", f"/api/runs/{run_id}/cancel", expect=(200, 409))
                if mode == "resume":
                    time.sleep(0.5)  # a running child is still being stopped: 409 until it is
                    status, _ = recorder.call(port, "POST runs/resume", "POST", f"/api/runs/{run_id}/resume",
                                              expect=(200, 409))
                    if status == 200:
                        time.sleep(rng.uniform(0.0, 2.0))
                        recorder.call(port, "POST runs/cancel", "POST", f"/api/runs/{run_id}/cancel", expect=(200, 409))
        time.sleep(max(0.0, every * rng.uniform(0.5, 1.5)))


# ------------------------------------------------------------------ what must hold afterwards
def check_run_folders(root: Path, runs: list[dict]) -> list[str]:
    """Problems with any run folder: unreadable config, a checkpoint or SAE that does not load,
    finished without an SAE."""
    import torch

    from sae_kit.sae import load_sae
    from sae_kit.train.checkpoint import find_checkpoint, load_checkpoint

    problems = []
    rng_state = torch.get_rng_state()
    for run in runs:
        folder = root / "runs" / run["id"]
        try:
            json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as exc:
            problems.append(f"{run['id']}: config.json unreadable ({exc})")
        checkpoint = find_checkpoint(folder)
        if checkpoint is not None:
            try:
                load_checkpoint(checkpoint)
            except (OSError, ValueError) as exc:
                problems.append(f"{run['id']} ({run['status']}): checkpoint does not load ({exc})")
        has_sae = (folder / "sae" / "cfg.json").is_file()
        if has_sae:
            try:
                load_sae(folder / "sae")
            except (OSError, ValueError) as exc:
                problems.append(f"{run['id']} ({run['status']}): SAE does not load ({exc})")
        if run["status"] == "finished" and not has_sae:
            problems.append(f"{run['id']}: finished without an SAE")
    torch.set_rng_state(rng_state)
    return problems


def check_feature_stores(root: Path) -> tuple[int, list[str]]:
    from sae_kit.feature_store import FeatureStore

    paths = sorted(root.rglob("features.sqlite"))
    problems = []
    for path in paths:
        try:
            store = FeatureStore(path)
            store.list_features(limit=5)
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
                verdict = connection.execute("PRAGMA integrity_check").fetchone()[0]
            if verdict != "ok":
                problems.append(f"{path}: integrity_check says {verdict}")
        except Exception as exc:  # any failure to open is what this check reports
            problems.append(f"{path}: {exc!r}")
    return len(paths), problems


# ------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=1.0, help="how long the load runs")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client threads (plus one for runs)")
    parser.add_argument("--max-runs", type=int, default=1, help="the server's --max-runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (its runs use 1)")
    parser.add_argument("--run-every", type=float, default=4.0, help="seconds between run creations (about)")
    parser.add_argument("--run-steps", type=int, default=40, help="training steps of each run")
    parser.add_argument("--drain", type=float, default=300.0, help="seconds to wait for runs to end after the load")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="build the data folder here (default: a temporary folder, removed after)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    load_before = load_average()
    scratch = Path(args.workdir or tempfile.mkdtemp(prefix="sae-kit-soak-"))
    root = scratch / "root"
    outside = scratch / "outside"
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.txt").write_text("not yours\n")
    started = time.monotonic()
    build_root(root)
    build_s = time.monotonic() - started
    server_log = scratch / "server.log"
    process, port = start_server(root, ["--max-runs", str(args.max_runs), "--threads", str(args.threads)], server_log,
                                 env={"OMP_NUM_THREADS": str(args.threads)})
    start_s = time.monotonic() - started - build_s
    recorder = Recorder()
    created: list[str] = []
    final_runs: list[dict] = []
    try:
        saes = request(port, "GET", "/api/saes")[1]
        main_sae = next(s for s in saes if s.get("analysed"))
        sae, d_sae = main_sae["id"], main_sae["d_sae"]
        # Explanations for explanation search to find (features without held-out examples cannot be scored).
        explainable = [index for index in range(min(d_sae, 24)) if request(
            port, "POST", f"/api/saes/{sae}/features/{index}/explain", {"explainer": "token-rule"})[0] == 200]
        until = time.monotonic() + 60 * args.minutes
        explain_lock = threading.Lock()
        threads = [threading.Thread(target=client_loop, args=(port, recorder, sae, d_sae, explainable, str(outside),
                                                              args.run_steps, until, args.seed * 1000 + i, explain_lock))
                   for i in range(args.clients)]
        threads.append(threading.Thread(target=runs_loop, args=(port, recorder, args.run_steps, until, args.run_every,
                                                                args.seed, created)))
        load_started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        load_s = time.monotonic() - load_started
        load_during = load_average()
        # Drain: every created run must end by itself (nothing is cancelled here).
        drain_deadline = time.monotonic() + args.drain
        while True:
            final_runs = [r for r in request(port, "GET", "/api/runs")[1] if r["id"] in set(created)]
            if all(r["status"] in TERMINAL for r in final_runs) or time.monotonic() > drain_deadline:
                break
            time.sleep(0.5)
        drain_s = time.monotonic() - drain_deadline + args.drain
        alive = process.poll() is None
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    load_after = load_average()
    from sae_kit.train.checkpoint import find_checkpoint

    listed = {r["id"] for r in final_runs}
    missing = [run_id for run_id in created if run_id not in listed]
    stuck = [f"{r['id']}: {r['status']}" for r in final_runs if r["status"] not in TERMINAL]
    failed = [f"{r['id']}: {r['error']}" for r in final_runs if r["status"] == "failed"]
    while_training = sum(r["status"] == "cancelled" and "while training" in (r["error"] or "") for r in final_runs)
    checkpoints = sum(find_checkpoint(root / "runs" / r["id"]) is not None for r in final_runs)
    folder_problems = check_run_folders(root, final_runs)
    stores, store_problems = check_feature_stores(root)
    status_counts = Counter()
    for counter in recorder.statuses.values():
        status_counts.update(counter)
    total = sum(status_counts.values())
    figures = {
        "machine": machine(), "minutes": args.minutes, "clients": args.clients, "max_runs": args.max_runs,
        "server_threads": args.threads, "run_steps": args.run_steps, "run_every_s": args.run_every, "seed": args.seed,
        "explainable_features": len(explainable),
        "load_average_before": load_before, "load_average_end_of_load": load_during, "load_average_after": load_after,
        "build_s": build_s, "server_start_s": start_s, "load_s": load_s, "drain_s": drain_s, "requests": total,
        "statuses": {str(k): v for k, v in sorted(status_counts.items())},
        "server_errors_5xx": len(recorder.server_errors), "hostile_accepted": len(recorder.hostile_accepted),
        "unexpected_statuses": len(recorder.unexpected), "connection_errors": len(recorder.connection_errors),
        "server_alive_at_end": alive,
        "latency_s": {label: {"n": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
                              "p99": percentile(values, 99), "max": max(values)}
                      for label, values in sorted(recorder.latency.items())},
        "runs_created": len(created), "runs_by_status": dict(Counter(r["status"] for r in final_runs)),
        "runs_cancelled_while_training": while_training, "runs_with_checkpoint": checkpoints,
        "runs_resumed": sum(r["attempts"] > 1 for r in final_runs), "runs_not_terminal": stuck, "runs_missing": missing, "runs_failed": failed,
        "run_folder_problems": folder_problems, "feature_stores": stores, "feature_store_problems": store_problems,
    }

    print(f"soak: {args.minutes:g} min of mixed load, {args.clients} client threads + 1 runs thread, against "
          f"sae-kit serve --max-runs {args.max_runs} --threads {args.threads} on 127.0.0.1 (tiny model, SAE d_sae={d_sae})")
    print(f"  machine: {figures['machine']}")
    print(f"  settings: runs of {args.run_steps} steps, one created every ~{args.run_every:g} s, seed {args.seed}; "
          f"{len(explainable)} of the first 24 features explainable (token-rule)")
    print(f"  load average before: {load_before}; end of load: {load_during}; after: {load_after}")
    print(f"  build {build_s:.1f} s, server start {start_s:.1f} s, load {load_s:.1f} s, drain {drain_s:.1f} s; {total} requests "
          f"({total / max(load_s, 1e-9):.1f}/s); statuses {figures['statuses']}")
    print(f"  {'endpoint':<30} {'n':>6} {'p50 s':>8} {'p95 s':>8} {'p99 s':>8} {'max s':>8}")
    for label, row in figures["latency_s"].items():
        print(f"  {label:<30} {row['n']:>6} {row['p50']:>8.3f} {row['p95']:>8.3f} {row['p99']:>8.3f} {row['max']:>8.3f}")
    print(f"  5xx: {figures['server_errors_5xx']}   hostile accepted: {figures['hostile_accepted']}   "
          f"unexpected statuses: {figures['unexpected_statuses']}   connection errors: {figures['connection_errors']}   "
          f"server alive at end: {'yes' if alive else 'NO'}")
    for note in (recorder.server_errors + recorder.hostile_accepted + recorder.unexpected + recorder.connection_errors)[:20]:
        print(f"    {note}")
    print(f"  runs: {len(created)} created, by status {figures['runs_by_status']}; all terminal: "
          f"{'yes' if not stuck and not missing else 'NO'}; not terminal: {len(stuck)}; missing: {len(missing)}; "
          f"failed: {len(failed)}; half-written run folders: {len(folder_problems)}")
    print(f"    cancelled while training (child stopped): {while_training}; resumed at least once: "
          f"{figures['runs_resumed']}; folders with a checkpoint (each loaded): {checkpoints}")
    for note in (stuck + missing + failed + folder_problems)[:20]:
        print(f"    {note}")
    print(f"  feature stores that open and pass integrity_check: {stores - len(store_problems)}/{stores}")
    for note in store_problems:
        print(f"    {note}")
    bad = (recorder.server_errors or recorder.hostile_accepted or recorder.unexpected or recorder.connection_errors
           or not alive or stuck or missing or failed or folder_problems or store_problems or not stores)
    tracebacks = [line for line in server_log.read_text(errors="replace").splitlines() if "Error" in line]
    if bad or tracebacks:
        print(f"  server log {server_log}: {len(tracebacks)} error lines; last 30 lines:")
        for line in server_log.read_text(errors="replace").splitlines()[-30:]:
            print(f"    | {line}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    if not args.workdir:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"  verdict: {'FAIL' if bad else 'ok'}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
