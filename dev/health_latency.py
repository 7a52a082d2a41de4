"""/health latency while long prompts arrive: is the event loop free while the server tokenizes?

    python dev/health_latency.py                                   # nano, 2 x 4 MB and 4 x 300 KB chat prompts
    python dev/health_latency.py --big 2 --big-mb 4 --mid 4 --mid-kb 300 --out /tmp/health.json

Starts `glm5 serve --preset nano` in-process (uvicorn on a thread), sends the long prompts concurrently and polls
/health every 20 ms meanwhile; prints the /health latencies (median, max) and what the long requests got.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import threading
import time

import httpx


def start_server(argv):
    import uvicorn

    from glm5.cli import build_parser
    from glm5.serve.app import create_app
    from glm5.serve.cli import build_server

    engine, tokenizer, config = build_server(build_parser().parse_args(["serve", *argv]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, tokenizer, config), host="127.0.0.1", port=port,
                                           log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server, engine


def words(n_bytes: int, seed: int) -> str:
    rng = random.Random(seed)  # varied words: no tokenizer cache hits
    out, size = [], 0
    while size < n_bytes:
        w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) + " "
        out.append(w)
        size += len(w)
    return "".join(out)


async def measure(url: str, prompts: list[str]) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        latencies, stop = [], asyncio.Event()

        async def poll():
            while not stop.is_set():
                t = time.perf_counter()
                await client.get("/health")
                latencies.append(time.perf_counter() - t)
                await asyncio.sleep(0.02)

        async def send(prompt):
            t = time.perf_counter()
            r = await client.post("/v1/chat/completions", json={
                "model": "nano", "max_tokens": 2, "messages": [{"role": "user", "content": prompt}]})
            return r.status_code, round(time.perf_counter() - t, 3)

        poller = asyncio.create_task(poll())
        await asyncio.sleep(0.2)
        results = await asyncio.gather(*(send(p) for p in prompts))
        stop.set()
        await poller
    return {"health_median_s": round(statistics.median(latencies), 4), "health_max_s": round(max(latencies), 3),
            "health_polls": len(latencies), "long_requests": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big", type=int, default=2, help="prompts of --big-mb MB")
    parser.add_argument("--big-mb", type=float, default=3.9, help="size of a big prompt (the body cap is 4 MiB)")
    parser.add_argument("--mid", type=int, default=4, help="prompts of --mid-kb KB")
    parser.add_argument("--mid-kb", type=float, default=300, help="size of a mid prompt (within nano's byte bound)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    url, server, engine = start_server(["--preset", "nano", "--threads", "1"])
    report = {}
    try:
        for name, count, size in (("big", args.big, int(args.big_mb * 1e6)), ("mid", args.mid, int(args.mid_kb * 1e3))):
            if count:
                report[name] = asyncio.run(measure(url, [words(size, i) for i in range(count)]))
                print(name, json.dumps(report[name]), flush=True)
    finally:
        server.should_exit = True
        engine.shutdown()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
