"""A stand-in for the Gemini API on 127.0.0.1, for the real google-genai SDK to talk to.

It answers `POST /<version>/models/<model>:generateContent` the way the Gemini API does: a JSON
body whose candidates[0].content.parts[0].text holds the model's text, or an error body
{"error": {code, message, status}} with the HTTP status. Tests script the replies in order
(`script(...)`); when the script runs out, `default` answers: by default a valid proposal that
weighs the i-th worker of the response schema's enum by i + 1, with confidence 0.9.

Every request is recorded (path, headers, JSON body), so tests can read the prompt the master
sent. The server runs in a daemon thread; a slow reply sleeps in its own handler thread.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

API_KEY = "test-key-never-logged-4f2a"


@dataclass(frozen=True)
class Reply:
    status: int = 200
    text: str | None = None  # the model's text (status 200)
    body: dict[str, Any] | None = None  # a whole response body instead
    delay_s: float = 0.0


@dataclass(frozen=True)
class Request:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def prompt(self) -> str:
        return "".join(p.get("text", "") for c in self.body["contents"] for p in c["parts"])

    @property
    def worker_ids(self) -> list[str]:
        """The ids the response schema allows (the workers the master asked about)."""
        schema = self.body["generationConfig"]["responseSchema"]
        ids: list[str] = schema["properties"]["weights"]["items"]["properties"]["worker_id"]["enum"]
        return ids

    @property
    def workers(self) -> list[dict[str, Any]]:
        """The contributors' facts as the prompt lists them (the JSON after "Workers (JSON):")."""
        _, _, tail = self.prompt.partition("Workers (JSON):\n")
        facts: list[dict[str, Any]] = json.loads(tail)
        return facts


Responder = Callable[[Request], Reply]


def proposal(
    weights: dict[str, float] | list[Any],
    confidence: float = 0.9,
    reasoning: str = "w1 has more data and a falling loss",
) -> str:
    """The JSON text a model following the response schema answers with."""
    entries = (
        [{"worker_id": w, "weight": x} for w, x in weights.items()]
        if isinstance(weights, dict)
        else weights
    )
    return json.dumps({"weights": entries, "reasoning": reasoning, "confidence": confidence})


def ranked_proposal(request: Request) -> Reply:
    """A valid answer for whatever workers were asked about: the i-th weighs i + 1."""
    return Reply(text=proposal({w: i + 1.0 for i, w in enumerate(request.worker_ids)}))


def error(status: int, message: str, code_name: str) -> Reply:
    return Reply(
        status=status, body={"error": {"code": status, "message": message, "status": code_name}}
    )


QUOTA = error(429, "Resource has been exhausted (e.g. check quota).", "RESOURCE_EXHAUSTED")
INTERNAL = error(500, "An internal error has occurred.", "INTERNAL")


class GeminiStandIn:
    def __init__(self, default: Responder = ranked_proposal) -> None:
        self.default = default
        self.requests: list[Request] = []
        self._script: deque[Reply | Responder] = deque()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def script(self, *replies: Reply | Responder) -> None:
        with self._lock:
            self._script.extend(replies)

    def start(self) -> GeminiStandIn:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _reply_for(self, request: Request) -> Reply:
        with self._lock:
            self.requests.append(request)
            scripted = self._script.popleft() if self._script else self.default
        return scripted if isinstance(scripted, Reply) else scripted(request)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's naming
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                request = Request(self.path, dict(self.headers.items()), body)
                reply = standin._reply_for(request)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                payload = reply.body if reply.body is not None else _candidates(reply.text or "")
                data = json.dumps(payload).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json; charset=UTF-8")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (the timeout tests)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def _candidates(text: str) -> dict[str, Any]:
    return {
        "candidates": [
            {
                "content": {"role": "model", "parts": [{"text": text}]},
                "finishReason": "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": {"promptTokenCount": 100, "candidatesTokenCount": 20},
        "modelVersion": "gemini-standin",
    }


@contextmanager
def running(default: Responder = ranked_proposal) -> Iterator[GeminiStandIn]:
    server = GeminiStandIn(default).start()
    try:
        yield server
    finally:
        server.stop()
