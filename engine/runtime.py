"""The engine service: the log feeds the supervisor, its decisions go back to the log.

The loop folds every event in log order, so the state is always the fold of a prefix
of the log. When no decision of its own is on its way back, it decides on everything
folded since its last round (`decide_many`) and appends the result as one atomic
batch, with each subject's expected last sequence: a concurrent writer (another
engine) makes the append fail with ConcurrencyError, and the engine reads on and
decides again. Every decision carries the headers `Gw-Basis` (the last sequence it
had folded) and `Gw-Trigger` (the events it decided on), so `replay --check` can
re-derive it from exactly the state it was made in.

Commands are sent when a decision is folded back, with ids derived from it, so a
resend after a crash is dropped by the server (and by the agent's labels).

Size: one module, past 600 lines, on purpose: the consume, decide, append and dispatch
loops share the engine's state and its in-flight bookkeeping, and each is short.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Final, Literal, NoReturn

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from gpuwarden.engine.core.admission import Admission
from gpuwarden.engine.core.commands import Command, commands_for
from gpuwarden.engine.core.decide import decide_guarded, reconcile
from gpuwarden.engine.core.events import (
    Event,
    FaultClassified,
    NodeLost,
    NodeRecovered,
    TaskCancelled,
    aggregate_of,
    aggregate_of_subject,
    is_legacy_subject,
    type_of,
)
from gpuwarden.engine.core.fold import evolve
from gpuwarden.engine.core.liveness import Liveness
from gpuwarden.engine.core.policy import DEFAULT_POLICY, Policy
from gpuwarden.engine.core.state import TERMINAL, State, initial_state, next_due
from gpuwarden.engine.core.wire import (
    BASIS_HEADER,
    MAX_EVENT_BYTES,
    POLICY_HEADER,
    TRIGGER_HEADER,
    policy_digest,
)
from gpuwarden.engine.ids import new_id
from gpuwarden.engine.metrics import EngineMetrics
from gpuwarden.engine.ports import (
    Clock,
    CommandBus,
    ConcurrencyError,
    DeadLetters,
    EventLog,
    EventLogError,
    StoredEvent,
    StreamCheck,
)

log = logging.getLogger("gpuwarden.engine")

MAX_TRIGGERS_PER_ROUND: Final = 512
MAX_DEAD_BACKLOG: Final = 100_000  # dead letters waiting for GW_DLQ; past it, counted only
MAX_BATCH: Final = 500  # decisions in one atomic append
MAX_SEND_BATCH: Final = 256  # commands the dispatcher sends at once, pipelined
MAX_DEAD_LETTER_BATCH: Final = 256  # dead letters copied to GW_DLQ at once, concurrently
MAX_HANDLER_ERROR_CHARS: Final = 900  # of the exception's text, before its frame
PUMP_BUFFER: Final = 10_000  # records read from the subscription, not yet folded
RESEND_PAUSE_S: Final = 0.2  # after a failed send or dead-letter copy, before the next
STREAM_CHECK_EVERY_S: Final = 1.0  # the lag gauge and the stream check
BACKOFF_MIN_S: Final = 0.05  # after a failed append: the first pause before the next round
BACKOFF_MAX_S: Final = 2.0  # ... doubled on every failure up to this
SKIPS_LOGGED: Final = 100  # the first dead letters each get a warning...
SKIPS_LOGGED_EVERY: Final = 1000  # ...after them, one in this many

# Why a message was not folded: the `reason` label of gpuwarden_dead_letters_total.
DeadLetterKind = Literal["undecodable", "too_large", "refused", "handler_error"]


def next_backoff(backoff_s: float) -> float:
    """The pause after another failed append: doubled, within [BACKOFF_MIN_S, BACKOFF_MAX_S]."""
    return min(max(backoff_s * 2, BACKOFF_MIN_S), BACKOFF_MAX_S)


def handler_error(exc: BaseException) -> str:
    """One line for a handler that raised: the exception and the frame it came from."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = ""
    if frames:
        last = frames[-1]
        where = f" at {last.filename.rsplit('/', 1)[-1]}:{last.lineno} in {last.name}"
    return f"handler error: {type(exc).__name__}: {exc}"[:MAX_HANDLER_ERROR_CHARS] + where


