"""Starting and talking to real vLLM servers (the CPU build): for the tests, `python -m kvtier.demo` and the benches."""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

# Every instance runs on one pinned OpenMP thread: the same float reduction order in
# every instance, so outputs compare bit for bit (see the README's vLLM section).
BASE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_TARGET_DEVICE": "cpu",
}


_HANDED_OUT: set = set()


def free_port() -> int:
    """A port free now that this process has not handed out before, chosen outside the
    kernel's ephemeral range (between 20000 and its start, or above its end where it starts
    lower): a process that binds port 0 meanwhile (kvtier's TCP transport does, vLLM's
    workers too) cannot be handed the same port before the one it was picked for binds it,
    and vLLM's fixed defaults (kv_port 14579) lie below."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(p) for p in f.read().split()[:2])
    except (OSError, ValueError):
        low, high = 32768, 60999
    if low >= 21000:
        first, last = 20000, low - 1
    elif high <= 64535:
        first, last = high + 1, 65535
    else:
        first, last = 20000, 65535
    for _ in range(256):
        port = random.randint(first, last)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _HANDED_OUT.add(port)
    return port


def kvtier_transfer_config(role: str = "kv_both", extra: Optional[dict] = None, **fields: Any) -> str:
    config = {
        "kv_connector": "KvtierConnector",
        "kv_connector_module_path": "kvtier.vllm",
        "kv_role": role,
        "kv_connector_extra_config": extra or {},
    }
    config.update(fields)
    return json.dumps(config)


def wait_http(port: int, path: str = "/health", timeout: float = 60.0) -> None:
    """Waits until http://127.0.0.1:PORT/PATH answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"nothing answers on port {port} after {timeout:.0f} s")


class OpenAiEndpoint:
    """An OpenAI-compatible HTTP endpoint on 127.0.0.1 (vLLM, or `kvtier proxy`)."""

    def __init__(self, port: int, model: str):
        self.port = port
        self.model = model

    def complete(self, prompt_ids: list[int], max_tokens: int = 8, **extra: Any) -> dict:
        """A greedy completion of token ids: {"token_ids", "logprobs", "raw"}."""
        body = {
            "model": self.model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0,
            "logprobs": 1, "return_token_ids": True, "ignore_eos": True,
        }
        body.update(extra)
        raw = self.post("/v1/completions", body)
        choice = raw["choices"][0]
        return {"token_ids": choice["token_ids"], "logprobs": choice["logprobs"]["token_logprobs"], "raw": raw}

    def post(self, path: str, body: dict, timeout: float = 300.0) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)

    def metric(self, name: str, default: Optional[float] = None) -> float:
        """Sum of a Prometheus metric's samples at the endpoint's /metrics. A metric the
        endpoint does not export is `default`, or a `KeyError` without one (so a check of
        a missing metric fails instead of reading 0)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            text = r.read().decode()
        total, found = 0.0, False
        for line in text.splitlines():
            if line.startswith(name) and (line[len(name)] in " {"):
                total += float(line.rsplit(" ", 1)[1])
                found = True
        if not found:
            if default is None:
                raise KeyError(f"port {self.port} exports no metric {name}")
            return default
        return total


def kvtier_binary() -> str:
    """The `kvtier` executable: $KVTIER_BIN, else on PATH, else a build in the kvtier
    checkout this package was installed from in place, or the one in the working directory."""
    explicit = os.environ.get("KVTIER_BIN")
    if explicit:
        return explicit
    found = shutil.which("kvtier")
    if found:
        return found
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        for build in ("release", "debug"):
            candidate = root / "target" / build / "kvtier"
            if candidate.is_file():
                return str(candidate)
    raise FileNotFoundError("the `kvtier` binary was not found (cargo build --release, or set KVTIER_BIN)")


def start_proxy(log: Path, *, port: int, prefiller_port: int, decoder_port: int, init_port: int,
                alloc_port: int, notify_port: int, args: tuple = ()) -> subprocess.Popen:
    """`kvtier proxy` on 127.0.0.1 with the reference 1p1d flags, in front of one prefiller
    and one decoder; waits until it answers."""
    proxy = subprocess.Popen(
        [kvtier_binary(), "proxy", "--host", "127.0.0.1", "--port", str(port),
         "--prefiller-host", "127.0.0.1", "--prefiller-port", str(prefiller_port),
         "--decoder-host", "127.0.0.1", "--decoder-port", str(decoder_port),
         "--decoder-init-port", str(init_port), "--decoder-alloc-port", str(alloc_port),
         "--proxy-host", "127.0.0.1", "--proxy-port", str(notify_port), *args],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        wait_http(port)
    except BaseException:
        proxy.kill()
        raise
    return proxy


_RUNNING: "set[VllmServer]" = set()


@atexit.register
def _stop_leftovers() -> None:
    """A server whose `with` never began (another one's start failed first) still stops."""
    for server in list(_RUNNING):
        server.stop()


class VllmServer(OpenAiEndpoint):
    """One `vllm serve` process on 127.0.0.1, started at construction; a context manager
    that waits for it and stops it."""

    def __init__(self, model: Path, log: Path, *, env: Optional[dict] = None,
                 transfer_config: Optional[str] = None, args: tuple = (), port: Optional[int] = None):
        super().__init__(port or free_port(), str(model))
        self.log_path = log
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model, "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", "float32", "--enforce-eager", "--max-model-len", "8192",
            "--no-enable-prefix-caching", *args,
        ]
        if transfer_config:
            cmd += ["--kv-transfer-config", transfer_config]
        full_env = dict(os.environ)
        full_env.update(BASE_ENV)
        full_env.update(env or {})
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=True)
        _RUNNING.add(self)

    def wait_ready(self, timeout: float = 300.0) -> "VllmServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1)
        raise RuntimeError(f"vLLM not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self) -> int:
        _RUNNING.discard(self)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            # vLLM's engine core and workers are in the same process group: none outlives it.
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "VllmServer":
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
