"""The job of tests/test_http_prouter.py: an HTTP and websocket server (a bare ASGI app on uvicorn) on an ephemeral
port, announced in $TICKETFARM_HTTP_PORT_FILE; it ends when asked (POST /stop), writing out.txt first."""
from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import uvicorn

stop = asyncio.Event()


async def http(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/stop":
        stop.set()
    if scope["path"] == "/slow":
        await asyncio.sleep(60)
    query = scope["query_string"].decode()
    upload = Path(query[5:]) if query.startswith("file=") else None
    answer = {"method": scope["method"], "path": scope["path"], "query": query, "body": body.decode(),
              "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
              "file": upload.read_text() if upload and upload.is_file() else None}
    status = 404 if scope["path"] == "/missing" else 200
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"x-job", b"prouter"),
                            (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")]})
    await send({"type": "http.response.body", "body": json.dumps(answer).encode()})


async def websocket(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": f"hello {scope['path']} {scope['query_string'].decode()}"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") == "bye":
            await send({"type": "websocket.close", "code": 4000, "reason": "bye from the job"})
            return
        if message.get("text") is not None:
            await send({"type": "websocket.send", "text": "echo:" + message["text"]})
        else:
            await send({"type": "websocket.send", "bytes": message["bytes"][::-1]})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await (http if scope["type"] == "http" else websocket)(scope, receive, send)


async def main() -> None:
    Path("progress.txt").write_text("started\n")
    os.symlink("/etc", "escape")  # a way out of the work dir that the sandbox must not follow
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
                                           ws="websockets-sansio"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    announce = Path(os.environ["TICKETFARM_HTTP_PORT_FILE"])
    announce.parent.mkdir(parents=True, exist_ok=True)
    announce.with_suffix(".tmp").write_text(str(port))
    announce.with_suffix(".tmp").rename(announce)  # never half a number
    await stop.wait()
    Path("out.txt").write_text("written by the job: " + Path("in/data.txt").read_text())
    server.should_exit = True
    await serving
    print("job done")


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
