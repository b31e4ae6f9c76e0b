"""AWS event-stream framing and event-stream-RPC constants, for the fake Greengrass nucleus.

Only what a *server* needs to talk to the real awscrt client: encode and decode single
messages (prelude + headers + payload + two CRC32s, all big-endian) and the RPC header
names/values layered on top. Sources: awslabs/aws-c-event-stream
(`event_stream.h`, `event_stream_rpc.h`) and `awscrt/eventstream/rpc.py`.
"""

from __future__ import annotations

import enum
import struct
import typing  # runtime-evaluated alias below: X | Y needs Python >= 3.10
import uuid
import zlib
from dataclasses import dataclass, field

# --- framing ---------------------------------------------------------------------------------

PRELUDE_LEN = 12  # total_length, headers_length, prelude_crc
MESSAGE_CRC_LEN = 4
MIN_MESSAGE_LEN = PRELUDE_LEN + MESSAGE_CRC_LEN
MAX_MESSAGE_LEN = 24 * 1024 * 1024  # awscrt refuses anything larger
MAX_HEADER_NAME_LEN = 255
MAX_HEADER_VALUE_LEN = 32767

_PRELUDE = struct.Struct(">III")
_UINT32 = struct.Struct(">I")


class HeaderType(enum.IntEnum):
    """Header value type tags (`aws_event_stream_header_value_type`)."""

    BOOL_TRUE = 0
    BOOL_FALSE = 1
    BYTE = 2
    INT16 = 3
    INT32 = 4
    INT64 = 5
    BYTE_BUF = 6
    STRING = 7
    TIMESTAMP = 8
    UUID = 9


HeaderValue = typing.Union[bool, int, bytes, str, uuid.UUID]

# Fixed-width integer header types: struct format for each.
_INT_FORMATS = {
    HeaderType.BYTE: ">b",
    HeaderType.INT16: ">h",
    HeaderType.INT32: ">i",
    HeaderType.INT64: ">q",
    HeaderType.TIMESTAMP: ">q",
}


@dataclass(frozen=True)
class Header:
    name: str
    type: HeaderType
    value: HeaderValue

    @classmethod
    def string(cls, name: str, value: str) -> Header:
        return cls(name, HeaderType.STRING, value)

    @classmethod
    def int32(cls, name: str, value: int) -> Header:
        return cls(name, HeaderType.INT32, value)


# --- event-stream RPC layer --------------------------------------------------------------------

HDR_MESSAGE_TYPE = ":message-type"
HDR_MESSAGE_FLAGS = ":message-flags"
HDR_STREAM_ID = ":stream-id"
HDR_VERSION = ":version"
HDR_CONTENT_TYPE = ":content-type"
HDR_OPERATION = "operation"
HDR_SERVICE_MODEL_TYPE = "service-model-type"

RPC_VERSION = "0.1.0"
CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_TEXT = "text/plain"


class MessageType(enum.IntEnum):
    APPLICATION_MESSAGE = 0
    APPLICATION_ERROR = 1
    PING = 2
    PING_RESPONSE = 3
    CONNECT = 4
    CONNECT_ACK = 5
    PROTOCOL_ERROR = 6
    INTERNAL_ERROR = 7


class MessageFlag(enum.IntFlag):
    NONE = 0
    CONNECTION_ACCEPTED = 0x1
    TERMINATE_STREAM = 0x2


class FrameError(ValueError):
    """A frame could not be decoded (bad length, CRC or header)."""


@dataclass
class Message:
    """One decoded event-stream message. Header lookup is case-insensitive, like the C client."""

    headers: list[Header] = field(default_factory=list)
    payload: bytes = b""

    def header(self, name: str) -> HeaderValue | None:
        lowered = name.lower()
        for hdr in self.headers:
            if hdr.name.lower() == lowered:
                return hdr.value
        return None

    # RPC accessors; the client always sends all three INT32 headers.
    @property
    def message_type(self) -> int:
        value = self.header(HDR_MESSAGE_TYPE)
        return int(value) if isinstance(value, int) else -1

    @property
    def flags(self) -> int:
        value = self.header(HDR_MESSAGE_FLAGS)
        return int(value) if isinstance(value, int) else 0

    @property
    def stream_id(self) -> int:
        value = self.header(HDR_STREAM_ID)
        return int(value) if isinstance(value, int) else 0


def _crc32(data: bytes, seed: int = 0) -> int:
    return zlib.crc32(data, seed) & 0xFFFFFFFF


