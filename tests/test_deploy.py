"""Deployment artifacts, validated offline: Kubernetes manifests against the API schemas,
KServe objects against the CRD fields we use, Prometheus rules with promtool and a real
Prometheus scraping a real server, the Dockerfile with hadolint — and all of them against the
ports, probes, flags and metrics the server really has."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, eventually, run_cli
from visionserve.service.cli import build_parser

DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    if path is None:
        pytest.skip(f"{name} is not installed (.ci/run installs it)")
    return path


def rendered(overlay: str) -> list[dict]:
    out = subprocess.run([tool("kubectl"), "kustomize", str(DEPLOY / "kubernetes" / "overlays" /
                                                            overlay)],
                         capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def server_env_names() -> set[str]:
    names = set(re.findall(r"\[env\s+(VISIONSERVE_\w+)", run_cli("serve", "--help").stdout))
    assert names, "no [env VISIONSERVE_…] in `serve --help`: nothing to check names against"
    return names


@pytest.mark.parametrize("overlay", ["cpu", "gpu", "object-store"])
def test_rendered_manifests_validate_against_the_kubernetes_schemas(overlay, tmp_path):
    docs = rendered(overlay)
    volume = set() if overlay == "object-store" else {"PersistentVolumeClaim"}
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "PodDisruptionBudget",
                                         "HorizontalPodAutoscaler", "Job", *volume}
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    result = subprocess.run([tool("kubernetes-validate"), "-k", "1.32.0", "--strict", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_manifests_use_the_servers_real_ports_probes_and_flags():
    deployment = next(d for d in rendered("cpu") if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) <= server_env_names(), set(env) - server_env_names()
    args = build_parser().parse_args(container["args"])  # the flags parse
    assert args.command == "serve"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": int(env["VISIONSERVE_HTTP_PORT"]),
                     "grpc": int(env["VISIONSERVE_GRPC_PORT"]),
                     "metrics": int(env["VISIONSERVE_METRICS_PORT"])}
    assert container["startupProbe"]["grpc"]["port"] == ports["grpc"]
    # readiness and liveness are the REST API's own health routes, on its port: KServe v2's
    # paths (kept literal: the protocol's), each a GET route of the server's OpenAPI document
    from visionserve.service.api.http.openapi import openapi_document

    routes = openapi_document()["paths"]
    for probe, path in (("readinessProbe", "/v2/health/ready"),
                        ("livenessProbe", "/v2/health/live")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}
        assert "get" in routes.get(path, {}), f"{path} is not a route of the HTTP API"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
    prestop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    # preStop + drain + unloading the models (at most 10 s, docs/security.md) fit the grace
    assert prestop + float(env["VISIONSERVE_SHUTDOWN_GRACE_S"]) + 10 < \
        pod["spec"]["terminationGracePeriodSeconds"]
    assert env["VISIONSERVE_REPO"] == container["volumeMounts"][0]["mountPath"]
    service = next(d for d in rendered("cpu") if d["kind"] == "Service")
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
    hpa = next(d for d in rendered("cpu") if d["kind"] == "HorizontalPodAutoscaler")
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    adapter = yaml.safe_load((DEPLOY / "prometheus" / "adapter-rules.yaml").read_text())
    assert metric in {r["name"]["as"] for r in adapter["rules"]}
    gpu = next(d for d in rendered("gpu") if d["kind"] == "Deployment")
    assert gpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"] == "1"


def test_the_object_store_overlay_serves_a_bucket_through_a_cache_volume():
    docs = rendered("object-store")
    assert "PersistentVolumeClaim" not in {d["kind"] for d in docs}  # no shared volume
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) <= server_env_names(), set(env) - server_env_names()
    assert env["VISIONSERVE_REPO"].startswith("s3://")
    assert container["volumeMounts"] == [{"name": "cache", "mountPath":
                                          env["VISIONSERVE_CACHE_DIR"]}]
    assert pod["volumes"][0]["name"] == "cache" and "emptyDir" in pod["volumes"][0]
    secret = "visionserve-store"  # credentials from a Secret, never on the command line
    assert container["envFrom"] == [{"secretRef": {"name": secret}}]
    job = next(d for d in docs if d["kind"] == "Job")["spec"]["template"]["spec"]
    export = job["containers"][0]
    assert export["envFrom"] == [{"secretRef": {"name": secret}}]
    args = build_parser().parse_args(["export", "--repo", "/models", *export["args"]])
    assert str(args.repo) == str(Path(env["VISIONSERVE_REPO"]))  # the bucket the servers read
    assert {v["name"] for v in job["volumes"]} == {"weights"}


# The fields of KServe's published CRDs (serving.kserve.io v1alpha1 ServingRuntime, v1beta1
# InferenceService) that our objects may use; no CRD schema installs from a package here. Kept
# literal: they are KServe's specification, not something of ours a test could read.
SERVING_RUNTIME_SPEC = {"annotations", "supportedModelFormats", "protocolVersions",
                        "multiModel", "containers", "disabled", "nodeSelector", "tolerations",
                        "affinity", "volumes", "labels", "builtInAdapter", "grpcEndpoint",
                        "grpcDataEndpoint", "httpDataEndpoint", "replicas", "storageHelper",
                        "imagePullSecrets", "hostIPC", "workerSpec"}
MODEL_FORMAT = {"name", "version", "autoSelect", "priority"}
PREDICTOR = {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "model",
             "containers", "serviceAccountName", "timeout", "canaryTrafficPercent",
             "containerConcurrency", "nodeSelector", "tolerations", "volumes", "labels",
             "annotations", "logger", "batcher", "deploymentStrategy", "scaleMetricType"}
MODEL_SPEC = {"modelFormat", "protocolVersion", "runtime", "storageUri", "ports", "resources",
              "env", "args", "image", "name", "readinessProbe", "livenessProbe",
              "volumeMounts", "storage", "command", "securityContext"}
PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}


def test_kserve_objects_use_only_known_crd_fields_and_our_real_flags():
    runtime = yaml.safe_load((DEPLOY / "kserve" / "servingruntime.yaml").read_text())
    isvc = yaml.safe_load((DEPLOY / "kserve" / "inferenceservice.yaml").read_text())
    assert (runtime["apiVersion"], runtime["kind"]) == ("serving.kserve.io/v1alpha1",
                                                        "ClusterServingRuntime")
    assert set(runtime["spec"]) <= SERVING_RUNTIME_SPEC
    assert runtime["spec"]["supportedModelFormats"]
    assert all(set(f) <= MODEL_FORMAT for f in runtime["spec"]["supportedModelFormats"])
    assert set(runtime["spec"]["protocolVersions"]) <= PROTOCOLS
    container = runtime["spec"]["containers"][0]
    assert container["name"] == "kserve-container"  # the name KServe looks for
    args = build_parser().parse_args(container["args"])
    assert args.repo == Path("/mnt/models")  # where KServe's storage initializer writes
    assert [p["containerPort"] for p in container["ports"]] == [args.grpc_port, args.http_port]
    assert [p["name"] for p in container["ports"]] == ["h2c", "http1"]  # KServe's port names
    assert container["readinessProbe"]["grpc"]["port"] == args.grpc_port
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/port"] == str(args.metrics_port)
    assert {e["name"] for e in container.get("env", [])} <= server_env_names()

    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    predictor = isvc["spec"]["predictor"]
    assert set(predictor) <= PREDICTOR and set(predictor["model"]) <= MODEL_SPEC
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in
                                            runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model["ports"][0]["containerPort"] == args.grpc_port


def test_prometheus_rules_pass_promtool_and_use_only_series_the_server_exports(server):
    rules = DEPLOY / "prometheus" / "visionserve.rules.yml"
    result = subprocess.run([tool("promtool"), "check", "rules", str(rules)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run([tool("promtool"), "check", "config",
                             str(DEPLOY / "prometheus" / "prometheus.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    families = set(re.findall(r"^# TYPE (\w+) (\w+)", server.metrics_text(), re.M))
    assert families
    exported = set()
    for name, kind in families:
        exported |= {name} if kind in ("gauge", "untyped") else set()
        exported |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" \
            else set()
        exported |= {name, f"{name}_total"} if kind == "counter" else set()
    groups = yaml.safe_load(rules.read_text())["groups"]
    recorded = {r["record"] for g in groups for r in g["rules"] if "record" in r}
    exprs = [r["expr"] for g in groups for r in g["rules"]]
    dashboard = json.loads((DEPLOY / "grafana" / "visionserve-dashboard.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "scrape-kubernetes.yml").read_text())
    assert scrape["scrape_configs"][0]["job_name"] == "visionserve-pods"
    assert len(exprs) > len(recorded) > 0  # the rules, their alerts, and the dashboard's
    for expr in exprs:
        named = re.findall(r"\b(?:model:)?visionserve_[a-z_]+(?::[a-z0-9_]+)?", expr)
        assert named, f"{expr!r} names no series of ours: nothing to check"
        for series in named:
            assert series in exported or series in recorded, f"{series} in {expr!r}"


@pytest.mark.slow
@contextmanager
def prometheus(tmp_path: Path, targets: list[dict]) -> Iterator[Callable[..., list]]:
    """A real Prometheus (Debian's package) scraping ``targets`` (static_configs entries) every
    second with our recording rules; yields ``query(promql, at=None)`` against its HTTP API."""
    binary = tool("prometheus")
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(DEPLOY / "prometheus" / "visionserve.rules.yml")],
        "scrape_configs": [{"job_name": "visionserve", "static_configs": targets}]}))
    log_path = tmp_path / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([binary, f"--config.file={config}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}",
                                 "--web.listen-address=127.0.0.1:0"],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        def listening() -> re.Match | None:
            assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
            return re.search(r'msg="?Listening on"? .*?address=\S*:(\d+)',
                             log_path.read_text(errors="replace"))

        # the port it bound (0: any free one), from its log (exporter-toolkit's "Listening on")
        port = int(eventually(listening, "Prometheus to listen", timeout=60)[1])

        def query(promql: str, at: float | None = None) -> list:
            params = {"query": promql, **({"time": f"{at:.3f}"} if at is not None else {})}
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode(params)
            try:
                with urllib.request.urlopen(url, timeout=5) as reply:
                    return json.loads(reply.read())["data"]["result"]
            except OSError:
                return []

        yield query
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_real_prometheus_scrapes_the_server_and_promql_returns_data(server, tmp_path):
    from conftest import encode, photo
    from visionserve.v1 import visionserve_pb2 as pb

    targets = [{"targets": [f"127.0.0.1:{server.metrics_port}"]}]
    with prometheus(tmp_path, targets) as query:
        image = pb.Image(encoded=encode(photo("camera"), "PNG"))
        for _ in range(5):
            server.stub.Classify(pb.ClassifyRequest(model="lenet5", images=[image]))
        promql = 'sum(visionserve_request_duration_seconds_count{model="lenet5",code="OK"})'
        result = eventually(lambda: query(promql), "Prometheus to return our series",
                            timeout=90, interval=1)
        assert float(result[0]["value"][1]) >= 5
        # a quantile needs a rate: traffic between two scrapes
        promql = ('histogram_quantile(0.99, sum by (le) (rate('
                  'visionserve_request_duration_seconds_bucket{model="lenet5"}[1m])))')

        def quantile() -> list[dict]:
            server.stub.Classify(pb.ClassifyRequest(model="lenet5", images=[image]))
            q = query(promql)
            return q if q and q[0]["value"][1] != "NaN" else []

        q = eventually(quantile, "a latency quantile from Prometheus", timeout=90, interval=0.5)
        p99 = float(q[0]["value"][1])  # a latency: its size is no claim here, its presence is
        assert math.isfinite(p99) and p99 > 0, q


def test_the_keda_overlay_scales_with_a_scaledobject_valid_against_kedas_schema(tmp_path):
    from cloudcoil.models.keda.v1alpha1 import ScaledObject
    from pydantic import ValidationError

    docs = rendered("keda")
    kinds = {d["kind"] for d in docs}
    assert "ScaledObject" in kinds and "HorizontalPodAutoscaler" not in kinds  # one scaler
    scaled = next(d for d in docs if d["kind"] == "ScaledObject")

    def checked(document: dict) -> dict:
        """The document as KEDA's CRD schema reads it (cloudcoil's models, generated from
        KEDA 2.16's CRDs): wrong types raise, and a field the schema lacks is dropped."""
        return ScaledObject.model_validate(document).model_dump(
            by_alias=True, exclude_unset=True, mode="json")

    assert checked(scaled) == scaled  # every field known, every value of its type
    typo = {**scaled, "spec": {**scaled["spec"], "minReplicas": 2}}  # HPA's name, not KEDA's
    assert checked(typo) != typo
    with pytest.raises(ValidationError):
        checked({**scaled, "spec": {**scaled["spec"], "minReplicaCount": "two"}})
    assert scaled["spec"]["scaleTargetRef"]["name"] == next(
        d for d in docs if d["kind"] == "Deployment")["metadata"]["name"]
    path = tmp_path / "keda.yaml"  # the rest against the Kubernetes schemas
    path.write_text(yaml.safe_dump_all([d for d in docs if d["kind"] != "ScaledObject"]))
    result = subprocess.run([tool("kubernetes-validate"), "-k", "1.32.0", "--strict", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _desired(pods: int, value: float, target: float, low: int, high: int) -> int:
    """The replica count an HPA asks for (KEDA's AverageValue trigger is one): ceil(pods x
    per-pod value / target), clamped to the bounds."""
    return min(high, max(low, math.ceil(pods * value / target - 1e-9)))


def test_the_autoscalers_queries_on_real_replicas_ask_for_the_replicas_their_load_needs(
        exported_repo, tmp_path):
    from conftest import Load, encode, make_repo, photo, start_server
    from visionserve.v1 import visionserve_pb2 as pb

    keda = next(d for d in rendered("keda") if d["kind"] == "ScaledObject")
    trigger = keda["spec"]["triggers"][0]["metadata"]
    hpa = next(d for d in rendered("cpu") if d["kind"] == "HorizontalPodAutoscaler")
    quantity = hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"]  # "700m"
    target = float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)
    rule = next(r for r in yaml.safe_load((DEPLOY / "prometheus" / "adapter-rules.yaml")
                                          .read_text())["rules"]
                if r["name"]["as"] == hpa["spec"]["metrics"][0]["pods"]["metric"]["name"])
    pods = ("visionserve-a", "visionserve-b")
    adapter = rule["metricsQuery"].replace("<<.GroupBy>>", "pod").replace(
        "<<.Series>>", rule["name"]["as"]).replace(
        "<<.LabelMatchers>>", f'namespace="default",pod=~"{"|".join(pods)}"')
    repo = make_repo(exported_repo, tmp_path / "repo", ("lenet5",))
    servers = [start_server(repo, tmp_path / f"{pod}.log") for pod in pods]
    targets = [{"targets": [f"127.0.0.1:{s.metrics_port}"],
                "labels": {"namespace": "default", "pod": pod}} for s, pod in zip(
        servers, pods, strict=True)]
    try:
        with prometheus(tmp_path, targets) as query:
            def asked(at: float) -> tuple[int, int, dict[str, float]] | None:
                fleet = query(trigger["query"], at)
                per_pod = {r["metric"]["pod"]: float(r["value"][1]) for r in query(adapter, at)}
                if not fleet or len(per_pod) < 2:
                    return None
                keda_wants = _desired(1, float(fleet[0]["value"][1]),
                                      float(trigger["threshold"]), keda["spec"]["minReplicaCount"],
                                      keda["spec"]["maxReplicaCount"])
                hpa_wants = _desired(len(per_pod), sum(per_pod.values()) / len(per_pod),
                                     target, hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"])
                return keda_wants, hpa_wants, per_pod

            idle = eventually(lambda: asked(time.time()), "both replicas' utilization",
                              timeout=90, interval=1)
            assert idle == (2, 2, {"visionserve-a": 0.0, "visionserve-b": 0.0})  # the minimum
            image = pb.Image(encoded=encode(photo("camera"), "PNG"))
            load = Load(servers[0], pb.ClassifyRequest(model="lenet5", images=[image]), 4)
            try:
                loaded = eventually(lambda: (a := asked(time.time())) and
                                    a[2]["visionserve-a"] > 0 and a, "replica a's load to show",
                                    timeout=90, interval=1)
            finally:
                load.stop()
        keda_wants, hpa_wants, per_pod = loaded
        assert per_pod["visionserve-b"] == 0.0 and 0 < per_pod["visionserve-a"] <= 1.0
        # both scalers read the same signal and ask for the same count: ceil(load / 0.7)
        assert keda_wants == hpa_wants == _desired(1, per_pod["visionserve-a"], target, 2, 20)
        assert load.errors() == []
    finally:
        for s in servers:
            s.stop()


def dockerfile_stages() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text()
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\w+)\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_dockerfile_passes_hadolint_and_its_serve_stage_has_no_torch():
    result = subprocess.run([tool("hadolint"), str(ROOT / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    stages = dockerfile_stages()
    assert {"wheel", "serve", "export"} <= set(stages)
    serve = stages["serve"]
    assert "torch" not in serve and "[export]" not in serve and "gcc" not in serve
    assert "USER 10001" in serve and "STOPSIGNAL SIGTERM" in serve
    assert re.search(r'HEALTHCHECK .*CMD \["visionserve", "health"\]', serve, re.S)
    assert "[export]" in stages["export"]


def test_dockerfile_entrypoint_env_and_ports_are_the_servers():
    serve = dockerfile_stages()["serve"]
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", serve, re.M)[1])
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", serve, re.M)[1])
    assert entry == ["visionserve"]
    assert 'visionserve = "visionserve.service.cli:main"' in (ROOT / "pyproject.toml").read_text()
    assert build_parser().parse_args(cmd).command == "serve"
    assert build_parser().parse_args(["health"]).command == "health"
    env = dict(re.findall(r"(VISIONSERVE_\w+)=(\S+)", serve))
    assert set(env) <= server_env_names()
    exposed = set(re.search(r"^EXPOSE (.*)$", serve, re.M)[1].split())
    assert exposed == {env["VISIONSERVE_HTTP_PORT"], env["VISIONSERVE_GRPC_PORT"],
                       env["VISIONSERVE_METRICS_PORT"]}


def test_health_command_reports_server_and_model_readiness(server):
    ok = run_cli("health", "--server", server.address)
    assert ok.returncode == 0 and "SERVING" in ok.stdout
    assert run_cli("health", "--server", server.address, "--service", "lenet5").returncode == 0
    missing = run_cli("health", "--server", server.address, "--service", "nope")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr


def test_server_containers_run_on_a_read_only_root_filesystem():
    """What must stay writable: nothing. The image test serves from a read-only root."""
    deployment = next(d for d in rendered("cpu") if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    runtime = yaml.safe_load((DEPLOY / "kserve" / "servingruntime.yaml").read_text())
    for security in (container["securityContext"],
                     runtime["spec"]["containers"][0]["securityContext"]):
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
    assert container["volumeMounts"]
    assert all(m.get("readOnly") for m in container["volumeMounts"])
