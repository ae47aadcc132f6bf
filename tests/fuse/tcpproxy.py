"""A loopback TCP forwarder that a test can cut and restore (a catalogue outage on demand), or hold
back in the middle of an answer (a listing that is still arriving)."""

from __future__ import annotations

import contextlib
import re
import socket
import threading

#: an HTTP request's first line, at the start of what a client sent or after the previous request's head
_REQUEST_LINE = re.compile(rb"(?:^|\r\n)(GET|HEAD|POST|PUT|DELETE) (\S+) HTTP/1\.[01]\r\n")
#: an HTTP answer's status line
_STATUS_LINE = re.compile(rb"(?:^|\r\n)HTTP/1\.[01] \d{3} ")


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``target``. ``cut()`` drops every connection and refuses new ones
    until ``restore()``; the listening port stays the same throughout. ``answered`` counts the bytes
    that came back from the target: proof that the traffic went this way. ``requests`` lists the HTTP
    requests that went to the target (``"GET /scopes/"``), in the order they were sent, and
    ``answered_before`` how many answers the target had given when each was sent (fewer than the
    requests before it: they were in flight together)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopped = False
        self.answered = 0
        self.requests: list[str] = []
        self.answered_before: list[int] = []
        self._answers = 0
        # answers pass while this is set; ``_passing``: bytes that may still pass before a hold
        self._flowing = threading.Event()
        self._flowing.set()
        self._passing: int | None = None
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for source, sink, answers in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(source, sink, answers), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if answers:
                    with self._lock:
                        self._answers += len(_STATUS_LINE.findall(data))
                    data = self._let_through(data, sink)
                else:
                    self._note_requests(data)
                sink.sendall(data)
                if answers:
                    with self._lock:
                        self.answered += len(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def _note_requests(self, data: bytes) -> None:
        """rucio's client (http.client) sends a request's head in one piece, so its first line is whole."""
        with self._lock:
            for method, path in _REQUEST_LINE.findall(data):
                self.requests.append(f"{method.decode()} {path.decode()}")
                self.answered_before.append(self._answers)

    def _let_through(self, data: bytes, sink: socket.socket) -> bytes:
        """What of an answer's ``data`` may pass now; waits (after passing the part allowed) while held."""
        with self._lock:
            allowed = len(data) if self._passing is None else min(self._passing, len(data))
            if self._passing is not None:
                self._passing -= allowed
                if not self._passing:
                    self._flowing.clear()
        if allowed < len(data):
            sink.sendall(data[:allowed])
            with self._lock:
                self.answered += allowed
            self._flowing.wait()
            return data[allowed:]
        return data

    def hold(self, after: int) -> None:
        """Let ``after`` more bytes of answers through, then hold the rest back until :meth:`release`."""
        with self._lock:
            self._passing = after

    @property
    def holding(self) -> bool:
        """Answers are being held back (the bytes allowed by :meth:`hold` have passed)."""
        return not self._flowing.is_set()

    def release(self) -> None:
        with self._lock:
            self._passing = None
        self._flowing.set()

    def cut(self) -> None:
        self._open.clear()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.close()
            self._conns.clear()

    def restore(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._stopped = True
        self.release()
        self.cut()
        self._listener.close()
