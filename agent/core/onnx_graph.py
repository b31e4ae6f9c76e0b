"""What the agent needs to know about an ONNX file, read from its protobuf encoding without the `onnx` package.

A device install has ONNX Runtime but not `onnx` (issue 15), and `edge-agent model build` still has to find a
model's inputs, outputs and external data files. An ONNX file is a serialized ModelProto; the few fields read here
(onnx/onnx.proto field numbers below) are walked directly on the bytes, skipping the weights without copying them.

The same walk answers the question ONNX Runtime 1.16/1.17 (JetPack 5) raises for newer exports: they refuse any IR
version above 9, but anomalib 2.x / torch >= 2.5 write IR 10 even when the graph uses nothing IR 10 added. Such a
file loads once its ir_version field says 9 (`with_ir_version`); `newer_ir_features` lists what would make that
wrong (4-bit types, overloaded functions, multi-device configuration).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Union

from agent.errors import PackageError

# Wire types (protobuf encoding).
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

# Field numbers from onnx/onnx.proto.
MODEL_IR_VERSION, MODEL_GRAPH, MODEL_OPSET_IMPORT, MODEL_FUNCTIONS, MODEL_CONFIGURATION = 1, 7, 8, 25, 26
OPSET_DOMAIN, OPSET_VERSION = 1, 2
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_INPUT, GRAPH_OUTPUT, GRAPH_VALUE_INFO = 1, 5, 11, 12, 13
GRAPH_SPARSE_INITIALIZER = 15
NODE_OP_TYPE, NODE_ATTRIBUTE, NODE_OVERLOAD, NODE_DEVICE_CONFIGURATIONS = 4, 5, 8, 10
ATTR_NAME, ATTR_I, ATTR_T, ATTR_G, ATTR_TENSORS, ATTR_GRAPHS, ATTR_TP, ATTR_TYPE_PROTOS = 1, 3, 5, 6, 10, 11, 14, 15
ATTR_SPARSE_TENSOR, ATTR_SPARSE_TENSORS = 22, 23
FUNCTION_NODE, FUNCTION_VALUE_INFO, FUNCTION_OVERLOAD = 7, 12, 13
TENSOR_DATA_TYPE, TENSOR_NAME, TENSOR_EXTERNAL_DATA = 2, 8, 13
SPARSE_VALUES, SPARSE_INDICES = 1, 2
ENTRY_KEY, ENTRY_VALUE = 1, 2
VALUE_INFO_NAME, VALUE_INFO_TYPE = 1, 2
TYPE_TENSOR, TYPE_SEQUENCE, TYPE_MAP, TYPE_SPARSE_TENSOR, TYPE_OPTIONAL = 1, 4, 5, 8, 9
TENSOR_TYPE_ELEM, TENSOR_TYPE_SHAPE = 1, 2
MAP_VALUE_TYPE = 2
SHAPE_DIM, DIM_VALUE, DIM_PARAM = 1, 1, 2

# TensorProto.DataType up to FLOAT8E5M2FNUZ (20) existed in IR 9; UINT4 (21) and INT4 (22) came with IR 10, later
# values (FLOAT4E2M1, ...) after it. A runtime that knows IR 9 knows none of them.
IR9_MAX_DATA_TYPE = 20
# Attributes whose int value is a TensorProto.DataType (Cast, CastLike's target, QuantizeLinear, RandomNormal, ...).
_DTYPE_ATTRIBUTES = {"to", "dtype", "output_dtype"}

Dim = Union[int, str]


@dataclass(frozen=True)
class GraphSignature:
    """A model's graph inputs (initializers excluded) and outputs with their shapes, and its external data files."""

    inputs: list[tuple[str, list[Dim]]]
    outputs: list[tuple[str, list[Dim]]]
    external_files: list[str]


@dataclass(frozen=True)
class ModelHeader:
    ir_version: int
    opsets: tuple[tuple[str, int], ...]  # (domain, version); "" is the default ai.onnx domain

    @property
    def onnx_opset(self) -> int | None:
        return next((v for d, v in self.opsets if d in ("", "ai.onnx")), None)


@dataclass
class _Scan:
    newer: list[str] = field(default_factory=list)

    def add(self, what: str) -> None:
        if what not in self.newer:
            self.newer.append(what)


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int, int | memoryview]]:
    """(field number, wire type, offset of the field's key, value) for each field of one message.

    Length-delimited values are memoryviews into buf (nothing is copied); varints are ints.
    """
    pos = 0
    end = len(buf)
    while pos < end:
        start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError(f"field number 0 at offset {start}")
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
            yield number, wire, start, value
        elif wire == _LEN:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise ValueError(f"field {number} at offset {start} runs past the end of its message")
            yield number, wire, start, buf[pos:pos + size]
            pos += size
        elif wire == _I64:
            pos += 8
        elif wire == _I32:
            pos += 4
        else:  # groups (3, 4) are not used by onnx.proto
            raise ValueError(f"unsupported wire type {wire} at offset {start}")
        if pos > end:
            raise ValueError("truncated message")