def encode_header(header: Header) -> bytes:
    name = header.name.encode("utf-8")
    if not 0 < len(name) <= MAX_HEADER_NAME_LEN:
        raise ValueError(f"header name length out of range: {header.name!r}")
    out = bytearray([len(name)]) + name
    htype = HeaderType(header.type)
    if htype in (HeaderType.BOOL_TRUE, HeaderType.BOOL_FALSE):
        # The value is carried by the type tag itself.
        htype = HeaderType.BOOL_TRUE if header.value else HeaderType.BOOL_FALSE
        out.append(htype)
    elif htype in _INT_FORMATS:
        out.append(htype)
        out += struct.pack(_INT_FORMATS[htype], int(header.value))  # type: ignore[arg-type]
    elif htype in (HeaderType.BYTE_BUF, HeaderType.STRING):
        raw = header.value.encode("utf-8") if isinstance(header.value, str) else bytes(header.value)  # type: ignore[arg-type]
        if len(raw) > MAX_HEADER_VALUE_LEN:
            raise ValueError(f"header value too long: {header.name!r}")
        out.append(htype)
        out += struct.pack(">H", len(raw)) + raw
    elif htype is HeaderType.UUID:
        value = header.value if isinstance(header.value, uuid.UUID) else uuid.UUID(bytes=bytes(header.value))  # type: ignore[arg-type]
        out.append(htype)
        out += value.bytes
    else:  # pragma: no cover - enum is exhaustive
        raise ValueError(f"unknown header type {htype}")
    return bytes(out)


def decode_headers(buf: bytes) -> list[Header]:
    headers: list[Header] = []
    pos = 0
    try:
        while pos < len(buf):
            name_len = buf[pos]
            pos += 1
            name = buf[pos : pos + name_len].decode("utf-8")
            pos += name_len
            htype = HeaderType(buf[pos])
            pos += 1
            value: HeaderValue
            if htype is HeaderType.BOOL_TRUE:
                value = True
            elif htype is HeaderType.BOOL_FALSE:
                value = False
            elif htype in _INT_FORMATS:
                fmt = struct.Struct(_INT_FORMATS[htype])
                (value,) = fmt.unpack_from(buf, pos)
                pos += fmt.size
            elif htype in (HeaderType.BYTE_BUF, HeaderType.STRING):
                (vlen,) = struct.unpack_from(">H", buf, pos)
                pos += 2
                raw = bytes(buf[pos : pos + vlen])
                if len(raw) != vlen:
                    raise FrameError("truncated header value")
                pos += vlen
                value = raw.decode("utf-8") if htype is HeaderType.STRING else raw
            else:  # UUID
                value = uuid.UUID(bytes=bytes(buf[pos : pos + 16]))
                pos += 16
            headers.append(Header(name, htype, value))
    except (IndexError, struct.error, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, FrameError):
            raise
        raise FrameError(f"malformed headers: {exc}") from exc
    if pos != len(buf):
        raise FrameError("header block overran its declared length")
    return headers


def encode_message(headers: list[Header], payload: bytes = b"") -> bytes:
    header_bytes = b"".join(encode_header(h) for h in headers)
    total = PRELUDE_LEN + len(header_bytes) + len(payload) + MESSAGE_CRC_LEN
    if total > MAX_MESSAGE_LEN:
        raise ValueError(f"message too large: {total} bytes")
    prelude8 = struct.pack(">II", total, len(header_bytes))
    prelude = prelude8 + _UINT32.pack(_crc32(prelude8))
    body = prelude + header_bytes + payload
    return body + _UINT32.pack(_crc32(body))


def parse_prelude(prelude: bytes) -> tuple[int, int]:
    """Validate the 12-byte prelude; return (total_length, headers_length)."""
    total, headers_len, prelude_crc = _PRELUDE.unpack(prelude)
    if _crc32(prelude[:8]) != prelude_crc:
        raise FrameError("prelude CRC mismatch")
    if not MIN_MESSAGE_LEN <= total <= MAX_MESSAGE_LEN:
        raise FrameError(f"bad total length {total}")
    if headers_len > total - MIN_MESSAGE_LEN:
        raise FrameError(f"bad headers length {headers_len}")
    return total, headers_len


def decode_message(frame: bytes) -> Message:
    """Decode one complete frame (prelude included) and check both CRCs."""
    if len(frame) < MIN_MESSAGE_LEN:
        raise FrameError("frame shorter than prelude + CRC")
    total, headers_len = parse_prelude(frame[:PRELUDE_LEN])
    if total != len(frame):
        raise FrameError(f"frame is {len(frame)} bytes, prelude says {total}")
    (message_crc,) = _UINT32.unpack_from(frame, total - MESSAGE_CRC_LEN)
    if _crc32(frame[: total - MESSAGE_CRC_LEN]) != message_crc:
        raise FrameError("message CRC mismatch")
    headers_end = PRELUDE_LEN + headers_len
    headers = decode_headers(frame[PRELUDE_LEN:headers_end])
    return Message(headers=headers, payload=bytes(frame[headers_end : total - MESSAGE_CRC_LEN]))


def rpc_message(
    message_type: MessageType,
    *,
    stream_id: int = 0,
    flags: int = 0,
    headers: list[Header] | None = None,
    payload: bytes = b"",
) -> bytes:
    """Encode a message carrying the three RPC headers the client insists on, plus extras."""
    all_headers = list(headers or [])
    all_headers += [
        Header.int32(HDR_MESSAGE_TYPE, int(message_type)),
        Header.int32(HDR_MESSAGE_FLAGS, int(flags)),
        Header.int32(HDR_STREAM_ID, stream_id),
    ]
    return encode_message(all_headers, payload)
