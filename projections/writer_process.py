"""The store's handle on its writer: projections/writer.py in a child process.

Reading the log and folding it hold the GIL, so a writer thread only takes turns with
them; a process writes on another core. The child is fed length-prefixed msgpack on its
stdin, and answers each batch once it is committed with its checkpoint.

A thread writes to the pipe (the write releases the GIL, and the fold never waits for
the child to drain it). Every wait has a deadline, an error in the child comes back as
its traceback in a ProjectionStoreError, and the child exits at the end of its input,
so it never outlives this process.
"""

from __future__ import annotations

import fcntl
import os
import queue
import sys
import threading
from collections import deque
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, Final

import anyio
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from gpuwarden.projections.errors import ProjectionStoreError
from gpuwarden.projections.writer import HEADER, frame, unframe

# A writer process that says nothing for this long while it owes an answer is hung.
WRITER_DEADLINE: Final = 60.0
PIPE_BYTES: Final = 1 << 20


class WriterProcess:
    """One child process writing one SQLite file; batches commit in the order sent."""

    def __init__(self, process: Process, pipe: int) -> None:
        self._process = process
        assert process.stdout is not None
        self._replies = BufferedByteReceiveStream(process.stdout)
        self._outbox: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
        self._sender = threading.Thread(
            target=_pump, args=(pipe, self._outbox), name="projections-writer-pipe", daemon=True
        )
        self._sender.start()
        self._sent: deque[int] = deque()  # the last sequence of each batch not yet answered

    @classmethod
    async def start(cls) -> WriterProcess:
        command = [sys.executable, "-m", "gpuwarden.projections.writer"]
        child_end, pipe = os.pipe()
        try:
            with suppress(OSError, AttributeError):  # a larger pipe: fewer wake-ups
                fcntl.fcntl(pipe, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            process = await anyio.open_process(command, stdin=child_end, stderr=None)
        except BaseException:
            os.close(pipe)
            raise
        finally:
            os.close(child_end)
        return cls(process, pipe)

    def open(self, path: Path, pragmas: Sequence[str]) -> None:
        """Have the child open the database; the first message it gets."""
        self._send(["open", str(path), pragmas])

    @property
    def in_flight(self) -> int:
        """Batches sent and not yet answered."""
        return len(self._sent)

    def send_batch(self, last: int, tables: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """A batch's rows, (INSERT head, rows) per table, to commit with checkpoint `last`."""
        self._send(["batch", last, tables])
        self._sent.append(last)

    async def committed(self) -> int:
        """The checkpoint of the oldest batch in flight, once the child committed it."""
        committed = await self._answer()
        if committed != self._sent.popleft():
            raise ProjectionStoreError(f"writer process committed {committed} out of order")
        return committed

    async def finish(self, script: str, deadline: float = WRITER_DEADLINE) -> None:
        """Run `script` in the child once every batch is in (a rebuild ends with the schema)."""
        self._send(["finish", script])
        await self._answer(deadline)

    def _send(self, message: Any) -> None:
        self._outbox.put(frame(message))

    async def _answer(self, deadline: float = WRITER_DEADLINE) -> int:
        try:
            with anyio.fail_after(deadline):
                (size,) = HEADER.unpack(await self._replies.receive_exactly(HEADER.size))
                reply = unframe(await self._replies.receive_exactly(size))
        except TimeoutError:
            raise ProjectionStoreError(
                f"projection writer process gave no answer for {deadline:.0f}s"
            ) from None
        except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError):
            raise ProjectionStoreError(
                f"projection writer process exited (code {self._process.returncode})"
            ) from None
        if reply[0] == "error":
            raise ProjectionStoreError(f"projection writer process failed:\n{reply[1]}")
        last: int = reply[1]
        return last

    async def close(self) -> None:
        """End its input (it commits what it got whole, then exits) and reap it."""
        with anyio.CancelScope(shield=True):
            self._outbox.put(None)
            try:
                with anyio.fail_after(WRITER_DEADLINE):
                    await self._process.wait()
            except TimeoutError:
                self._process.kill()  # the pipe breaks, so the sender thread ends too
            await self._process.aclose()
            await anyio.to_thread.run_sync(self._sender.join, WRITER_DEADLINE)


def _pump(pipe: int, outbox: queue.SimpleQueue[bytearray | None]) -> None:
    """Write each framed message to the child until told to stop or the pipe breaks."""
    try:
        while (data := outbox.get()) is not None:
            view = memoryview(data)
            while view:
                view = view[os.write(pipe, view) :]
    except OSError:  # the child is gone; its exit or silence is reported by `_answer`
        pass
    finally:
        os.close(pipe)
