"""The connection to NATS: servers, credentials, TLS, and a deadline on the first connect.

The event log (adapters/event_log.py), the command bus (adapters/command_bus.py) and
every other adapter that speaks NATS get their client from `connect`.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

import anyio
import nats
import nats.errors
from gpuwarden.engine.ports import EventLogError
from nats.aio.client import Client as NatsClient

log = logging.getLogger(__name__)


async def connect(
    url: str,
    *,
    creds: str | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    name: str = "gpuwarden",
    deadline_s: float = 10.0,
    **options: Any,
) -> NatsClient:
    """A nats-py connection; `url` may list several servers separated by commas.

    Reconnects forever once connected, but the first connection has a deadline
    (nats-py would otherwise retry an unreachable server forever). `creds` is a
    credentials file: gpuwarden's own (adapters/auth.py: the principal's nkey seed, and
    its own inbox prefix, the only inboxes its permissions let it read) or a NATS JWT
    `.creds` file, handed to nats-py as it is.
    """
    servers = [part.strip() for part in url.split(",") if part.strip()]
    problems: list[str] = []
    refused = anyio.CancelScope()  # a server that refuses who we are will not change its mind

    async def remember(exc: Exception) -> None:
        text = str(exc) or type(exc).__name__
        if text not in problems:  # a few distinct ones: "reset by peer" hides the cause
            problems[:] = [*problems[-2:], text]
        if isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in (
            text.lower()
        ):
            refused.cancel()
        await _log_error(exc)

    settings: dict[str, Any] = {
        "name": name,
        "reconnect_time_wait": 0.2,
        "max_reconnect_attempts": -1,
        "connect_timeout": 2,
        "error_cb": remember,
    }
    if creds:
        from gpuwarden.adapters.auth import connect_options, load_credentials

        settings.update(connect_options(load_credentials(creds)))
    settings.update(options)
    if tls_ca or tls_cert:
        settings["tls"] = _tls_context(tls_ca, tls_cert, tls_key)
    try:
        with anyio.fail_after(deadline_s), refused:
            return await nats.connect(servers, **settings)
    except TimeoutError:
        why = f" (errors seen: {'; '.join(problems)})" if problems else ""
        raise EventLogError(f"cannot connect to NATS at {url} within {deadline_s}s{why}") from None
    except (OSError, nats.errors.Error) as exc:
        reason = str(exc) or type(exc).__name__
        raise EventLogError(f"cannot connect to NATS at {url}: {reason}") from exc
    from gpuwarden.adapters.auth import ConnectRefusedError

    if creds:
        who = f"the credentials in {creds}"
    else:
        who = "the user in the URL" if "@" in url else "a client without credentials"
    raise ConnectRefusedError(
        f"NATS at {url} refused {who}: authorization violation", url=url, creds=creds
    )


def _tls_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    if cert:
        context.load_cert_chain(cert, key)
    return context


async def _log_error(exc: Exception) -> None:
    log.debug("nats: %s", exc)


async def unsubscribe(sub: Any) -> None:
    """End a subscription (or a consumer's), quietly: the connection may be gone."""
    try:
        with anyio.fail_after(2):
            await sub.unsubscribe()
    except Exception as exc:  # the connection may be gone; the consumer expires anyway
        log.debug("unsubscribe failed: %s", exc)
