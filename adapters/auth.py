"""Principals and their least privilege: who may write which part of the log.

The log is the only authority, so what may enter it is the security model (DESIGN.md,
"Trust and authority"). Every client of the NATS server is a named principal with an
nkey of its own, and the server itself refuses what a principal may not do: a node
agent can state facts about its own node only and read only its own commands, the
task API can only submit and cancel tasks, the engine can decide but not forge what a
user or a node said, and only `admin` may change, purge or delete a stream.

`PERMISSIONS` below is the contract: it renders `auth.conf` for the server and the
summary `gpuwarden auth` prints, so the two never disagree. Its `$JS.API...` subjects
were worked out by running the real adapters against a real server (tests/test_auth.py
keeps them honest): nothing here is a guess at what a client library sends.

Credentials file (our own format, one per principal, mode 0600 in a 0700 directory)::

    # gpuwarden credentials: principal engine (role engine). Secret: whoever holds [...]
    principal: engine
    role: engine
    seed: SUA...

(the first line, in full, ends "...this file is that principal."). `#` lines and blank
lines are ignored; every other line is `key: value`. The seed is a NATS user nkey seed
(it signs the server's connect nonce; the server knows only the public key, from
auth.conf). A client with it connects with its own inbox prefix, `_INBOX.<principal>`,
the only part of `_INBOX` it may subscribe to, so no principal can read another's
replies or JetStream deliveries. Where a credentials file is read, a NATS JWT `.creds`
file (an account/operator deployment made with `nsc`) works too: it is handed to
nats-py as it is, and its permissions are whatever its JWT says.

One thing permissions cannot pin is the body of a consumer-create request: whoever may
create a push consumer on a stream may name any deliver subject, and the server does
not check it against the creator's rights (seen with nats-server 2.15.1). It delivers
only where a literal subscription shows interest, and each message keeps its stored
subject (GW_CMDS, picking one up, stores it as `gw.evt...`, where no agent's filter
looks), so this stays harmless while nobody but admin subscribes to a literal
`gw.cmd.<N>`, `gw.hb.<N>` or `gw.api...` subject: subscribe to those with wildcards, as
the engine and the API do, and grant nobody else consumer info or lists on GW_EVENTS
(they would show the deliver subjects of others' consumers). On GW_CMDS the create
subject does pin name and filter (the server refuses a body that disagrees with it, or
that has several filters).

Size: one module, past 600 lines, on purpose: the permission table, the server
configuration it renders and the credentials it issues must change together.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import nkeys
from gpuwarden.adapters.env_seal import ensure_env_key
from gpuwarden.engine.core.errors import GpuwardenError
from gpuwarden.engine.core.events import subject_token
from gpuwarden.engine.core.wire import (
    COMMANDS_STREAM,
    DEAD_LETTER_SUBJECT,
    DLQ_STREAM,
    EVENTS_STREAM,
)
from gpuwarden.engine.ports import EventLogError

AUTH_CONF: Final = "auth.conf"
CREDS_SUFFIX: Final = ".creds"
JWT_MARKER: Final = "-----BEGIN NATS USER JWT-----"
API_QUEUE: Final = "gw-api"  # the task API's queue group

ROLE_ADMIN: Final = "admin"
ROLE_ENGINE: Final = "engine"
ROLE_API: Final = "api"
ROLE_NODE: Final = "node"
ROLE_READER: Final = "reader"
ROLE_OPERATOR: Final = "operator"
ROLE_USER: Final = "user"
ROLE_JWT: Final = "jwt"  # a NATS JWT creds file: its permissions live in the JWT

NODE_PREFIX: Final = "node-"
USER_PREFIX: Final = "user-"
# The principals every credentials directory has; nodes and users are added by name.
FIXED_PRINCIPALS: Final = (ROLE_ADMIN, ROLE_ENGINE, ROLE_API, ROLE_READER, ROLE_OPERATOR)

MAX_NAME = 128
_PRINCIPAL_OK = re.compile(r"^[A-Za-z0-9_\-~]+$")  # one subject token (subject_token's output)
_BAD_NAME = re.compile(r"[\s/\\\x00-\x1f\x7f*>]")


class AuthError(GpuwardenError):
    """Credentials or an authorization directory that cannot be used; says which and why."""


class ConnectRefusedError(EventLogError):
    """The NATS server refused a connection: missing, unknown or revoked credentials."""

    def __init__(self, message: str, *, url: str, creds: str | None) -> None:
        super().__init__(message)
        self.url = url
        self.creds = creds


# --- the permission table (the contract) -------------------------------------------------
#
# Subject templates: `{me}` is the principal's name, `{node}` a node's subject token.
# `gw.evt.<kind>.<key>.<writer>` is the event scheme of engine/core/events.py; the server
# refuses an event published under another writer's token, and nobody but admin may
# publish a legacy four-token `gw.evt.<kind>.<key>` (the deny list below).

_INBOX: Final = "_INBOX.{me}.>"


def _reads(stream: str) -> tuple[str, ...]:
    """Reading a stream the way JetStreamEventLog does: ordered push consumers (created
    ephemeral, left to expire, their flow control answered on a long replay) and
    MSG.GET by sequence or by last subject. Direct get is not granted: it bypasses the
    stream leader. Consumer info/delete are not needed and not granted."""
    return (
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.FC.{stream}.>",
    )


def _creates(stream: str) -> tuple[str, ...]:
    return (f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.STREAM.CREATE.{stream}")


def _own_commands() -> tuple[str, ...]:
    """A node's durable pull consumer on its own command subject, and nothing else on
    GW_CMDS: the create subject pins both the consumer's name and its filter."""
    consumer = "gw-agent-{node}"
    return (
        f"$JS.API.STREAM.INFO.{COMMANDS_STREAM}",
        f"$JS.API.CONSUMER.CREATE.{COMMANDS_STREAM}.{consumer}.gw.cmd.{{node}}",
        f"$JS.API.CONSUMER.INFO.{COMMANDS_STREAM}.{consumer}",
        f"$JS.API.CONSUMER.MSG.NEXT.{COMMANDS_STREAM}.{consumer}",
        f"$JS.ACK.{COMMANDS_STREAM}.{consumer}.>",
    )


