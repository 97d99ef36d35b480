"""The task API on NATS request-reply: create, cancel, get, list.

The service holds no state of its own: it follows the log and folds it (the cluster's
shape for validation, the supervisor's State for task status, client request ids for
idempotency), so a restarted service knows everything the log knows. Its only writes
are compare-and-set appends on one task's aggregate: `task.submitted` with an expected
last subject sequence of 0 (a task is created once, whoever asks twice), and
`task.cancelled` against the sequence it read (a cancel never lands after the task
ended). Allocation itself stays with the engine, which reacts to `task.submitted`.

Requests and replies are JSON objects; an error reply is
`{"error": {"code": ..., "field": ..., "message": ...}}` and stores nothing.

Who asks is in the subject: a request goes to `gw.api.<principal>.task.<verb>`, and the
NATS permissions `gpuwarden auth` writes let a principal publish only under its own name,
so the token is the caller's authenticated identity (Kubernetes' NodeRestriction, for
the task API). A task's owner is that principal; only the owner or an operator may
cancel it or read its env. An insecure service (`trust_owner_field`, `up --insecure`)
also serves the old subjects `gw.api.task.<verb>` and lets a request's `owner` field win.

A task's env values are sealed to the cluster's env key before they are stored
(`env_seal`): every reader of GW_EVENTS sees ciphertext, and only the engine, building the
run command for the node that got the task, opens them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Final, Protocol

import anyio
import anyio.abc
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream
from gpuwarden.adapters.env_seal import (
    SEALED_PREFIX,
    EnvKey,
    EnvSealError,
    is_sealed,
    open_env,
    seal_env,
)
from gpuwarden.engine.core.admission import Admission, check_size
from gpuwarden.engine.core.errors import GpuwardenError, TaskRequestError
from gpuwarden.engine.core.events import (
    Event,
    TaskCancelled,
    TaskSubmitted,
    aggregate_of_subject,
    encode,
    is_legacy_subject,
    subject_token,
    task_subject,
    to_builtins,
)
from gpuwarden.engine.core.fold import evolve
from gpuwarden.engine.core.intake import (
    ClusterShape,
    ValidTask,
    fold_shape,
    task_id_for_request,
    validate_create,
)
from gpuwarden.engine.core.state import TERMINAL, State, TaskState, initial_state
from gpuwarden.engine.core.wire import MAX_EVENT_BYTES
from gpuwarden.engine.ids import new_id
from gpuwarden.engine.ports import Clock, ConcurrencyError, EventLog, StoredEvent
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

log = logging.getLogger("gpuwarden.api")

VERBS: Final = ("create", "cancel", "get", "list")
API_SUBJECTS: Final = "gw.api.*.task.*"  # gw.api.<principal>.task.<verb>
# The old subjects, without a principal: served only by an insecure service.
CREATE: Final = "gw.api.task.create"
CANCEL: Final = "gw.api.task.cancel"
GET: Final = "gw.api.task.get"
LIST: Final = "gw.api.task.list"
LEGACY_SUBJECTS: Final = "gw.api.task.*"
OPERATORS: Final = frozenset({"operator", "admin"})
ME: Final = "me"  # list's owner filter for the caller
QUEUE: Final = "gw-api"
ACTOR: Final = "api"
MAX_REQUEST_BYTES: Final = 256 * 1024
DEFAULT_CANCEL_REASON: Final = "cancelled by owner"
CANCEL_TRIES: Final = 5
LIST_LIMIT: Final = 1000

IdSource = Callable[[datetime], str]


def api_subject(principal: str, verb: str) -> str:
    """Where `principal` (a subject token, as auth's principal names are) sends a `verb`
    request; api_cli spells the same."""
    return f"gw.api.{principal}.task.{verb}"


def route(subject: str) -> tuple[str, str | None] | None:
    """(verb, principal) of an API subject; principal None on an old subject; None if
    the subject is no API's."""
    tokens = subject.split(".")
    if len(tokens) == 5 and tokens[:2] == ["gw", "api"] and tokens[3] == "task":
        principal, verb = tokens[2], tokens[4]
        return (verb, principal) if verb in VERBS and principal else None
    if len(tokens) == 4 and tokens[:3] == ["gw", "api", "task"] and tokens[3] in VERBS:
        return tokens[3], None
    return None


class Admits(Protocol):
    """engine/admission's Admission: the refusal reason for a stored message, or None."""

    def admit(self, subject: str, event: Event) -> str | None: ...


class ApiRequestError(GpuwardenError):
    """A request the service answers with an error (and stores nothing for)."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field


class ApiService:
    """Serves the task API for as long as `serve()` runs; several may share a queue group."""

    def __init__(
        self,
        nc: NatsClient,
        log: EventLog,
        clock: Clock,
        ids: IdSource = new_id,
        *,
        workers: int = 64,
        sync_timeout_s: float = 5.0,
        ready_timeout_s: float = 300.0,
        shared: bool = False,
        trust_owner_field: bool = False,
        operators: frozenset[str] = OPERATORS,
        env_key: EnvKey | None = None,
        admission: Admits | None = None,
    ) -> None:
        """`shared`: another reader in this process (the engine) feeds `follow()` and
        sets `ready` once it has caught up; no subscription of its own.

        `trust_owner_field`: insecure (no authenticated principals): a request's `owner`
        wins, and the old principal-less subjects are served. `operators`: principals
        that may cancel any task and read any task's env. `env_key`: seals env at create
        and opens it for owners and operators; without one env is stored in clear.
        `admission`: the stored-message check (default: the engine's, engine/admission);
        a refused record is counted in `refused` and not folded."""
        self.nc = nc
        self.trust_owner_field = trust_owner_field
        self.operators = operators
        self.env_key = env_key
        self.admission: Admits | None = admission if admission is not None else Admission()
        self.shared = shared
        self.log = log
        self.clock = clock
        self.ids = ids
        self.workers = workers
        self.sync_timeout_s = sync_timeout_s
        self.ready_timeout_s = ready_timeout_s  # catching up on a long log before serving
        self.shape = ClusterShape()
        self.state: State = initial_state()
        self.requests: dict[tuple[str, str], str] = {}  # (owner, request id) -> task id
        self.subject_seqs: dict[str, int] = {}
        self.folded = 0
        self.fold_errors = 0  # records whose fold raised (logged, skipped)
        self.refused = 0  # records admission refused (not folded)
        self.ready = anyio.Event()
        self._progress = anyio.Event()

    # --- following the log -----------------------------------------------------------

    def fold(self, record: StoredEvent) -> None:
        """Fold one record; crash-only: no single record can stop the service."""
        if record.seq <= self.folded:
            return
        self.folded = record.seq
        if not is_legacy_subject(record.subject):  # what the aggregate's CAS counts
            self.subject_seqs[aggregate_of_subject(record.subject)] = record.seq
        event = record.event
        if event is None:
            return
        too_large = check_size(len(record.data))
        if too_large is not None:  # the engine dead-letters it: it never happened
            self.refused += 1
            log.warning("seq %d on %s not folded: %s", record.seq, record.subject, too_large)
            return
        try:
            if self.admission is not None:
                reason = self.admission.admit(record.subject, event)
                if reason is not None:
                    self.refused += 1
                    log.warning("seq %d on %s not folded: %s", record.seq, record.subject, reason)
                    return
            self._fold_event(event)
        except Exception as exc:
            self.fold_errors += 1
            why = f"{type(exc).__name__}: {exc}"  # a traceback's last line
            log.error(
                "seq %d on %s could not be folded, skipped: %s", record.seq, record.subject, why
            )

    def _fold_event(self, event: Event) -> None:
        self.shape = fold_shape(self.shape, event)
        if isinstance(event, TaskSubmitted) and event.request_id is not None:
            self.requests.setdefault((event.owner, event.request_id), event.task_id)
        evolve(self.state, event)

    def follow(self, record: StoredEvent) -> None:
        """Fold one record of the log, in order, and wake whoever waits on progress."""
        self.fold(record)
        self._progress.set()
        self._progress = anyio.Event()

    async def _follow(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        end = await self.log.last_seq()
        if end == 0:
            self.ready.set()
        task_status.started()
        async for record in self.log.subscribe(1):
            self.follow(record)
            if record.seq >= end and not self.ready.is_set():
                self.ready.set()

    async def wait_folded(self, seq: int, timeout_s: float | None = None) -> None:
        with anyio.fail_after(timeout_s or self.sync_timeout_s):
            while self.folded < seq:
                await self._progress.wait()

    async def sync(self) -> None:
        """Fold up to the log's current end: a read after a write sees the write."""
        try:
            await self.wait_folded(await self.log.last_seq())
        except TimeoutError:
            raise ApiRequestError(
                "unavailable", "the API service is behind the event log; retry"
            ) from None

    # --- serving ---------------------------------------------------------------------

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        send, receive = anyio.create_memory_object_stream[Msg](self.workers * 4)

        async def enqueue(msg: Msg) -> None:
            await send.send(msg)

        async with anyio.create_task_group() as tg:
            if not self.shared:
                await tg.start(self._follow)
            with anyio.fail_after(self.ready_timeout_s):
                await self.ready.wait()
            for _ in range(self.workers):
                tg.start_soon(self._worker, receive.clone())
            served = [API_SUBJECTS, LEGACY_SUBJECTS] if self.trust_owner_field else [API_SUBJECTS]
            subs = [await self.nc.subscribe(subject, queue=QUEUE, cb=enqueue) for subject in served]
            try:
                task_status.started()
                await anyio.sleep_forever()
            finally:
                with anyio.CancelScope(shield=True):
                    for sub in subs:
                        await _quiet_unsubscribe(sub)

    run = serve

    async def _worker(self, receive: MemoryObjectReceiveStream[Msg]) -> None:
        async with receive:
            async for msg in receive:
                await self._serve(msg)

    async def _serve(self, msg: Msg) -> None:
        if not msg.reply:
            log.warning("request on %s without a reply subject ignored", msg.subject)
            return
        if not self.reply_allowed(msg.subject, msg.reply):
            log.warning("request on %s with reply subject %s ignored", msg.subject, msg.reply)
            return
        try:
            answer = await self.handle(msg.subject, msg.data)
        except Exception as exc:  # one bad request never stops the service
            log.exception("request on %s failed", msg.subject)
            answer = _error("internal", f"internal error: {type(exc).__name__}: {exc}")
        try:
            await self.nc.publish(msg.reply, json.dumps(answer, default=str).encode())
        except Exception as exc:
            log.error("reply on %s failed: %s", msg.subject, exc)

    def reply_allowed(self, subject: str, reply: str) -> bool:
        """A reply goes only to the caller's own inbox, `_INBOX.<principal>.`: the API may
        answer any request (allow_responses), so a reply subject of the caller's choosing
        would let it write, as the API, wherever the caller names (a node's subject, a
        task's, another node's commands). Without authorization there is no principal."""
        if self.trust_owner_field:
            return True
        found = route(subject)
        return found is not None and reply.startswith(f"_INBOX.{found[1]}.")

    async def handle(self, subject: str, data: bytes) -> dict[str, Any]:
        """The reply to one request (also callable without NATS, for tests)."""
        handlers = {
            "create": self.create,
            "cancel": self.cancel,
            "get": self.get,
            "list": self.list_tasks,
        }
        found = route(subject)
        try:
            if found is None or (found[1] is None and not self.trust_owner_field):
                raise ApiRequestError("invalid", f"no API on {subject}")
            verb, principal = found
            return await handlers[verb](_parse(data), principal)
        except TaskRequestError as exc:
            return _error("invalid", str(exc), exc.field)
        except ApiRequestError as exc:
            return _error(exc.code, str(exc), exc.field)
        except GpuwardenError as exc:
            return _error("unavailable", str(exc))

    # --- create ----------------------------------------------------------------------

    async def create(self, request: Mapping[str, Any], principal: str | None) -> dict[str, Any]:
        valid = validate_create(request, self.shape)
        valid = dataclasses.replace(valid, owner=self._owner(valid.owner, principal))
        _refuse_sealed_values(valid.env)
        key = (valid.owner, valid.request_id) if valid.request_id is not None else None
        if key is not None and key in self.requests:
            return await self._existing(self.requests[key], valid)
        now = self.clock.now()
        task_id = task_id_for_request(*key) if key is not None else self.ids(now)
        event = valid.to_event(task_id, self.ids(now), now, ACTOR)
        if self.env_key is not None and event.env:
            event = msgspec.structs.replace(
                event, env=seal_env(event.env, self.env_key.public_bytes)
            )
        size = len(encode(event))
        if size > MAX_EVENT_BYTES:  # the engine would dead-letter it: the task never runs
            sealed = " (with its env sealed)" if self.env_key is not None and event.env else ""
            raise ApiRequestError(
                "invalid",
                f"the task is too large: its task.submitted{sealed} would be {size} bytes, "
                f"over the engine's limit of {MAX_EVENT_BYTES}",
            )
        try:
            (seq,) = await self.log.append(task_subject(task_id), [event], 0)
        except ConcurrencyError:
            return await self._existing(task_id, valid)
        return {"task_id": task_id, "created": True, "seq": seq, "event": to_builtins(event)}

    def _owner(self, given: str, principal: str | None) -> str:
        """The owner of a task `principal` creates; `given` is the request's field."""
        if principal is None:  # an old subject: insecure only
            return given
        if not given or self.trust_owner_field:
            return given or principal
        if given != principal and subject_token(given) != principal:
            raise ApiRequestError(
                "forbidden", f"owner comes from your credentials (you are {principal})", "owner"
            )
        return given  # the name whose subject token the caller is

    async def _existing(self, task_id: str, valid: ValidTask) -> dict[str, Any]:
        """The task a repeated request id already created, if it asked for the same."""
        submitted = await self._submitted(task_id)
        if submitted is None:
            raise ApiRequestError(
                "conflict", f"task {task_id} exists but its submission is unreadable"
            )
        try:  # sealed values never compare equal: compare what they say
            asked = msgspec.structs.replace(submitted, env=open_env(submitted.env, self.env_key))
        except EnvSealError as exc:
            raise ApiRequestError(
                "conflict",
                f"request_id {valid.request_id!r} was already used for task {task_id}, whose "
                f"env cannot be compared here: {exc}",
                "request_id",
            ) from None
        if not valid.same_request(asked):
            raise ApiRequestError(
                "conflict",
                f"request_id {valid.request_id!r} was already used for task {task_id} "
                "with a different request",
                "request_id",
            )
        seq = self.subject_seqs.get(task_subject(task_id), 0)
        return {"task_id": task_id, "created": False, "seq": seq, "event": to_builtins(submitted)}

    async def _submitted(self, task_id: str) -> TaskSubmitted | None:
        task = self.state.tasks.get(task_id)
        if task is not None:
            return task.spec
        async for record in self.log.read(1, subject=task_subject(task_id)):
            if isinstance(record.event, TaskSubmitted):
                return record.event
        return None

    # --- cancel ----------------------------------------------------------------------

    async def cancel(self, request: Mapping[str, Any], principal: str | None) -> dict[str, Any]:
        task_id = _task_id(request)
        reason = request.get("reason") or DEFAULT_CANCEL_REASON
        if not isinstance(reason, str) or len(reason) > 1024 or "\x00" in reason:
            raise ApiRequestError(
                "invalid", "reason must be a string (<= 1024 chars, no NUL)", "reason"
            )
        for _ in range(CANCEL_TRIES):
            await self.sync()
            task = self._task(task_id)
            if not self._may_act_on(task, principal):
                raise ApiRequestError(
                    "forbidden",
                    f"task {task_id} belongs to {task.spec.owner or 'nobody'}; only its owner "
                    f"or an operator may cancel it (you are {principal})",
                    "task_id",
                )
            subject = task_subject(task_id)
            now = self.clock.now()
            current = task.current
            event = TaskCancelled(
                id=self.ids(now),
                at=now,
                actor=ACTOR,
                correlation_id=task_id,
                task_id=task_id,
                reason=reason,
                attempt=current.n if current is not None else None,
            )
            try:
                (seq,) = await self.log.append(subject, [event], self.subject_seqs.get(subject, 0))
            except ConcurrencyError:
                continue  # the task moved on meanwhile: look again
            return {"task_id": task_id, "seq": seq, "event": to_builtins(event)}
        raise ApiRequestError("conflict", f"task {task_id} kept changing; retry the cancel")

    def _may_act_on(self, task: TaskState, principal: str | None) -> bool:
        """The owner and the operators may; on an old subject (insecure) anyone may."""
        return principal is None or principal in self.operators or owned_by(task, principal)

    def _task(self, task_id: str, *, for_cancel: bool = True) -> TaskState:
        task = self.state.tasks.get(task_id)
        if task is None:
            raise ApiRequestError("not_found", f"no task {task_id!r}", "task_id")
        if for_cancel and task.status in TERMINAL:
            raise ApiRequestError(
                "conflict", f"task {task_id} is already {task.status}; nothing to cancel", "task_id"
            )
        return task

    # --- reads -----------------------------------------------------------------------

    async def get(self, request: Mapping[str, Any], principal: str | None) -> dict[str, Any]:
        task_id = _task_id(request)
        await self.sync()
        task = self._task(task_id, for_cancel=False)
        summary = task_summary(task)
        if principal is not None and self._may_act_on(task, principal):
            try:
                summary["env"] = open_env(task.spec.env, self.env_key)
            except EnvSealError as exc:
                summary["env_error"] = str(exc)
        return {"task": summary}

    async def list_tasks(self, request: Mapping[str, Any], principal: str | None) -> dict[str, Any]:
        status, owner = request.get("status"), request.get("owner")
        if owner == ME:
            if principal is None:
                raise ApiRequestError(
                    "invalid",
                    "owner 'me' needs a principal: ask on gw.api.<you>.task.list",
                    "owner",
                )
            return await self._list(status, lambda t: owned_by(t, principal), request)
        return await self._list(status, lambda t: owner is None or t.spec.owner == owner, request)

    async def _list(
        self, status: object, keep: Callable[[TaskState], bool], request: Mapping[str, Any]
    ) -> dict[str, Any]:
        limit = request.get("limit", LIST_LIMIT)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= LIST_LIMIT:
            raise ApiRequestError("invalid", f"limit must be 1..{LIST_LIMIT}", "limit")
        await self.sync()
        tasks = [
            task_summary(t)
            for t in self.state.tasks.values()
            if (status is None or t.status == status) and keep(t)
        ]
        return {"tasks": tasks[-limit:], "total": len(tasks)}


def _refuse_sealed_values(env: Mapping[str, str]) -> None:
    """A sealed value is the API's to make: one copied from another task's submission
    would otherwise be opened by the engine into this task's container."""
    for name, value in env.items():
        if is_sealed(value):
            raise ApiRequestError(
                "invalid", f"env {name} may not start with {SEALED_PREFIX!r}", f"env.{name}"
            )


def owned_by(task: TaskState, principal: str) -> bool:
    """Whether `principal` (a subject token) is the task's owner."""
    owner = task.spec.owner
    return bool(owner) and (owner == principal or subject_token(owner) == principal)


def task_summary(task: TaskState) -> dict[str, Any]:
    spec = task.spec
    current = task.current
    return {
        "task_id": spec.task_id,
        "name": spec.name,
        "owner": spec.owner,
        "image": spec.image,
        "command": list(spec.command),
        "gpus": spec.gpus,
        "gpu_model": spec.gpu_model,
        "status": task.status,
        "pending_reason": task.pending_reason,
        "attempt": current.n if current is not None else None,
        "node": current.node if current is not None else None,
        "gpu_uuids": list(current.gpu_uuids) if current is not None else [],
        "rebuilds": task.rebuilds,
        "failure": task.failure.reason if task.failure is not None else None,
        "request_id": spec.request_id,
        "env_names": sorted(spec.env),
    }


def _parse(data: bytes) -> Mapping[str, Any]:
    if len(data) > MAX_REQUEST_BYTES:
        raise ApiRequestError("invalid", f"request is larger than {MAX_REQUEST_BYTES} bytes")
    try:
        request = json.loads(data)
    except ValueError as exc:
        raise ApiRequestError("invalid", f"request is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ApiRequestError(
            "invalid", f"request must be a JSON object, not {type(request).__name__}"
        )
    return request


def _task_id(request: Mapping[str, Any]) -> str:
    task_id = request.get("task_id")
    if not isinstance(task_id, str) or not task_id:
        raise ApiRequestError("invalid", "task_id is required (a string)", "task_id")
    return task_id


def _error(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "field": field, "message": message}}


async def _quiet_unsubscribe(sub: Any) -> None:
    try:
        with anyio.fail_after(2):
            await sub.unsubscribe()
    except Exception as exc:
        log.debug("unsubscribe failed: %s", exc)
