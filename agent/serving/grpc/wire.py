"""Serialising a DetectAnomaliesResponse whose mask travels inline (`anomaly_mask.byte_data`).

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
