"""A batch API for tests: the OpenAI Files and Batches endpoints on 127.0.0.1, with faults.

Routes: `POST /v1/files` (multipart upload, purpose=batch), `GET /v1/files/{id}/content`,
`POST /v1/batches`, `GET /v1/batches/{id}`, `GET /v1/batches` (newest first). A batch is worked
on in a thread by `process` (default: the answers of tests/fake_openai.py; the slow test hands
in vLLM's batch runner) and is `in_progress` for at least `polls` looks.

Faults (`faults`, each once unless said): "drop_create_after" (the batch is made, then the
connection is closed with no answer), "drop_create_before" (closed before anything is made),
"hang_create" (the create waits until `release()`, then closes without making the batch),
"cut_download" (the first download of an output file stops mid-line), "cut_line_always"
(every download of an output file has its first line cut in half), "junk_line" (every output
file ends with a line for a request never asked), "html_retrieve" (a look at a batch answered
200 with an HTML page), "expire" (every batch
ends `expired` with only its first half answered), "fail" (every batch ends `failed` with a
validation error). `billed` holds the usage of every answered request of a finished batch,
as a provider bills it, downloaded or not. `hold`: batches stay in progress until `release()`. `fail_prompts`: requests
whose user message contains one of these strings get HTTP 400 in the error file, with a message
that echoes the caller's API key (as some servers do).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from fake_openai import completion


def fake_process(lines: list[dict]) -> list[dict]:
    """Output lines for input lines: the fake server's answers."""
    out = []
    for i, item in enumerate(lines):
        body = item["body"]
        prompt = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
        k = body.get("top_logprobs") if "messages" in body else body.get("logprobs")
        answer = completion(prompt, body.get("n", 1), k or 1, body.get("max_tokens") or 16,
                            "chat" if "messages" in body else "completions")
        out.append({"id": f"batch_req_{i}", "custom_id": item["custom_id"],
                    "response": {"status_code": 200, "request_id": f"req_{i}", "body": answer},
                    "error": None})
    return out


