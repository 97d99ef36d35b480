"""Prometheus metrics for the engine, in the text exposition format, without a dependency.

A handful of counters, one histogram and two gauges do not justify a client library;
the format is a few lines of text served over a bare HTTP/1.0 response.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import anyio
import anyio.abc

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
REQUEST_TIMEOUT_S = 5.0  # for one scrape: its request read and the answer sent
MAX_REQUEST_BYTES = 8192  # of a request head read before answering
READ_CHUNK_BYTES = 4096


class Histogram:
    def __init__(self, buckets: Iterable[float] = LATENCY_BUCKETS_S) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1


class EngineMetrics:
    def __init__(self) -> None:
        self.events_consumed = 0
        self.dead_letters: dict[str, int] = defaultdict(int)
        self.faults: dict[str, int] = defaultdict(int)
        self.decisions: dict[str, int] = defaultdict(int)
        self.conflicts = 0
        self.append_failures = 0
        self.commands_sent = 0
        self.decision_latency = Histogram()
        self.consumer_lag = 0
        self.last_seq = 0
        self.stream_refused = False  # the log's stream changed under the fold

    def render(self) -> str:
        lines = [
            "# HELP gpuwarden_events_consumed_total Events folded by the engine.",
            "# TYPE gpuwarden_events_consumed_total counter",
            f"gpuwarden_events_consumed_total {self.events_consumed}",
            "# HELP gpuwarden_dead_letters_total Log messages skipped and dead-lettered.",
            "# TYPE gpuwarden_dead_letters_total counter",
        ]
        lines += _labelled("gpuwarden_dead_letters_total", "reason", self.dead_letters)
        lines += [
            "# HELP gpuwarden_faults_total Attempts classified, by fault type.",
            "# TYPE gpuwarden_faults_total counter",
        ]
        lines += _labelled("gpuwarden_faults_total", "fault", self.faults)
        lines += [
            "# HELP gpuwarden_decisions_total Decision events appended, by type.",
            "# TYPE gpuwarden_decisions_total counter",
        ]
        lines += _labelled("gpuwarden_decisions_total", "action", self.decisions)
        lines += [
            "# HELP gpuwarden_decision_conflicts_total Appends refused by a concurrent writer.",
            "# TYPE gpuwarden_decision_conflicts_total counter",
            f"gpuwarden_decision_conflicts_total {self.conflicts}",
            "# HELP gpuwarden_append_failures_total Decision appends that failed and were retried.",
            "# TYPE gpuwarden_append_failures_total counter",
            f"gpuwarden_append_failures_total {self.append_failures}",
            "# HELP gpuwarden_commands_sent_total Commands published to node agents.",
            "# TYPE gpuwarden_commands_sent_total counter",
            f"gpuwarden_commands_sent_total {self.commands_sent}",
            "# HELP gpuwarden_decision_latency_seconds Trigger folded to decision stored.",
            "# TYPE gpuwarden_decision_latency_seconds histogram",
        ]
        h = self.decision_latency
        for bound, count in zip(h.buckets, h.counts, strict=True):
            lines.append(f'gpuwarden_decision_latency_seconds_bucket{{le="{bound}"}} {count}')
        lines += [
            f'gpuwarden_decision_latency_seconds_bucket{{le="+Inf"}} {h.total}',
            f"gpuwarden_decision_latency_seconds_sum {h.sum}",
            f"gpuwarden_decision_latency_seconds_count {h.total}",
            "# HELP gpuwarden_consumer_lag Events in the log not yet folded by the engine.",
            "# TYPE gpuwarden_consumer_lag gauge",
            f"gpuwarden_consumer_lag {self.consumer_lag}",
            "# HELP gpuwarden_stream_refused 1 while the engine refuses to decide: the "
            "event stream was deleted, recreated or trimmed under it.",
            "# TYPE gpuwarden_stream_refused gauge",
            f"gpuwarden_stream_refused {int(self.stream_refused)}",
            "# HELP gpuwarden_last_folded_sequence Stream sequence the engine has folded.",
            "# TYPE gpuwarden_last_folded_sequence gauge",
            f"gpuwarden_last_folded_sequence {self.last_seq}",
        ]
        return "\n".join(lines) + "\n"


def _labelled(name: str, label: str, values: dict[str, int]) -> list[str]:
    return [f'{name}{{{label}="{key}"}} {values[key]}' for key in sorted(values)]


async def serve_metrics(
    metrics: EngineMetrics,
    port: int,
    host: str = "127.0.0.1",
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve GET /metrics until cancelled; reports the bound port through task_status."""
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    bound = listener.extra(anyio.abc.SocketAttribute.local_port)
    task_status.started(bound)

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            with anyio.move_on_after(REQUEST_TIMEOUT_S):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < MAX_REQUEST_BYTES:
                    chunk = await stream.receive(READ_CHUNK_BYTES)
                    if not chunk:
                        break
                    request += chunk
                first = request.split(b"\r\n", 1)[0].split()
                path = first[1] if len(first) > 1 else b""
                if path in (b"/metrics", b"/"):
                    body = metrics.render().encode()
                    head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                else:
                    body = b"not found\n"
                    head = b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
                head += f"Content-Length: {len(body)}\r\n\r\n".encode()
                await stream.send(head + body)

    await listener.serve(handle)