def _unique(*groups: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(s for group in groups for s in group))


_JS_INFO: Final = ("$JS.API.INFO",)
_STREAM_LISTS: Final = (
    "$JS.API.STREAM.NAMES",
    "$JS.API.STREAM.LIST",
    f"$JS.API.STREAM.INFO.{EVENTS_STREAM}",
    f"$JS.API.STREAM.INFO.{COMMANDS_STREAM}",
    f"$JS.API.STREAM.INFO.{DLQ_STREAM}",
)
_READER_PUBLISH: Final = _unique(_JS_INFO, _STREAM_LISTS, _reads(EVENTS_STREAM), _reads(DLQ_STREAM))

# Refused to everyone but admin even if an allow above were ever widened by mistake.
DENY_UNLESS_ADMIN: Final = (
    "$JS.API.STREAM.DELETE.>",
    "$JS.API.STREAM.PURGE.>",
    "$JS.API.STREAM.UPDATE.>",
    "$JS.API.STREAM.MSG.DELETE.>",
    "gw.evt.*.*",  # the legacy scheme: an aggregate subject with no writer token
)


@dataclass(frozen=True)
class Grant:
    """What a role may do (subject templates), and the same in words for the summary."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    may_publish: str
    may_subscribe: str
    may_manage_streams: str
    deny_publish: tuple[str, ...] = DENY_UNLESS_ADMIN
    allow_responses: bool = False


PERMISSIONS: Final[Mapping[str, Grant]] = {
    ROLE_ADMIN: Grant(
        publish=(">",),
        subscribe=(">",),
        deny_publish=(),
        may_publish="anything",
        may_subscribe="anything",
        may_manage_streams="all: create, update, purge, delete, consumers",
    ),
    ROLE_ENGINE: Grant(
        publish=_unique(
            ("gw.evt.*.*.engine", "gw.cmd.*", DEAD_LETTER_SUBJECT),
            _JS_INFO,
            _creates(EVENTS_STREAM),
            _creates(COMMANDS_STREAM),
            _creates(DLQ_STREAM),
            _reads(EVENTS_STREAM),
            (f"$JS.API.STREAM.MSG.GET.{DLQ_STREAM}",),
        ),
        subscribe=("gw.hb.*", _INBOX),
        may_publish=f"gw.evt.*.*.engine, gw.cmd.*, {DEAD_LETTER_SUBJECT}",
        may_subscribe="gw.hb.*; reads GW_EVENTS",
        may_manage_streams="create GW_EVENTS, GW_CMDS, GW_DLQ (no update/purge/delete)",
    ),
    ROLE_API: Grant(
        publish=_unique(
            ("gw.evt.task.*.api",),
            _reads(EVENTS_STREAM),
            (f"$JS.API.STREAM.INFO.{COMMANDS_STREAM}",),  # ensure_streams checks both
        ),
        subscribe=(f"gw.api.*.task.* {API_QUEUE}", _INBOX),
        allow_responses=True,
        may_publish="gw.evt.task.*.api; replies to requests",
        may_subscribe=f"gw.api.*.task.* (queue {API_QUEUE}); reads GW_EVENTS",
        may_manage_streams="no",
    ),
    ROLE_NODE: Grant(
        publish=_unique(
            ("gw.evt.*.*.node.{node}", "gw.hb.{node}"),
            _reads(EVENTS_STREAM),
            _own_commands(),
        ),
        subscribe=(_INBOX,),
        may_publish="gw.evt.*.*.node.{node}, gw.hb.{node}",
        may_subscribe="gw.cmd.{node} as gw-agent-{node}; reads GW_EVENTS",
        may_manage_streams="no",
    ),
    ROLE_READER: Grant(
        publish=_unique(_READER_PUBLISH, ("gw.api.{me}.task.get", "gw.api.{me}.task.list")),
        subscribe=(_INBOX,),
        may_publish="gw.api.{me}.task.get, gw.api.{me}.task.list",
        may_subscribe="reads GW_EVENTS, GW_DLQ",
        may_manage_streams="no",
    ),
    ROLE_OPERATOR: Grant(
        publish=_unique(_READER_PUBLISH, ("gw.evt.gpu.*.op", "gw.api.{me}.task.*")),
        subscribe=(_INBOX,),
        may_publish="gw.evt.gpu.*.op (gpu-restore), gw.api.{me}.task.*",
        may_subscribe="reads GW_EVENTS, GW_DLQ",
        may_manage_streams="no",
    ),
    ROLE_USER: Grant(
        publish=("gw.api.{me}.task.*",),
        subscribe=(_INBOX,),
        may_publish="gw.api.{me}.task.* (its own tasks)",
        may_subscribe="its replies only",
        may_manage_streams="no",
    ),
}

SUMMARY_FOOTER: Final = (
    "Every principal but admin subscribes only to its own inbox _INBOX.<principal>.> and "
    "may never update,\npurge or delete a stream, nor write another writer's events. Whoever "
    "reads GW_EVENTS reads every task's\nspec: a task's env is sealed in the log, so a node "
    "agent reading it learns nothing secret."
)


# --- principals ----------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    name: str
    role: str

    @property
    def node(self) -> str | None:
        """The node's subject token, for a node agent."""
        return self.name.removeprefix(NODE_PREFIX) if self.role == ROLE_NODE else None

    def grant(self) -> Grant:
        return PERMISSIONS[self.role]

    def fill(self, template: str) -> str:
        return template.replace("{me}", self.name).replace("{node}", self.node or "")

    def publish(self) -> list[str]:
        return [self.fill(s) for s in self.grant().publish]

    def subscribe(self) -> list[str]:
        return [self.fill(s) for s in self.grant().subscribe]

    def deny_publish(self) -> list[str]:
        return [self.fill(s) for s in self.grant().deny_publish]