class FakeBatchServer:
    def __init__(self, process=fake_process, polls: int = 1, faults: set[str] | None = None,
                 hold: bool = False, fail_prompts: tuple[str, ...] = ()):
        self.process, self.polls, self.faults = process, polls, set(faults or ())
        self.fail_prompts = fail_prompts
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.looks: Counter = Counter()
        self.calls: Counter = Counter()
        self.billed: list[tuple[int, int]] = []  # (prompt, completion) of each answer made
        self.lock = threading.Lock()
        self.released = threading.Event()
        if not hold:
            self.released.set()
        self.hold = hold
        self.create_seen = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, payload, raw: bytes | None = None,
                      kind: str = "application/json"):
                body = raw if raw is not None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _drop(self):
                self.close_connection = True
                self.connection.shutdown(2)

            def do_GET(self):
                url = urlparse(self.path)
                parts = url.path.strip("/").split("/")  # v1, files|batches, id, content
                if parts[1:2] == ["files"] and len(parts) == 4:
                    server.calls["download"] += 1
                    if parts[2].startswith("file-out"):
                        server.calls["download_output"] += 1
                    data = server.files.get(parts[2])
                    if data is None:
                        return self._send(404, {"error": {"message": "no such file"}})
                    if "cut_download" in server.faults and parts[2].startswith("file-out"):
                        server.faults.discard("cut_download")
                        data = data[:len(data) // 2 + 7]  # mid-line, Content-Length to match
                    if parts[2].startswith("file-out"):
                        if "cut_line_always" in server.faults:
                            first, rest = data.split(b"\n", 1)
                            data = first[:len(first) // 2] + b"\n" + rest
                        if "junk_line" in server.faults:
                            data += json.dumps({"custom_id": "never-asked", "response": {
                                "status_code": 200, "body": {"choices": []}}}).encode() + b"\n"
                    return self._send(200, None, raw=data)
                if parts[1:2] == ["batches"] and len(parts) == 3:
                    server.calls["retrieve"] += 1
                    if "html_retrieve" in server.faults:
                        server.faults.discard("html_retrieve")
                        return self._send(200, None, raw=b"<html>Gateway sign-in</html>",
                                          kind="text/html")
                    with server.lock:
                        batch = server.batches.get(parts[2])
                        if batch is None:
                            return self._send(404, {"error": {"message": "no such batch"}})
                        server.looks[batch["id"]] += 1
                        shown = server._shown(batch)
                    return self._send(200, shown)
                if parts[1:2] == ["batches"]:
                    server.calls["list"] += 1
                    limit = int(parse_qs(url.query).get("limit", ["20"])[0])
                    with server.lock:
                        data = [server._shown(b) for b in sorted(
                            server.batches.values(), key=lambda b: -b["created_at"])][:limit]
                    return self._send(200, {"object": "list", "data": data,
                                            "has_more": False})
                self._send(200, {"data": [{"id": "fake"}]})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                path = urlparse(self.path).path
                if path.endswith("/files"):
                    server.calls["upload"] += 1
                    head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
                    message = BytesParser().parsebytes(head + raw)
                    fields = {p.get_param("name", header="content-disposition"):
                              p.get_payload(decode=True) for p in message.get_payload()}
                    with server.lock:
                        file_id = f"file-in-{len(server.files)}"
                        server.files[file_id] = fields["file"]
                    return self._send(200, {"id": file_id, "object": "file",
                                            "bytes": len(fields["file"]), "created_at": 0,
                                            "filename": "input.jsonl", "purpose": "batch"})
                if path.endswith("/batches"):
                    server.calls["create"] += 1
                    server.create_seen.set()
                    if "drop_create_before" in server.faults:
                        server.faults.discard("drop_create_before")
                        return self._drop()
                    if "hang_create" in server.faults:
                        server.faults.discard("hang_create")
                        server.released.wait(60)
                        return self._drop()
                    request = json.loads(raw)
                    batch = server._create(request, self.headers.get("Authorization", ""))
                    if "drop_create_after" in server.faults:
                        server.faults.discard("drop_create_after")
                        return self._drop()
                    return self._send(200, server._shown(batch))
                self._send(404, {"error": {"message": f"no route {path}"}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    # -- the batches --------------------------------------------------------------------
    def _create(self, request: dict, authorization: str) -> dict:
        data = self.files[request["input_file_id"]]
        lines = [json.loads(x) for x in data.decode().splitlines() if x.strip()]
        with self.lock:
            batch_id = f"batch_{len(self.batches)}"
            batch = {"id": batch_id, "object": "batch", "endpoint": request["endpoint"],
                     "input_file_id": request["input_file_id"],
                     "completion_window": request["completion_window"],
                     "metadata": request.get("metadata"), "status": "validating",
                     "created_at": time.time() + len(self.batches) * 1e-3,
                     "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                     "output_file_id": None, "error_file_id": None, "errors": None,
                     "_done": False, "_lines": lines}
            self.batches[batch_id] = batch
        threading.Thread(target=self._work, args=(batch, authorization), daemon=True).start()
        return batch

    def _work(self, batch: dict, authorization: str) -> None:
        lines = batch["_lines"]
        if "fail" in self.faults:
            with self.lock:
                batch.update(status="failed", _done=True, errors={"object": "list", "data": [
                    {"code": "invalid_request", "message": "the input file is not valid",
                     "line": 1}]})
            return
        keep = lines[:len(lines) // 2] if "expire" in self.faults else lines
        failing = [x for x in keep if any(s in json.dumps(x["body"])
                                          for s in self.fail_prompts)]
        asked = [x for x in keep if x not in failing]
        answers = self.process(asked) if asked else []
        errors = [{"id": f"batch_req_f{i}", "custom_id": x["custom_id"], "response": {
            "status_code": 400, "request_id": f"req_f{i}", "body": {"error": {
                "message": f"Incorrect API key provided: {authorization.split()[-1]}",
                "type": "invalid_request_error"}}}, "error": None}
            for i, x in enumerate(failing)]
        errors += [{"id": f"batch_req_e{i}", "custom_id": x["custom_id"], "response": None,
                    "error": {"code": "batch_expired", "message": "This request could not be "
                              "executed before the completion window expired."}}
                   for i, x in enumerate(lines[len(keep):])]
        self.released.wait(120)
        with self.lock:
            n = len(self.files)
            if answers:
                self.files[f"file-out-{n}"] = "".join(json.dumps(a) + "\n"
                                                      for a in answers).encode()
                batch["output_file_id"] = f"file-out-{n}"
            if errors:
                self.files[f"file-err-{n}"] = "".join(json.dumps(e) + "\n"
                                                      for e in errors).encode()
                batch["error_file_id"] = f"file-err-{n}"
            ok = sum(1 for a in answers if a["response"]["status_code"] == 200)
            # the provider bills a batch's answered requests when the batch ends, whether or
            # not their output file is ever downloaded
            for a in answers:
                if a["response"]["status_code"] == 200:
                    usage = a["response"]["body"].get("usage") or {}
                    self.billed.append((usage.get("prompt_tokens", 0),
                                        usage.get("completion_tokens", 0)))
            batch["request_counts"] = {"total": len(lines), "completed": ok,
                                       "failed": len(lines) - ok}
            batch["status"] = "expired" if "expire" in self.faults else "completed"
            batch["_done"] = True

    def _shown(self, batch: dict) -> dict:
        """The batch as the API shows it now: in progress until its work is done and it has
        been looked at `polls` times."""
        out = {k: v for k, v in batch.items() if not k.startswith("_")}
        if not batch["_done"] or self.looks[batch["id"]] < self.polls:
            out.update(status="in_progress", output_file_id=None, error_file_id=None,
                       errors=None)
        return out

    def release(self) -> None:
        self.released.set()

    def submitted(self) -> list[dict]:
        """The batches made, oldest first, each with its number of requests."""
        return [{"id": b["id"], "requests": len(b["_lines"]), "status": b["status"]}
                for b in sorted(self.batches.values(), key=lambda b: b["created_at"])]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def vllm_process(model: str, workdir, dtype: str = "float32", timeout: float = 900.0):
    """A `process` that hands the batch to vLLM's batch runner (`python -m
    vllm.entrypoints.openai.run_batch`), the real component that reads our input file and
    writes the output lines; `model`: a model folder, served under its folder name."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    def process(lines: list[dict]) -> list[dict]:
        folder = Path(workdir)
        folder.mkdir(parents=True, exist_ok=True)
        given, made = folder / "input.jsonl", folder / "output.jsonl"
        given.write_text("".join(json.dumps(x) + "\n" for x in lines))
        names = {x["body"]["model"] for x in lines}
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
        done = subprocess.run(
            [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(given),
             "-o", str(made), "--model", str(model), "--served-model-name", *sorted(names),
             "--dtype", dtype, "--enforce-eager", "--max-logprobs", "20",
             "--no-enable-chunked-prefill"], capture_output=True, text=True, timeout=timeout,
            env=env)
        if done.returncode != 0:
            raise RuntimeError(f"vLLM's batch runner failed:\n{done.stderr[-3000:]}")
        return [json.loads(x) for x in made.read_text().splitlines() if x.strip()]

    return process
