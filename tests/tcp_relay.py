"""A TCP relay for tests that put something between a client and a server (a Service standing in for a
picker's pods, an address held while the picker is down, a replica whose connects start to time out): bytes
are copied as they are, TLS included."""

from __future__ import annotations

import asyncio
import contextlib
import socket


async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
    """Connect to 127.0.0.1:``port`` and copy both ways until either side closes; when the connect fails
    (nothing listens there) the client's connection is closed, as a stopped server's would be."""
    try:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        writer.close()
        return
    await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    dst.close()


class FreezableRelay:
    """A front for a server on 127.0.0.1:``port`` that can stop answering connects: until :meth:`freeze` it
    accepts and relays; then it stops accepting, closes what it relayed and fills its listen backlog, so a
    new connect hangs until the client's own timeout (Linux drops the SYN of a full accept queue), as with
    a blackholed or partitioned replica. ``port`` None: nothing behind it (freeze it at once)."""

    def __init__(self, port: int | None) -> None:
        self.target = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.sock.setblocking(False)
        self.port = int(self.sock.getsockname()[1])
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._held: list[socket.socket] = []
        self._accepting: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def key(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> FreezableRelay:
        if self.target is not None:
            self._accepting = asyncio.create_task(self._accept())
        else:
            await self.freeze()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()
        for s in self._held:
            s.close()
        self.sock.close()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            try:
                reader, writer = await asyncio.open_connection(sock=conn)
            except BaseException:
                conn.close()
                raise
            self._writers.append(writer)
            task = asyncio.create_task(self._relay(reader, writer))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self.target is not None
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        if self._stopped:  # stopped while connecting: nothing more is relayed
            up_writer.close()
            writer.close()
            return
        self._writers.append(up_writer)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    async def _stop(self) -> None:
        self._stopped = True
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
            self._accepting = None
        for w in self._writers:
            w.close()
        self._writers.clear()
        if self._pipes:
            await asyncio.gather(*self._pipes, return_exceptions=True)

    async def refuse(self) -> None:
        """Stop answering: relayed connections closed, new connects refused (nothing listens)."""
        await self._stop()
        self.sock.close()

    async def freeze(self) -> None:
        """Stop answering: relayed connections closed, new connects hang."""
        await self._stop()
        loop = asyncio.get_running_loop()
        while True:  # connect until one does not complete: the accept queue is full
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(s, ("127.0.0.1", self.port)), 0.2)
            except TimeoutError:
                s.close()
                return
            self._held.append(s)
