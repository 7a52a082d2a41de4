"""A real glm5 server on a free loopback port, in a thread, for the serving tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(argv: list[str]):
    """Start `glm5 serve <argv>` in-process (uvicorn in a thread); yield (base_url, app); shut down after."""
    import uvicorn

    from glm5.cli import build_parser
    from glm5.serve.app import create_app
    from glm5.serve.cli import build_server

    args = build_parser().parse_args(["serve", *argv])
    engine, tokenizer, config = build_server(args)
    app = create_app(engine, tokenizer, config)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(30)
        engine.shutdown()
