"""AWS output mode: S3 against a real S3 API (moto_server on 127.0.0.1, started here), greengrassv2
checked at the wire (botocore Stubber in-process; a local HTTP endpoint for the CLI's worker)."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
import urllib.parse
import zipfile
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from packaging_helpers import cli_env, free_port, greengrass, run_cli, wait_until

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")
from botocore.stub import ANY, Stubber  # noqa: E402

from agent.packaging import Client, PackagingSettings  # noqa: E402
from agent.packaging.output import create_deployment, deployment_request  # noqa: E402
from agent.packaging.recipe import AGENT_COMPONENT  # noqa: E402
from agent.tools.modelgen import build_anomalib_v2  # noqa: E402

ACCOUNT = "123456789012"
REGION = "us-east-1"
CREDS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": REGION}
ARN = f"arn:aws:greengrass:{REGION}:{ACCOUNT}:components:demo.model:versions:1.0.0"


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                import urllib.request

                urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
                return True
            except OSError:
                if proc.poll() is not None:
                    raise AssertionError("moto_server exited") from None
                return False

        wait_until(up, 30, "moto_server to answer", interval=0.1)
        yield url
    finally:
        proc.kill()
        proc.wait(10)


@pytest.fixture()
def s3(moto_url: str):
    client = boto3.client("s3", endpoint_url=moto_url, **CREDS)
    client.create_bucket(Bucket="my-bucket")
    yield client
    for obj in client.list_objects_v2(Bucket="my-bucket").get("Contents", []):
        client.delete_object(Bucket="my-bucket", Key=obj["Key"])
    client.delete_bucket(Bucket="my-bucket")


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_anomalib_v2(tmp_path_factory.mktemp("model") / "model.onnx", image_size=(64, 64))


def aws_client(home: Path, onnx_model: Path, s3, gg) -> Client:
    settings = PackagingSettings(home=home, mode="aws", region=REGION, account=ACCOUNT, poll_interval_s=0.0)
    c = Client(settings=settings, executor="inline", s3_client=s3, greengrass_client=gg, env={})
    c.create_project(ProjectName="demo")
    c.create_model(ProjectName="demo", ModelFile=onnx_model)
    return c


def _describe(c: Client, name: str) -> dict:
    return c.describe_model_packaging_job(ProjectName="demo", JobName=name)["ModelPackagingDescription"]


def test_aws_mode_uploads_to_s3_and_creates_the_component(tmp_path: Path, onnx_model: Path, s3) -> None:
    gg = boto3.client("greengrassv2", **CREDS)
    sent: list[dict] = []
    gg.meta.events.register("provide-client-params.greengrassv2.CreateComponentVersion",
                            lambda params, **_: sent.append(dict(params)))
    with Stubber(gg) as stub:
        stub.add_client_error("describe_component", service_error_code="ResourceNotFoundException",
                              http_status_code=404, expected_params={"arn": ARN})
        stub.add_response("create_component_version", {
            "arn": ARN, "componentName": "demo.model", "componentVersion": "1.0.0",
            "creationTimestamp": datetime(2024, 1, 1, tzinfo=timezone.utc),
            "status": {"componentState": "REQUESTED"}},
            expected_params={"inlineRecipe": ANY, "tags": {"team": "qa"}})
        stub.add_response("describe_component", {"arn": ARN, "status": {"componentState": "DEPLOYABLE"}},
                          expected_params={"arn": ARN})
        c = aws_client(tmp_path / "home", onnx_model, s3, gg)
        config = greengrass(Tags=[{"Key": "team", "Value": "qa"}])
        name = c.start_model_packaging_job(ProjectName="demo", ModelVersion="1", Configuration=config)["JobName"]
        desc = _describe(c, name)
        stub.assert_no_pending_responses()
    assert desc["Status"] == "SUCCEEDED", desc["StatusMessage"]
    assert desc["ModelPackagingOutputDetails"]["Greengrass"]["ComponentVersionArn"] == ARN
    key = "models/demo/demo.model-1.0.0_greengrass_model_component.zip"
    body = s3.get_object(Bucket="my-bucket", Key=key)["Body"].read()
    names = zipfile.ZipFile(io.BytesIO(body)).namelist()
    assert "manifest.json" in names and "model.onnx" in names
    recipe = json.loads(sent[0]["inlineRecipe"])
    assert recipe["ComponentName"] == "demo.model" and recipe["ComponentVersion"] == "1.0.0"
    assert recipe["Manifests"][0]["Artifacts"][0]["Uri"] == f"s3://my-bucket/{key}"
    assert recipe["ComponentDependencies"][AGENT_COMPONENT]["DependencyType"] == "HARD"
    assert not (tmp_path / "home" / "greengrass").exists()  # nothing went to the local tree


def test_existing_greengrass_component_fails_the_job_before_uploading(tmp_path: Path, onnx_model: Path,
                                                                       s3) -> None:
    gg = boto3.client("greengrassv2", **CREDS)
    with Stubber(gg) as stub:
        stub.add_response("describe_component", {"arn": ARN, "componentName": "demo.model",
                                                 "componentVersion": "1.0.0"}, expected_params={"arn": ARN})
        c = aws_client(tmp_path / "home", onnx_model, s3, gg)
        name = c.start_model_packaging_job(ProjectName="demo", ModelVersion="1", Configuration=greengrass())["JobName"]
        stub.assert_no_pending_responses()
    desc = _describe(c, name)
    assert desc["Status"] == "FAILED" and "already exists" in desc["StatusMessage"]
    assert s3.list_objects_v2(Bucket="my-bucket").get("KeyCount", 0) == 0


def test_bucket_in_another_region_fails_the_job(tmp_path: Path, onnx_model: Path, moto_url: str) -> None:
    s3 = boto3.client("s3", endpoint_url=moto_url, **CREDS)
    s3.create_bucket(Bucket="eu-bucket", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    gg = boto3.client("greengrassv2", **CREDS)
    with Stubber(gg) as stub:
        stub.add_client_error("describe_component", service_error_code="ResourceNotFoundException",
                              http_status_code=404)
        c = aws_client(tmp_path / "home", onnx_model, s3, gg)
        config = greengrass(S3OutputLocation={"Bucket": "eu-bucket"})
        name = c.start_model_packaging_job(ProjectName="demo", ModelVersion="1", Configuration=config)["JobName"]
    desc = _describe(c, name)
    assert desc["Status"] == "FAILED" and "eu-west-1" in desc["StatusMessage"]


def test_deploy_calls_create_deployment() -> None:
    gg = boto3.client("greengrassv2", **CREDS)
    target = f"arn:aws:iot:{REGION}:{ACCOUNT}:thinggroup/line-1"
    with Stubber(gg) as stub:
        stub.add_response("create_deployment", {"deploymentId": "d-1", "iotJobId": "j-1", "iotJobArn": "arn:j"},
                          expected_params={
                              "targetArn": target,
                              "deploymentName": "models",
                              "components": {"demo.model": {"componentVersion": "1.0.0"},
                                             AGENT_COMPONENT: {"componentVersion": "0.1.0"}},
                              "deploymentPolicies": {
                                  "failureHandlingPolicy": "ROLLBACK",
                                  "componentUpdatePolicy": {"timeoutInSeconds": 60, "action": "NOTIFY_COMPONENTS"}},
                          })
        result = create_deployment(gg, deployment_request(target, {"demo.model": "1.0.0"}, agent_version="0.1.0",
                                                          deployment_name="models"))
        stub.assert_no_pending_responses()
    assert result == {"deploymentId": "d-1", "iotJobId": "j-1", "iotJobArn": "arn:j"}


class FakeGreengrass(BaseHTTPRequestHandler):
    """greengrassv2's REST-JSON wire protocol, enough for CreateComponentVersion and DescribeComponent."""

    requests: list[tuple[str, str, dict]] = []
    created: set[str] = set()

    def log_message(self, *args) -> None:
        pass

    def _reply(self, code: int, body: dict, error: str = "") -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if error:
            self.send_header("x-amzn-ErrorType", error)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        self.requests.append(("GET", self.path, {}))
        prefix, suffix = "/greengrass/v2/components/", "/metadata"  # DescribeComponent's URI
        if not (self.path.startswith(prefix) and self.path.endswith(suffix)):
            self._reply(400, {"message": f"unexpected request {self.path}"}, "ValidationException")
            return
        arn = urllib.parse.unquote(self.path[len(prefix):-len(suffix)])
        if arn in self.created:
            self._reply(200, {"arn": arn, "status": {"componentState": "DEPLOYABLE"}})
        else:
            self._reply(404, {"message": f"{arn} not found"}, "ResourceNotFoundException")

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append(("POST", self.path, body))
        recipe = json.loads(base64.b64decode(body["inlineRecipe"]))
        arn = (f"arn:aws:greengrass:{REGION}:{ACCOUNT}:components:{recipe['ComponentName']}:versions:"
               f"{recipe['ComponentVersion']}")
        self.created.add(arn)
        self._reply(201, {"arn": arn, "componentName": recipe["ComponentName"],
                          "componentVersion": recipe["ComponentVersion"], "creationTimestamp": 1700000000,
                          "status": {"componentState": "REQUESTED"}})


