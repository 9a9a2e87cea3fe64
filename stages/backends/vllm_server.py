"""Start vLLM's OpenAI-compatible server on 127.0.0.1 (for tests, benchmarks and local runs).

    with local_vllm_server("smollm2-135m-instruct") as server:
        ...  # generate.base_url = server.base_url, generate.model = server.model

The server runs as its own process group and is stopped with SIGTERM (SIGKILL after a grace
period) when the block ends, also on an error; its log is kept in a file for when it fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stages.backends.vllm_engine import _INSTALL_HINT, _all_cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalVLLMServer:
    def __init__(self, model: str, *, port: int | None = None, dtype: str = "bfloat16",
                 kv_cache_gb: int = 2, max_logprobs: int = 20, startup_timeout: float = 300.0,
                 log_path: str | Path | None = None, lora_modules: dict[str, str] | None = None,
                 max_lora_rank: int = 16, runtime_lora: bool = False):
        """`lora_modules`: {served name: adapter folder} served beside the base model
        (`--enable-lora --lora-modules name=path`), adapters of rank up to `max_lora_rank`.
        `runtime_lora`: LoRA enabled with adapters added while it runs (`load_adapter`), so
        one server started once serves the base model and adapters trained later."""
        from pipeline.models import resolve_model

        self.model = model
        self.path = resolve_model(model)
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.dtype = dtype
        self.kv_cache_gb = kv_cache_gb
        self.max_logprobs = max_logprobs
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else Path(
            tempfile.mkstemp(prefix="vllm-server-", suffix=".log")[1])
        self.lora_modules = dict(lora_modules or {})
        self.max_lora_rank = max_lora_rank
        self.runtime_lora = runtime_lora
        self.proc: subprocess.Popen | None = None
        self.startup_s = 0.0

    def command(self) -> list[str]:
        args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(self.path), "--served-model-name", self.model,
                "--host", "127.0.0.1", "--port", str(self.port), "--dtype", self.dtype,
                "--enforce-eager", "--max-logprobs", str(self.max_logprobs)]
        if self.lora_modules or self.runtime_lora:
            args += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank)]
        if self.lora_modules:
            args += ["--lora-modules", *(f"{n}={p}" for n, p in self.lora_modules.items())]
        import torch

        if not torch.cuda.is_available():
            # On a CPU a request with a seed kills the engine when its prefill is split over
            # two steps ("CPU Generator does not use offset"); whole prefills avoid it.
            args.append("--no-enable-chunked-prefill")
        return args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gb))
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", _all_cores())
        if self.runtime_lora:  # vLLM's /v1/load_lora_adapter answers only with this set
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        return env

    def start(self) -> "LocalVLLMServer":
        import importlib.util

        from stages.backends.openai_api import wait_for_server

        if importlib.util.find_spec("vllm") is None:
            raise RuntimeError(f"starting a vLLM server needs the vllm package; {_INSTALL_HINT}")
        t0 = time.time()
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     env=self.environment(), start_new_session=True)
        deadline = time.time() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with code {self.proc.returncode} "
                                   f"while starting; its log:\n{self.tail()}")
            try:
                wait_for_server(self.base_url, timeout=2.0)
                break
            except TimeoutError:
                if time.time() > deadline:
                    self.stop()
                    raise TimeoutError(f"the vLLM server did not answer within "
                                       f"{self.startup_timeout:.0f}s; its log:\n{self.tail()}")
        self.startup_s = time.time() - t0
        return self

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Serve the LoRA adapter in folder `path` as model `name` from now on."""
        import json
        import urllib.error
        import urllib.request

        if not self.runtime_lora:
            raise RuntimeError("this server was started without runtime_lora=True: it cannot "
                               "take adapters while it runs; start it with runtime_lora=True "
                               "or name the adapter in lora_modules")
        body = json.dumps({"lora_name": name, "lora_path": str(Path(path).resolve())}).encode()
        req = urllib.request.Request(f"{self.base_url}/load_lora_adapter",
                                     data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300):
                return
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"the vLLM server did not load the adapter {name!r} from "
                               f"{path}: HTTP {e.code}: {e.read().decode(errors='replace')[:500]}"
                               ) from None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        group = os.getpgid(self.proc.pid)
        os.killpg(group, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(group, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "LocalVLLMServer":
        try:
            return self.start()
        except BaseException:  # Ctrl-C while it starts: no server left behind
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def local_vllm_server(model: str, **kwargs) -> LocalVLLMServer:
    return LocalVLLMServer(model, **kwargs)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Serve a teacher with vLLM's OpenAI-compatible "
                                     "server on 127.0.0.1 until Ctrl-C.")
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="a local checkpoint folder, a hub id, or smollm2-135m-instruct; "
                        "also the served model name")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-cache-gb", type=int, default=4, help="CPU: KV-cache GiB")
    parser.add_argument("--max-logprobs", type=int, default=20)
    args = parser.parse_args()
    server = LocalVLLMServer(args.model, port=args.port, dtype=args.dtype,
                             kv_cache_gb=args.kv_cache_gb, max_logprobs=args.max_logprobs)
    # Ctrl-C, and SIGINT or SIGTERM from a script (where SIGINT may arrive ignored), stop it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(f"starting vLLM for {args.model} (log: {server.log_path})", flush=True)
    with server:
        print(f"serving {args.model} at {server.base_url} (ready in {server.startup_s:.0f}s); "
      "Ctrl-C stops it", flush=True)
        try:
            while server.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    if server.proc.returncode not in (0, None, -15):
        raise SystemExit(f"the server exited with code {server.proc.returncode}; its log:\n"
                         f"{server.tail()}")


if __name__ == "__main__":
    main()
