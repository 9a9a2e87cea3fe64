"""A small OpenAI-compatible server for tests (the chat completions and completions routes):
real HTTP on 127.0.0.1, scripted failures.

Each request's user message selects its script (`SCRIPTS`), a list of what to do on the first,
second, ... attempt: "ok", "429" (with Retry-After), "500", "400" (permanent), "stall" (answer
after the client's timeout), "malformed" (200 with a body that is not JSON), "html" (200 with
a proxy's HTML page, Content-Type text/html), "truncated"
(200 whose body stops short of its Content-Length), "drop" (the connection closed with no
answer), "401" (a rejected key, whose message echoes the key it was sent, as some servers do)
or "404" (no such model). Unscripted prompts get `default` ("ok" unless told).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VOCAB = 100


def _pieces(text: str, n: int) -> list[str]:
    step = -(-len(text) // n)
    return [text[i:i + step] for i in range(0, len(text), step)]


def completion(prompt: str, n: int, k: int, max_tokens: int, endpoint: str = "chat",
               stop_token: bool = False, strings: bool = False, usage: bool = True) -> dict:
    """A deterministic answer of up to 5 tokens (ids 10..14) spelling "answer {i} to {prompt}",
    with top-k holding the sampled token last. `stop_token` appends, like vLLM, the token that
    hit the stop string: returned with its log-probabilities, absent from the text. `strings`
    names tokens by their text, as hosted APIs do, instead of vLLM's "token_id:N"."""
    choices = []
    for i in range(n):
        text = f"answer {i} to {prompt}"
        pieces = _pieces(text, min(5, max_tokens)) + (["\n"] if stop_token else [])
        tokens, entries = [], []
        for t, piece in enumerate(pieces):
            name = piece if strings else f"token_id:{10 + t}"
            tops = [(f"alt{j}" if strings else f"token_id:{50 + j}", -1.0 - j)
                    for j in range(k - 1)]
            tops.append((name, -0.5))
            tokens.append(name)
            entries.append({"token": name, "logprob": -0.5,
                            "bytes": list(piece.encode()),
                            "top_logprobs": [{"token": a, "logprob": b, "bytes": None}
                                             for a, b in tops]})
        if endpoint == "chat":
            choices.append({"index": i, "finish_reason": "stop",
                            "logprobs": {"content": entries},
                            "message": {"role": "assistant", "content": text}})
        else:
            choices.append({"index": i, "finish_reason": "stop", "text": text, "logprobs": {
                "tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]}
                                 for e in entries],
                "text_offset": [0] * len(entries)}})
    out = {"id": "x", "object": "chat.completion" if endpoint == "chat" else "text_completion",
           "created": 0, "model": "fake", "choices": choices}
    if usage:  # prompt tokens: one per 4 bytes; completion: every token of every choice
        completion_tokens = sum(len((c.get("logprobs") or {}).get("content")
                                    or (c.get("logprobs") or {}).get("tokens") or [])
                                for c in choices)
        prompt_tokens = len(prompt.encode()) // 4 + 1
        out["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens}
    return out


class FakeServer:
    def __init__(self, scripts: dict[str, list[str]] | None = None, stall_seconds: float = 2.0,
                 delay: float = 0.0, stop_token: bool = False, strings: bool = False,
                 default: str = "ok", usage: bool = True):
        self.usage = usage
        self.billed: list[tuple[int, int]] = []  # (prompt, completion) of each answer sent
        self.scripts = scripts or {}
        self.default = default
        self.stop_token = stop_token
        self.strings = strings
        self.delay = delay
        self.stall_seconds = stall_seconds
        self.attempts: Counter = Counter()
        self.times: dict[str, list[float]] = {}
        self.successes: Counter = Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

            def log_message(self, *args):
                pass

            def do_GET(self):
                self._send(200, json.dumps({"data": [{"id": "fake"}]}).encode())

            def _send(self, status, body, headers=None, length=None,
                      kind="application/json"):
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(length or len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint = "chat" if self.path.endswith("/chat/completions") else "completions"
                prompt = body["messages"][-1]["content"] if endpoint == "chat" else body["prompt"]
                k = body["top_logprobs"] if endpoint == "chat" else body["logprobs"]
                with server.lock:
                    attempt = server.attempts[prompt]
                    server.attempts[prompt] += 1
                    server.times.setdefault(prompt, []).append(time.monotonic())
                script = server.scripts.get(prompt, [])
                action = script[attempt] if attempt < len(script) else (
                    "ok" if script else server.default)
                if action == "401":
                    sent = self.headers.get("Authorization", "")
                    self._send(401, json.dumps({"error": {
                        "message": f"Incorrect API key provided: {sent.split()[-1]}. You can "
                                   "find your API key at https://example.invalid/keys",
                        "type": "invalid_request_error", "code": "invalid_api_key"}}).encode())
                elif action == "404":
                    self._send(404, json.dumps({"error": {
                        "message": f"The model `{body.get('model')}` does not exist."}}).encode())
                elif action == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                elif action == "429":
                    self._send(429, b'{"error": {"message": "slow down"}}',
                               {"Retry-After": "0.2"})
                elif action == "500":
                    self._send(500, b'{"error": {"message": "boom"}}')
                elif action == "400":
                    self._send(400, b'{"error": {"message": "bad request"}}')
                elif action == "stall":
                    time.sleep(server.stall_seconds)
                    self._send(200, json.dumps(completion(prompt, body.get("n", 1), k, 5,
                                                          endpoint)).encode())
                elif action == "malformed":
                    self._send(200, b"{this is not json")
                elif action == "html":
                    self._send(200, b"<html><body>Gateway sign-in</body></html>",
                               kind="text/html; charset=utf-8")
                elif action == "truncated":
                    self._send(200, b'{"id": "x", "choi', length=500)
                    self.close_connection = True
                else:
                    time.sleep(server.delay)
                    payload = completion(prompt, body.get("n", 1), k,
                                         body.get("max_tokens") or 16, endpoint,
                                         server.stop_token, server.strings, server.usage)
                    with server.lock:
                        server.successes[prompt] += 1
                        usage = payload.get("usage") or {}
                        server.billed.append((usage.get("prompt_tokens", 0),
                                              usage.get("completion_tokens", 0)))
                    self._send(200, json.dumps(payload).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
