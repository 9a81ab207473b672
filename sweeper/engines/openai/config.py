"""engine=openai's config, and what it refuses before anything starts."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
import re
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from sweeper.config import ConfigError, KVCache, check
from sweeper.engines.config import EngineConfig
from sweeper.models.info import ModelInfo


class Server(StrEnum):
    """The servers sweeper starts itself (`engine.server`)."""

    vllm = "vllm"
    sglang = "sglang"


INSTALL = {
    Server.vllm: "pip install 'sweeper[vllm]' on a GPU host, or scripts/install_vllm_cpu.sh on CPU",
    Server.sglang: "pip install 'sweeper[sglang]' (Linux x86_64/aarch64, in an environment "
    "without vLLM)",
}
# The module that imports when the server is installed.
MODULES = {Server.vllm: "vllm", Server.sglang: "sglang"}
# The server's flag for the running sequences at most: what continuous batching's batch_size sets.
MAX_SEQS_FLAG = {Server.vllm: "max_num_seqs", Server.sglang: "max_running_requests"}
# Flags sweeper sets itself, by what sets them instead.
RESERVED = {
    "model": "model.path",
    "model_path": "model.path",
    "host": "engine.host",
    "port": "a free port sweeper picks",
    "served_model_name": "engine.served_model_name",
    "dtype": "engine.dtype",
    "seed": "engine.seed",
    "random_seed": "engine.seed",
    "api_key": "engine.api_key_env (a key on the command line is visible to every user)",
    "enable_prefix_caching": "the trial key prefix_caching",
    "disable_radix_cache": "the trial key prefix_caching",
}
FLAG_NAME = re.compile(r"[a-z][a-z0-9]*(?:[_-][a-z0-9]+)*")


def vllm_cli_installed() -> bool:
    """Whether `vllm serve` can start: its CLI reads the version of a distribution named vllm,
    which vllm-cpu (scripts/install_vllm_cpu.sh) does not provide."""
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def root_url(base_url: str) -> str:
    """The server's root (where /health and /metrics are) from a base URL with or without the
    OpenAI clients' /v1."""
    return base_url.rstrip("/").removesuffix("/v1")


# Server flags that change the answers (vLLM's and SGLang's names): a reference trial leaves
# them out. A running server's flags are its own (the reference then runs on it as it is).
OUTPUT_CHANGING_FLAGS = ("kv_cache_dtype", "quantization", "speculative_config")


