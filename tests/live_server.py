"""A real `ia3 serve` app on a loopback port for tests: uvicorn in a background thread, driven with httpx."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import uvicorn

from ia3.serve import ServeConfig, create_app
from ia3.serve.http import uvicorn_config


class LiveServer:
    """`create_app(config)` served by uvicorn in a background thread on a free loopback port."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.app = create_app(config)
        self.service = self.app.state.service
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn_config(self.app, config, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def post(self, path: str, **kwargs):
        return self.client.post(path, **kwargs)

    def close(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(15)
