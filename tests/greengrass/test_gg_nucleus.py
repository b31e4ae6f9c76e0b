"""Drive the fake nucleus with the real awsiotsdk IPC client, the way a component does."""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import gg_eventstream as es
import pytest
from awsiot import eventstreamrpc
from awsiot.greengrasscoreipc import connect as ipc_connect
from awsiot.greengrasscoreipc import model
from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
from gg_nucleus import (
    ERR_UNAUTHORIZED,
    OP_GET_CONFIGURATION,
    OP_SUBSCRIBE_TO_COMPONENT_UPDATES,
    OP_SUBSCRIBE_TO_CONFIGURATION_UPDATE,
    OP_SUBSCRIBE_TO_VALIDATE_CONFIGURATION_UPDATES,
    OP_UPDATE_CONFIGURATION,
    FakeNucleus,
)

COMPONENT = "com.example.InferenceAgent"
MODEL_COMPONENT = "com.example.Model"
TOKEN = "ABCDEFGHIJKLMNOP"  # nucleus tokens are 16 uppercase characters
WAIT_S = 5.0

INITIAL_CONFIG: dict[str, Any] = {
    "modelDir": "/models/current",
    "batch": {"size": 4, "timeoutMs": 50},
    "labels": ["ok", "anomaly"],
}

T = TypeVar("T")


class Collector(Generic[T]):
    """Thread-safe sink for client callbacks (they run on the client's executor threads)."""

    def __init__(self) -> None:
        self._items: list[T] = []
        self._cond = threading.Condition()

    def __call__(self, item: T) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()

    @property
    def items(self) -> list[T]:
        with self._cond:
            return list(self._items)

    def wait_for(self, count: int = 1, timeout: float = WAIT_S) -> list[T]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._items) >= count, timeout):
                raise AssertionError(f"got {len(self._items)} item(s) within {timeout}s, wanted {count}")
            return list(self._items)


class RecordingLifecycle(eventstreamrpc.LifecycleHandler):
    def __init__(self) -> None:
        self.disconnected = threading.Event()
        self.reason: Exception | None = None

    def on_disconnect(self, reason: Exception | None) -> None:
        self.reason = reason
        self.disconnected.set()


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def socket_path() -> Iterator[str]:
    # pytest's tmp_path is often too deep for AF_UNIX (108-byte limit).
    directory = tempfile.mkdtemp(prefix="ggipc", dir="/tmp")
    try:
        yield os.path.join(directory, "ipc.socket")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def nucleus(socket_path: str) -> Iterator[FakeNucleus]:
    with FakeNucleus(
        socket_path, TOKEN, COMPONENT, INITIAL_CONFIG, other_configs={MODEL_COMPONENT: {"version": "1.0.0"}}
    ) as fake:
        yield fake


@pytest.fixture
def ipc_env(monkeypatch: pytest.MonkeyPatch, socket_path: str) -> None:
    # What the nucleus' ShellRunner puts in a component's environment.
    monkeypatch.setenv("SVCUID", TOKEN)
    monkeypatch.setenv("AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT", socket_path)


@pytest.fixture
def client(nucleus: FakeNucleus, ipc_env: None) -> Iterator[GreengrassCoreIPCClientV2]:
    ipc = GreengrassCoreIPCClientV2()
    try:
        yield ipc
    finally:
        ipc.close()


# --- codec -----------------------------------------------------------------------------------


def test_codec_round_trips_every_header_type() -> None:
    headers = [
        es.Header("t", es.HeaderType.BOOL_TRUE, True),
        es.Header("f", es.HeaderType.BOOL_FALSE, False),
        es.Header("b", es.HeaderType.BYTE, -7),
        es.Header("i16", es.HeaderType.INT16, -300),
        es.Header("i32", es.HeaderType.INT32, 70000),
        es.Header("i64", es.HeaderType.INT64, -(2**40)),
        es.Header("buf", es.HeaderType.BYTE_BUF, b"\x00\xff"),
        es.Header("s", es.HeaderType.STRING, "h\u00e9llo"),
        es.Header("ts", es.HeaderType.TIMESTAMP, 1_700_000_000_000),
        es.Header("id", es.HeaderType.UUID, uuid.UUID(int=42)),
    ]
    frame = es.encode_message(headers, b'{"k": 1}')
    decoded = es.decode_message(frame)
    assert decoded.headers == headers
    assert decoded.payload == b'{"k": 1}'
    assert decoded.header("S") == "h\u00e9llo"  # lookup is case-insensitive, like the C client