@dataclass
class OpenAIEngineConfig(EngineConfig):
    """An OpenAI-compatible server, driven over HTTP with streamed chat completions
    (sweeper/engines/openai/engine.py): one already running at `base_url` (sweeper only
    measures), or one sweeper starts (`server`) with `server_args` as its flags, restarted when
    a flag changes."""

    name: str = "openai"
    _target_: str = "sweeper.engines.openai.engine.OpenAIEngine"
    base_url: str | None = None  # e.g. http://10.0.0.5:8000 (or .../v1): a running server
    server: Server | None = None  # vllm | sglang: sweeper starts it on a free port of `host`
    # The started server's flags, as `--key-with-dashes value` (true: --key, false: --no-key on
    # vLLM, left out on SGLang; a list: several values; a dict: JSON; null: the server's default).
    server_args: dict[str, Any] = field(default_factory=dict)
    # The name of the environment variable that holds the API key (never the key itself).
    api_key_env: str | None = None
    served_model_name: str | None = None  # null: the started server's model folder name, or
    # the first model a running server lists
    host: str = "127.0.0.1"  # where the started server listens
    seed: int = 0  # the started server's own RNG; sampling uses the trial's `seed`
    request_timeout_s: float = 600.0  # a request fails when no byte comes back for this long
    startup_timeout_s: float = 900.0  # the started server must answer /health within this
    # Open connections at most: requests beyond wait in the client (their clock is running).
    max_connections: int = 1024

    def __post_init__(self) -> None:
        check(
            (self.base_url is None) != (self.server is None),
            "engine.base_url",
            self.base_url,
            "exactly one of engine.base_url (a running server) and engine.server (vllm or "
            "sglang: sweeper starts it)",
        )
        if self.base_url is not None:
            self._check_base_url()
        for key in ("request_timeout_s", "startup_timeout_s"):
            value = getattr(self, key)
            check(0 < value < math.inf, f"engine.{key}", value, "a number of seconds > 0")
        check(
            self.max_connections >= 1,
            "engine.max_connections",
            self.max_connections,
            "an integer >= 1",
        )
        self._check_server_args()
        if self.api_key_env is not None:
            check(
                self.server != Server.sglang,
                "engine.api_key_env",
                self.api_key_env,
                "null with engine.server=sglang: SGLang takes its key only on the command line, "
                "where every user of the machine can read it",
            )

    def _check_base_url(self) -> None:
        parts = urlsplit(self.base_url)
        check(
            parts.scheme in ("http", "https") and bool(parts.hostname),
            "engine.base_url",
            self.base_url,
            "an http(s) URL of a running server, e.g. http://127.0.0.1:8000 or .../v1",
        )
        check(
            not (parts.username or parts.password or parts.query),
            "engine.base_url",
            "<a URL with credentials or a query>",  # not echoed: it may hold a secret
            "a URL without credentials or query: give a key through engine.api_key_env",
        )

    def _check_server_args(self) -> None:
        if self.server is None:
            check(
                not self.server_args,
                "engine.server_args",
                self.server_args,
                "{} with engine.base_url: sweeper cannot change a running server's flags",
            )
            return
        for key in self.server_args:
            check(
                isinstance(key, str) and FLAG_NAME.fullmatch(key) is not None,
                "engine.server_args",
                key,
                "flag names: lowercase letters and digits joined by _ or - (e.g. max_num_seqs)",
            )
            flag = key.replace("-", "_")
            check(
                flag not in RESERVED,
                f"engine.server_args.{key}",
                self.server_args[key],
                f"unset: sweeper sets it from {RESERVED.get(flag)}",
            )

    def exact(self) -> OpenAIEngineConfig:
        """The started server without the flags of OUTPUT_CHANGING_FLAGS."""
        kept = {
            key: value
            for key, value in self.server_args.items()
            if key.replace("-", "_") not in OUTPUT_CHANGING_FLAGS
        }
        return replace(self, server_args=kept)

    def check(self, trial: Any, model: ModelInfo) -> None:
        check(
            trial.beam_num == 1,
            "beam_num",
            trial.beam_num,
            "1 with engine=openai: the chat completions API has no beam search",
        )
        check(
            trial.kv_cache == KVCache.dynamic,
            "kv_cache",
            trial.kv_cache,
            "dynamic with engine=openai: the server manages its own KV cache",
        )
        check(
            self.device == "auto",
            "engine.device",
            self.device,
            "auto with engine=openai: the server decides where it runs",
        )
        if self.api_key_env is not None:
            check(
                bool(os.environ.get(self.api_key_env)),
                "engine.api_key_env",
                self.api_key_env,
                "the name of a set environment variable holding the API key",
            )
        if self.server is not None:
            self._check_server(trial)
        else:
            check(
                trial.model.chat_template is None,
                "model.chat_template",
                trial.model.chat_template,
                "null with engine.base_url: a running server renders prompts with its own "
                "template (start it with --chat-template)",
            )
            self._check_running_server(trial)

    def _check_server(self, trial: Any) -> None:
        server = Server(self.server)
        check(
            importlib.util.find_spec(MODULES[server]) is not None,
            "engine.server",
            self.server,
            f"an installed server: {INSTALL[server]}",
        )
        if server == Server.vllm and not vllm_cli_installed():
            count = self.server_args.get("api_server_count")
            check(
                count in (None, 1),
                "engine.server_args.api_server_count",
                count,
                "null or 1 with this vLLM build (vllm-cpu): its `vllm serve` command cannot "
                "start, and the api_server module sweeper runs instead starts one API server",
            )
        seqs = self.server_args.get(MAX_SEQS_FLAG[server])
        width = trial.num_samples
        if seqs is not None and not trial.continuous_batching:
            check(
                trial.batch_size * width <= seqs,
                "batch_size",
                trial.batch_size,
                f"at most engine.server_args.{MAX_SEQS_FLAG[server]} / {width} = "
                f"{seqs // width} with continuous_batching=false, so that a static batch runs "
                "as one batch",
            )

    def _check_running_server(self, trial: Any) -> None:
        """The server answers, and runs with the prefix caching the trial asks for where it says
        (a vLLM's /metrics does)."""
        from sweeper.engines.openai.server import probe

        try:
            found = probe(root_url(self.base_url), self.api_key_env)
        except ConnectionError as error:
            raise ConfigError(
                "engine.base_url", self.base_url, f"the URL of a running server: {error}"
            ) from None
        if found.prefix_caching is not None:
            check(
                trial.prefix_caching == found.prefix_caching,
                "prefix_caching",
                trial.prefix_caching,
                f"{str(found.prefix_caching).lower()} with engine.base_url={self.base_url}: "
                "that server runs so, and sweeper cannot change a running server's flags",
            )

    def open_load_refusal(self, trial: Any) -> str | None:
        return None  # a server takes requests as they come

    def load_options(self, trial: Any) -> dict[str, Any]:
        """What fixes a started server's flags (a changed one restarts it): prefix caching, and
        under continuous batching the running sequences at most, batch_size x num_samples (each
        of a request's samples is a sequence), unless server_args sets them. A running server's
        flags are its own."""
        if self.server is None:
            return {}
        seqs = self.server_args.get(MAX_SEQS_FLAG[Server(self.server)])
        if seqs is None and trial.continuous_batching:
            seqs = trial.batch_size * trial.num_samples
        return {"prefix_caching": trial.prefix_caching, "max_num_seqs": seqs}
