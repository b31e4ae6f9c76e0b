"""grpc.health.v1 and server reflection on the agent's own socket(s).

Service names a client can check:

* ""                               — the agent: NOT_SERVING until start() has bound the socket, SERVING
  while it serves, NOT_SERVING for good once shutdown begins (so a prober stops sending work
  before the drain, as Triton and Kubernetes readiness do);
* "AWS.LookoutVision.EdgeAgent"    — the LFV API, same as "";
* "<model component name>"         — SERVING only while that model is RUNNING (fed by the registry's
  on_status hook); NOT_SERVING while STOPPED, STARTING, STOPPING, FAILED or after it was removed.
  A name the agent never knew gives NOT_FOUND, as the health protocol says.

Reflection (on by default, GrpcReflection=false turns it off) lets grpcurl and similar tools list
and call the services without the .proto files.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agent.core.lifecycle import ModelInfo, ModelStatus
from agent.serving.grpc._generated import edge_agent_pb2 as pb

EDGE_AGENT_SERVICE = pb.DESCRIPTOR.services_by_name["EdgeAgent"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class AgentHealth:
    """The health servicer plus the RegistryListener that keeps per-model statuses current."""

    def __init__(self) -> None:
        # Non-blocking Watch: a watcher doesn't hold a gRPC worker thread while it waits.
        self.servicer = health.HealthServicer(experimental_non_blocking=True)
        for service in (health.OVERALL_HEALTH, EDGE_AGENT_SERVICE):
            self.servicer.set(service, NOT_SERVING)

    def add_to_server(self, server: grpc.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    def serving(self) -> None:
        """The agent is up: sockets bound, server started."""
        for service in (health.OVERALL_HEALTH, EDGE_AGENT_SERVICE):
            self.servicer.set(service, SERVING)

    def shutting_down(self) -> None:
        """Everything NOT_SERVING, permanently (later model transitions during the drain are ignored)."""
        self.servicer.enter_graceful_shutdown()

    # -- RegistryListener ----------------------------------------------------------------------
    def on_status(self, info: ModelInfo) -> None:
        self.servicer.set(info.name, SERVING if info.status == ModelStatus.RUNNING else NOT_SERVING)

    def on_loaded(self, info: ModelInfo, load_seconds: float, warmup_seconds: float) -> None:
        pass  # a swap keeps the model RUNNING; on_status covers the rest

    def on_swap(self, info: ModelInfo, ok: bool, reason: str) -> None:
        pass

    def on_removed(self, name: str) -> None:
        # The health servicer has no public way to forget a name; NOT_SERVING is what a removed model is.
        self.servicer.set(name, NOT_SERVING)


def enable_reflection(server: grpc.Server, extra_services: Sequence[str] = ()) -> None:
    """Serve grpc.reflection.v1alpha for the LFV API, health and reflection itself."""
    names = (EDGE_AGENT_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME, *extra_services)
    reflection.enable_server_reflection(names, server)
