"""The agent's configuration: one typed object, declared once.

Each field of AgentConfig declares its Greengrass configuration key (PascalCase, as in the
component recipe), and from that its command-line flag (--kebab-case) and environment variable
(EDGE_AGENT_UPPER_SNAKE) are derived. Standalone mode reads CLI and environment; under
Greengrass the same keys come from the component configuration (agent/greengrass).
Precedence, lowest first: defaults, Greengrass configuration, environment, command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import ConfigError

DEFAULT_SOCKET = "unix:///tmp/aws.iot.lookoutvision.EdgeAgent.sock"
#: Triton's metrics port, so dashboards and firewall rules written for Triton carry over.
DEFAULT_METRICS_PORT = 8002
PROVIDER_NAMES = ("tensorrt", "cuda", "cpu")
ENV_PREFIX = "EDGE_AGENT_"
#: glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2, 32 MiB on 64-bit systems (agent/runtime/memory.py
#: applies MallocMmapThresholdMB).
MAX_MMAP_THRESHOLD_MB = 32


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():  # Greengrass JSON numbers arrive as floats
        return int(value)
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        # ...and as "16.0" or "6.711296E7" (Java's Double.toString) once a recipe interpolates them into Setenv
        number = float(text)
        if not number.is_integer():
            raise
        return int(number)


def _parse_mode(value: Any) -> int:
    mode = int(str(value), 8) if not isinstance(value, int) else value
    if mode & 0o007:
        raise ValueError(f"socket mode {oct(mode)} would give other users access; use owner/group bits only")
    return mode


def _parse_list(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return tuple(str(i).strip() for i in items if str(i).strip())


def _parse_providers(value: Any) -> tuple[str, ...]:
    names = tuple(n.lower() for n in _parse_list(value))
    if not names:
        raise ValueError("at least one execution provider is needed")
    if names == ("auto",):
        return names
    unknown = [n for n in names if n not in PROVIDER_NAMES]
    if unknown:
        raise ValueError(f"unknown execution provider(s) {unknown}; choose from {list(PROVIDER_NAMES)} or 'auto'")
    return names


def _parse_socket(value: Any) -> str:
    text = str(value).strip()
    if not text.startswith("unix://") or len(text) <= len("unix://"):
        raise ValueError(f"socket must be a unix:// URI, got {text!r}")
    path = text[len("unix://"):]
    if not path.startswith("/"):
        raise ValueError(f"socket path must be absolute, got {path!r}")
    if len(path.encode()) > 107:
        raise ValueError(f"socket path is {len(path.encode())} bytes; Unix sockets allow at most 107")
    return text


def _parse_hostport(value: Any) -> str:
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return text if host else f"127.0.0.1:{port}"


def _parse_positive_float(value: Any) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError(f"must be > 0, got {value!r}")
    return number


def _parse_non_negative_float(value: Any) -> float:
    number = float(value)
    if not number >= 0:  # also refuses NaN
        raise ValueError(f"must be >= 0, got {value!r}")
    return number


def _parse_log_format(value: Any) -> str:
    text = str(value).strip().lower()
    if text not in ("plain", "json"):
        raise ValueError(f"log format must be plain or json, got {value!r}")
    return text


def _parse_metrics_port(value: Any) -> int:
    port = _parse_int(value)
    if not -1 <= port <= 65535:
        raise ValueError(f"expected a port 0..65535, or -1 for no metrics endpoint, got {value!r}")
    return port


def _parse_address(value: Any) -> str:
    text = str(value).strip().strip("[]")
    if not text:
        raise ValueError("address is empty")
    return text


def _parse_log_level(value: Any) -> str:
    text = str(value).strip().upper()
    if text not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"unknown log level {value!r}")
    return text


def _non_negative(parse: Callable[[Any], int]) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        number = parse(value)
        if number < 0:
            raise ValueError(f"must be >= 0, got {value!r}")
        return number

    return check


def _at_least_one(value: Any) -> int:
    number = _parse_int(value)
    if number < 1:
        raise ValueError(f"must be >= 1, got {value!r}")
    return number


def _malloc_threshold_mb(value: Any) -> int:
    number = _non_negative(_parse_int)(value)
    if number > MAX_MMAP_THRESHOLD_MB:
        raise ValueError(f"must be at most {MAX_MMAP_THRESHOLD_MB} (glibc's limit), got {value!r}")
    return number


def _parse_inline_mask(value: Any) -> str:
    text = str(value).strip().lower()
    if text not in ("fit", "full", "none"):
        raise ValueError(f"expected fit, full or none, got {value!r}")
    return text


def _inline_mask_bytes(value: Any) -> int:
    number = _parse_int(value)
    if number < 4096:
        raise ValueError(f"must be at least 4096 bytes, got {value!r}")
    return number


def _snake(key: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key).lower()


def _setting(
    default: Any, key: str, help: str, parse: Callable[[Any], Any] = str, *, restart: bool = True, flag: str = ""
) -> Any:
    """Declare a configuration field.

    `restart` says whether a live change needs an agent restart; `flag` overrides the derived CLI flag.
    """
    meta = {"key": key, "help": help, "parse": parse, "restart": restart,
            "flag": flag or "--" + _snake(key).replace("_", "-")}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use immutable defaults")
    return field(default=default, metadata=meta)


def default_work_dir() -> str:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(state) / "edge-agent")


@dataclass(frozen=True)
class AgentConfig:
    socket: str = _setting(DEFAULT_SOCKET, "Socket", "gRPC Unix socket URI the agent serves on", _parse_socket)
    socket_mode: int = _setting(0o660, "SocketMode", "permission bits of the socket file (octal, never world)",
                                _parse_mode)
    socket_group: str = _setting("", "SocketGroup", "group that owns the socket file (e.g. ggc_group); empty = "
                                 "the agent's own group")
    tcp: str = _setting("", "TcpListener", "optional extra TCP listener HOST:PORT (host defaults to 127.0.0.1)",
                        lambda v: _parse_hostport(v) if str(v).strip() else "", flag="--tcp")
    models_dir: str = _setting("", "ModelsDir", "standalone mode: directory whose sub-directories are model "
                               "packages, rescanned while running")
    work_dir: str = _setting(default_work_dir(), "WorkDir", "writable directory for TensorRT engine caches and "
                             "agent state")
    execution_providers: tuple[str, ...] = _setting(
        ("auto",), "ExecutionProviders", "ONNX Runtime execution providers in preference order "
        "(tensorrt,cuda,cpu) or auto (the package's choice, else every available one)", _parse_providers,
        restart=False)
    require_accelerator: bool = _setting(False, "RequireAccelerator", "fail a model instead of running it on "
                                         "the CPU when no GPU provider could be used", parse_bool, restart=False)
    intra_op_threads: int = _setting(0, "IntraOpThreads", "ONNX Runtime intra-op threads per model (0 = "
                                     "runtime default)", _non_negative(_parse_int), restart=False)
    intra_op_spinning: bool = _setting(False, "IntraOpSpinning", "let idle ONNX Runtime intra-op threads "
                                       "busy-wait for work (lower latency on an otherwise idle CPU; off: they "
                                       "don't steal cores from the gRPC and image threads)", parse_bool,
                                       restart=False)
    resize_threads: int = _setting(0, "ResizeThreads", "threads one request's resize of a frame of 500,000 "
                                   "pixels or more uses, its own included: the output is cut into row bands "
                                   "resized in parallel, with the same result (1 = the request's thread alone; "
                                   "0 = the CPUs the agent may use, at most 4)", _non_negative(_parse_int))
    inter_op_threads: int = _setting(0, "InterOpThreads", "ONNX Runtime inter-op threads per model (0 = "
                                     "runtime default)", _non_negative(_parse_int), restart=False)
    max_concurrency: int = _setting(2, "MaxConcurrentInferences", "inferences one model runs in parallel",
                                    _at_least_one, restart=False)
    max_queue: int = _setting(16, "MaxQueuedRequests", "requests per model allowed to wait for a slot; more "
                              "get RESOURCE_EXHAUSTED", _non_negative(_parse_int), restart=False)
    warmup_runs: int = _setting(3, "WarmupRuns", "inferences on generated images before a model is RUNNING",
                                _non_negative(_parse_int), restart=False)
    autostart: tuple[str, ...] = _setting((), "Autostart", "models started as soon as they are known "
                                          "(comma list, * = all), besides packages that say autostart",
                                          _parse_list, restart=False)
    scan_interval_s: float = _setting(1.0, "ModelScanIntervalSeconds", "how often model packages are "
                                      "rescanned", _parse_positive_float, restart=False)
    removal_grace_s: float = _setting(60.0, "ModelRemovalGraceSeconds", "how long a model whose package "
                                      "directory (standalone) or component link (Greengrass) vanished keeps "
                                      "serving before it is removed; a package that reappears in time is "
                                      "swapped in instead (rm -rf + cp -r)",
                                      _parse_non_negative_float, restart=False)
    stop_timeout_s: float = _setting(30.0, "StopTimeoutSeconds", "how long StopModel and shutdown wait for "
                                     "in-flight requests", _parse_positive_float, restart=False)
    load_timeout_s: float = _setting(600.0, "ModelLoadTimeoutSeconds", "a model load (session creation and "
                                     "warm-up) taking longer than this is abandoned and the model goes FAILED "
                                     "(a swap keeps the old version)", _parse_positive_float, restart=False)
    grpc_workers: int = _setting(24, "GrpcWorkers", "gRPC server worker threads; at most GrpcWorkers - 4 "
                                 "DetectAnomalies calls are admitted (running or queued) at once over all "
                                 "models, the other 4 workers answer lifecycle and health calls",
                                 _at_least_one)
    malloc_mmap_threshold_mb: int = _setting(
        17, "MallocMmapThresholdMB", "glibc: buffers up to this size (MiB, at most 32; 17 covers 1080p RGB frames "
        "and Pillow's 16 MiB image blocks) are reused between requests instead of being mmap'ed and "
        "page-faulted afresh each time; 0 = glibc's defaults",
        _malloc_threshold_mb)
    max_message_bytes: int = _setting(64 * 1024 * 1024 + 4096, "MaxMessageBytes", "largest gRPC message "
                                      "accepted or sent (a 4096x4096 RGB image is 48 MiB)", _at_least_one)
    inline_mask: str = _setting(
        "fit", "InlineMask", "masks sent inline in DetectAnomalies responses (anomaly_mask.byte_data): fit = full "
        "size when the response fits InlineMaskMaxBytes, else scaled down (same aspect, nearest neighbour; areas "
        "stay full-size) so gRPC clients with the default 4 MiB receive limit get every frame size; full = always "
        "full size; none = never (shared-memory masks are always full size)", _parse_inline_mask, restart=False)
    inline_mask_max_bytes: int = _setting(
        4 * 1024 * 1024 - 64 * 1024, "InlineMaskMaxBytes", "InlineMask=fit: the largest DetectAnomalies response "
        "with an inline mask, in bytes (default: gRPC's default 4 MiB client receive limit less 64 KiB)",
        _inline_mask_bytes, restart=False)
    inline_mask_normal: bool = _setting(
        True, "InlineMaskNormal", "send the inline mask for normal results too, as Lookout for Vision did (a "
        "640x480 mask is 0.9 MB of mostly white per response); off = only anomalous results carry one (areas are "
        "listed either way)", parse_bool, restart=False)
    log_level: str = _setting("INFO", "LogLevel", "DEBUG, INFO, WARNING or ERROR", _parse_log_level,
                              restart=False)
    log_format: str = _setting("plain", "LogFormat", "plain or json", _parse_log_format)
    metrics_port: int = _setting(DEFAULT_METRICS_PORT, "MetricsPort", "TCP port of the Prometheus /metrics "
                                 "endpoint (0 = any free port, -1 = no endpoint)", _parse_metrics_port)
    metrics_address: str = _setting("127.0.0.1", "MetricsAddress", "address the /metrics endpoint listens on "
                                    "(loopback by default; 0.0.0.0 lets other hosts scrape)", _parse_address)
    grpc_reflection: bool = _setting(True, "GrpcReflection", "serve gRPC server reflection (grpcurl can list "
                                     "and call the API without .proto files)", parse_bool)

    @property
    def socket_path(self) -> str:
        return self.socket[len("unix://"):]

    def replace(self, **changes: Any) -> AgentConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_sources(
        cls,
        *,
        greengrass: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        cli: Mapping[str, Any] | None = None,
    ) -> AgentConfig:
        """Build the config from Greengrass keys, EDGE_AGENT_* variables and parsed CLI options.

        Unknown Greengrass keys are ignored (recipes carry keys of other tools, e.g. accessControl);
        an invalid value raises ConfigError naming the key and what is wrong.
        """
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = f.metadata["key"]
            env_name = ENV_PREFIX + _snake(key).upper()
            # (source, name in it, what the error message calls it: what the user typed, never a field name)
            for source, name, shown in (
                (greengrass, key, key),
                (env, env_name, env_name),
                (cli, f.name, f.metadata["flag"]),
            ):
                if source is not None and source.get(name) is not None:
                    raw = source[name]
                    try:
                        values[f.name] = f.metadata["parse"](raw)
                    except (ValueError, TypeError) as exc:
                        given = f"{shown} {raw!r}" if shown.startswith("--") else f"{shown}={raw!r}"
                        raise ConfigError(f"invalid {key} ({given}): {exc}") from exc
        return cls(**values)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one --flag per field; defaults stay None so from_sources knows what was given."""
        for f in dataclasses.fields(cls):
            flag = f.metadata["flag"]
            if f.type in ("bool", bool):
                # --flag / --no-flag: a setting that defaults to true must be switchable off too.
                parser.add_argument(flag, dest=f.name, action=_BoolFlag, default=None,
                                    help=f"{f.metadata['help']}")
            else:
                parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(),
                                    help=f"{f.metadata['help']} (default: {_show(f.default)})")

    @classmethod
    def keys(cls) -> dict[str, dataclasses.Field[Any]]:
        """Greengrass key → field, for validation and docs."""
        return {f.metadata["key"]: f for f in dataclasses.fields(cls)}


class _BoolFlag(argparse.Action):
    """--flag / --no-flag, as argparse.BooleanOptionalAction (Python >= 3.9) does it."""

    def __init__(self, option_strings: list[str], dest: str, default: Any = None, help: str | None = None) -> None:
        options = [o for s in option_strings for o in (s, "--no-" + s[2:])]
        super().__init__(options, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, not (option_string or "").startswith("--no-"))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(value) or "none"
    if isinstance(value, int) and not isinstance(value, bool) and value == 0o660:
        return "0660"
    return str(value) if value != "" else "unset"