def node_principal(node: str) -> Principal:
    _check_name("node", node)
    return Principal(NODE_PREFIX + subject_token(node), ROLE_NODE)


def user_principal(user: str) -> Principal:
    _check_name("user", user)
    return Principal(USER_PREFIX + subject_token(user), ROLE_USER)


def _check_name(kind: str, name: str) -> None:
    if not name:
        raise AuthError(f"a {kind} name may not be empty")
    if len(name) > MAX_NAME:
        raise AuthError(f"{kind} name {name[:20]!r}... is longer than {MAX_NAME} characters")
    bad = _BAD_NAME.search(name)
    if bad is not None:
        raise AuthError(
            f"{kind} name {name!r} may not contain {bad.group()!r} "
            "(no spaces, slashes, control characters, '*' or '>')"
        )


def _role_of(name: str) -> str | None:
    """The role a principal's name calls for, or None for a name no role has."""
    if name in FIXED_PRINCIPALS:
        return name
    for prefix, role in ((NODE_PREFIX, ROLE_NODE), (USER_PREFIX, ROLE_USER)):
        if name.startswith(prefix) and len(name) > len(prefix):
            return role
    return None


# --- credentials files ---------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """A principal's credentials as read from a file (`seed` None: a NATS JWT file)."""

    principal: str
    role: str
    seed: str | None
    path: Path

    @property
    def inbox_prefix(self) -> str:
        """Its inbox, `_INBOX.<principal>`: the task API answers only there (a JWT
        user's permissions must allow it to subscribe `_INBOX.<its name>.>`)."""
        return f"_INBOX.{self.principal}"

    def public_key(self) -> str:
        if self.seed is None:
            raise AuthError(f"{self.path}: a JWT credentials file has no gpuwarden nkey")
        return _public_key(self.seed)


