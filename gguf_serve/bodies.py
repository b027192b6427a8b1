"""A request's body, as every route reads it: taken as it arrives, decoded from its
Content-Encoding (gzip, deflate or zstd: Codex CLI compresses its requests for some providers),
and held to MAX_BODY_BYTES once decoded, then its JSON decoded strictly into the route's struct
(`decode`, an error naming the field at fault). A decompression bomb is a 413 once its first
MAX_BODY_BYTES are decoded: no more than that, the piece being decoded and a zstd frame's window
(8 MiB at most) is ever held, whatever it would expand to."""

from __future__ import annotations

import re
import zlib
from typing import Iterator

import msgspec
import zstandard
from litestar import Request
from litestar.exceptions.http_exceptions import RequestEntityTooLarge

from .errors import APIError

CODINGS = ("gzip", "deflate", "zstd")
SAME_CODING = {"x-gzip": "gzip"}  # RFC 9110 8.4.1.3: a recipient treats x-gzip as gzip
PIECE = 64 << 10  # the most zlib decodes in one call
# What zstd is given at once. A block decodes to 128 KiB at most and takes 4 bytes at least (a 3-byte header and an
# RLE byte), so 32 bytes decode to 9 blocks, 1.1 MiB, at most. A 200 KB agent request (15 KB as zstd, 35 KB as
# gzip) still decodes in 0.4 ms, 500 MB/s, as gzip's does: less than msgspec takes to decode its JSON.
ZSTD_SLICE = 32
# The most history a zstd frame may make its decoder keep. A frame asks for the window its compressor used,
# up to 2 GiB; levels 1-19 use at most 8 MiB (level 3, the default, 2 MiB), only --ultra more.
ZSTD_WINDOW = 8 << 20


class Inflate:
    """gzip, or deflate (zlib's format, as RFC 9110 defines it), through zlib, which decodes at
    most PIECE a call whatever the input would expand to (1032 times its size at most)."""

    def __init__(self, coding: str):
        self.coding = coding
        self.stream = zlib.decompressobj(zlib.MAX_WBITS | 16 if coding == "gzip" else zlib.MAX_WBITS)

    def decode(self, data: bytes) -> Iterator[bytes]:
        while True:
            piece = self.stream.decompress(data, PIECE)
            data = self.stream.unconsumed_tail
            yield piece
            if self.stream.eof:  # what follows the stream is in unused_data
                break
            if not data and len(piece) < PIECE:  # a full piece may leave output still inside zlib: ask again
                break
        if self.stream.unused_data:
            raise trailing_data(self.coding)

    @property
    def ended(self) -> bool:
        return self.stream.eof


class Unzstd:
    """zstd (one frame), through zstandard's decompressobj. That decodes all the input it is
    given at once, with no bound on the output as zlib's max_length (32,768 times the input for
    a frame of RLE blocks): so it is given ZSTD_SLICE bytes at a time."""

    coding = "zstd"

    def __init__(self):
        self.frame = zstandard.ZstdDecompressor(max_window_size=ZSTD_WINDOW).decompressobj()

    def decode(self, data: bytes) -> Iterator[bytes]:
        whole = memoryview(data)
        for start in range(0, len(whole), ZSTD_SLICE):
            if self.frame.eof:
                raise trailing_data(self.coding)
            yield self.frame.decompress(whole[start:start + ZSTD_SLICE])
        if self.frame.unused_data:
            raise trailing_data(self.coding)

    @property
    def ended(self) -> bool:
        return self.frame.eof


async def read_body(request: Request, limit: int) -> bytearray:
    """The request's body, decoded from its Content-Encoding: a 413 past `limit` bytes on the wire
    (Litestar's request_max_body_size) or decoded, a 415 for a coding not in CODINGS, a 400 for a
    stream that isn't one (corrupt, cut short, or followed by more data)."""
    decoder = decoder_for(request.headers.getall("content-encoding", []))
    body = bytearray()
    try:
        async for chunk in request.stream():
            for piece in decoder.decode(chunk) if decoder else (chunk,):
                if len(body) + len(piece) > limit:
                    raise too_large(limit, decoder)
                body += piece
    except RequestEntityTooLarge:
        raise too_large(limit, None) from None
    except (zlib.error, zstandard.ZstdError) as e:
        raise APIError(400, f"the body can't be decoded as {decoder.coding}: {e}") from None
    if decoder and not decoder.ended:
        raise APIError(400, f"the {decoder.coding} body ends before its stream does")
    return body


def decoder_for(values: list[str]) -> Inflate | Unzstd | None:
    """The decoder of the content coding Content-Encoding names (its values, one a header line):
    none for no coding or `identity`; one coding at most (nobody sends more, and each more would
    multiply the work a body of MAX_BODY_BYTES can ask for)."""
    codings = [SAME_CODING.get(name, name) for value in values for name in map(str.strip, value.lower().split(","))
               if name not in ("", "identity")]
    if not codings:
        return None
    if len(codings) > 1 or codings[0] not in CODINGS:
        supported = ", ".join(CODINGS)
        raise APIError(415, f"Content-Encoding `{', '.join(codings)[:64]}` is not supported: encode the body in one of "
                            f"{supported}, or not at all", None, "unsupported_content_encoding",
                       {"accept-encoding": supported})  # RFC 7694: a 415 for a coding says which ones are
    return Unzstd() if codings[0] == "zstd" else Inflate(codings[0])


def too_large(limit: int, decoder: Inflate | Unzstd | None) -> APIError:
    decoded = f" once decoded from {decoder.coding}" if decoder else ""
    return APIError(413, f"request body larger than {limit} bytes (MAX_BODY_BYTES){decoded}", None, "request_too_large")


def trailing_data(coding: str) -> APIError:
    return APIError(400, f"the body goes on after the end of its {coding} stream (one {coding} stream is a body)")


MISSING = re.compile(r"Object missing required field `(\w+)`(?: - at `\$\.?(.*)`)?")


def decode(body: bytes, kind: type[msgspec.Struct]):
    """Decode a request body strictly (a string is not a number), naming the offending field."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as e:
        message = str(e)
        if missing := MISSING.fullmatch(message):  # worded as OpenAI words it, the field's path its param
            field, within = missing.groups()
            param = f"{within}.{field}" if within else field
            raise APIError(400, f"Missing required parameter: '{param}'.", param, "missing_required_parameter") from None
        param = message.rsplit("at `$.", 1)[1].rstrip("`") if "at `$." in message else None
        raise APIError(400, message, param) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as e:  # invalid UTF-8 in a string is the latter
        raise APIError(400, f"the body is not valid JSON: {e}") from None


JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def deep_field(body: bytes, depth_limit: int = 256) -> str | None:
    """The top-level field of a JSON object whose value first nests deeper than `depth_limit`,
    for a body that failed to decode for its nesting (msgspec recurses as deep as Python's
    recursion limit allows, ignored fields too: a RecursionError). A Python scan, 0.5-0.7 s for
    4 MB of brackets: run it off the event loop."""
    depth, key, last_string = 0, None, None
    for token in JSON_TOKEN.finditer(body):
        text = token.group()
        if text[0] == ord('"'):
            last_string = text
        elif text in (b"[", b"{"):
            if depth == 1:
                key = last_string
            depth += 1
            if depth > depth_limit:
                return msgspec.json.decode(key) if key else None
        else:
            depth -= 1
    return None
