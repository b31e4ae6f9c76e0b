"""Running as the Greengrass v2 component com.edgeagent.EdgeAgent (docs/greengrass.md).

Depends on the core; the core never imports this package. agent/app.py (the composition root)
wires it in when `detect()` finds the nucleus' environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

COMPONENT_NAME = "com.edgeagent.EdgeAgent"
SVCUID_ENV = "SVCUID"
SOCKET_ENV = "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT"


@dataclass(frozen=True)
class GreengrassEnvironment:
    """What the nucleus gives a component process: its IPC token and socket, and its work dir (cwd)."""

    svcuid: str
    socket_path: str
    work_path: Path
    #: The component nucleus lite runs us as (from our systemd unit's cgroup), else the agent's name: what a
    #: `componentName` IPC connect presents when the SVCUID was forgotten (agent/greengrass/ipc.py).
    component_name: str = COMPONENT_NAME


def detect(environ: Mapping[str, str], cwd: Path, cgroup: Path = Path("/proc/self/cgroup")) -> \
        GreengrassEnvironment | None:
    """The Greengrass environment if this process was started by the nucleus (both variables set)."""
    svcuid, socket_path = environ.get(SVCUID_ENV, ""), environ.get(SOCKET_ENV, "")
    if not svcuid or not socket_path:
        return None
    from agent.greengrass.ipc import unit_component_name

    try:
        name = unit_component_name(cgroup.read_text())
    except OSError:
        name = ""
    return GreengrassEnvironment(svcuid, socket_path, cwd, name or COMPONENT_NAME)