def _messages(buf: memoryview, number: int) -> Iterator[memoryview]:
    for n, wire, _, value in _fields(buf):
        if n == number and wire == _LEN:
            assert isinstance(value, memoryview)
            yield value


def _int(buf: memoryview, number: int, default: int = 0) -> int:
    out = default
    for n, wire, _, value in _fields(buf):
        if n == number and wire == _VARINT:
            assert isinstance(value, int)
            out = value
    return out


def _str(buf: memoryview, number: int) -> str:
    out = ""
    for value in _messages(buf, number):
        out = bytes(value).decode("utf-8", "replace")
    return out


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _view(data: bytes | memoryview) -> memoryview:
    return data if isinstance(data, memoryview) else memoryview(data)


def read_header(data: bytes | memoryview) -> ModelHeader:
    """IR version and operator sets of a serialized ModelProto (ValueError if it is not one)."""
    buf = _view(data)
    ir_version = 0
    opsets = []
    seen_graph = False
    for n, wire, _, value in _fields(buf):
        if n == MODEL_IR_VERSION and wire == _VARINT:
            assert isinstance(value, int)
            ir_version = value
        elif n == MODEL_OPSET_IMPORT and wire == _LEN:
            assert isinstance(value, memoryview)
            opsets.append((_str(value, OPSET_DOMAIN), _signed(_int(value, OPSET_VERSION))))
        elif n == MODEL_GRAPH and wire == _LEN:
            seen_graph = True
    if not seen_graph or ir_version <= 0:
        raise ValueError("no ir_version or no graph: not an ONNX model")
    return ModelHeader(ir_version, tuple(opsets))


def _dims(type_proto: memoryview) -> list[Dim]:
    dims: list[Dim] = []
    for tensor in _messages(type_proto, TYPE_TENSOR):
        for shape in _messages(tensor, TENSOR_TYPE_SHAPE):
            for dim in _messages(shape, SHAPE_DIM):
                value: Dim = "?"
                for n, wire, _, v in _fields(dim):
                    if n == DIM_VALUE and wire == _VARINT:
                        assert isinstance(v, int)
                        value = _signed(v)
                    elif n == DIM_PARAM and wire == _LEN:
                        assert isinstance(v, memoryview)
                        value = bytes(v).decode("utf-8", "replace") or "?"
                dims.append(value)
    return dims


def _value_infos(graph: memoryview, number: int) -> list[tuple[str, list[Dim]]]:
    out = []
    for vi in _messages(graph, number):
        types = list(_messages(vi, VALUE_INFO_TYPE))
        out.append((_str(vi, VALUE_INFO_NAME), _dims(types[-1]) if types else []))
    return out


def graph_signature(data: bytes | memoryview) -> GraphSignature:
    """Inputs, outputs and external data locations of a serialized ModelProto (ValueError if unreadable)."""
    buf = _view(data)
    read_header(buf)
    graphs = list(_messages(buf, MODEL_GRAPH))
    graph = graphs[-1]
    initializers = set()
    externals = set()
    for tensor in _messages(graph, GRAPH_INITIALIZER):
        initializers.add(_str(tensor, TENSOR_NAME))
        for entry in _messages(tensor, TENSOR_EXTERNAL_DATA):
            if _str(entry, ENTRY_KEY) == "location":
                externals.add(_str(entry, ENTRY_VALUE))
    return GraphSignature(
        inputs=[(n, d) for n, d in _value_infos(graph, GRAPH_INPUT) if n not in initializers],
        outputs=_value_infos(graph, GRAPH_OUTPUT),
        external_files=sorted(externals),
    )