class Engine:
    def __init__(
        self,
        log: EventLog,
        bus: CommandBus,
        clock: Clock,
        policy: Policy = DEFAULT_POLICY,
        *,
        dead_letters: DeadLetters | None = None,
        metrics: EngineMetrics | None = None,
        liveness: Liveness | None = None,
        max_event_bytes: int = MAX_EVENT_BYTES,
        open_command: Callable[[Command], Command] | None = None,
        stream_check: StreamCheck | None = None,
    ) -> None:
        """`open_command` readies a command for its one node just before it is sent (the
        shell opens a task's sealed env there, so the clear values exist only in the
        command to the node that runs the task)."""
        self.log = log
        self.open_command = open_command
        # Is the stream still the one folded (not deleted and recreated, not trimmed)?
        # Asked at start and every second; while it says no, the engine decides nothing.
        self.stream_check = stream_check
        self.stream_problem: str | None = None
        self.bus = bus
        self.clock = clock
        self.policy = policy
        self.policy_digest = policy_digest(policy)
        self.dead_letters = dead_letters
        self.metrics = metrics or EngineMetrics()
        self.liveness = liveness
        self.max_event_bytes = max_event_bytes
        self.state: State = initial_state(policy)
        # Per aggregate, the last sequence of its scheme-2 subjects: the expectation of
        # the compare-and-set on `<aggregate>.>` (scheme-1 messages are outside it).
        self.subject_seqs: dict[str, int] = {}
        self.folded = 0  # last stream sequence folded
        self.awaiting = 0  # our own last append's sequence, until folded back
        # Admission: every message is checked for meaning (and its writer) before it folds.
        self.admission = Admission()
        self.triggers: list[Event] = []
        # Their records, in stream order: a run of sequences, less the dead letters.
        self.trigger_records: list[StoredEvent] = []
        self.trigger_since: float | None = None
        self.live = False
        self.deciding = False  # a round is between deciding and its append's ack
        self._dead_backlog: list[tuple[StoredEvent, str]] = []  # on their way to GW_DLQ
        self._dead_ready = anyio.Event()
        self.reconcile_due = False  # the startup sweep could not be stored yet
        self.caught_up = anyio.Event()
        # In-process followers of the same read of the log (the task API), each record
        # once and in order, as it is read: one subscription serves them all.
        self.taps: list[Callable[[StoredEvent], None]] = []
        self.progress = anyio.Event()  # set (and replaced) after each fold batch
        self.outbox: list[Command] = []  # commands for the dispatcher, in decision order
        self._outbox_ready = anyio.Event()
        self._news = anyio.Event()  # something outside the log changed (a heartbeat)
        self.backoff_s = 0.0  # after a failed append, before the next round
        # Folded in catch-up: the last cancel per task, recovery per node, and every
        # conclusion; the stops they still call for (commands_for judges that on the
        # caught-up state) are resent at start_live: an engine may have died before its
        # dispatcher sent them.
        self._stop_causes: dict[str, Event] = {}
        if liveness is not None:
            liveness.on_news = self.wake

    def wake(self) -> None:
        """Re-check timers now (e.g. a lost node beat again); safe from any task."""
        self._news.set()

    # --- folding -----------------------------------------------------------------

    async def _fold(self, record: StoredEvent) -> None:
        if record.seq <= self.folded:
            return  # a redelivery after a reconnect
        self.folded = record.seq
        if not is_legacy_subject(record.subject):
            self.subject_seqs[aggregate_of_subject(record.subject)] = record.seq
        self.metrics.last_seq = record.seq
        event = record.event
        kind: DeadLetterKind = "undecodable"
        problem = record.error or "undecodable"
        if event is not None and len(record.data) > self.max_event_bytes:
            kind, event = "too_large", None
            problem = f"event of {len(record.data)} bytes exceeds {self.max_event_bytes}"
        if event is not None:
            refused = self.admission.admit(record.subject, event)
            if refused is not None:
                kind, problem, event = "refused", f"refused: {refused}", None
        if event is None:
            await self._dead_letter(record, kind, problem)
            return
        self.metrics.events_consumed += 1
        try:
            evolve(self.state, event)
        except Exception as exc:  # a bug no test caught: this event, not the engine, stops
            await self._handler_failed(record, exc)
            return
        if isinstance(event, FaultClassified):
            self.metrics.faults[event.fault] += 1
        if self.live:
            if not self.triggers:
                self.trigger_since = time.perf_counter()
            self.triggers.append(event)
            self.trigger_records.append(record)
            try:
                self.outbox.extend(commands_for(self.state, event))
            except Exception as exc:
                await self._handler_failed(record, exc, dead_letter=False)
        elif isinstance(event, TaskCancelled | NodeRecovered):
            self._stop_causes[record.subject] = event
        elif isinstance(event, FaultClassified):
            self._stop_causes[f"{record.subject}#{event.attempt}"] = event  # may still run
        if self.liveness is not None and isinstance(event, NodeLost | NodeRecovered):
            self.liveness.settled(event.node, lost=isinstance(event, NodeLost))

    async def _handler_failed(
        self, record: StoredEvent, exc: Exception, *, dead_letter: bool = True
    ) -> None:
        """Crash-only: say it loudly, count it, dead-letter the event, and go on."""
        reason = handler_error(exc)
        log.error("seq %s on %s: %s", record.seq, record.subject, reason, exc_info=exc)
        if dead_letter:
            await self._dead_letter(record, "handler_error", reason)
        else:
            self.metrics.dead_letters["handler_error"] += 1

    async def _dead_letter(self, record: StoredEvent, kind: DeadLetterKind, reason: str) -> None:
        self.metrics.dead_letters[kind] += 1
        skipped = sum(self.metrics.dead_letters.values())
        if kind != "handler_error" and (
            skipped <= SKIPS_LOGGED or skipped % SKIPS_LOGGED_EVERY == 0
        ):
            log.warning("seq %s on %s skipped (%d so far): %s", record.seq, record.subject,
                        skipped, reason)  # fmt: skip
        if self.dead_letters is None:
            return
        # Copied to GW_DLQ in the background, pipelined: a flood of junk (any writer may
        # send it on its own subjects) must not hold up the fold, or decisions wait.
        if len(self._dead_backlog) >= MAX_DEAD_BACKLOG:
            self.metrics.dead_letters["not_copied"] += 1  # the original stays in the log
            return
        self._dead_backlog.append((record, reason))
        self._dead_ready.set()

    async def _copy_dead_letters(self) -> None:
        """Copy queued dead letters to GW_DLQ, MAX_DEAD_LETTER_BATCH at a time, concurrently."""
        assert self.dead_letters is not None
        while True:
            while not self._dead_backlog:
                await self._dead_ready.wait()
                self._dead_ready = anyio.Event()
            batch = self._dead_backlog[:MAX_DEAD_LETTER_BATCH]
            try:
                async with anyio.create_task_group() as tg:
                    for record, reason in batch:
                        tg.start_soon(self.dead_letters.dead_letter, record, reason)
            except Exception as exc:  # msg ids de-duplicate a resend
                log.error("copying %d dead letters failed, retrying: %s", len(batch), exc)
                await anyio.sleep(RESEND_PAUSE_S)
                continue
            del self._dead_backlog[: len(batch)]
            self._signal_progress()

    async def _dispatch(self) -> None:
        """Send queued commands in order, pipelined, without holding up the fold.

        A batch that fails is sent again: msg ids make a resend harmless.
        """
        while True:
            while not self.outbox:
                await self._outbox_ready.wait()
                self._outbox_ready = anyio.Event()
            batch = self.outbox[:MAX_SEND_BATCH]
            try:
                if self.open_command is not None:
                    batch = [self._opened(command) for command in batch]
                await self.bus.send_many(batch)
            except Exception as exc:
                log.error("sending %d commands failed, retrying: %s", len(batch), exc)
                await anyio.sleep(RESEND_PAUSE_S)
                continue
            del self.outbox[: len(batch)]
            self.metrics.commands_sent += len(batch)
            self._signal_progress()

    def _opened(self, command: Command) -> Command:
        assert self.open_command is not None
        try:
            return self.open_command(command)
        except Exception as exc:  # a run that cannot be opened still runs, without env
            log.error("command %s: %s; sent without its sealed env", command.id, exc)
            return command

    def _kick_dispatcher(self) -> None:
        if self.outbox:
            self._outbox_ready.set()

    # --- deciding ----------------------------------------------------------------

    def due(self) -> datetime | None:
        """The next moment a timer (supervisor or liveness) needs a round."""
        dues = [d for d in (next_due(self.state), self._liveness_due()) if d is not None]
        return min(dues) if dues else None

    def _liveness_due(self) -> datetime | None:
        if self.liveness is None:
            return None
        return self.liveness.next_due(self.state)

    async def _round(self) -> None:
        """Decide on everything folded since the last round, and on due timers."""
        now = self.clock.now()
        triggers = self.triggers[:MAX_TRIGGERS_PER_ROUND]
        records = self.trigger_records[:MAX_TRIGGERS_PER_ROUND]
        del self.triggers[:MAX_TRIGGERS_PER_ROUND]
        del self.trigger_records[:MAX_TRIGGERS_PER_ROUND]
        started = self.trigger_since
        self.trigger_since = time.perf_counter() if self.triggers else None
        if self.liveness is not None:
            await self._liveness_round(now)
        if self.reconcile_due:
            await self._reconcile(now)
        decisions, failed = decide_guarded(self.state, triggers, now)
        if failed:  # replay leaves them out of this round the same way
            for index, exc in failed:
                await self._handler_failed(records[index], exc)
            dropped = {index for index, _ in failed}
            triggers = [t for i, t in enumerate(triggers) if i not in dropped]
            records = [r for i, r in enumerate(records) if i not in dropped]
        if not decisions:
            return
        # The triggers are every event folded since the last round: a run of sequences
        # (dead letters inside it are skipped by replay just as they were here).
        span = f"{records[0].seq}-{records[-1].seq}" if records else "timer"
        stored = await self._commit(decisions, span)
        if not stored:
            self.triggers[:0] = triggers  # someone else decided; read on, decide again
            self.trigger_records[:0] = records
            return
        if started is not None:
            self.metrics.decision_latency.observe(time.perf_counter() - started)

    async def _commit(self, decisions: Sequence[Event], trigger_ids: str) -> bool:
        headers = {
            BASIS_HEADER: str(self.folded),
            TRIGGER_HEADER: trigger_ids,
            POLICY_HEADER: self.policy_digest,
        }
        seqs = dict(self.subject_seqs)
        for part in _parts(decisions):
            expected: dict[str, int] = {}
            for event in part:
                aggregate = aggregate_of(event)
                expected.setdefault(aggregate, seqs.get(aggregate, 0))
            try:
                stored = await self.log.append_batch(part, expected, headers)
            except ConcurrencyError as exc:
                self.metrics.conflicts += 1
                log.info("decision refused (%s); reading on", exc)
                self.awaiting = max(self.awaiting, await self._stream_end())
                return False
            except EventLogError as exc:
                # The server is away or slow. Nothing half-stored: batches are atomic and
                # ids derived, so deciding again later re-sends the same decision.
                self.metrics.append_failures += 1
                self.backoff_s = next_backoff(self.backoff_s)
                log.warning(
                    "appending a decision failed (%s); retrying in %.2fs", exc, self.backoff_s
                )
                return False
            self.backoff_s = 0.0
            for event, seq in zip(part, stored, strict=True):
                seqs[aggregate_of(event)] = seq
                self.metrics.decisions[type_of(event)] += 1
            self.awaiting = max(self.awaiting, stored[-1])
        return True

    async def _stream_end(self) -> int:
        try:
            return await self.log.last_seq()
        except EventLogError:
            return self.folded + 1

    async def _liveness_round(self, now: datetime) -> None:
        assert self.liveness is not None
        for event in self.liveness.check(self.state, now, new_id(now)):
            aggregate = aggregate_of(event)
            try:
                await self.log.append(aggregate, [event], self.subject_seqs.get(aggregate, 0))
            except ConcurrencyError:
                # Another engine said it first, or the node's subject moved on (a new
                # registration): read on, then let check() judge the node afresh.
                self.metrics.conflicts += 1
                self.awaiting = max(self.awaiting, await self._stream_end())
                if isinstance(event, NodeLost | NodeRecovered):
                    self.liveness.pending.discard(event.node)
            except EventLogError as exc:
                # The server is away (often why heartbeats stopped): try again later,
                # never let a timer take the engine down.
                self.metrics.append_failures += 1
                self.backoff_s = next_backoff(self.backoff_s)
                if isinstance(event, NodeLost | NodeRecovered):
                    self.liveness.pending.discard(event.node)  # check() may propose it again
                log.warning("appending %s failed (%s); retrying", type_of(event), exc)
            else:
                self.metrics.decisions[type_of(event)] += 1

    # --- the service -------------------------------------------------------------

    async def catch_up(self) -> None:
        """Fold the whole log without deciding (the decisions are in it already)."""
        async for record in self.log.read(self.folded + 1):
            self._tap(record)
            await self._fold(record)

    async def start_live(self) -> None:
        """After catch-up: decide what was missed, resend commands not yet carried out."""
        self.live = True
        now = self.clock.now()
        if self.liveness is not None:
            self.liveness.start(self.state, now)
        await self._reconcile(now)
        for task in self.state.tasks.values():
            attempt = task.current
            if (
                task.status not in TERMINAL
                and attempt is not None
                and attempt.live
                and not attempt.started
            ):
                self.outbox.extend(self._commands_for(attempt.scheduled))
        for event in self._stop_causes.values():  # only stops still called for
            self.outbox.extend(self._commands_for(event))
        self._stop_causes.clear()
        self.caught_up.set()

    def _commands_for(self, event: Event) -> list[Command]:
        try:
            return commands_for(self.state, event)
        except Exception as exc:  # crash-only, as in the fold
            log.error("commands for %s raised: %s", event.id, handler_error(exc))
            self.metrics.dead_letters["handler_error"] += 1
            return []

    async def _reconcile(self, now: datetime) -> None:
        """Decide what nobody decided while no engine ran; retried until it is stored."""
        try:
            missed = reconcile(self.state, now)
        except Exception as exc:  # crash-only: replay's sweep decides nothing the same way
            log.error("the startup sweep raised, deciding nothing: %s", handler_error(exc))
            self.metrics.dead_letters["handler_error"] += 1
            missed = []
        self.reconcile_due = bool(missed) and not await self._commit(missed, "reconcile")

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        await self._check_stream()
        await self.catch_up()
        await self.start_live()
        send, receive = anyio.create_memory_object_stream[StoredEvent](PUMP_BUFFER)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._pump, send, self.folded + 1)
            tg.start_soon(self._measure_lag)
            tg.start_soon(self._dispatch)
            if self.dead_letters is not None:
                tg.start_soon(self._copy_dead_letters)
                self._dead_ready.set()  # what catch-up queued
            self._kick_dispatcher()
            task_status.started()
            await self._loop(receive)

    async def _measure_lag(self, every_s: float = STREAM_CHECK_EVERY_S) -> None:
        """Keep the consumer-lag gauge current and check the stream (wall time: both are
        about the real server). A reconnect after the stream changed is seen here too."""
        while True:
            try:
                self.metrics.consumer_lag = max(0, await self.log.last_seq() - self.folded)
            except EventLogError:
                pass
            await self._check_stream()
            await anyio.sleep(every_s)

    async def _check_stream(self) -> None:
        if self.stream_check is None:
            return
        try:
            problem = await self.stream_check(self.folded)
        except EventLogError as exc:  # the server is away: nothing is known to be wrong
            log.debug("stream check failed: %s", exc)
            return
        if problem != self.stream_problem:
            if problem is not None:
                log.error("refusing to decide: %s", problem)
            else:
                log.warning("the stream is sound again; deciding")
                self.wake()
        changed = problem != self.stream_problem
        self.stream_problem = problem
        self.metrics.stream_refused = problem is not None
        if changed:
            self._signal_progress()

    async def _pump(self, send: MemoryObjectSendStream[StoredEvent], from_seq: int) -> None:
        async with send:
            async for record in self.log.subscribe(from_seq):
                self._tap(record)
                await send.send(record)

    def _tap(self, record: StoredEvent) -> None:
        for tap in self.taps:
            tap(record)

    async def _loop(self, receive: MemoryObjectReceiveStream[StoredEvent]) -> None:
        while True:
            record = await self._next(receive)
            if record is not None:
                await self._fold(record)
                while True:  # fold whatever else is already here before deciding
                    try:
                        record = receive.receive_nowait()
                    except anyio.WouldBlock:
                        break
                    except anyio.EndOfStream:
                        await _subscription_ended()
                    await self._fold(record)
                self._kick_dispatcher()
                self._signal_progress()
            if self.awaiting > self.folded:
                continue  # our last decision is not folded back yet
            if self.stream_problem is not None:
                continue  # a stream that changed under the fold: decide nothing on it
            due = self.due()
            if self.triggers or self.reconcile_due or (due is not None and due <= self.clock.now()):
                if self.backoff_s:
                    await anyio.sleep(self.backoff_s)
                self.deciding = True
                try:
                    await self._round()
                finally:
                    self.deciding = False
                self._signal_progress()

    async def _next(self, receive: MemoryObjectReceiveStream[StoredEvent]) -> StoredEvent | None:
        """The next record, or None when a timer falls due (or a round is pending)."""
        try:
            return receive.receive_nowait()
        except anyio.WouldBlock:
            pass
        except anyio.EndOfStream:
            await _subscription_ended()
        refusing = self.stream_problem is not None  # wait for news: the check's wake()
        if not refusing and self.awaiting <= self.folded and (self.triggers or self.reconcile_due):
            return None
        due = None if self.awaiting > self.folded or refusing else self.due()
        if self._news.is_set():
            self._news = anyio.Event()
            return None
        result: StoredEvent | None = None
        async with anyio.create_task_group() as tg:

            async def timer() -> None:
                if due is not None:
                    await self.clock.sleep_until(due)
                else:
                    await anyio.sleep_forever()
                tg.cancel_scope.cancel()

            async def news() -> None:
                await self._news.wait()
                tg.cancel_scope.cancel()

            async def reader() -> None:
                nonlocal result
                try:
                    result = await receive.receive()
                except anyio.EndOfStream:
                    await _subscription_ended()
                tg.cancel_scope.cancel()

            tg.start_soon(timer)
            tg.start_soon(news)
            tg.start_soon(reader)
        if self._news.is_set():
            self._news = anyio.Event()
        return result

    def _signal_progress(self) -> None:
        self.progress.set()
        self.progress = anyio.Event()

    async def wait_folded(self, seq: int, timeout_s: float = 10.0) -> None:
        """Wait until the engine has folded `seq` (tests and the scenario runner)."""
        with anyio.fail_after(timeout_s):
            while self.folded < seq:
                await self.progress.wait()

    async def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Wait until everything appended so far is folded and nothing is left to decide."""
        with anyio.fail_after(timeout_s):
            while True:
                end = await self.log.last_seq()
                due = self.due()
                busy = (
                    self.deciding
                    or bool(self._dead_backlog)
                    or self.reconcile_due
                    or bool(self.outbox)
                    or self.folded < end
                    or self.awaiting > self.folded
                    or bool(self.triggers)
                    or (due is not None and due <= self.clock.now())
                )
                if not busy:
                    return
                await self.progress.wait()


async def _subscription_ended() -> NoReturn:
    """The pump's end of the stream closed: on shutdown (the engine is being cancelled,
    which this checkpoint delivers) or because the log subscription itself ended."""
    await anyio.lowlevel.checkpoint()
    raise EventLogError("the event log subscription ended; the engine cannot go on")


def _parts(decisions: Sequence[Event]) -> list[list[Event]]:
    """Split a round's decisions into atomic batches, never splitting one task's group."""
    if len(decisions) <= MAX_BATCH:
        return [list(decisions)]
    parts: list[list[Event]] = [[]]
    group: list[Event] = []
    key: str | None = None
    for event in decisions:
        if event.correlation_id != key and group:
            if len(parts[-1]) + len(group) > MAX_BATCH and parts[-1]:
                parts.append([])
            parts[-1].extend(group)
            group = []
        key = event.correlation_id
        group.append(event)
    if len(parts[-1]) + len(group) > MAX_BATCH and parts[-1]:
        parts.append([])
    parts[-1].extend(group)
    return parts
