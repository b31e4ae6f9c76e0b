"""The committed protobuf/gRPC modules and the package import on every supported Python and dependency version
(the compatibility pass runs this on 3.8 with protobuf 4.21.9 / grpcio 1.60 and on 3.13 with the newest)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

from grpc_tools import protoc

import agent
from agent.serving.grpc._generated import edge_agent_pb2, edge_agent_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


def test_descriptor_bytes_are_what_this_protoc_embeds(tmp_path):
    # A client's own protoc output adds the same file to the default descriptor pool as ours; the pool accepts
    # that only when the bytes are identical, whichever protoc (grpcio-tools) the client used.
    assert protoc.main(["protoc", f"--proto_path={ROOT / 'proto'}", f"--python_out={tmp_path}",
                        "edge-agent.proto"]) == 0
    text = (tmp_path / "edge_agent_pb2.py").read_text()
    literal = re.search(r"AddSerializedFile\((b'.*?')\)\n", text, re.S)
    assert literal, "no AddSerializedFile in protoc's output"
    assert ast.literal_eval(literal.group(1)) == edge_agent_pb2._SERIALIZED_FILE


def test_generated_grpc_module_serves_every_method_of_the_proto():
    service = edge_agent_pb2.DESCRIPTOR.services_by_name["EdgeAgent"]
    methods = [m.name for m in service.methods]
    assert methods == ["DetectAnomalies", "StartModel", "StopModel", "ListModels", "DescribeModel"]
    for name in methods:
        assert callable(getattr(edge_agent_pb2_grpc.EdgeAgentServicer, name))

    class Channel:
        def unary_unary(self, path, request_serializer, response_deserializer):
            return path

    stub = edge_agent_pb2_grpc.EdgeAgentStub(Channel())
    assert [getattr(stub, n) for n in methods] == [f"/AWS.LookoutVision.EdgeAgent/{n}" for n in methods]


def test_every_agent_module_imports():
    # Optional dependencies (boto3, yaml, matplotlib) are imported inside functions, so this needs none of them;
    # on Python 3.8 it catches what the end-to-end tests do not reach (e.g. a runtime-evaluated `list[int]`).
    # The benchmark's peer-server adapters run inside the other servers' environments (mlserver, ...), not ours.
    foreign = ("agent.tools.bench.peer_servers.",)
    failed = {}
    for module in pkgutil.walk_packages(agent.__path__, "agent."):
        if module.name.startswith(foreign):
            continue
        try:
            importlib.import_module(module.name)
        except Exception as exc:  # report them all, not the first
            failed[module.name] = f"{type(exc).__name__}: {exc}"
    assert failed == {}
