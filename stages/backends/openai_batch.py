"""Batch mode of the `openai` backend (`generate.transport=batch`): a shard's requests go to
the provider's batch API instead of one by one, for half the price.

The protocol (the OpenAI Batch API, https://platform.openai.com/docs/api-reference/batch):
the requests are written as a JSONL file (`custom_id`, `method`, `url`, `body` per line),
uploaded with the Files API (`purpose=batch`), submitted as a batch with a completion window,
polled until it ends (`completed`, `expired`, `failed` or `cancelled`), and its output and
error files are downloaded. Every answered request lands in the request cache like a live
response (marked as a batch one, for its price), so the shard is then made exactly as in live
mode, and a request that failed or expired is the row's error, for `--retry-failed`.

Nothing is submitted twice. A call's requests that the cache does not answer and no
unfinished batch holds are one *request set* (named by the hash of their keys; a batch left
unfinished by a kill is resumed first); its record, `generate/batches/<set>.json` (kept with
the request cache when the stage's output is set aside), is written before every step that
waits on the provider: the input file's id after the upload, `submitting` before the batch is
created, the batch id as soon as it is known. A kill at any point resumes from the record: an
upload is repeated at most (files cost nothing), a batch whose creation was cut off is found
by the request set in its metadata before anything is submitted again, and a batch already
submitted is polled and downloaded by its id. A download cut short (a line that is not whole
JSON, fewer answers than the batch counted) is downloaded again.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path

from pipeline.log import log
from pipeline.secrets import scrub
from stages.backends.base import BudgetReached, NotJSONAnswer, TeacherUnavailable
from stages.backends.openai_client import PaidRequests, api_client
from stages.backends.request_cache import request_key

TERMINAL = ("completed", "expired", "failed", "cancelled")
METADATA_KEY = "distill_request_set"


class BatchInterrupted(TeacherUnavailable):
    """A batch step that cannot go on now (a submit that failed, a download not whole): the
    stage stops, its record kept, and the same command resumes it."""


class DamagedBatchRecord(TeacherUnavailable):
    """A batch's record or input file cannot be read: the stage stops before anything is
    submitted again (the batch it records may be running, and paid for, at the provider)."""

    def __init__(self, path: Path, why: str, name: str):
        super().__init__(
            f"{path} is damaged ({why}). It records request set {name}, whose batch may be "
            f"running at the provider: nothing was submitted. Look for a batch whose metadata "
            f"holds {METADATA_KEY}={name} in the provider's batch list; restore the file from "
            "a backup, or move it and its .json/.jsonl partner aside to submit the set again "
            "(paid again if that batch was already run)")


DOWNLOAD_TRIES = 3


def request_set(keys: list[str]) -> str:
    """The name of a call's requests: the hash of their sorted keys."""
    return hashlib.sha256("\n".join(sorted(set(keys))).encode()).hexdigest()[:24]


def batch_line(key: str, body: dict, url: str) -> dict:
    """One line of a batch input file: the request body as it would be sent live, with the
    extra fields (`extra_body`) merged in, as the batch API reads them."""
    flat = {k: v for k, v in body.items() if k != "extra_body"}
    flat.update(body.get("extra_body") or {})
    return {"custom_id": key, "method": "POST", "url": url, "body": flat}


def read_lines(text: str) -> tuple[list[dict], int]:
    """The whole JSON lines of a downloaded file, and how many lines were not whole."""
    good, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(item, dict) and item.get("custom_id"):
            good.append(item)
        else:
            bad += 1
    return good, bad


def _not_an_object(cfg, what: str, answer) -> str:
    start = " ".join(str(answer).split())[:60]
    return (f"the batch API at {cfg.base_url or 'the OpenAI API'} answered the call to {what} "
            f"with a body that is not JSON (it starts {start!r}): is a proxy or a gateway "
            "answering instead of the server?")


def _error_text(item: dict) -> str:
    """Why a batch line holds no answer, from its `error` or its response's status."""
    error = item.get("error") or {}
    response = item.get("response") or {}
    if error:
        return f"batch request failed: {error.get('code') or ''} {error.get('message') or ''}"
    body = response.get("body") or {}
    detail = body.get("error") if isinstance(body, dict) else None
    if isinstance(detail, dict):
        detail = detail.get("message")
    return f"batch request failed: HTTP {response.get('status_code')} {detail or ''}".strip()


