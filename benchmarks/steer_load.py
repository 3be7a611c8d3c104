"""Load test of the steering endpoint: N concurrent POST /api/steer requests against a running server.

First measures the reference in the same run: single steering requests sent one at a time (median of
``--reference`` of them; serial throughput is one request per reference time). Then sends
``--requests`` requests at once from as many threads, each with its own prompt, feature, method and
seed, and reports every status code, latency percentiles, the wall time, the throughput against
serial (target >= 4x at 50 concurrent: the server generates concurrent requests as one batch) and
p95 latency against one request alone (target <= 15x), with the machine, settings and load average.

    sae-kit serve runs/demo --threads 2 &          # or: sae-kit demo --out runs/demo
    python benchmarks/steer_load.py --url http://127.0.0.1:8000 --requests 50

``--root FOLDER`` starts ``sae-kit serve FOLDER`` itself on a free port and stops it afterwards;
``--tiny`` serves the tiny random model and SAE of tests/tiny_served.py (CI size, not a measurement).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# The shared bench_env.py beside this script (PYTHONSAFEPATH=1 drops the script folder from sys.path).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_env import machine  # benchmarks/ is the script's folder
from local_server import start_server  # noqa: E402

PROMPTS = ["The meaning of life is", "Once upon a time, in a kingdom by the sea,", "My favourite food is",
           "The weather today", "To be, or not to be:"]


def call(url: str, body: dict | None = None, token: str | None = None, timeout: float = 1800) -> tuple[int, dict, float]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=timeout) as response:
            status, payload = response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        status, payload = error.code, json.loads(error.read() or b"{}")
    return status, payload, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def same_answer(together: dict, alone: dict) -> bool:
    """Steering: the same texts. Search: the same tokens and features (values agree to float rounding
    of the batch, so they are not compared bit for bit)."""
    if "token_features" not in alone:
        return together == alone
    features = lambda r: ([[f["index"] for f in row] for row in r["token_features"]],  # noqa: E731
                          [f["index"] for f in r["top_features"]])
    return together.get("tokens") == alone["tokens"] and features(together) == features(alone)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--root", help="serve this folder for the duration of the test")
    where.add_argument("--tiny", action="store_true", help="serve tests/tiny_served.py's tiny folder (CI size)")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--endpoint", choices=("steer", "search"), default="steer",
                        help="steer (default) or search: texts are encoded in batches the same way")
    parser.add_argument("--reference", type=int, default=3, help="single requests timed first")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--strength", type=float, default=40.0)
    parser.add_argument("--token", default=os.environ.get("SAE_KIT_API_TOKEN"), help="API token, if the server has one")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of a server started with --root")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    process = None
    load_before = os.getloadavg()
    tiny_root = None
    if args.tiny:
        import tempfile

        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        from tiny_served import build_served_root

        tiny_root = Path(tempfile.mkdtemp(prefix="steer-load-"))
        args.root = str(build_served_root(tiny_root, analysis_tokens=256))
    if args.root:
        process, port = start_server(args.root, ["--threads", str(args.threads)] if args.threads else [])
        url = f"http://127.0.0.1:{port}"
    else:
        url = args.url.rstrip("/")
    try:
        saes = call(f"{url}/api/saes")[1]
        sae = next((s for s in saes if s["analysed"]), saes[0])
        if sae["analysed"]:
            page = call(f"{url}/api/saes/{sae['id']}/features?sort=density&order=desc&limit=5")[1]
            features = [f["index"] for f in page["features"]]
        else:
            features = list(range(5))

        endpoint = f"{url}/api/{args.endpoint}"

        def body(i: int) -> dict:
            if args.endpoint == "search":  # a different text per request, ~30-60 tokens
                return {"sae": sae["id"], "text": " ".join([PROMPTS[i % len(PROMPTS)]] * (2 + i % 3)) + f" {i}"}
            return {"prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": args.max_new_tokens,
                    "temperature": args.temperature, "seed": i, "method": "additive" if i % 2 == 0 else "clamp",
                    "features": [{"sae": sae["id"], "index": features[i % len(features)], "strength": args.strength}]}

        reference, alone = [], []
        for i in range(args.reference):
            status, payload, seconds = call(endpoint, body(i), args.token)
            if status != 200:
                raise SystemExit(f"a single steering request failed: {status} {payload}")
            reference.append(seconds)
            alone.append(payload)
        single = statistics.median(reference)

        started = time.perf_counter()
        with ThreadPoolExecutor(args.requests) as pool:
            results = list(pool.map(lambda i: call(endpoint, body(i), args.token), range(args.requests)))
        wall = time.perf_counter() - started
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=60)
        if tiny_root is not None:
            import shutil

            shutil.rmtree(tiny_root, ignore_errors=True)

    statuses = [status for status, _, _ in results]
    latencies = [seconds for _, _, seconds in results]
    ok = statuses.count(200)
    # The reference requests were sent again among the concurrent ones: batched, they must give the same texts.
    same = sum(same_answer(results[i][1], alone[i]) for i in range(min(args.reference, args.requests)))
    figures = {
        "server": url, "endpoint": args.endpoint, "sae": sae["id"], "requests": args.requests, "max_new_tokens": args.max_new_tokens,
        "succeeded": ok, "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
        "single_request_s": single, "wall_s": wall,
        "latency_s": {name: percentile(latencies, q) for name, q in
                      (("p50", 50), ("p90", 90), ("p95", 95), ("p99", 99), ("max", 100))} | {"min": min(latencies)},
        "wall_over_serial_reference": wall / (args.requests * single),
        "throughput_over_serial": args.requests * single / wall,
        "p95_over_single": percentile(latencies, 95) / single,
        "same_as_alone": f"{same}/{min(args.reference, args.requests)}", "machine": machine(), "server_threads": args.threads,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
    }
    if args.endpoint == "steer":
        print(f"steering load test: {args.requests} concurrent requests to {url} (SAE {sae['id']}, "
              f"{args.max_new_tokens} new tokens each, default + steered, temperature {args.temperature}, "
              f"strength {args.strength}, additive and clamp alternating)")
    else:
        print(f"search load test: {args.requests} concurrent POST /api/search to {url} (SAE {sae['id']}, "
              "a different text of ~10-40 tokens each)")
    print(f"  machine: {figures['machine']}; server threads: {args.threads or 'server default'}")
    print("  load average before: {:.2f} {:.2f} {:.2f}  after: {:.2f} {:.2f} {:.2f} (1, 5, 15 min)".format(
        *load_before, *figures["load_average_after"]))
    print(f"  succeeded: {ok}/{args.requests}  statuses: {figures['statuses']}")
    print(f"  reference (one request alone, median of {args.reference}): {single:.2f} s; the same requests "
          f"among the concurrent ones gave the same texts: {figures['same_as_alone']}")
    print("  latency: " + "  ".join(f"{name} {value:.2f} s" for name, value in figures["latency_s"].items()))
    print(f"  wall time {wall:.1f} s = {figures['wall_over_serial_reference']:.2f} x "
          f"({args.requests} x reference); throughput {args.requests / wall:.2f} requests/s")
    print(f"  throughput vs serial: {figures['throughput_over_serial']:.2f}x (target >= 4x)   "
          f"p95 latency vs one request alone: {figures['p95_over_single']:.2f}x (target <= 15x)")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(figures, file, indent=2)
    if ok != args.requests or same != min(args.reference, args.requests):
        sys.exit(1)


if __name__ == "__main__":
    main()
