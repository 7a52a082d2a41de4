"""Server throughput and latency under N concurrent clients: a load generator on the async `openai` client.

    .venv/bin/python bench/serve.py                         # starts `glm5 serve --preset nano` (own process)
    .venv/bin/python bench/serve.py --clients 1 8 32 --requests 64 --max-tokens 32
    .venv/bin/python bench/serve.py --url http://127.0.0.1:8000/v1 --model nano   # an already running server

Each client sends streaming chat requests back to back (thinking off, fixed max_tokens, ignore_eos so every
request generates exactly max_tokens). Reported per concurrency: requests/s, output tokens/s, and p50/p99 of
request latency and of time to first token. Writes bench/results/serve.json. The server is the real CLI
in a process of its own: a load generator in the server's process would share its interpreter (measured:
40.5 vs 59.4 req/s at 32 clients), and a test helper's server would differ from what users run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

from results_io import write_results  # bench/ is on sys.path when a bench runs


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


async def load(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    import openai

    latencies, ttfts, tokens = [], [], 0
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def client_loop(client):
        nonlocal tokens
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            start = time.perf_counter()
            first = None
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"Request {i}: tell me a story."}], stream=True,
                max_tokens=max_tokens, stream_options={"include_usage": True},
                extra_body={"thinking": {"type": "disabled"}, "ignore_eos": True})
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - start
                if chunk.usage is not None:
                    tokens += chunk.usage.completion_tokens
            latencies.append(time.perf_counter() - start)
            ttfts.append(first if first is not None else latencies[-1])

    async with openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return {"clients": clients, "requests": requests, "max_tokens": max_tokens, "seconds": elapsed,
            "requests_per_s": requests / elapsed, "output_tok_s": tokens / elapsed,
            "latency_p50_s": percentile(latencies, 50), "latency_p99_s": percentile(latencies, 99),
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
            "latency_mean_s": statistics.fmean(latencies)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="base URL of a running server (default: start `glm5 serve` in its own process)")
    parser.add_argument("--model", default="nano", help="model id (and the preset served when starting one)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels")
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--threads", type=int, default=1,
                        help="engine torch threads of the started server (default 1: the other core runs the clients)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "serve.json"))
    args = parser.parse_args()

    async def run_all(url):
        await load(url, args.model, 2, 4, 4)  # warm-up
        rows = []
        for clients in args.clients:
            row = await load(url, args.model, clients, max(args.requests, clients), args.max_tokens)
            rows.append(row)
            print(f"{clients:3d} clients: {row['requests_per_s']:6.2f} req/s  {row['output_tok_s']:8.1f} tok/s  "
                  f"latency p50 {row['latency_p50_s'] * 1e3:7.1f} ms  p99 {row['latency_p99_s'] * 1e3:7.1f} ms  "
                  f"TTFT p50 {row['ttft_p50_s'] * 1e3:6.1f} ms  p99 {row['ttft_p99_s'] * 1e3:6.1f} ms", flush=True)
        return rows

    if args.url:
        rows = asyncio.run(run_all(args.url))
    else:
        import socket
        import subprocess
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "glm5.cli", "serve", "--preset", args.model, "--threads",
                                   str(args.threads), "--max-num-seqs", str(max(args.clients)), "--host", "127.0.0.1",
                                   "--port", str(port)])
        try:
            for _ in range(600):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                    break
                except OSError:
                    if server.poll() is not None:
                        raise SystemExit(f"glm5 serve exited with status {server.returncode}") from None
                    time.sleep(0.1)
            rows = asyncio.run(run_all(f"http://127.0.0.1:{port}/v1"))
        finally:
            server.terminate()
            server.wait(30)
    write_results(args.out, {"model": args.model, "url": args.url or "glm5 serve (subprocess)", "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
