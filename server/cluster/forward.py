"""`python -m server.cluster.forward --listen 127.0.0.1:8000 --uds PATH`: bridge a host TCP port to the
cluster ingress's Unix socket (the cluster itself runs in a loopback-only network namespace; see `netns`).

A byte pipe, nothing more: every connection to the TCP port is connected to the socket and copied both ways
until either side closes. It binds what `--listen` says (127.0.0.1 by default).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

log = logging.getLogger(__name__)
CHUNK = 64 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def serve(host: str, port: int, uds: str) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_unix_connection(uds)
        except OSError as exc:
            log.warning("ingress socket %s not reachable: %s", uds, exc)
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, up_w), _pipe(up_r, client_w))

    server = await asyncio.start_server(handle, host, port)
    log.info("forwarding http://%s:%d -> unix:%s", host, port, uds)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8000", metavar="HOST:PORT")
    parser.add_argument("--uds", required=True, metavar="PATH")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(host or "127.0.0.1", int(port), args.uds))


if __name__ == "__main__":
    main()
