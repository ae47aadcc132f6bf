"""A uvloop event loop on its own thread with one aiohttp ``ClientSession``, awaitable from trio.

Why this shape: aiohttp (TLS, redirects, keep-alive pooling) and our bulk client
(:mod:`datalakefs.transport.bulk_http`, an ``asyncio.BufferedProtocol``) need asyncio, while the daemon
runs on trio. Measured on this machine, the fastest design that keeps asyncio is its loop on a dedicated
uvloop thread, with response bodies written to disk *on that thread*, and trio woken only when a block
a reader waits for or a transfer is done (never per FUSE request).

Invariants:

* One loop thread and one ``ClientSession`` per bridge; only coroutines submitted through :meth:`run`
  touch the session, and they run on the loop thread. Other clients on the loop (the bulk client of
  :mod:`datalakefs.transport.bulk_http`) close their connections through :meth:`AioBridge.on_close`.
* :meth:`AioBridge.run` creates the coroutine on the loop thread (so a cancelled call never leaves a
  "coroutine was never awaited" behind) and wakes the trio task with ``TrioToken.run_sync_soon``, which is
  safe from any thread. (``trio.from_thread`` inside a future's done-callback can run on the trio thread
  and hang the caller: pitfall 1 of the transport notes.)
* Cancelling the trio caller cancels the asyncio task and *waits until it has finished*: when ``run``
  returns or raises, the coroutine no longer touches anything the caller gave it (files, sinks).
* After :meth:`close`, every call still running has been cancelled and its caller gets
  :class:`TransportClosedError`; new calls raise it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import aiohttp
import outcome
import trio
import uvloop

from datalakefs.errors import TransferError

T = TypeVar("T")


class TransportClosedError(TransferError):
    """The bridge was closed (daemon shutdown) while or before a transfer ran."""


class _Call:
    """The asyncio side of one :meth:`AioBridge.run` call; touched only on the loop thread."""

    __slots__ = ("cancelled", "task")

    def __init__(self) -> None:
        self.task: asyncio.Task[Any] | None = None
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        if self.task is not None:
            self.task.cancel()


def _outcome_of(task: asyncio.Task[T]) -> outcome.Outcome[T]:
    if task.cancelled():
        return outcome.Error(TransportClosedError("transfer cancelled by the transport"))
    exc = task.exception()
    if exc is not None:
        return outcome.Error(exc)
    return outcome.Value(task.result())


class AioBridge:
    """Owns the loop thread and the HTTP session.

    ``connections`` bounds the pool as a whole and ``connections_per_host`` per origin; idle connections
    are kept alive for ``keepalive`` seconds. Use as a context manager, or call :meth:`start` and
    :meth:`close` (both block briefly: call them at startup/shutdown, or via :meth:`aclose` from trio).
    """

    def __init__(
        self,
        *,
        connections: int = 64,
        connections_per_host: int = 16,
        keepalive: float = 60.0,
    ) -> None:
        self._connections = connections
        self._per_host = connections_per_host
        self._keepalive = keepalive
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._on_close: list[Callable[[], None]] = []

    def __enter__(self) -> AioBridge:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        """The shared session; use it only inside coroutines passed to :meth:`run`."""
        if self._session is None:
            raise TransportClosedError("the HTTP transport is not running")
        return self._session

    def on_close(self, release: Callable[[], None]) -> None:
        """Call ``release`` on the loop thread when the bridge closes, after its calls were cancelled
        (a client running on the loop closes its own connections)."""
        self._on_close.append(release)

    def start(self) -> None:
        """Start the loop thread and open the session; returns once both are ready."""
        if self._loop is not None or self._closed:
            raise RuntimeError("an AioBridge can be started only once")
        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        thread = threading.Thread(target=self._thread_main, args=(loop,), name="datalakefs-aio", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        self._session = asyncio.run_coroutine_threadsafe(self._open_session(), loop).result()

    @staticmethod
    def _thread_main(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _open_session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._connections, limit_per_host=self._per_host, keepalive_timeout=self._keepalive
        )
        # No automatic decompression: the bytes written are exactly the bytes of the file. A 1 MiB read
        # buffer (aiohttp's default is 64 KiB) lets a body arrive in fewer, larger pieces with fewer
        # pauses of the socket: a cold 1 GiB read was faster in 3 of 3 alternated pairs (loaded machine).
        return aiohttp.ClientSession(connector=connector, auto_decompress=False, trust_env=False,
                                     read_bufsize=1 << 20)

    def close(self) -> None:
        """Cancel running calls, close the session and stop the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        self._session = None

    async def aclose(self) -> None:
        """:meth:`close` without blocking the trio thread."""
        await trio.to_thread.run_sync(self.close)

    async def _shutdown(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for release in self._on_close:
            release()
        if self._session is not None:
            await self._session.close()

    async def run(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """Run ``fn(*args)`` on the loop thread and return its result to the calling trio task.

        Exceptions of the coroutine propagate unchanged. If the trio task is cancelled, the asyncio task
        is cancelled too and ``run`` raises ``trio.Cancelled`` only after it has finished.
        """
        loop = self._loop
        if loop is None or self._closed:
            raise TransportClosedError("the HTTP transport is not running")
        token = trio.lowlevel.current_trio_token()
        waiter = trio.lowlevel.current_task()
        call = _Call()

        def deliver(result: outcome.Outcome[T]) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(trio.lowlevel.reschedule, waiter, outcome.Value(result))

        def start() -> None:
            if call.cancelled or self._closed:
                # After close() began, a new task might outlive the loop and never wake its caller.
                deliver(outcome.Error(TransportClosedError("transfer cancelled before it started")))
                return
            task = loop.create_task(fn(*args))
            call.task = task
            task.add_done_callback(lambda t: deliver(_outcome_of(t)))

        try:
            loop.call_soon_threadsafe(start)
        except RuntimeError:  # the loop was closed between the check above and now
            raise TransportClosedError("the HTTP transport is not running") from None
        abort_requested = False

        def abort(_: Any) -> trio.lowlevel.Abort:
            nonlocal abort_requested
            abort_requested = True
            # RuntimeError: the loop already stopped; close() cancelled the task and delivered.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(call.cancel)
            # FAILED: we stay blocked until deliver() reschedules us, i.e. until the task is done.
            return trio.lowlevel.Abort.FAILED

        result: outcome.Outcome[T] = await trio.lowlevel.wait_task_rescheduled(abort)
        if abort_requested:
            await trio.lowlevel.checkpoint()  # the cancel scope is still cancelled: raises Cancelled
        return result.unwrap()
