r"""Throughput and latency of the REST endpoint, beside direct in-process calls (the baseline).

The endpoint runs as a separate process (``tfgalflow serve`` on 127.0.0.1, so server and clients do
not share a GIL); a bounded number of concurrent keep-alive clients (aiohttp) post the same payload
for a bounded time, for each payload size; small payloads also against a second server with
micro-batching off (mode REST-nobat). Every answer is checked against the in-process SavedModel
(rtol = atol = 1e-5, float32 precision): failed answers (non-200, errors) and wrong answers are
counted. The baseline calls the same loaded signature directly, sequentially, for the same time.

    .venv/bin/python benchmarks/bench_serving.py  # 8 clients x 10 s, sizes 1, 100, 10^4
    .venv/bin/python benchmarks/bench_serving.py --clients 4 --seconds 3 --sizes 1 1000
    .venv/bin/python benchmarks/bench_serving.py --model saved_models/hernquist_iso/1 \
        --format columns

Without ``--model`` a 6D affine flow (6 layers, 64x64 MADE networks, rescaler fitted to Gaussian
data; untrained weights do not change the cost) is exported to a temporary directory first.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from tfgalflow.export import export_model, load_saved_model  # noqa: E402
from tfgalflow.serving import Client, ServingError  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


def build_model(directory: Path) -> Path:
    from tfgalflow.flows import FlowConfig
    from tfgalflow.model import Flow
    flow = Flow(FlowConfig(dim=6, layers=6, hidden=(64, 64)))
    flow.adapt(np.random.default_rng(0).normal(size=(10_000, 6)) * [5, 5, 5, 100, 100, 100])
    return export_model(flow, directory / "bench" / "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base: Path, port: int, workers: int | None, batch_rows: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "tfgalflow.cli",
        "serve",
        str(base),
        "--port",
        str(port),
        "--poll-seconds",
        "0",
        "--batch-rows",
        str(batch_rows),
    ]
    if workers:
        cmd += ["--workers", str(workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client, deadline = (
        Client(f"http://127.0.0.1:{port}", model="bench", timeout=5),
        time.monotonic() + 120,
    )
    while True:
        try:
            client.status()
            return proc
        except ServingError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    "server did not start: "
                    f"{proc.stderr.read() if proc.poll() is not None else 'timeout'}"
                )
            time.sleep(0.3)


def percentiles(latencies: list[float]) -> str:
    if not latencies:
        return "      -        -        -"
    p50, p95, p99 = np.percentile(np.array(latencies) * 1e3, [50, 95, 99])
    return f"{p50:8.2f} {p95:8.2f} {p99:8.2f}"


async def load_test(
    url: str, body: bytes, expected: np.ndarray, key: str, clients: int, seconds: float
) -> dict:
    import aiohttp
    latencies, failed, wrong = [], 0, 0
    deadline = time.perf_counter() + seconds

    async def client(session):
        nonlocal failed, wrong
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                async with session.post(
                    url, data=body, headers={"Content-Type": "application/json"}
                ) as response:
                    text = await response.read()
                    status = response.status
            except aiohttp.ClientError:
                failed += 1
                continue
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                failed += 1
                continue
            answer = np.asarray(json.loads(text)[key], np.float32)
            if answer.shape != expected.shape or not np.allclose(answer, expected, **TOL):
                wrong += 1

    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    return {"requests": len(latencies) + 0, "failed": failed, "wrong": wrong, "elapsed": elapsed,
            "latencies": latencies}


def direct_calls(signature, arrays: dict, seconds: float) -> tuple[int, float, list[float]]:
    """Sequential direct calls of the loaded signature (the in-process baseline)."""
    signature.run(arrays)                                          # warm-up
    latencies, t_end = [], time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        signature.run(arrays)
        latencies.append(time.perf_counter() - t)
    return len(latencies), time.perf_counter() - t0, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", type=Path, help="a SavedModel directory (default: export a 6D flow)"
    )
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="seconds per payload size (default: 10)"
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1, 100, 10_000], help="points per request"
    )
    parser.add_argument(
        "--signature", default="log_prob", help="signature to call (default: log_prob)"
    )
    parser.add_argument(
        "--format", choices=("rows", "columns"), default="rows", help="request format"
    )
    parser.add_argument(
        "--workers", type=int, help="server worker threads (default: the server's)"
    )
    parser.add_argument(
        "--batch-rows",
        type=int,
        default=256,
        help="server micro-batching limit (default: 256); sizes up to it are also run against "
        "a second server with batching off",
    )
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_serving."))
    try:
        if args.model:
            base = tmp / "models"
            (base / "bench").mkdir(parents=True)
            os.symlink(args.model.resolve(), base / "bench" / "1")
        else:
            build_model(tmp)
            base = tmp
        model = load_saved_model(base / "bench" / "1")
        signature = model.signatures[args.signature]
        if list(signature.inputs) != ["x"]:
            raise SystemExit(
                f"signature {args.signature} has inputs {list(signature.inputs)}; this benchmark "
                f"sends x only (log_prob, grad_log_prob, serving_default)"
            )
        dim = signature.inputs["x"][0][1]
        servers = {"REST": start_server(base, port := free_port(), args.workers, args.batch_rows)}
        urls = {"REST": f"http://127.0.0.1:{port}/v1/models/bench:predict"}
        if args.batch_rows and min(args.sizes) <= args.batch_rows:
            servers["REST-nobat"] = start_server(base, port := free_port(), args.workers, 0)
            urls["REST-nobat"] = f"http://127.0.0.1:{port}/v1/models/bench:predict"
        print(f"model {base / 'bench' / '1'}  signature {args.signature}  format {args.format}  "
              f"{args.clients} clients x {args.seconds:g} s per size  (CPUs: {os.cpu_count()})")
        print(
            f"{'points/req':>10} {'mode':>10} {'requests':>9} {'failed':>6} {'wrong':>5} "
            f"{'req/s':>9} {'points/s':>11} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
        )
        rng = np.random.default_rng(1)
        try:
            for n in args.sizes:
                x = (
                    rng.normal(size=(n, dim)) * ([5.0] * 3 + [100.0] * 3 if dim == 6 else 1.0)
                ).astype(np.float32)
                expected = signature.run({"x": x})[list(signature.outputs)[0]]
                key = "predictions" if args.format == "rows" else "outputs"
                body = json.dumps(
                    {
                        "signature_name": args.signature,
                        ("instances" if args.format == "rows" else "inputs"): x.tolist(),
                    }
                ).encode()
                calls, elapsed, lat = direct_calls(signature, {"x": x}, min(args.seconds, 5.0))
                print(f"{n:>10} {'direct':>10} {calls:>9} {0:>6} {0:>5} {calls / elapsed:>9.1f} "
                      f"{calls * n / elapsed:>11.4g} {percentiles(lat)}")
                for mode, url in urls.items():
                    if mode == "REST-nobat" and n > args.batch_rows:
                        continue  # not batched anyway
                    r = asyncio.run(
                        load_test(url, body, expected, key, args.clients, args.seconds)
                    )
                    ok = r["requests"] - r["failed"]
                    print(
                        f"{n:>10} {mode:>10} {r['requests']:>9} {r['failed']:>6} {r['wrong']:>5} "
                        f"{ok / r['elapsed']:>9.1f} {ok * n / r['elapsed']:>11.4g} "
                        f"{percentiles(r['latencies'])}"
                    )
        finally:
            for server in servers.values():
                server.terminate()
                server.wait(timeout=30)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
