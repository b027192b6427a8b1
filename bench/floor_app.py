"""The floor under a streamed token on granian: a bare ASGI app with no model, whose chunks come
from a thread through `call_soon_threadsafe`, one every FLOOR_TOKEN_MS (default 15), as
gguf-serve's decode thread hands its tokens to the event loop. Each chunk is the same bytes as
an OpenAI chat chunk of one token. What its event loop and granian's runtime spend per chunk is
what any Python ASGI server on granian pays to stream a token; `python -m bench threadtime --floor`
sets it beside gguf-serve and llama-server.

    granian --interface asgi --port 8001 bench.floor_app:app      # from the checkout's root
"""

import asyncio
import json
import os
import threading
import time

TOKEN_S = float(os.environ.get("FLOOR_TOKEN_MS", "15")) / 1000
HEAD = b'data: {"id":"chatcmpl-0123456789abcdef01234567","object":"chat.completion.chunk","created":1764560000,"model":"floor","choices":[{"index":0,"delta":'
TOKEN = HEAD + b'{"content":" dragon"},"logprobs":null,"finish_reason":null}]}\n\n'


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        return await send({"type": "lifespan.shutdown.complete"})
    body, more = b"", scope["method"] == "POST"
    while more:
        message = await receive()
        body, more = body + message.get("body", b""), message.get("more_body", False)
    if scope["path"] != "/v1/chat/completions":
        return await answer(send, {"object": "list", "data": [{"id": "floor", "object": "model"}]})
    request = json.loads(body)
    n, stream = request["max_tokens"], request.get("stream", False)
    loop, chunks = asyncio.get_running_loop(), asyncio.Queue()

    def decode():  # the model's place: a token every TOKEN_S, handed over as the engine hands it
        for k in range(n):  # (not streamed, only the first and the last: the engine merges the rest)
            time.sleep(TOKEN_S)
            if stream or k in (0, n - 1):
                loop.call_soon_threadsafe(chunks.put_nowait, TOKEN)
        loop.call_soon_threadsafe(chunks.put_nowait, None)

    threading.Thread(target=decode, daemon=True).start()
    usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
    if not stream:
        while await chunks.get() is not None:
            pass
        return await answer(send, {"choices": [{"index": 0, "message": {"role": "assistant", "content": " dragon" * n},
                                                "finish_reason": "length"}], "usage": usage})
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    while (chunk := await chunks.get()) is not None:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    last = HEAD + b'{},"finish_reason":"length"}],"usage":' + json.dumps(usage).encode() + b"}\n\ndata: [DONE]\n\n"
    await send({"type": "http.response.body", "body": last, "more_body": False})


async def answer(send, obj: dict) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(obj).encode()})