def connect_options(creds: Credentials) -> dict[str, Any]:
    """nats-py connect options for these credentials."""
    if creds.seed is None:
        return {"user_credentials": str(creds.path), "inbox_prefix": creds.inbox_prefix}
    return {"nkeys_seed_str": creds.seed, "inbox_prefix": creds.inbox_prefix}


def msg_id_key(path: str | os.PathLike[str] | None) -> bytes | None:
    """The key of a principal's msg ids (JetStreamEventLog's `msg_id_key`), so nobody
    can store junk first under the msg id of an event it foresees (de-duplication is
    stream-wide, and some ids derive from what the log shows). Derived from the seed,
    so a restarted agent's retry still de-duplicates; None without credentials."""
    if path is None:
        return None
    creds = load_credentials(path)
    if creds.seed is None:  # a JWT file: no seed of ours to derive from
        return os.urandom(16)
    return hashlib.blake2b(creds.seed.encode(), digest_size=32, person=b"gw-msg-id").digest()


def load_credentials(path: str | os.PathLike[str]) -> Credentials:
    """Read a credentials file, ours or a NATS JWT one; errors name the file and the fault."""
    file = Path(path)
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise AuthError(f"{file}: no such credentials file") from None
    except IsADirectoryError:
        raise AuthError(f"{file}: is a directory, not a credentials file") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not text"
        raise AuthError(f"{file}: cannot read credentials: {reason}") from None
    if JWT_MARKER in text:
        return Credentials(_jwt_name(text) or file.stem, ROLE_JWT, None, file)
    fields: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise AuthError(f"{file}:{number}: expected `key: value`, found {line[:40]!r}")
        if key in fields:
            raise AuthError(f"{file}:{number}: {key} given twice")
        fields[key] = value
    for key in ("principal", "role", "seed"):
        if not fields.get(key):
            raise AuthError(
                f"{file}: not a gpuwarden credentials file: no `{key}:` line "
                "(expected principal, role and seed, or a NATS JWT creds file)"
            )
    principal, role, seed = fields["principal"], fields["role"], fields["seed"]
    if role not in PERMISSIONS:
        raise AuthError(f"{file}: unknown role {role!r} (one of {', '.join(PERMISSIONS)})")
    if not _PRINCIPAL_OK.match(principal) or _role_of(principal) != role:
        raise AuthError(f"{file}: principal {principal!r} cannot have role {role!r}")
    try:
        _public_key(seed)
    except AuthError as exc:
        raise AuthError(f"{file}: {exc}") from None
    return Credentials(principal, role, seed, file)