class BatchTransport:
    """Sends a call's requests as one batch and answers them into the backend's request cache.
    `failed` holds, after `run`, why each request of the call without an answer has none."""

    def __init__(self, paid: PaidRequests, folder: Path):
        cfg = paid.cfg
        self.paid, self.cfg, self.folder = paid, cfg, folder
        self.client = api_client(cfg)  # no retries of its own: a retried create submits twice
        self.url = "/v1/chat/completions" if cfg.endpoint == "chat" else "/v1/completions"
        self.failed: dict[str, str] = {}
        self.fresh: set[str] = set()  # the keys this process's batches answered
        self.stats = {"batches": 0, "uploads": 0, "downloads": 0}

    # -- the record ------------------------------------------------------------------------
    def _save(self, path: Path, record: dict) -> None:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:  # on disk before it replaces the record (a power cut)
            f.write(json.dumps(record, indent=1, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @staticmethod
    def _read(path: Path) -> dict:
        """A batch record, checked: a damaged one names itself and stops the stage."""
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict) or not {"request_set", "input"} <= set(record):
                raise ValueError("not a batch record")
        except (ValueError, UnicodeDecodeError) as error:
            raise DamagedBatchRecord(path, f"{type(error).__name__}: {error}",
                                     path.stem) from None
        return record

    def _call(self, what: str, fn, expect: str | None = None):
        """A Files/Batches call, retried on what a retry can fix (not used for `create`);
        `expect`: an attribute the answer must have (an answer that is not the JSON object
        the endpoint promises, such as a gateway's HTML page, is retried like a 5xx)."""
        import openai

        for attempt in range(self.cfg.max_retries + 1):
            try:
                result = fn()
                if expect is not None and not hasattr(result, expect):
                    raise NotJSONAnswer(_not_an_object(self.cfg, what, result))
                return result
            except NotJSONAnswer as error:
                last = error
            except openai.APIStatusError as error:
                status = error.status_code
                if status in (401, 403, 404) or status < 500 and status not in (408, 409, 429):
                    raise TeacherUnavailable(
                        f"the batch API at {self.cfg.base_url or 'the OpenAI API'} refused to "
                        f"{what} (HTTP {status}): {scrub(str(error))[:300]}") from None
                last = error
            except (openai.APIConnectionError, openai.APITimeoutError) as error:
                last = error
            time.sleep(random.uniform(0, min(self.cfg.backoff_max, 0.5 * 2 ** attempt)))
        raise BatchInterrupted(f"could not {what} after {self.cfg.max_retries + 1} tries "
                               f"({scrub(str(last))[:300]}); what was done is recorded in "
                               f"{self.folder}: run the same command again to go on")

    # -- the protocol ----------------------------------------------------------------------
    def run(self, bodies: list[dict]) -> None:
        """Have every request of `bodies` answered through a batch (or found in the cache).

        First every batch a kill left unfinished that holds one of the unanswered requests is
        resumed (never submitted again); what is still unanswered and in no such batch is
        submitted as a new request set. A request that failed or expired in a batch (the
        provider bills neither) is submitted again only by a later call that asks for it:
        `--retry-failed`, or a rerun of a shard whose failures were never written."""
        cache = self.paid.cache
        self.failed = {}
        missing: dict[str, dict] = {}
        for body in bodies:
            key = request_key(body)
            if key not in missing and cache.usage(key) is None:
                missing[key] = body
        if not missing:
            return
        for path in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []:
            record = self._read(path)
            if record.get("state") == "downloaded":
                continue
            held = self._keys(record)
            if held & set(missing):
                log("generate", f"resuming the batch of request set {record['request_set']} "
                    f"({record.get('batch_id') or 'not yet submitted'})")
                self._finish(path, record)
                for key in held & set(missing):
                    del missing[key]
                    if key in record.get("failed", {}):
                        self.failed[key] = record["failed"][key]
        if not missing:
            return
        budget = self.paid.budget
        if budget.on:
            worst = [self.paid.worst_case(b) for b in missing.values()]
            cost, tokens = sum(w[0] for w in worst), sum(w[1] for w in worst)
            if not budget.reserve(cost, tokens):
                raise BudgetReached(budget.stopped(f"batch ({len(missing)} requests)"))
            budget.release(cost, tokens)
        name = base = request_set(list(missing))
        again = 1
        while (self.folder / f"{name}.json").exists():  # the same requests, failed before
            again += 1
            name = f"{base}-{again}"
        self.folder.mkdir(parents=True, exist_ok=True)
        lines = self.folder / f"{name}.jsonl"
        tmp = lines.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for key, body in missing.items():
                f.write(json.dumps(batch_line(key, body, self.url)) + "\n")
        os.replace(tmp, lines)
        path = self.folder / f"{name}.json"
        record = {"request_set": name, "requests": len(missing), "url": self.url,
                  "input": lines.name, "created": time.time()}
        self._save(path, record)
        self._finish(path, record)
        self.failed.update(record.get("failed", {}))

    def _items(self, record: dict) -> list[dict]:
        """The lines of a request set's input file (checked by `_keys` first)."""
        return [json.loads(line) for line in
                (self.folder / record["input"]).read_text().splitlines() if line.strip()]

    def _keys(self, record: dict) -> set[str]:
        """The request keys of a request set (from its input file, checked against the count
        its record holds: an input file cut short would let its requests be sent again)."""
        path = self.folder / record["input"]
        try:
            keys = {json.loads(line)["custom_id"] for line in
                    path.read_text().splitlines() if line.strip()}
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
            raise DamagedBatchRecord(path, f"{type(error).__name__}: {error}",
                                     record["request_set"]) from None
        if record.get("requests") is not None and len(keys) != record["requests"]:
            raise DamagedBatchRecord(path, f"{len(keys)} requests where its record says "
                                     f"{record['requests']}", record["request_set"])
        return keys

    def _finish(self, path: Path, record: dict) -> None:
        """Upload, submit, wait for and download a request set, from where its record says
        it stopped."""
        self._upload(path, record)
        batch = self._submit(path, record)
        batch = self._wait(path, record, batch)
        self._download(path, record, batch)

    def _upload(self, path: Path, record: dict) -> None:
        if record.get("input_file_id"):
            return
        data = (self.folder / record["input"]).read_bytes()
        uploaded = self._call("upload the batch input file", lambda: self.client.files.create(
            file=(record["input"], data), purpose="batch"), expect="id")
        self.stats["uploads"] += 1
        record["input_file_id"] = uploaded.id
        self._save(path, record)

    def _find(self, record: dict):
        """The batch submitted for the record's request set, if the provider has one: the
        batches listed newest first, back to a day and two hours before the record was made
        (a batch's completion window and a margin)."""
        since = record.get("created", 0) - 26 * 3600

        def look():
            page = self.client.batches.list(limit=100)
            if isinstance(page, (str, bytes)):
                raise NotJSONAnswer(_not_an_object(self.cfg, "list batches", page))
            for batch in page:
                if (batch.metadata or {}).get(METADATA_KEY) == record["request_set"]:
                    return batch
                if (batch.created_at or 0) < since:
                    return None
            return None

        return self._call("list batches", look)

    def _submit(self, path: Path, record: dict):
        import openai

        if record.get("batch_id"):
            return None
        # before any submission, the provider's own list: a batch of this request set made
        # by a create whose answer was lost, or by a run whose record was lost, is resumed
        found = self._find(record)
        if found is not None:
            log("generate", f"batch {found.id} at the provider already holds request set "
                f"{record['request_set']} ({found.status}): resumed, not submitted again")
        if found is None:
            if not record.get("spending_recorded"):  # write-ahead, once per request set
                self.paid.cache.sending_many([
                    (item["custom_id"], self.paid.prompt_bound(item["body"]),
                     item["body"]["n"] * item["body"]["max_tokens"])
                    for item in self._items(record)])
                record["spending_recorded"] = True
            record["submitting"] = True  # written before the batch exists: see `_find`
            self._save(path, record)
            try:
                found = self.client.batches.create(
                    input_file_id=record["input_file_id"], endpoint=record["url"],
                    completion_window=self.cfg.batch_window,
                    metadata={METADATA_KEY: record["request_set"]})
                self.stats["batches"] += 1
            except openai.APIStatusError as error:
                if error.status_code in (400, 401, 403, 404, 422):
                    raise TeacherUnavailable(
                        f"the batch API refused the batch (HTTP {error.status_code}): "
                        f"{scrub(str(error))[:300]}") from None
                found = self._find(record)
                failure = error
            except (openai.APIConnectionError, openai.APITimeoutError) as error:
                # the provider may have made the batch before the answer was lost
                found = self._find(record)
                failure = error
            if found is None:
                raise BatchInterrupted(
                    f"submitting the batch failed ({scrub(str(failure))[:200]}) and the "
                    f"provider holds no batch of this request set ({record['request_set']}); "
                    "run the same command again to submit it") from None
        record["batch_id"] = found.id
        record.pop("submitting", None)
        self._save(path, record)
        log("generate", f"batch {found.id} submitted: {record['requests']} requests, "
            f"window {self.cfg.batch_window} (recorded in {path.name})")
        return found

    def _wait(self, path: Path, record: dict, batch):
        """Poll until the batch ends, showing its progress."""
        t0, said = time.time(), None
        while True:
            if batch is None or batch.status not in TERMINAL:
                batch = self._call("look at the batch", lambda: self.client.batches.retrieve(
                    record["batch_id"]), expect="request_counts")
            counts = batch.request_counts
            line = (f"batch {batch.id}: {batch.status}" + (
                f", {counts.completed} of {counts.total} requests answered, {counts.failed} "
                f"failed" if counts is not None else "") + f" ({time.time() - t0:.0f}s)")
            if line.split(" (")[0] != said:
                log("generate", line)
                said = line.split(" (")[0]
            if record.get("status") != batch.status:
                record["status"] = batch.status
                self._save(path, record)
            if batch.status in TERMINAL:
                return batch
            time.sleep(self.cfg.batch_poll_seconds)
            batch = None

    def _download(self, path: Path, record: dict, batch) -> None:
        """The output and error files into the cache; failures recorded per request."""
        requests = {item["custom_id"]: item["body"] for item in self._items(record)}
        cache, answered, failed = self.paid.cache, set(), {}
        for attempt in range(DOWNLOAD_TRIES):
            cut = strangers = 0
            for which in ("output_file_id", "error_file_id"):
                file_id = getattr(batch, which, None)
                if not file_id:
                    continue
                text = self._call("download the batch results", lambda: self.client.files.content(
                    file_id).text)
                self.stats["downloads"] += 1
                items, bad = read_lines(text)
                cut += bad
                for item in items:
                    key = item["custom_id"]
                    if key not in requests:
                        strangers += 1
                        continue
                    response = item.get("response") or {}
                    body = response.get("body")
                    if (which == "output_file_id" and response.get("status_code") == 200
                            and isinstance(body, dict) and body.get("choices")):
                        if key not in answered:
                            used = self.paid.usage_of(requests[key], body)
                            cache.put(key, body, used, batch=True)
                            cache.settle(key, "answered")
                            self.paid.budget.spend(*used, True)
                            answered.add(key)
                            self.fresh.add(key)
                            failed.pop(key, None)
                    elif key not in answered:
                        failed[key] = scrub(_error_text(item))
            # downloaded again only while requests are missing and the files say why: lines
            # not whole, or fewer answers than the batch counts as completed
            missing = [k for k in requests if k not in answered and k not in failed]
            counts = batch.request_counts
            short = counts is not None and len(answered) < (counts.completed or 0)
            if not missing or not (cut or short):
                break
            if attempt + 1 < DOWNLOAD_TRIES:
                log("generate", f"batch {batch.id}: the download was cut short ({cut} line(s) "
                    f"not whole, {len(missing)} request(s) without a line); downloading again "
                    f"({attempt + 2} of {DOWNLOAD_TRIES})")
        unread = set()
        if missing and (cut or short):  # still unreadable after every try: those requests
            unread = set(missing)        # fail (maybe billed), the rest go on
            for key in missing:
                failed[key] = (f"its line in the results of batch {batch.id} could not be read "
                               f"in {DOWNLOAD_TRIES} downloads (the provider may have billed "
                               "it)")
            log("generate", f"batch {batch.id}: {len(missing)} request(s) whose result line "
                f"could not be read in {DOWNLOAD_TRIES} downloads are recorded as failed "
                "(`distill generate --retry-failed` sends them again)")
        if strangers:
            log("generate", f"batch {batch.id}: {strangers} result line(s) for requests this "
                "set never asked were ignored")
        why = f"the batch ended {batch.status} without an answer for this request"
        if batch.status == "failed" and getattr(batch, "errors", None):
            data = getattr(batch.errors, "data", None) or []
            why = "the batch failed: " + "; ".join(
                scrub(f"{e.code}: {e.message}") for e in data[:3])
        for key in requests:
            if key not in answered and key not in failed:
                failed[key] = why
        for key in set(failed) - unread:  # failed or expired in the batch: not billed
            cache.settle(key, "refused")
        record.update(state="downloaded", failed=failed, answered=len(answered))
        self._save(path, record)
        log("generate", f"batch {batch.id}: {len(answered)} answers in the request cache, "
            f"{len(failed)} without one" + (" (`distill generate --retry-failed` sends them "
                                            "again)" if failed else ""))
