"""A TCP relay for tests that put something between a client and a server (a Service standing in for a
picker's pods, an address held while the picker is down): bytes are copied as they are, TLS included."""

from __future__ import annotations

import asyncio
import contextlib


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