def test_codec_rejects_corrupted_frames() -> None:
    frame = bytearray(es.rpc_message(es.MessageType.PING, payload=b"x"))
    bad_payload = bytes(frame[:-5]) + b"y" + bytes(frame[-4:])
    with pytest.raises(es.FrameError, match="message CRC"):
        es.decode_message(bad_payload)
    frame[0] ^= 0x01
    with pytest.raises(es.FrameError, match="prelude CRC"):
        es.decode_message(bytes(frame))


# --- connection ------------------------------------------------------------------------------


def test_connect_with_environment_token(nucleus: FakeNucleus, client: GreengrassCoreIPCClientV2) -> None:
    nucleus.wait_for_connections(1, timeout=WAIT_S)
    attempt = nucleus.connect_attempts[-1]
    assert attempt.accepted
    assert attempt.auth_token == TOKEN
    assert attempt.version == "0.1.0"
    assert nucleus.connection_count == 1
    assert nucleus.accepted_connection_total == 1


def test_wrong_token_is_rejected(nucleus: FakeNucleus, ipc_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SVCUID", "WRONGTOKEN000000")
    with pytest.raises(eventstreamrpc.AccessDeniedError):
        GreengrassCoreIPCClientV2()
    attempt = nucleus.connect_attempts[-1]
    assert attempt.auth_token == "WRONGTOKEN000000"
    assert not attempt.accepted
    assert nucleus.accepted_connection_total == 0
    assert nucleus.wait_for(lambda: nucleus.connection_count == 0, WAIT_S)


def test_ping_gets_a_response(nucleus: FakeNucleus, client: GreengrassCoreIPCClientV2) -> None:
    client.client._connection.send_ping().result(WAIT_S)
    assert nucleus.wait_for(lambda: nucleus.ping_count == 1, WAIT_S)
    # The PING_RESPONSE must not upset the client: the connection stays usable.
    assert client.get_configuration(key_path=["modelDir"]).value == {"modelDir": "/models/current"}
    assert nucleus.protocol_errors == []


def test_message_before_connect_is_a_protocol_error(nucleus: FakeNucleus, socket_path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(WAIT_S)
        raw.connect(socket_path)
        raw.sendall(es.rpc_message(es.MessageType.PING))
        reply = b""
        while chunk := raw.recv(4096):  # the server answers, then closes
            reply += chunk
    message = es.decode_message(reply)
    assert message.message_type == es.MessageType.PROTOCOL_ERROR
    assert message.stream_id == 0
    assert "not CONNECT" in nucleus.protocol_errors[-1]


# --- configuration ---------------------------------------------------------------------------


def test_get_configuration_whole_container_and_leaf(nucleus: FakeNucleus, client: GreengrassCoreIPCClientV2) -> None:
    whole = client.get_configuration()
    assert whole.component_name == COMPONENT
    assert whole.value == INITIAL_CONFIG

    assert client.get_configuration(key_path=["batch"]).value == {"size": 4, "timeoutMs": 50}
    # A leaf comes back wrapped as {leafName: value}, like the Java nucleus does.
    assert client.get_configuration(key_path=["batch", "size"]).value == {"size": 4}

    other = client.get_configuration(component_name=MODEL_COMPONENT, key_path=["version"])
    assert (other.component_name, other.value) == (MODEL_COMPONENT, {"version": "1.0.0"})

    recorded = nucleus.requests_for("aws.greengrass#GetConfiguration")
    assert [r.payload for r in recorded] == [
        {},
        {"keyPath": ["batch"]},
        {"keyPath": ["batch", "size"]},
        {"componentName": MODEL_COMPONENT, "keyPath": ["version"]},
    ]
    assert recorded[0].model_type == "aws.greengrass#GetConfigurationRequest"


def test_get_configuration_unknown_key_raises_resource_not_found(client: GreengrassCoreIPCClientV2) -> None:
    with pytest.raises(model.ResourceNotFoundError) as err:
        client.get_configuration(key_path=["batch", "nope"])
    assert err.value.message == "Key not found"
    with pytest.raises(model.ResourceNotFoundError):
        client.get_configuration(component_name="com.example.Missing")
    # The stream was terminated cleanly: the connection still serves requests.
    assert client.get_configuration(key_path=["modelDir"]).component_name == COMPONENT


def test_update_configuration_notifies_matching_subscribers(
    nucleus: FakeNucleus, client: GreengrassCoreIPCClientV2
) -> None:
    all_events: Collector[model.ConfigurationUpdateEvents] = Collector()
    labels_events: Collector[model.ConfigurationUpdateEvents] = Collector()
    client.subscribe_to_configuration_update(on_stream_event=all_events)
    _, labels_op = client.subscribe_to_configuration_update(key_path=["labels"], on_stream_event=labels_events)
    nucleus.wait_for_subscriber(OP_SUBSCRIBE_TO_CONFIGURATION_UPDATE, count=2)

    when = datetime.datetime.now()
    client.update_configuration(key_path=["batch"], timestamp=when, value_to_merge={"size": 8, "new": True})

    assert nucleus.configuration()["batch"] == {"size": 8, "timeoutMs": 50, "new": True}
    events = all_events.wait_for(2)
    paths = sorted(e.configuration_update_event.key_path for e in events)
    assert paths == [["batch", "new"], ["batch", "size"]]
    assert {e.configuration_update_event.component_name for e in events} == {COMPONENT}

    # The keyPath-filtered subscriber got nothing: check what the server actually pushed.
    sent = nucleus.sent_events(OP_SUBSCRIBE_TO_CONFIGURATION_UPDATE)
    assert len(sent) == 2
    assert len({e.stream_id for e in sent}) == 1  # both went to the unfiltered subscription
    assert labels_events.items == []
    labels_op.close().result(WAIT_S)

    # Wire format: timestamp is float epoch seconds, not milliseconds.
    request = nucleus.requests_for(OP_UPDATE_CONFIGURATION)[-1].payload
    assert request["keyPath"] == ["batch"]
    assert request["valueToMerge"] == {"size": 8, "new": True}
    assert request["timestamp"] == pytest.approx(when.timestamp())


def test_update_configuration_rejects_access_control(client: GreengrassCoreIPCClientV2, nucleus: FakeNucleus) -> None:
    with pytest.raises(model.InvalidArgumentsError) as err:
        client.update_configuration(timestamp=datetime.datetime.now(), value_to_merge={"accessControl": {"x": {}}})
    # Error shapes don't pass their message to Exception.__init__, so str(err) is empty.
    assert "accessControl" in err.value.message
    assert nucleus.configuration() == INITIAL_CONFIG


def test_subscribe_to_missing_key_raises_resource_not_found(
    client: GreengrassCoreIPCClientV2, nucleus: FakeNucleus
) -> None:
    with pytest.raises(model.ResourceNotFoundError):
        client.subscribe_to_configuration_update(key_path=["notThereYet"])
    assert nucleus.subscriber_count(OP_SUBSCRIBE_TO_CONFIGURATION_UPDATE) == 0


def _subscribe_validator(
    client: GreengrassCoreIPCClientV2, decide: Callable[[dict[str, Any]], tuple[str, str]]
) -> Collector[model.ValidateConfigurationUpdateEvents]:
    """Subscribe a validator that reports `decide(configuration)` for every proposal."""
    seen: Collector[model.ValidateConfigurationUpdateEvents] = Collector()

    def on_event(event: model.ValidateConfigurationUpdateEvents) -> None:
        proposal = event.validate_configuration_update_event
        status, message = decide(proposal.configuration)
        # Runs on the client's executor thread, so a synchronous IPC call is allowed here.
        client.send_configuration_validity_report(
            configuration_validity_report=model.ConfigurationValidityReport(
                status=status, deployment_id=proposal.deployment_id, message=message
            )
        )
        seen(event)

    client.subscribe_to_validate_configuration_updates(on_stream_event=on_event)
    return seen


def test_rejected_configuration_is_not_applied(nucleus: FakeNucleus, client: GreengrassCoreIPCClientV2) -> None:
    updates: Collector[model.ConfigurationUpdateEvents] = Collector()
    client.subscribe_to_configuration_update(on_stream_event=updates)

    def decide(config: dict[str, Any]) -> tuple[str, str]:
        if config["batch"]["size"] <= 0:
            return model.ConfigurationValidityStatus.REJECTED, "batch.size must be positive"
        return model.ConfigurationValidityStatus.ACCEPTED, "ok"

    seen = _subscribe_validator(client, decide)
    proposal = {**INITIAL_CONFIG, "batch": {"size": 0, "timeoutMs": 50}}

    status, message = nucleus.propose_configuration(proposal, timeout=WAIT_S, deployment_id="dep-reject")

    assert (status, message) == ("REJECTED", "batch.size must be positive")
    event = seen.wait_for(1)[0].validate_configuration_update_event
    assert event.deployment_id == "dep-reject"
    assert event.configuration == proposal
    assert nucleus.configuration() == INITIAL_CONFIG
    assert nucleus.sent_events(OP_SUBSCRIBE_TO_CONFIGURATION_UPDATE) == []
    assert updates.items == []


def test_accepted_configuration_is_applied_and_announced(
    nucleus: FakeNucleus, client: GreengrassCoreIPCClientV2
) -> None:
    updates: Collector[model.ConfigurationUpdateEvents] = Collector()
    client.subscribe_to_configuration_update(on_stream_event=updates)
    _subscribe_validator(client, lambda cfg: (model.ConfigurationValidityStatus.ACCEPTED, "looks good"))
    proposal = {**INITIAL_CONFIG, "modelDir": "/models/v2"}

    assert nucleus.propose_configuration(proposal, timeout=WAIT_S) == ("ACCEPTED", "looks good")

    assert nucleus.configuration() == proposal
    event = updates.wait_for(1)[0].configuration_update_event
    assert (event.component_name, event.key_path) == (COMPONENT, ["modelDir"])
    assert client.get_configuration(key_path=["modelDir"]).value == {"modelDir": "/models/v2"}


def test_propose_configuration_times_out_without_validator(
    nucleus: FakeNucleus, client: GreengrassCoreIPCClientV2
) -> None:
    with pytest.raises(TimeoutError):
        nucleus.propose_configuration({"modelDir": "/x"}, timeout=0.2)
    assert nucleus.configuration() == INITIAL_CONFIG
    # Without a validator the real nucleus applies the config unvalidated.
    assert nucleus.propose_configuration({"modelDir": "/x"}, require_validator=False) == ("ACCEPTED", None)
    assert nucleus.configuration() == {"modelDir": "/x"}


# --- component updates (deployment notifications) --------------------------------------------


def test_pre_update_is_acknowledged_with_defer(nucleus: FakeNucleus, client: GreengrassCoreIPCClientV2) -> None:
    events: Collector[model.ComponentUpdatePolicyEvents] = Collector()

    def on_event(event: model.ComponentUpdatePolicyEvents) -> None:
        events(event)
        if event.pre_update_event is not None:
            client.defer_component_update(
                deployment_id=event.pre_update_event.deployment_id, message="idle, go ahead", recheck_after_ms=0
            )

    client.subscribe_to_component_updates(on_stream_event=on_event)
    nucleus.wait_for_subscriber(OP_SUBSCRIBE_TO_COMPONENT_UPDATES)

    defers = nucleus.send_pre_update("dep-1", is_ggc_restarting=True, timeout=WAIT_S)

    assert [(d.deployment_id, d.message, d.recheck_after_ms) for d in defers] == [("dep-1", "idle, go ahead", 0)]
    assert nucleus.defer_requests == defers
    pre = events.wait_for(1)[0].pre_update_event
    assert (pre.deployment_id, pre.is_ggc_restarting) == ("dep-1", True)


def test_defer_without_recheck_does_not_acknowledge(nucleus: FakeNucleus, client: GreengrassCoreIPCClientV2) -> None:
    def on_event(event: model.ComponentUpdatePolicyEvents) -> None:
        if event.pre_update_event is not None:
            client.defer_component_update(deployment_id=event.pre_update_event.deployment_id)

    client.subscribe_to_component_updates(on_stream_event=on_event)
    nucleus.wait_for_subscriber(OP_SUBSCRIBE_TO_COMPONENT_UPDATES)

    started = time.monotonic()
    defers = nucleus.send_pre_update("dep-2", timeout=0.5)

    # The nucleus ignores such a defer and waits out its whole timeout.
    assert time.monotonic() - started >= 0.5
    assert [(d.deployment_id, d.recheck_after_ms) for d in defers] == [("dep-2", None)]


def test_late_or_unsubscribed_defer_is_refused(nucleus: FakeNucleus, client: GreengrassCoreIPCClientV2) -> None:
    with pytest.raises(model.InvalidArgumentsError) as not_subscribed:
        client.defer_component_update(deployment_id="dep-x", recheck_after_ms=0)
    assert "not subscribed" in not_subscribed.value.message
    client.subscribe_to_component_updates(on_stream_event=lambda event: None)
    with pytest.raises(model.ServiceError) as too_late:
        client.defer_component_update(deployment_id="dep-x", recheck_after_ms=0)
    assert "Time limit" in too_late.value.message
    assert [d.deployment_id for d in nucleus.defer_requests] == ["dep-x", "dep-x"]


def test_post_update_is_delivered(nucleus: FakeNucleus, client: GreengrassCoreIPCClientV2) -> None:
    events: Collector[model.ComponentUpdatePolicyEvents] = Collector()
    client.subscribe_to_component_updates(on_stream_event=events)
    nucleus.wait_for_subscriber(OP_SUBSCRIBE_TO_COMPONENT_UPDATES)

    assert nucleus.send_post_update("dep-3") == 1

    event = events.wait_for(1)[0]
    assert event.pre_update_event is None
    assert event.post_update_event.deployment_id == "dep-3"


def test_pre_update_without_subscribers_returns_immediately(nucleus: FakeNucleus) -> None:
    started = time.monotonic()
    assert nucleus.send_pre_update("dep-none", timeout=WAIT_S) == []
    assert time.monotonic() - started < WAIT_S / 2


# --- lifecycle, errors, stream close ---------------------------------------------------------


def test_update_state_is_recorded(nucleus: FakeNucleus, client: GreengrassCoreIPCClientV2) -> None:
    client.update_state(state=model.ReportedLifecycleState.RUNNING)
    client.update_state(state=model.ReportedLifecycleState.ERRORED)
    assert nucleus.state_updates == ["RUNNING", "ERRORED"]


def test_unsupported_operation_raises_service_error(client: GreengrassCoreIPCClientV2) -> None:
    with pytest.raises(model.ServiceError) as err:
        client.list_components()
    assert err.value.message == "Operation aws.greengrass#ListComponents is not supported by Greengrass"


def test_injected_error_fails_only_the_next_request(nucleus: FakeNucleus, client: GreengrassCoreIPCClientV2) -> None:
    nucleus.inject_error(OP_GET_CONFIGURATION, ERR_UNAUTHORIZED, "Principal is not authorized")
    with pytest.raises(model.UnauthorizedError) as err:
        client.get_configuration()
    assert err.value.message == "Principal is not authorized"
    assert client.get_configuration().value == INITIAL_CONFIG
    assert len(nucleus.requests_for(OP_GET_CONFIGURATION)) == 2


def test_client_close_ends_subscription(nucleus: FakeNucleus, client: GreengrassCoreIPCClientV2) -> None:
    _, operation = client.subscribe_to_component_updates(on_stream_event=lambda event: None)
    nucleus.wait_for_subscriber(OP_SUBSCRIBE_TO_COMPONENT_UPDATES)

    operation.close().result(WAIT_S)

    assert nucleus.wait_for(lambda: nucleus.subscriber_count(OP_SUBSCRIBE_TO_COMPONENT_UPDATES) == 0, WAIT_S)
    assert nucleus.send_post_update("dep-after-close") == 0


def test_server_close_ends_client_stream(nucleus: FakeNucleus, client: GreengrassCoreIPCClientV2) -> None:
    closed = threading.Event()
    client.subscribe_to_validate_configuration_updates(on_stream_event=lambda event: None, on_stream_closed=closed.set)
    nucleus.wait_for_subscriber(OP_SUBSCRIBE_TO_VALIDATE_CONFIGURATION_UPDATES)

    assert nucleus.close_subscriptions() == 1

    assert closed.wait(WAIT_S)
    assert nucleus.subscriber_count(OP_SUBSCRIBE_TO_VALIDATE_CONFIGURATION_UPDATES) == 0


def test_server_disconnect_then_new_client_connects(nucleus: FakeNucleus, ipc_env: None) -> None:
    lifecycle = RecordingLifecycle()
    first = GreengrassCoreIPCClientV2(client=ipc_connect(lifecycle_handler=lifecycle))
    second: GreengrassCoreIPCClientV2 | None = None
    try:
        stream_closed = threading.Event()
        first.subscribe_to_component_updates(on_stream_event=lambda event: None, on_stream_closed=stream_closed.set)
        nucleus.wait_for_subscriber(OP_SUBSCRIBE_TO_COMPONENT_UPDATES)

        assert nucleus.disconnect_all() == 1

        assert lifecycle.disconnected.wait(WAIT_S)
        assert stream_closed.wait(WAIT_S)
        assert nucleus.wait_for(lambda: nucleus.connection_count == 0, WAIT_S)
        with pytest.raises(eventstreamrpc.ConnectionClosedError):
            first.get_configuration()

        # The fake keeps listening: a fresh client (what an agent's reconnect does) gets in.
        second = GreengrassCoreIPCClientV2()
        nucleus.wait_for_accepted_total(2)
        assert nucleus.connection_count == 1
        assert second.get_configuration(key_path=["modelDir"]).value == {"modelDir": "/models/current"}
        assert [a.accepted for a in nucleus.connect_attempts] == [True, True]
    finally:
        first.close()
        if second is not None:
            second.close()