def _public_key(seed: str) -> str:
    if not seed.startswith("SU"):
        raise AuthError("the seed is not an NATS user seed (it must start with SU)")
    try:
        keys = nkeys.from_seed(bytearray(seed.encode()))
        public: bytes = keys.public_key
    except (nkeys.NkeysError, ValueError, TypeError) as exc:
        raise AuthError(f"the seed is not a valid nkey seed ({type(exc).__name__})") from None
    return public.decode()


def _jwt_name(text: str) -> str | None:
    """The `name` claim of a creds file's JWT, unverified (only to name it in messages)."""
    try:
        token = text.split(JWT_MARKER, 1)[1].split("---", 1)[0].strip().split("\n")[0]
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        name = claims.get("name")
    except (IndexError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and name else None


def render_credentials(principal: Principal, seed: str) -> str:
    return (
        f"# gpuwarden credentials: principal {principal.name} (role {principal.role}). "
        "Secret: whoever holds this file is that principal.\n"
        f"principal: {principal.name}\n"
        f"role: {principal.role}\n"
        f"seed: {seed}\n"
    )


def new_seed() -> str:
    seed: bytes = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return seed.decode()


# --- the server's authorization --------------------------------------------------------

AUTH_CONF_HEADER: Final = """\
# gpuwarden authorization for nats-server: generated by `gpuwarden auth` (and by
# `gpuwarden up` for its embedded server). Re-run the command instead of editing this
# file: it is rendered from the permission table in gpuwarden/adapters/auth.py.
# Include it from the server's configuration: include "auth.conf" (the path is
# relative to the including file).
#
# Why nkey users and not accounts with JWTs: every principal lives in one account, so
# the JetStream streams (GW_EVENTS, GW_CMDS, GW_DLQ) are shared without exports and
# imports; no operator, account JWTs or `nsc` tooling are needed; and this file is the
# single place that says who may do what. The server stores only public keys: the
# seeds stay in the principals' .creds files.
"""


def render_auth_conf(principals: Sequence[tuple[Principal, str]]) -> str:
    """The `authorization` block for (principal, public key) pairs."""
    lines = [AUTH_CONF_HEADER, "authorization {", "  users = ["]
    for principal, public in principals:
        lines += [
            f"    # {principal.name} (role {principal.role})",
            "    {",
            f"      nkey: {json.dumps(public)}",
            "      permissions: {",
            "        publish: {",
            f"          allow: {_list(principal.publish())}",
        ]
        if principal.deny_publish():
            lines.append(f"          deny: {_list(principal.deny_publish())}")
        lines += ["        }", f"        subscribe: {{ allow: {_list(principal.subscribe())} }}"]
        if principal.grant().allow_responses:
            lines.append("        allow_responses: true")
        lines += ["      }", "    }"]
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def _list(subjects: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(s) for s in subjects) + "]"


# --- generation ----------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    """One principal in a credentials directory, for the summary."""

    principal: Principal
    creds: Path
    public_key: str
    new: bool

    def summary(self) -> dict[str, Any]:
        grant = self.principal.grant()
        return {
            "principal": self.principal.name,
            "role": self.principal.role,
            "credentials": str(self.creds),
            "public_key": self.public_key,
            "new": self.new,
            "may_publish": self.principal.fill(grant.may_publish),
            "may_subscribe": self.principal.fill(grant.may_subscribe),
            "may_manage_streams": grant.may_manage_streams,
            "publish": self.principal.publish(),
            "deny_publish": self.principal.deny_publish(),
            "subscribe": self.principal.subscribe(),
            "allow_responses": grant.allow_responses,
        }


def wanted_principals(nodes: Sequence[str] = (), users: Sequence[str] = ()) -> list[Principal]:
    principals = [Principal(name, name) for name in FIXED_PRINCIPALS]
    principals += [node_principal(node) for node in nodes]
    principals += [user_principal(user) for user in users]
    return principals


def generate(out: Path, nodes: Sequence[str] = (), users: Sequence[str] = ()) -> list[Issued]:
    """Make or refresh a credentials directory: auth.conf and one .creds per principal.

    Principals already there keep their seeds (their files are not rewritten); the ones
    asked for that are missing get new seeds. auth.conf lists all of them: to revoke
    one, delete its .creds file and run this again.
    """
    wanted = wanted_principals(nodes, users)
    out = Path(out)
    _make_private_dir(out)
    existing = _existing(out)
    issued: dict[str, Issued] = {}
    for principal in [*existing.values(), *wanted]:
        if principal.name in issued:
            continue
        path = out / (principal.name + CREDS_SUFFIX)
        if principal.name in existing:
            creds = load_credentials(path)
            issued[principal.name] = Issued(principal, path, creds.public_key(), new=False)
            continue
        seed = new_seed()
        _write_private(path, render_credentials(principal, seed))
        issued[principal.name] = Issued(principal, path, _public_key(seed), new=True)
    ordered = sorted(issued.values(), key=lambda i: (_ORDER.get(i.principal.role, 9), i.creds))
    conf = render_auth_conf([(i.principal, i.public_key) for i in ordered])
    _write_private(out / AUTH_CONF, conf)
    ensure_env_key(out / ENV_KEY)  # the engines' and the API's: it opens sealed env
    return ordered


_ORDER: Final = {role: n for n, role in enumerate(PERMISSIONS)}


def _existing(out: Path) -> dict[str, Principal]:
    """The principals whose credentials are in the directory already (ours only)."""
    found: dict[str, Principal] = {}
    for path in sorted(out.glob("*" + CREDS_SUFFIX)):
        creds = load_credentials(path)  # a damaged secret is an error, never overwritten
        if creds.seed is None:
            continue  # a JWT creds file someone keeps here: not ours to list
        if path.stem != creds.principal:
            raise AuthError(f"{path}: holds principal {creds.principal!r}, not {path.stem!r}")
        found[creds.principal] = Principal(creds.principal, creds.role)
    return found


def _make_private_dir(out: Path) -> None:
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        if stat.S_IMODE(out.stat().st_mode) != 0o700:
            out.chmod(0o700)
    except OSError as exc:
        raise AuthError(f"cannot make credentials directory {out}: {exc.strerror}") from None


def _write_private(path: Path, text: str) -> None:
    """Write a file 0600, atomically (a reader never sees half a key)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise AuthError(f"cannot write {path}: {exc.strerror}") from None


# --- the data directory's own credentials (gpuwarden up) ---------------------------------

ENV_KEY: Final = "env.key"  # beside the credentials: for the engines and the API only
LOCAL_AUTH_DIR: Final = "auth"
CLI_PRINCIPAL: Final = ROLE_OPERATOR  # what CLI calls in a data directory act as
PROBE_PRINCIPAL: Final = ROLE_READER  # the embedded server's readiness probe


def local_auth_dir(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / LOCAL_AUTH_DIR


def local_creds(data_dir: str | os.PathLike[str], principal: str) -> Path | None:
    """A principal's credentials file in the data directory, if `up` made one."""
    path = local_auth_dir(data_dir) / (principal + CREDS_SUFFIX)
    return path if path.exists() else None


def local_authorization(data_dir: str | os.PathLike[str]) -> Path | None:
    """The data directory's auth.conf, if `up` made one."""
    path = local_auth_dir(data_dir) / AUTH_CONF
    return path if path.exists() else None


def prepare_local(data_dir: str | os.PathLike[str], node: str) -> list[Issued]:
    """The credentials `gpuwarden up` runs with: every fixed principal and its node."""
    return generate(local_auth_dir(data_dir), nodes=[node])


def resolve_creds(args: Any) -> str | None:
    """The credentials file a CLI call uses: --creds, else (without --nats) the data
    directory's operator credentials when `up` made them, else none."""
    given: str | None = getattr(args, "creds", None)
    if given:
        return given
    if getattr(args, "nats", None):
        return None
    found = local_creds(getattr(args, "data_dir", ".gpuwarden"), CLI_PRINCIPAL)
    return str(found) if found is not None else None


def embedded_server_auth(args: Any) -> tuple[Path | None, dict[str, Any]]:
    """The authorization the data directory's embedded server runs with (`up` made
    `<data-dir>/auth/auth.conf`, and not --insecure), and its readiness probe's connect
    options (the reader's credentials: `$JS.API.INFO` is all it needs)."""
    data_dir = getattr(args, "data_dir", ".gpuwarden")
    conf = None if getattr(args, "insecure", False) else local_authorization(data_dir)
    if conf is None:
        return None, {}
    probe = local_creds(data_dir, PROBE_PRINCIPAL)
    if probe is None:
        raise AuthError(
            f"{conf} is there but {PROBE_PRINCIPAL}{CREDS_SUFFIX} beside it is not: run "
            f"`gpuwarden up` (or `gpuwarden auth --out {conf.parent}`) to make it again"
        )
    return conf, connect_options(load_credentials(probe))


def refused_hint(args: Any, creds: str | None) -> str:
    """What to do when the server refused a CLI call's connection."""
    made = local_auth_dir(getattr(args, "data_dir", ".gpuwarden"))
    if creds:
        return (
            f"the server does not know the principal in {creds} (revoked, or another "
            "cluster's): pass the --creds FILE this server's `gpuwarden auth` made"
        )
    return (
        f"the server demands credentials and none were found: pass --creds FILE (made by "
        f"`gpuwarden auth`; `gpuwarden up` keeps its own in {made}/, e.g. "
        f"{made / (CLI_PRINCIPAL + CREDS_SUFFIX)})"
    )


# --- the summary -------------------------------------------------------------------------


def format_summary(issued: Sequence[Issued], out: Path) -> str:
    headers = ("PRINCIPAL", "ROLE", "MAY PUBLISH", "MAY SUBSCRIBE", "MAY MANAGE STREAMS")
    rows = [headers]
    for item in issued:
        s = item.summary()
        name = s["principal"] + (" (new)" if item.new else "")
        rows.append(
            (name, s["role"], s["may_publish"], s["may_subscribe"], s["may_manage_streams"])
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(headers) - 1)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        + "  "
        + row[-1]
        for row in rows
    ]
    lines += [
        "",
        SUMMARY_FOOTER,
        f"Server authorization: {out / AUTH_CONF}; credentials: {out}/<principal>.creds "
        "(secret, mode 0600).",
        f"Env key: {out / ENV_KEY} (secret): the engines' and the API's only (`gpuwarden "
        "engine --env-key`); it opens the task env that the log holds sealed.",
    ]
    return "\n".join(lines) + "\n"


def print_summary(issued: Sequence[Issued], out: Path, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps([item.summary() for item in issued], indent=2))
    else:
        sys.stdout.write(format_summary(issued, out))
