"""Binding the gRPC server: Unix socket with owner/group permissions, stale-socket handling, TCP."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path

import grpc

from agent.config import AgentConfig
from agent.errors import ConfigError
from agent.serving.grpc.guard import RequestGuard

log = logging.getLogger(__name__)

#: Workers kept out of DetectAnomalies' reach, so StartModel, StopModel, DescribeModel, ListModels and
#: health checks are answered at once however many inference calls wait (at most half the pool).
RESERVED_WORKERS = 4
#: grpc refuses calls beyond GrpcWorkers x this (RESOURCE_EXHAUSTED, before reading their bodies): a
#: backstop so a flood can't pile request bodies up in grpc's executor queue without limit.
RPC_BACKLOG_FACTOR = 8


def detect_capacity(config: AgentConfig) -> int:
    """How many DetectAnomalies calls the agent admits at once (running or queued), over all models:
    every one of them holds a gRPC worker, and a few workers stay free for everything else."""
    reserved = min(RESERVED_WORKERS, config.grpc_workers // 2)
    return max(1, config.grpc_workers - reserved)


def clear_stale_socket(path: Path) -> None:
    """Remove a socket file left by a crashed agent; refuse if an agent still answers on it
    or if the path is something other than a socket (never delete a user's file)."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ConfigError(f"cannot check socket {path}: {exc.strerror}") from exc
        log.info("removing stale socket %s from an earlier run", path)
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise ConfigError(f"another process is serving on {path}; stop it or choose another --socket")


def _group_id(group: str) -> int:
    import grp

    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"socket group {group!r} does not exist") from None


def build_server(config: AgentConfig, interceptors: Sequence[grpc.ServerInterceptor] = (),
                 guard: RequestGuard | None = None) -> grpc.Server:
    """The gRPC server; `guard` (innermost interceptor, one is made if not given) gives every method a
    request deserializer that never raises, and tells shutdown when the server is quiet."""
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # One agent per socket: a second one must not silently share the address.
        ("grpc.so_reuseport", 0),
    ]
    return grpc.server(futures.ThreadPoolExecutor(max_workers=config.grpc_workers, thread_name_prefix="grpc"),
                       interceptors=[*interceptors, guard or RequestGuard()], options=options,
                       maximum_concurrent_rpcs=config.grpc_workers * RPC_BACKLOG_FACTOR)


def bind(server: grpc.Server, config: AgentConfig) -> list[str]:
    """Bind the Unix socket (and TCP listener if configured); returns the bound addresses."""
    path = Path(config.socket_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_stale_socket(path)
    if config.socket_group:
        _group_id(config.socket_group)  # an unknown group fails here, before anything is bound
    # The socket is created by bind(): a restrictive umask keeps it closed until chmod below.
    old_umask = os.umask(0o177)
    try:
        server.add_insecure_port(config.socket)
    finally:
        os.umask(old_umask)
    addresses = [config.socket]
    if config.tcp:
        port = server.add_insecure_port(config.tcp)
        if port == 0:
            raise ConfigError(f"cannot listen on {config.tcp}")
        host = config.tcp.rpartition(":")[0]
        addresses.append(f"{host}:{port}")
    return addresses


def secure_socket(config: AgentConfig) -> None:
    """Give the socket file its configured mode and group (after server.start(), when it exists)."""
    path = Path(config.socket_path)
    if config.socket_group:
        os.chown(path, -1, _group_id(config.socket_group))
    os.chmod(path, config.socket_mode)
