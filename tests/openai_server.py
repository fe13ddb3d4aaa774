"""A real OpenAI-compatible chat-completions server on loopback that injects faults, for tests and benchmarks.

    with OpenAIServer(reply=lambda body: "Answer: 4", faults={"429": 0.05, "500": 0.05, "timeout": 0.05,
                      "truncated": 0.05}, latency_s=0.01, api_key="sk-test") as server:
        ... base_url = server.base_url  # http://127.0.0.1:<port>/v1

`reply(body) -> str` scripts the assistant text from the request JSON (default: echoes the last user
message). Each request draws at most one fault: HTTP 429 (with Retry-After: 0), HTTP 500, a hang of
`hang_s` (the client's timeout fires), a 200 whose JSON is cut in half, or a reply cut at the token limit
(half the text, finish_reason "length"). Counters in `server.stats`;
request bodies and headers in `server.bodies` / `server.headers_seen` (unless record=False).
It runs an aiohttp server on its own event loop in a daemon thread, bound to 127.0.0.1 port 0 (a free port).

As a separate process (benchmarks, so client and server do not share one interpreter):
    python tests/openai_server.py --latency_s 0.05  # prints the base URL on its first line, serves until killed
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import socket
import threading
from typing import Callable

from aiohttp import web

FAULTS = ("429", "500", "timeout", "truncated", "length")


def echo_reply(body: dict) -> str:
    users = [m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user"]
    return f"You said: {users[-1] if users else ''}"


class OpenAIServer:
    def __init__(self, reply: Callable[[dict], str] = echo_reply, faults: dict[str, float] | None = None,
                 latency_s: float = 0.0, hang_s: float = 5.0, api_key: str | None = None, seed: int = 0,
                 port: int = 0, record: bool = True):
        faults = dict(faults or {})
        unknown = set(faults) - set(FAULTS)
        if unknown or sum(faults.values()) > 1:
            raise ValueError(f"faults: keys from {FAULTS}, rates summing to <= 1; got {faults}")
        self.reply, self.faults, self.latency_s, self.hang_s = reply, faults, latency_s, hang_s
        self.api_key, self.port, self.record = api_key, port, record
        self._rng = random.Random(seed)
        self.stats: collections.Counter = collections.Counter()
        self.bodies: list[dict] = []  # every request body that reached the server (successful or not)
        self.headers_seen: list[dict] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _draw_fault(self) -> str | None:
        x, acc = self._rng.random(), 0.0
        for kind in FAULTS:
            acc += self.faults.get(kind, 0.0)
            if x < acc:
                return kind
        return None

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.stats["requests"] += 1
        if self.record:
            self.headers_seen.append(dict(request.headers))
        if self.api_key is not None and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            self.stats["unauthorized"] += 1
            return web.json_response({"error": {"message": "invalid api key"}}, status=401)
        try:
            body = await request.json()
        except json.JSONDecodeError:
            self.stats["bad_request"] += 1
            return web.json_response({"error": {"message": "body is not JSON"}}, status=400)
        if self.record:
            self.bodies.append(body)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        fault = self._draw_fault()
        if fault:
            self.stats[fault] += 1
        if fault == "429":
            return web.json_response({"error": {"message": "rate limited"}}, status=429, headers={"Retry-After": "0"})
        if fault == "500":
            return web.json_response({"error": {"message": "internal error"}}, status=500)
        if fault == "timeout":
            await asyncio.sleep(self.hang_s)
        try:
            content = self.reply(body)
        except Exception as e:  # a scripted reply may reject a request on purpose (e.g. a 400 test)
            self.stats["reply_error"] += 1
            return web.json_response({"error": {"message": str(e)}}, status=400)
        finish = "stop"
        if fault == "length":
            content, finish = content[: len(content) // 2], "length"
        payload = json.dumps({
            "id": f"chatcmpl-{self.stats['requests']}", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        })
        if fault == "truncated":
            payload = payload[: len(payload) // 2]
        else:
            self.stats["ok"] += 1
        return web.Response(text=payload, content_type="application/json")

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))  # port 0: the OS picks a free one
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock, backlog=1024).start()

    def start(self) -> "OpenAIServer":
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def serve():
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("loopback OpenAI server did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None

    def __enter__(self) -> "OpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latency_s", type=float, default=0.0)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--hang_s", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    for kind in FAULTS:
        ap.add_argument(f"--fault_{kind}", type=float, default=0.0)
    a = ap.parse_args()
    server = OpenAIServer(latency_s=a.latency_s, port=a.port, record=False, hang_s=a.hang_s, seed=a.seed,
                          faults={k: getattr(a, f"fault_{k}") for k in FAULTS if getattr(a, f"fault_{k}")})
    server.start()
    print(server.base_url, flush=True)
    threading.Event().wait()
