"""Start `glm5 serve` as a child process for an agent run that names no endpoint, and stop it after.

    with local_server(log_path=Path("run/serve.log")) as base_url:   # newest runs/*/model, else --preset nano
        ...

The server binds a free loopback port; we wait for GET /health. It is stopped (SIGTERM, then SIGKILL) when
the block ends, also on Ctrl-C or an error. The agent still talks to it only over HTTP.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def newest_model(runs_dir: Path = Path("runs")) -> Path | None:
    """The most recently written `runs/*/model` checkpoint (a folder with config.json), if any."""
    found = [p.parent for p in Path(runs_dir).glob("*/model/config.json")]
    return max(found, key=lambda p: (p / "config.json").stat().st_mtime) if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(port: int, model: Path | None, extra: list[str] = ()) -> list[str]:
    source = ["--model", str(model)] if model is not None else ["--preset", "nano"]
    return [sys.executable, "-m", "glm5.cli", "serve", *source, "--host", "127.0.0.1", "--port", str(port), *extra]


@contextlib.contextmanager
def local_server(model: Path | None = None, log_path: Path | None = None, startup_timeout_s: float = 300.0,
                 extra_args: list[str] = ()):
    """Yield the base URL of a `glm5 serve` child process on a free loopback port."""
    model = model if model is not None else newest_model()
    port = free_port()
    command = serve_command(port, model, list(extra_args))
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    print(f"glm5 agent: starting {'model ' + str(model) if model else 'glm5 serve --preset nano (random weights)'} "
          f"on 127.0.0.1:{port}", file=sys.stderr)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if process.poll() is not None:
                tail = Path(log_path).read_text(errors="replace")[-800:] if log_path else ""
                raise OSError(f"glm5 serve exited with code {process.returncode} before it was ready: {tail.strip()}")
            try:
                if httpx.get(f"{base_url}/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise OSError(f"glm5 serve was not ready after {startup_timeout_s:.0f} s")
            time.sleep(0.25)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if log_path:
            log.close()
