"""Talk to nucleus lite's IPC server as a component, the way lite's own SDK does: from inside the component's
systemd-unit cgroup, authenticated by `componentName` (ggipcd checks the cgroup). Used by test_nucleus_lite.py,
which needs no SVCUID for it (after a ggipcd restart the agent's is unknown anyway).

usage: python lite_ipc_client.py CGROUP_DIR SOCKET COMPONENT update JSON   UpdateConfiguration (merge JSON)
       python lite_ipc_client.py CGROUP_DIR SOCKET COMPONENT get KEY       GetConfiguration of KEY
Prints the result as JSON; exit status 1 with the error on stderr.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    cgroup, socket, component, command, arg = argv
    Path(cgroup, "cgroup.procs").write_text(f"{__import__('os').getpid()}\n")  # become part of the unit

    from awscrt.io import ClientBootstrap, DefaultHostResolver, EventLoopGroup, SocketDomain, SocketOptions
    from awsiot.eventstreamrpc import Connection, LifecycleHandler, MessageAmendment
    from awsiot.greengrasscoreipc.client import GreengrassCoreIPCClient
    from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2

    elg = EventLoopGroup(num_threads=1)
    options = SocketOptions()
    options.domain = SocketDomain.Local
    payload = json.dumps({"componentName": component}).encode()
    connection = Connection(host_name=socket, port=0, bootstrap=ClientBootstrap(elg, DefaultHostResolver(elg)),
                            socket_options=options, connect_message_amender=lambda: MessageAmendment(payload=payload))
    connection.connect(LifecycleHandler()).result(10)
    client = GreengrassCoreIPCClientV2(client=GreengrassCoreIPCClient(connection))
    try:
        if command == "update":
            client.update_configuration(key_path=[], timestamp=datetime.datetime.now(), value_to_merge=json.loads(arg))
            print(json.dumps({"updated": json.loads(arg)}))
        else:
            print(json.dumps(client.get_configuration(key_path=[arg]).value))
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except Exception as exc:  # the test shows this
        print(f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}", file=sys.stderr)
        sys.exit(1)