def read_signature(path: str | bytes | memoryview, name: str = "model") -> GraphSignature:
    """graph_signature of a file (or its bytes), as a PackageError naming the file when it is not ONNX."""
    try:
        if isinstance(path, (bytes, memoryview)):
            return graph_signature(path)
        with open(path, "rb") as f:
            return graph_signature(f.read())
    except (ValueError, IndexError) as exc:
        raise PackageError(f"{name} is not a readable ONNX model: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# IR version downgrade for runtimes that only know IR 9


def _scan_type(tp: memoryview, where: str, scan: _Scan) -> None:
    for n, wire, _, value in _fields(tp):
        if wire != _LEN:
            continue
        assert isinstance(value, memoryview)
        if n in (TYPE_TENSOR, TYPE_SPARSE_TENSOR):
            if _int(value, TENSOR_TYPE_ELEM) > IR9_MAX_DATA_TYPE:
                scan.add(f"a 4-bit or newer element type ({where})")
        elif n in (TYPE_SEQUENCE, TYPE_OPTIONAL):
            for inner in _messages(value, 1):
                _scan_type(inner, where, scan)
        elif n == TYPE_MAP:
            for inner in _messages(value, MAP_VALUE_TYPE):
                _scan_type(inner, where, scan)


def _scan_tensor(tensor: memoryview, where: str, scan: _Scan) -> None:
    if _int(tensor, TENSOR_DATA_TYPE) > IR9_MAX_DATA_TYPE:
        scan.add(f"a 4-bit or newer tensor type ({where} {_str(tensor, TENSOR_NAME)!r})")


def _scan_sparse(sparse: memoryview, where: str, scan: _Scan) -> None:
    for number in (SPARSE_VALUES, SPARSE_INDICES):
        for tensor in _messages(sparse, number):
            _scan_tensor(tensor, where, scan)


def _scan_nodes(container: memoryview, node_field: int, scan: _Scan) -> None:
    for node in _messages(container, node_field):
        op = _str(node, NODE_OP_TYPE)
        if _str(node, NODE_OVERLOAD):
            scan.add(f"an overloaded function call ({op})")
        if any(True for _ in _messages(node, NODE_DEVICE_CONFIGURATIONS)):
            scan.add(f"a multi-device node configuration ({op})")
        for attr in _messages(node, NODE_ATTRIBUTE):
            name = _str(attr, ATTR_NAME)
            for n, wire, _, value in _fields(attr):
                if n == ATTR_I and wire == _VARINT and name in _DTYPE_ATTRIBUTES:
                    assert isinstance(value, int)
                    if value > IR9_MAX_DATA_TYPE:
                        scan.add(f"a 4-bit or newer type ({op} {name}={value})")
                if wire != _LEN:
                    continue
                assert isinstance(value, memoryview)
                if n in (ATTR_T, ATTR_TENSORS):
                    _scan_tensor(value, f"{op} attribute", scan)
                elif n in (ATTR_SPARSE_TENSOR, ATTR_SPARSE_TENSORS):
                    _scan_sparse(value, f"{op} attribute", scan)
                elif n in (ATTR_G, ATTR_GRAPHS):
                    _scan_graph(value, scan)
                elif n in (ATTR_TP, ATTR_TYPE_PROTOS):
                    _scan_type(value, f"{op} attribute", scan)


def _scan_graph(graph: memoryview, scan: _Scan) -> None:
    for tensor in _messages(graph, GRAPH_INITIALIZER):
        _scan_tensor(tensor, "initializer", scan)
    for sparse in _messages(graph, GRAPH_SPARSE_INITIALIZER):
        _scan_sparse(sparse, "sparse initializer", scan)
    for number, where in ((GRAPH_INPUT, "input"), (GRAPH_OUTPUT, "output"), (GRAPH_VALUE_INFO, "value")):
        for vi in _messages(graph, number):
            for tp in _messages(vi, VALUE_INFO_TYPE):
                _scan_type(tp, f"{where} {_str(vi, VALUE_INFO_NAME)!r}", scan)
    _scan_nodes(graph, GRAPH_NODE, scan)


def newer_ir_features(data: bytes | memoryview) -> list[str]:
    """What in a model a runtime that knows only IR 9 could not honour (empty: loading it as IR 9 is exact).

    Metadata properties (IR 10 put them on nodes, graphs, functions and values) are not listed: they are
    annotations that no runtime executes, and an IR 9 runtime skips them as unknown fields.
    """
    buf = _view(data)
    scan = _Scan()
    for graph in _messages(buf, MODEL_GRAPH):
        _scan_graph(graph, scan)
    for function in _messages(buf, MODEL_FUNCTIONS):
        if _str(function, FUNCTION_OVERLOAD):
            scan.add("an overloaded model-local function")
        for vi in _messages(function, FUNCTION_VALUE_INFO):
            for tp in _messages(vi, VALUE_INFO_TYPE):
                _scan_type(tp, "function value", scan)
        _scan_nodes(function, FUNCTION_NODE, scan)
    if any(True for _ in _messages(buf, MODEL_CONFIGURATION)):
        scan.add("a multi-device configuration")
    return scan.newer


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def with_ir_version(data: bytes | memoryview, ir_version: int) -> bytes:
    """The serialized model with its ir_version field set to ir_version (everything else byte for byte)."""
    buf = _view(data)
    pieces: list[bytes | memoryview] = []
    last = 0
    key = _encode_varint(MODEL_IR_VERSION << 3 | _VARINT)
    for n, wire, start, _ in _fields(buf):
        if n == MODEL_IR_VERSION and wire == _VARINT:
            _, end = _varint(buf, start + len(key))
            pieces += [buf[last:start], key, _encode_varint(ir_version)]
            last = end
    pieces.append(buf[last:])
    return b"".join(pieces)
