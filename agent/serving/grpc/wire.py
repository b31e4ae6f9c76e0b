"""The two frame-size byte fields of DetectAnomalies, moved with as few copies as the wire allows.

Requests in (`decode_detect_request`): grpcio hands the deserializer the request as one `bytes` object.
protobuf's parse (upb) copies `bitmap.byte_data` into its arena, and every `.byte_data` access makes new
bytes again: 1-3 ms per request at 1920x1080, 50-250 ms at 4096x4096 (docs/benchmarks-notes.md). Here the
wire format is walked far enough to find the `byte_data` field's offset, protobuf parses everything
else (a few dozen bytes, so its checks — UTF-8 strings, wire types — still apply), and the frame is a
memoryview of the received bytes: no copy at all. Any layout the fast path does not expect (the bitmap
twice, a shared-memory handle next to byte_data, a malformed length) goes to protobuf's own parse
unchanged, so the result is always what protobuf would give.

Responses out (`InlineMaskResponse`): serialising a DetectAnomaliesResponse whose mask travels inline
(`anomaly_mask.byte_data`).

Why not `SerializeToString()`: the mask is as large as the frame (0.9 MB at 640x480, 48 MiB at 4096²).
Setting it on the message copies it into upb's arena, and serialising copies it again into a buffer of
frame size that glibc hands out with a fresh mmap on every request, so each of its 4 KiB pages faults on
first touch: 1.1 ms per 640x480 response on the 2-core benchmark machine against 0.05 ms for one plain
copy (docs/benchmarks-notes.md). Here protobuf serialises everything except the mask bytes (a few dozen
bytes), and the mask is appended with its own field header in a single join: one copy of the mask.

The result is ordinary protobuf wire format: the mask message's fields come after the other fields of
`DetectAnomalyResult` instead of in field-number order, which every conforming parser accepts (fields may
appear in any order). tests/serving/test_wire.py checks that parsing it gives the very message protobuf would build.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.serving.grpc._generated import edge_agent_pb2 as pb

_LEN = 2  # wire type of length-delimited fields
_RESULT = pb.DetectAnomaliesResponse.DESCRIPTOR.fields_by_name["detect_anomaly_result"].number
_MASK = pb.DetectAnomalyResult.DESCRIPTOR.fields_by_name["anomaly_mask"].number
_BYTE_DATA = pb.Bitmap.DESCRIPTOR.fields_by_name["byte_data"].number
_BITMAP = pb.DetectAnomaliesRequest.DESCRIPTOR.fields_by_name["bitmap"].number
_BITMAP_SHM = pb.Bitmap.DESCRIPTOR.fields_by_name["shared_memory_handle"].number


class DetectRequestView:
    """A decoded DetectAnomaliesRequest whose `bitmap.byte_data` is `byte_data`, a memoryview of the
    received bytes; `message` holds every other field (its bitmap has no data set)."""

    __slots__ = ("message", "byte_data")

    def __init__(self, message: pb.DetectAnomaliesRequest, byte_data: memoryview) -> None:
        self.message = message
        self.byte_data = byte_data


class _Malformed(Exception):
    """Not the layout the fast path handles: protobuf's parse decides."""


def _read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes, pos: int, end: int) -> list[tuple[int, int, int, int]]:
    """(number, key start, payload start, payload end) of each field in data[pos:end], for the wire
    types proto3 uses (varint, 64-bit, length-delimited, 32-bit); anything else is _Malformed."""
    out = []
    while pos < end:
        start = pos
        key, pos = _read_varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, payload_end = _read_varint(data, pos, end)
        elif wire == 1 or wire == 5:
            payload_end = pos + (8 if wire == 1 else 4)
        elif wire == _LEN:
            length, pos = _read_varint(data, pos, end)
            payload_end = pos + length
        else:
            raise _Malformed
        if number == 0 or payload_end > end:
            raise _Malformed
        out.append((number if wire == _LEN else -number, start, pos, payload_end))
        pos = payload_end
    return out


def decode_detect_request(data: bytes) -> pb.DetectAnomaliesRequest | DetectRequestView:
    """grpc's request deserializer for DetectAnomalies: a DetectRequestView when the bitmap carries
    byte_data in the usual layout (one bitmap, one byte_data), else protobuf's own parse (which raises
    DecodeError for what isn't a DetectAnomaliesRequest: guard.tolerant turns that into INVALID_ARGUMENT).

    Length-delimited fields are listed by number, others by minus their number, so a field of the right
    number but the wrong wire type never takes the fast path."""
    try:
        top = _fields(data, 0, len(data))
        bitmaps = [f for f in top if abs(f[0]) == _BITMAP]
        if len(bitmaps) != 1 or bitmaps[0][0] != _BITMAP:
            raise _Malformed
        _, bm_start, bm_payload, bm_end = bitmaps[0]
        inner = _fields(data, bm_payload, bm_end)
        frames = [f for f in inner if abs(f[0]) == _BYTE_DATA]
        if len(frames) != 1 or frames[0][0] != _BYTE_DATA or any(abs(f[0]) == _BITMAP_SHM for f in inner):
            raise _Malformed
        _, bd_start, bd_payload, bd_end = frames[0]
    except _Malformed:
        return pb.DetectAnomaliesRequest.FromString(data)
    # Everything but the bitmap, then the bitmap's other fields (width, height, unknown ones): small.
    message = pb.DetectAnomaliesRequest.FromString(data[:bm_start] + data[bm_end:])
    message.bitmap.MergeFrom(pb.Bitmap.FromString(data[bm_payload:bd_start] + data[bd_end:bm_end]))
    return DetectRequestView(message, memoryview(data)[bd_payload:bd_end])


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _header(number: int, length: int) -> bytes:
    """Key and length of a length-delimited field."""
    return _varint(number << 3 | _LEN) + _varint(length)


@dataclass(frozen=True)
class InlineMaskResponse:
    """A DetectAnomaliesResponse whose `detect_anomaly_result.anomaly_mask` is `mask` (width x height
    RGB888, any C-contiguous buffer) with the mask bytes kept out of the protobuf message.

    `response` must not have `anomaly_mask` set: its width, height and data are written from here."""

    response: pb.DetectAnomaliesResponse
    mask: np.ndarray
    width: int
    height: int

    def SerializeToString(self) -> bytes:  # noqa: N802 - the protobuf method name grpc expects
        data = self.mask.data.cast("B")
        data_header = _header(_BYTE_DATA, data.nbytes)
        mask_head = pb.Bitmap(width=self.width, height=self.height).SerializeToString()
        mask_len = len(mask_head) + len(data_header) + data.nbytes
        mask_header = _header(_MASK, mask_len)
        result_head = self.response.detect_anomaly_result.SerializeToString()
        result_len = len(result_head) + len(mask_header) + mask_len
        return b"".join((_header(_RESULT, result_len), result_head, mask_header, mask_head, data_header, data))

    def to_message(self) -> pb.DetectAnomaliesResponse:
        """The same response as a protobuf message (copies the mask: for tests and in-process callers)."""
        message = pb.DetectAnomaliesResponse()
        message.CopyFrom(self.response)
        mask = message.detect_anomaly_result.anomaly_mask
        mask.width, mask.height = self.width, self.height
        mask.byte_data = self.mask.data.cast("B").tobytes()
        return message


def serialize_detect_response(response: Any) -> bytes:
    """grpc's response serializer for DetectAnomalies: protobuf messages and InlineMaskResponse alike."""
    return response.SerializeToString()  # type: ignore[no-any-return]