def test_cli_aws_mode_through_the_worker_process(tmp_path: Path, onnx_model: Path, s3, moto_url: str) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeGreengrass)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = cli_env(tmp_path / "home", EDGE_AGENT_PACKAGING_MODE="aws", AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_REGION=REGION, EDGE_AGENT_ACCOUNT_ID=ACCOUNT,
                      EDGE_AGENT_S3_ENDPOINT_URL=moto_url,
                      EDGE_AGENT_GREENGRASS_ENDPOINT_URL=f"http://127.0.0.1:{server.server_address[1]}")
        local = Client(settings=PackagingSettings(home=tmp_path / "home", mode="local"), env={}, recover_jobs=False)
        local.create_project(ProjectName="demo")
        local.create_model(ProjectName="demo", ModelFile=onnx_model)
        out = run_cli(["start-model-packaging-job", "--project-name", "demo", "--model-version", "1",
                       "--job-name", "aws-job", "--configuration",
                       json.dumps(greengrass(Tags=[{"Key": "team", "Value": "qa"}]))], env)
        assert out.returncode == 0, out.stderr

        wait_until(lambda: local.registry.get_job("demo", "aws-job").status in ("SUCCEEDED", "FAILED"), 30,
                   "the worker to finish the job", interval=0.05)
        res = run_cli(["describe-model-packaging-job", "--project-name", "demo", "--job-name", "aws-job"], env)
        desc = json.loads(res.stdout)["ModelPackagingDescription"]
    finally:
        server.shutdown()
    assert desc["Status"] == "SUCCEEDED", desc["StatusMessage"]
    assert desc["ModelPackagingOutputDetails"]["Greengrass"]["ComponentVersionArn"] == ARN
    methods = [(m, p.split("?")[0]) for m, p, _ in FakeGreengrass.requests]
    describe_path = "/greengrass/v2/components/" + urllib.parse.quote(ARN, safe="") + "/metadata"
    # DescribeComponent (does it exist?), CreateComponentVersion, then DescribeComponent until DEPLOYABLE.
    assert methods == [("GET", describe_path), ("POST", "/greengrass/v2/createComponentVersion"),
                       ("GET", describe_path)]
    assert FakeGreengrass.requests[1][2]["tags"] == {"team": "qa"}
    assert s3.head_object(Bucket="my-bucket", Key="models/demo/demo.model-1.0.0_greengrass_model_component.zip")
