"""A TCP proxy on 127.0.0.1 between worker subprocesses and PostgreSQL that can cut the network:
``blackhole()`` keeps every socket open and forwards nothing (bytes wait, as in a partition
that TCP rides out), ``reset()`` closes every connection with RST and refuses new ones
until ``heal()``. ``drop_answer_to(marker, nth)`` loses exactly one answer: the nth request
whose bytes contain ``marker`` reaches the server, which executes and commits it; its answer
(everything up to ReadyForQuery) is swallowed and that client connection is reset, as when a
network path dies after the server committed. ``slow_answers(marker, seconds)`` holds back the
answer to every request containing ``marker`` for ``seconds`` (the server has executed and
committed it: a busy server, or a slow path, not a dead one). Runs an asyncio loop in a
background thread."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from psycopg.conninfo import conninfo_to_dict, make_conninfo

#: ReadyForQuery: the server's last message for a request, sent after the commit.
READY_FOR_QUERY = b"Z\x00\x00\x00\x05"


@dataclass
class _Link:
    """One client connection and its upstream; ``swallowing`` while its answer is dropped."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    swallowing: bool = False
    delay: float = 0.0


class Proxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.mode = "forward"
        self._flowing = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.port = 0
        self._marker: bytes | None = None
        self._nth = 0
        self._seen = 0
        self.dropped = 0
        self._slow: tuple[bytes, float] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._flowing.set()
        server = self._loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "reset":
            self._rst(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self._rst(writer)
            return
        self._writers.update((writer, up_writer))
        link = _Link(writer, up_writer)
        await asyncio.gather(self._pipe(reader, up_writer, link, True),
                             self._pipe(up_reader, writer, link, False),
                             return_exceptions=True)

    def _is_the_request(self, data: bytes) -> bool:
        if self._marker is None or self._marker not in data:
            return False
        self._seen += 1
        if self._seen == self._nth:
            self._marker = None
            return True
        return False

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    link: _Link, to_server: bool) -> None:
        try:
            while True:
                await self._flowing.wait()  # blackholed: nothing is read, nothing forwarded
                data = await reader.read(65536)
                if not data:
                    break
                await self._flowing.wait()
                if to_server and self._is_the_request(data):
                    link.swallowing = True
                if to_server and self._slow is not None and self._slow[0] in data:
                    link.delay = self._slow[1]
                if not to_server and link.delay:
                    delay, link.delay = link.delay, 0.0
                    await asyncio.sleep(delay)
                if not to_server and link.swallowing:
                    if READY_FOR_QUERY in data:  # the server is done (and committed): cut
                        self.dropped += 1
                        self._rst(link.client)
                        link.upstream.close()
                        break
                    continue
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    @staticmethod
    def _rst(writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()

    def _in_loop(self, fn: object) -> None:
        done = threading.Event()

        def call() -> None:
            try:
                fn()  # type: ignore[operator]
            finally:
                done.set()

        self._loop.call_soon_threadsafe(call)
        done.wait(10)

    def blackhole(self) -> None:
        def go() -> None:
            self.mode = "blackhole"
            self._flowing.clear()
        self._in_loop(go)

    def reset(self) -> None:
        def go() -> None:
            self.mode = "reset"
            for writer in list(self._writers):
                self._rst(writer)
            self._writers.clear()
        self._in_loop(go)

    def drop_answer_to(self, marker: bytes, nth: int = 1) -> None:
        def go() -> None:
            self._marker, self._nth, self._seen = marker, nth, 0
        self._in_loop(go)

    def slow_answers(self, marker: bytes, seconds: float) -> None:
        def go() -> None:
            self._slow = (marker, seconds)
        self._in_loop(go)

    def heal(self) -> None:
        def go() -> None:
            self.mode = "forward"
            self._slow = None
            self._flowing.set()
        self._in_loop(go)

    def close(self) -> None:
        self.heal()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@contextlib.contextmanager
def proxy_for(dsn: str) -> Iterator[tuple[Proxy, str]]:
    """A proxy in front of the server of ``dsn`` (a unix socket's server over TCP on
    127.0.0.1), and ``dsn`` through it."""
    params = conninfo_to_dict(dsn)
    host = str(params.get("host") or "127.0.0.1")
    host = "127.0.0.1" if host.startswith("/") else host
    with proxy_to(host, int(params.get("port") or 5432)) as proxy:
        yield proxy, make_conninfo(dsn, host="127.0.0.1", port=str(proxy.port))


@contextlib.contextmanager
def proxy_to(host: str, port: int) -> Iterator[Proxy]:
    p = Proxy(host, port)
    try:
        yield p
    finally:
        p.close()
