"""Credentials in URLs, kept out of everything sweeper and Hydra write or print.

A password typed into a URL on the command line (`tracking.uri=postgresql://alice:PW@host/db`,
`hydra.sweeper.storage=postgresql://...`, `tracking.uri=http://user:PW@host:5000`) is taken out
of the command line before Hydra composes anything (`take_passwords`), so the config Hydra
composes never holds it: not its `.hydra/*.yaml` or `multirun.yaml` files, the MLflow params,
tags and run names made from the config, the `config.yaml` artifacts, the Optuna study's
attributes, or a printed line. The secret goes to this process's environment instead, which
launcher processes inherit, and nothing writes:
- an http(s) tracking server's user and password become MLflow's own
  `MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD` (its client sends them as basic auth);
- a database password (PostgreSQL, MySQL) waits in `SWEEPER_DB_PASSWORDS`, keyed by backend,
  user, host and port, and is put back only into the URL a connection is opened with
  (`with_password`).

Better still, keep passwords out of URLs altogether: libpq reads `PGPASSWORD` and `~/.pgpass`,
MLflow's client `MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD` (a command line is
visible to other users in `ps` while it runs). `redact` masks any password left in a text, for
what came some other way (a config file, an `${oc.env:...}` interpolation) and for messages.
"""

from __future__ import annotations

import json
import os
import re
from urllib.parse import unquote

# Database passwords taken from URLs: {"<backend>://<user>@<host>:<port>": password}.
PASSWORDS_ENV = "SWEEPER_DB_PASSWORDS"
HTTP_USER_ENV = "MLFLOW_TRACKING_USERNAME"
HTTP_PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
MASK = "***"

# scheme://user:password@ (user may be empty); the password runs to the last '@' before the host
# part, so that an unencoded '@' or ':' in it is masked whole. Hydra writes an override's ':' as
# '\:' (in overrides.yaml, hydra.yaml and the override lines sweeper tags runs with).
_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*\\?://)(?P<user>[^\s:/@'\"\\]*)(?P<colon>\\?:)"
    r"(?P<password>[^\s/'\"]*)@"
)
_HTTP = ("http://", "https://")


def redact(text: str) -> str:
    """`text` with the password of every URL in it replaced by ***."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}{m['colon']}{MASK}@", text)


def _key(url: str) -> str | None:
    """The registry key of a database URL (None: not a URL SQLAlchemy parses)."""
    import sqlalchemy

    try:
        parsed = sqlalchemy.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        return None
    port = parsed.port or ""
    return f"{parsed.get_backend_name()}://{parsed.username or ''}@{parsed.host or ''}:{port}"


def _registry() -> dict[str, str]:
    try:
        return dict(json.loads(os.environ.get(PASSWORDS_ENV, "{}")))
    except ValueError:
        return {}


_HOST = re.compile(r"[^\s/,'\"?#]*")


def _take(match: re.Match[str], text: str, registry: dict[str, str]) -> str:
    """What replaces `scheme://user:password@` in `text`; the password goes to the environment."""
    scheme, user, password = match["scheme"], match["user"], match["password"]
    if scheme.lower() in _HTTP:
        # MLflow's client reads these; the URL goes on without any user info.
        if user:
            os.environ[HTTP_USER_ENV] = unquote(user)
        os.environ[HTTP_PASSWORD_ENV] = unquote(password)
        return scheme
    host = _HOST.match(text, match.end())
    key = _key(f"{scheme}{user}@{host.group(0) if host else ''}")
    if key is not None:
        registry[key] = unquote(password)
    return f"{scheme}{user}@"


def take_passwords(args: list[str]) -> list[str]:
    """The command line without the passwords of its URLs, which go to the environment."""
    taken: list[str] = []
    registry = _registry()
    for arg in args:
        parts, end = [], 0
        for match in _USERINFO.finditer(arg):
            parts += [arg[end : match.start()], _take(match, arg, registry)]
            end = match.end()
        taken.append("".join(parts) + arg[end:])
    if registry:
        os.environ[PASSWORDS_ENV] = json.dumps(registry)
    return taken


def with_password(url: str) -> str:
    """The database URL to connect with: its password put back if `take_passwords` took one."""
    if url.lower().startswith(_HTTP) or "://" not in url:
        return url
    key = _key(url)
    password = _registry().get(key) if key is not None else None
    if password is None:
        return url
    import sqlalchemy

    parsed = sqlalchemy.make_url(url)
    if parsed.password is not None:
        return url
    return parsed.set(password=password).render_as_string(hide_password=False)


def http_auth() -> tuple[str, str] | None:
    """The tracking server's basic-auth user and password from MLflow's variables, if set."""
    user, password = os.environ.get(HTTP_USER_ENV), os.environ.get(HTTP_PASSWORD_ENV)
    if user is None and password is None:
        return None
    return user or "", password or ""
