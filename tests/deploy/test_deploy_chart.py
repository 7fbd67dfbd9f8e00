"""The Helm chart helm/dcam-stream: lint, render, Kubernetes schemas, and its ties to the operator."""

from __future__ import annotations

import copy
import re
import tarfile
import tomllib
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from deploylib import (
    CHART,
    CI_VALUES,
    RELEASE,
    by_kind,
    chart,
    config_check,
    config_map,
    config_toml,
    container,
    default_config,
    default_http_port,
    default_keys,
    flat_keys,
    helm,
    manifests,
    one,
    render,
    strip_private,
    workload,
)

# Kubernetes versions to validate against: the oldest the chart supports (Chart.yaml kubeVersion) and the
# newest kubernetes-validate ships.
KUBE_VERSIONS = sorted({"1.27.0", kubernetes_validate.latest_version()} & set(all_versions()))
SEVERITY_WARNING = 2


def test_ci_values_files_present():
    names = {p.name for p in CI_VALUES}
    assert {"gpu-tensorrt-values.yaml", "keda-values.yaml", "sasl-ssl-s3-values.yaml"} <= names


# ---- helm lint --strict -------------------------------------------------------------------------


def test_helm_lint_strict(values_set):
    name, values = values_set
    for kube_version in KUBE_VERSIONS:
        report = helm().lint(str(CHART), values=values, strict=True, kube_version=f"v{kube_version}")
        problems = [m for m in report["messages"] if m["severity"] >= SEVERITY_WARNING]
        assert not report["errors"] and not problems, f"{name} on {kube_version}: {report}"


def test_chart_metadata():
    meta = chart().metadata
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "dcam-stream"
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"])
    assert chart().schema is not None, "values.schema.json must ship with the chart"


# ---- rendering and Kubernetes schemas ------------------------------------------------------------


def test_renders_and_validates_against_kubernetes_schemas(values_set):
    name, values = values_set
    docs = manifests(values)
    assert docs, f"{name}: nothing rendered"
    seen = set()
    for doc in docs:
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in seen, f"{name}: duplicate {key}"
        seen.add(key)
        if doc["apiVersion"] in CRD_SCHEMAS:
            continue  # custom resources: see test_custom_resources
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(strip_private(doc), version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {version}: "
                            f"{exc.message} at {list(exc.path)}")


def test_standard_labels(values_set):
    _, values = values_set
    for doc in manifests(values):
        labels = doc["metadata"].get("labels", {})
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                    "app.kubernetes.io/managed-by", "helm.sh/chart"):
            assert key in labels, f"{doc['kind']} lacks label {key}"
        assert labels["app.kubernetes.io/instance"] == RELEASE


# Custom resources are not in the Kubernetes OpenAPI that kubernetes-validate ships (KEDA and the
# Prometheus Operator install their CRDs separately), so the checks below pin down the fields the
# operators require, plus the cross-references to the chart's own objects.
_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253}
_META = {"type": "object", "required": ["name", "labels"], "properties": {"name": _NAME}}
# Prometheus durations as the Prometheus Operator's CRDs accept them.
_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
CRD_SCHEMAS: dict[str, dict[str, dict[str, Any]]] = {
    "keda.sh/v1alpha1": {
        "ScaledObject": {
            "type": "object",
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {
                "metadata": _META,
                "spec": {
                    "type": "object",
                    "required": ["scaleTargetRef", "triggers"],
                    "properties": {
                        "scaleTargetRef": {
                            "type": "object", "required": ["name"], "additionalProperties": False,
                            "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                           "name": _NAME, "envSourceContainerName": {"type": "string"}},
                        },
                        "pollingInterval": {"type": "integer", "minimum": 1},
                        "cooldownPeriod": {"type": "integer", "minimum": 0},
                        "minReplicaCount": {"type": "integer", "minimum": 0},
                        "maxReplicaCount": {"type": "integer", "minimum": 1},
                        "advanced": {"type": "object"},
                        "triggers": {
                            "type": "array", "minItems": 1,
                            "items": {
                                "type": "object", "required": ["type", "metadata"],
                                "properties": {
                                    "type": {"const": "kafka"},
                                    "metadata": {
                                        "type": "object",
                                        "required": ["bootstrapServers", "consumerGroup", "topic", "lagThreshold"],
                                        # KEDA trigger metadata values are strings.
                                        "additionalProperties": {"type": "string"},
                                    },
                                    "authenticationRef": {"type": "object", "required": ["name"]},
                                },
                            },
                        },
                    },
                    "additionalProperties": False,
                },
            },
        },
        "TriggerAuthentication": {
            "type": "object",
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {
                "metadata": _META,
                "spec": {
                    "type": "object", "required": ["secretTargetRef"],
                    "properties": {"secretTargetRef": {
                        "type": "array", "minItems": 1,
                        "items": {"type": "object", "required": ["parameter", "name", "key"],
                                  "additionalProperties": False,
                                  "properties": {
                                      "parameter": {"enum": ["sasl", "username", "password", "tls", "ca", "cert",
                                                             "key", "keyPassword", "unsafeSsl"]},
                                      "name": _NAME, "key": {"type": "string", "minLength": 1}}},
                    }},
                },
            },
        },
    },
    "monitoring.coreos.com/v1": {
        "ServiceMonitor": {
            "type": "object",
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {
                "metadata": _META,
                "spec": {
                    "type": "object", "required": ["selector", "endpoints"],
                    "properties": {
                        "selector": {"type": "object", "required": ["matchLabels"]},
                        "endpoints": {"type": "array", "minItems": 1, "items": {
                            "type": "object", "required": ["port"],
                            "properties": {"port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                                           "interval": {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h))+$"}},
                        }},
                    },
                },
            },
        },
        # The Prometheus Operator's PrometheusRule (its CRD's required fields and patterns).
        "PrometheusRule": {
            "type": "object",
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {
                "metadata": _META,
                "spec": {
                    "type": "object", "required": ["groups"], "additionalProperties": False,
                    "properties": {"groups": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "required": ["name", "rules"], "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "rules": {"type": "array", "minItems": 1, "items": {
                                "type": "object", "required": ["expr"], "additionalProperties": False,
                                "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                "properties": {
                                    "alert": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]*$"},
                                    "record": {"type": "string", "pattern": r"^[A-Za-z_:][A-Za-z0-9_:]*$"},
                                    "expr": {"type": "string", "minLength": 1},
                                    "for": {"type": "string", "pattern": _DURATION},
                                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                                },
                            }},
                        },
                    }}},
                },
            },
        },
    },
}


def test_custom_resources(values_set):
    name, values = values_set
    docs = manifests(values)
    kinds = {d["kind"] for d in docs}
    target = workload(docs)
    for doc in docs:
        group = CRD_SCHEMAS.get(doc["apiVersion"])
        if group is None:
            continue
        assert doc["kind"] in group, f"{name}: unexpected custom resource {doc['apiVersion']} {doc['kind']}"
        jsonschema.validate(strip_private(doc), group[doc["kind"]])
        if doc["kind"] == "ScaledObject":
            ref = doc["spec"]["scaleTargetRef"]
            assert (ref["kind"], ref["name"]) == (target["kind"], target["metadata"]["name"])
            auth_names = {d["metadata"]["name"] for d in by_kind(docs, "TriggerAuthentication")}
            for trigger in doc["spec"]["triggers"]:
                if "authenticationRef" in trigger:
                    assert trigger["authenticationRef"]["name"] in auth_names
        if doc["kind"] == "ServiceMonitor":
            service = one(docs, "Service")
            selector = doc["spec"]["selector"]["matchLabels"]
            assert selector.items() <= service["metadata"]["labels"].items()
            port_names = {p["name"] for p in service["spec"]["ports"]}
            assert all(ep["port"] in port_names for ep in doc["spec"]["endpoints"])
            assert all(ep.get("path", "/metrics") == "/metrics" for ep in doc["spec"]["endpoints"])
    if "ScaledObject" in kinds:
        assert "HorizontalPodAutoscaler" not in kinds


# ---- workload shape ------------------------------------------------------------------------------


def test_selectors_match_pod_labels(values_set):
    _, values = values_set
    docs = manifests(values)
    wl = workload(docs)
    pod_labels = wl["spec"]["template"]["metadata"]["labels"]
    assert wl["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert one(docs, "Service")["spec"]["selector"].items() <= pod_labels.items()
    for pdb in by_kind(docs, "PodDisruptionBudget"):
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    if wl["kind"] == "StatefulSet":
        assert wl["spec"]["serviceName"] == one(docs, "Service")["metadata"]["name"]
    cm = config_map(docs)["metadata"]["name"]
    volumes = {v["name"]: v for v in wl["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == cm


def test_security_context(values_set):
    _, values = values_set
    docs = manifests(values)
    pod = workload(docs)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    sc = container(docs)["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"


def test_writable_paths_are_volumes(values_set):
    """With a read-only root, every path the operator writes must be a mounted volume."""
    _, values = values_set
    docs = manifests(values)
    pod = workload(docs)["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in container(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    cfg = tomllib.loads(config_toml(docs))
    writable = []
    store = cfg["heatmap"]["store"]
    if store.startswith("file://"):
        writable.append(store.removeprefix("file://"))
    if cfg["engine"].get("trt_engine_cache"):
        writable.append(cfg["engine"]["trt_engine_cache"])
    for path in writable:
        mount = mounts.get(path)
        assert mount is not None, f"{path} is written by the operator but not mounted"
        assert not mount.get("readOnly", False)


def test_probes_match_the_operator(values_set):
    """Probe paths are the operator's endpoints and the port is telemetry.http_addr's port."""
    _, values = values_set
    docs = manifests(values)
    c = container(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    expected_port = default_http_port()
    assert default_config()["telemetry"]["http_addr"].endswith(f":{expected_port}")
    assert ports["http"] == expected_port
    for probe, path in (("startupProbe", "/readyz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["port"] in ("http", expected_port), probe
    service_ports = {p["name"]: p for p in one(docs, "Service")["spec"]["ports"]}
    assert service_ports["http"]["port"] == expected_port
    assert service_ports["http"]["targetPort"] in ("http", expected_port)


def test_http_port_follows_config():
    docs = manifests({"config": {"telemetry": {"http_addr": "0.0.0.0:9100"}}})
    assert {p["name"]: p["containerPort"] for p in container(docs)["ports"]}["http"] == 9100
    assert one(docs, "Service")["spec"]["ports"][0]["port"] == 9100


def test_startup_probe_covers_tensorrt_build():
    name, values = "gpu-tensorrt-values", yaml.safe_load((CHART / "ci" / "gpu-tensorrt-values.yaml").read_text())
    probe = container(manifests(values))["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 15 * 60, name
    default_probe = container(manifests({}))["startupProbe"]
    assert default_probe["periodSeconds"] * default_probe["failureThreshold"] >= 5 * 60


def test_args_point_at_the_configmap():
    docs = manifests({})
    c = container(docs)
    assert c["args"][:2] == ["run", "--config"]
    config_path = c["args"][2]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert config_path == f"{mounts['config']}/config.toml"


# ---- GPU, exactly-once, secrets --------------------------------------------------------------------


def test_gpu_tensorrt_values():
    values = yaml.safe_load((CHART / "ci" / "gpu-tensorrt-values.yaml").read_text())
    docs = manifests(values)
    wl = workload(docs)
    pod = wl["spec"]["template"]["spec"]
    c = container(docs)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] and pod["tolerations"] and pod["affinity"]
    assert c["image"].endswith("-cuda"), "GPU providers default to the CUDA image"
    cfg = tomllib.loads(config_toml(docs))
    assert cfg["engine"]["provider"] == "tensorrt"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts[cfg["engine"]["trt_engine_cache"]] == "trt-cache"
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["kind"] == wl["kind"] == "StatefulSet"


def test_gpu_resource_added_when_missing():
    docs = manifests({"config": {"engine": {"provider": "cuda"}}, "gpu": {"count": 2}})
    assert container(docs)["resources"]["limits"]["nvidia.com/gpu"] == 2
    cpu = manifests({})
    assert "nvidia.com/gpu" not in container(cpu)["resources"].get("limits", {})
    assert not container(cpu)["image"].endswith("-cuda")


@pytest.mark.parametrize("mode,kind", [("at_least_once", "Deployment"), ("exactly_once", "StatefulSet")])
def test_workload_kind_and_instance_id(mode, kind):
    docs = manifests({"config": {"delivery": {"mode": mode}}})
    assert workload(docs)["kind"] == kind
    env = {e["name"]: e for e in container(docs).get("env", [])}
    if mode == "exactly_once":
        # transactional id = "<group_id>-<instance_id>", instance_id = the stable StatefulSet pod name
        assert env["DCAM__DELIVERY__INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    else:
        assert "DCAM__DELIVERY__INSTANCE_ID" not in env


def test_deployment_with_exactly_once_is_refused():
    with pytest.raises(helm().HelmError, match="exactly_once"):
        render({"workload": {"kind": "Deployment"}, "config": {"delivery": {"mode": "exactly_once"}}})


def test_sasl_ssl_s3_values():
    values = yaml.safe_load((CHART / "ci" / "sasl-ssl-s3-values.yaml").read_text())
    docs = manifests(values)
    c = container(docs)
    pod = workload(docs)["spec"]["template"]["spec"]
    env = {e["name"]: e for e in c["env"]}
    ref = env["DCAM__KAFKA__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "dcam-kafka-sasl", "key": "password"}
    assert env["DCAM__S3__SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "dcam-s3"
    assert env["DCAM__KAFKA__SSL_KEY_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "tls.key.password"
    cfg = tomllib.loads(config_toml(docs))
    assert cfg["heatmap"]["store"] == "s3://dcam-heatmaps/prod"
    # TLS files: each ssl_*_location is a key of the mounted Secret.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    tls_dir = mounts["kafka-tls"]["mountPath"]
    assert mounts["kafka-tls"]["readOnly"] is True
    assert volumes["kafka-tls"]["secret"]["secretName"] == "dcam-kafka-tls"
    for key, file in (("ssl_ca_location", "ca.crt"), ("ssl_certificate_location", "tls.crt"),
                      ("ssl_key_location", "tls.key")):
        assert cfg["kafka"][key] == f"{tls_dir}/{file}"
    # Model override by mount over the baked model's directory.
    assert cfg["model"]["path"].startswith(mounts["model"]["mountPath"] + "/")
    assert volumes["model"]["persistentVolumeClaim"]["claimName"] == "dcam-models"
    # KEDA reads the same Secrets.
    auth = one(docs, "TriggerAuthentication")
    params = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert params["password"] == ("dcam-kafka-sasl", "password")
    assert params["ca"] == ("dcam-kafka-tls", "ca.crt")
    trigger = one(docs, "ScaledObject")["spec"]["triggers"][0]["metadata"]
    assert trigger["sasl"] == "scram_sha512" and trigger["tls"] == "enable"


def test_ui_ingress_and_api_token():
    """The page is exposed through an Ingress to the `http` port: /ui and /api only, never /metrics
    or the probes; both tokens come from Secrets; the operator answers only to the Ingress's host
    and the Service's names."""
    values = yaml.safe_load((CHART / "ci" / "sasl-ssl-s3-values.yaml").read_text())
    docs = manifests(values)
    env = {e["name"]: e for e in container(docs)["env"]}
    assert env["DCAM__TELEMETRY__API_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "dcam-ui-token", "key": "token"}
    assert env["DCAM__TELEMETRY__READ_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "dcam-ui-read-token", "key": "token"}
    ingress = one(docs, "Ingress")
    rule = ingress["spec"]["rules"][0]
    assert rule["host"] == "dcam.example.com" and ingress["spec"]["ingressClassName"] == "nginx"
    service = one(docs, "Service")["metadata"]["name"]
    paths = rule["http"]["paths"]
    assert [(p["path"], p["pathType"]) for p in paths] == [("/ui", "Prefix"), ("/api", "Prefix")]
    assert all(p["backend"]["service"] == {"name": service, "port": {"name": "http"}} for p in paths)
    assert ingress["spec"]["tls"][0]["secretName"] == "dcam-ui-tls"
    hosts = tomllib.loads(config_toml(docs))["telemetry"]["allowed_hosts"]
    assert hosts == ["dcam.example.com", service, f"{service}.dcam", f"{service}.dcam.svc", f"{service}.dcam.svc.cluster.local"], hosts
    # Off by default: no Ingress, no tokens (writes refused, reads open on the pod port), no Host check.
    defaults = manifests({})
    assert not [d for d in defaults if d["kind"] == "Ingress"]
    default_env = {e["name"] for e in container(defaults).get("env", [])}
    assert not {"DCAM__TELEMETRY__API_TOKEN", "DCAM__TELEMETRY__READ_TOKEN"} & default_env
    assert tomllib.loads(config_toml(defaults))["telemetry"]["allowed_hosts"] == []


def test_ui_ingress_needs_a_read_token():
    """An Ingress without the read token would publish images and scores: the chart refuses it."""
    with pytest.raises(Exception, match="ui.readTokenSecret"):
        manifests({"ui": {"ingress": {"enabled": True, "host": "dcam.example.com"}}})


def test_control_signing_key_and_writers_come_from_mounted_secrets():
    """The control-record signing key and the named writers are Secret files the config points at."""
    values = yaml.safe_load((CHART / "ci" / "sasl-ssl-s3-values.yaml").read_text())
    docs = manifests(values)
    pod = workload(docs)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container(docs)["volumeMounts"]}
    cfg = tomllib.loads(config_toml(docs))
    for volume, secret, key, setting in [
        ("writers", "dcam-ui-writers", "tokens", cfg["telemetry"]["tokens_file"]),
        ("control-signing-key", "dcam-control-signing", "signing-key", cfg["control"]["signing_key_file"]),
    ]:
        assert volumes[volume]["secret"]["secretName"] == secret
        assert volumes[volume]["secret"]["items"] == [{"key": key, "path": key}], "only that key is mounted"
        assert mounts[volume]["readOnly"] is True
        assert setting == f"{mounts[volume]['mountPath']}/{key}"
    assert "signing_key" not in cfg["control"], "the key itself never enters the ConfigMap"
    assert cfg["topics"]["control_audit"] == "dcam.control.audit"
    # Off by default: no volumes, no settings (the operator warns that records are unsigned).
    defaults = manifests({})
    default_volumes = {v["name"] for v in workload(defaults)["spec"]["template"]["spec"]["volumes"]}
    assert not default_volumes & {"writers", "control-signing-key"}
    default_cfg = tomllib.loads(config_toml(defaults))
    assert "signing_key_file" not in default_cfg["control"] and "tokens_file" not in default_cfg["telemetry"]
    assert cfg["control"]["catch_up_timeout_ms"] == default_cfg["control"]["catch_up_timeout_ms"] == 10000, \
        "the chart adds the key file to config.control without dropping its other keys"


def test_no_secret_in_configmap(values_set):
    _, values = values_set
    cfg = tomllib.loads(config_toml(manifests(values)))
    assert not cfg["kafka"].get("sasl_password")
    assert not cfg["kafka"].get("ssl_key_password")
    assert not cfg["heatmap"].get("s3", {}).get("secret_access_key")


def test_keda_values():
    values = yaml.safe_load((CHART / "ci" / "keda-values.yaml").read_text())
    docs = manifests(values)
    so = one(docs, "ScaledObject")
    assert so["spec"]["maxReplicaCount"] <= values["kafka"]["partitions"]
    topics = [t["metadata"]["topic"] for t in so["spec"]["triggers"]]
    assert topics == values["config"]["kafka"]["input_topics"]
    assert all(t["metadata"]["consumerGroup"] == "dcam-lines" for t in so["spec"]["triggers"])
    assert "replicas" not in workload(docs)["spec"], "the autoscaler owns the replica count"
    one(docs, "ServiceMonitor")
    volumes = {v["name"]: v for v in workload(docs)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["heatmaps"]["persistentVolumeClaim"]["claimName"] == "dcam-heatmaps"
    assert not by_kind(docs, "PersistentVolumeClaim"), "existingClaim: no PVC created"


def test_heatmap_pvc_created():
    docs = manifests({"heatmaps": {"storage": "pvc"}})
    pvc = one(docs, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in workload(docs)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["heatmaps"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


# ---- config: ConfigMap TOML vs the operator -------------------------------------------------------


def test_config_keys_exist_in_default_toml(values_set):
    """Every key the chart writes exists in config/default.toml (the binary rejects unknown keys)."""
    name, values = values_set
    rendered = tomllib.loads(config_toml(manifests(values)))
    unknown = flat_keys(rendered) - default_keys()
    assert not unknown, f"{name}: keys not in config/default.toml: {sorted(unknown)}"
    defaults = default_config()
    for section, table in rendered.items():
        for key, value in table.items():
            if isinstance(value, dict):
                continue
            assert type(value) is type(defaults[section][key]), f"{name}: {section}.{key} is {value!r}"


def test_chart_config_covers_default_toml():
    """values.yaml mirrors config/default.toml (apart from chart-managed keys and secrets)."""
    rendered = flat_keys(tomllib.loads(config_toml(manifests({}))))
    chart_managed = {"kafka.sasl_password", "kafka.ssl_key_password", "s3.secret_access_key",
                     "s3.access_key_id", "kafka.ssl_ca_location", "kafka.ssl_certificate_location",
                     "kafka.ssl_key_location", "engine.trt_engine_cache", "delivery.instance_id", "telemetry.api_token",
                     "telemetry.tokens_file", "control.signing_key", "control.signing_key_file",
                     "telemetry.read_token"}
    missing = default_keys() - rendered - chart_managed
    assert not missing, f"values.yaml config lacks {sorted(missing)} (new operator keys?)"


def test_env_vars_name_existing_keys(values_set):
    """DCAM__SECTION__KEY env vars injected by the chart name keys of config/default.toml."""
    _, values = values_set
    keys = default_keys()
    for env in container(manifests(values)).get("env", []):
        if env["name"].startswith("DCAM__"):
            dotted = ".".join(env["name"].removeprefix("DCAM__").lower().split("__"))
            assert dotted in keys, env["name"]


def _pod_env(docs) -> dict[str, str]:
    """The DCAM__* env a pod would get, secrets replaced by placeholders."""
    env = {}
    for e in container(docs).get("env", []):
        if e["name"].startswith("DCAM__"):
            env[e["name"]] = e.get("value") or ("rel-dcam-stream-0" if "fieldRef" in e.get("valueFrom", {}) else "s3cr3t")
    return env


def test_rendered_config_passes_operator_config_check(values_set, tmp_path):
    """`dcam-stream config check` accepts the ConfigMap's TOML, with the env the pod would get."""
    name, values = values_set
    docs = manifests(values)
    env = _pod_env(docs)
    result = config_check(config_toml(docs), tmp_path, env)
    assert result.returncode == 0, f"{name}: config check failed:\n{result.stdout}\n{result.stderr}"
    if "DCAM__DELIVERY__INSTANCE_ID" in env:
        # The effective config carries the per-pod instance id (transactional id suffix).
        assert 'instance_id = "rel-dcam-stream-0"' in result.stdout, result.stdout


def test_config_check_rejects_unknown_key(tmp_path):
    """Sanity check of the tie itself: the binary does reject what the chart must never write."""
    bad = config_toml(manifests({})) + "\n[bogus]\nkey = 1\n"
    result = config_check(bad, tmp_path)
    assert result.returncode != 0
    assert "bogus" in (result.stdout + result.stderr)
    typo = config_check(config_toml(manifests({})), tmp_path, {"DCAM__KAFKA__SASL_PASWORD": "x"})
    assert typo.returncode != 0, "a misspelt env override must be rejected too"


def test_toml_writer_round_trips_values():
    values = {"config": {
        "kafka": {"extra": {"fetch.max.bytes": "52428800", "client.rack": "eu-1a"},
                  "client_id": 'quote " backslash \\ <tag> & unicode é'},
        "model": {"thresholds": {"bottle": 0.42, "screw": 3, "tiny": 1e-7}},
        "decode": {"max_payload_bytes": 33554432},
    }}
    cfg = tomllib.loads(config_toml(manifests(values)))
    assert cfg["kafka"]["extra"] == values["config"]["kafka"]["extra"]
    assert cfg["kafka"]["client_id"] == values["config"]["kafka"]["client_id"]
    assert cfg["model"]["thresholds"] == {"bottle": 0.42, "screw": 3, "tiny": 1e-7}
    assert cfg["decode"]["max_payload_bytes"] == 33554432 and isinstance(cfg["decode"]["max_payload_bytes"], int)


def test_config_change_rolls_pods():
    def checksum(values):
        return workload(manifests(values))["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    base = checksum({})
    assert base == checksum({}), "checksum must be deterministic"
    assert base != checksum({"config": {"batch": {"max_batch": 16}}})
    assert base == checksum({"replicaCount": 2}), "only config changes should roll the pods"


# ---- values.schema.json and template guards --------------------------------------------------------


def _schema_error(values: dict[str, Any]) -> str:
    with pytest.raises(helm().HelmValuesError) as err:
        chart().validate_schema(values)
    return str(err.value)


def test_schema_accepts_shipped_values(values_set):
    _, values = values_set
    chart().validate_schema(values)


def test_schema_rejects_hpa_and_keda_together(tmp_path):
    path = tmp_path / "both-autoscalers.yaml"
    path.write_text("autoscaling:\n  enabled: true\nkeda:\n  enabled: true\n")
    values = helm().values_from_yaml(path.read_text())
    message = _schema_error(values)
    assert "at '/keda/enabled': value must be false" in message
    assert "'not' failed" in message
    # helm lint and helm template refuse it too, with the same message.
    report = helm().lint(str(CHART), values=values, strict=True)
    assert any("/keda/enabled" in e for e in report["errors"])
    with pytest.raises(helm().HelmValuesError, match="/keda/enabled"):
        render(values)
    # Either one alone is fine.
    chart().validate_schema({"autoscaling": {"enabled": True}})
    chart().validate_schema({"keda": {"enabled": True}})


def test_schema_rejects_negative_batch_size(tmp_path):
    path = tmp_path / "negative-batch.yaml"
    path.write_text("config:\n  batch:\n    max_batch: -8\n")
    message = _schema_error(helm().values_from_yaml(path.read_text()))
    assert "at '/config/batch/max_batch': minimum: got -8, want 0" in message


@pytest.mark.parametrize("values,expected", [
    ({"config": {"kafka": {"bogus_key": 1}}}, "additional properties 'bogus_key' not allowed"),
    ({"config": {"kafka": {"sasl_password": "hunter2"}}}, "at '/config/kafka/sasl_password': maxLength"),
    ({"config": {"engine": {"provider": "rocm"}}}, "at '/config/engine/provider': value must be one of"),
    ({"config": {"kafka": {"security_protocol": "sasl_ssl"}}}, "at '/config/kafka/sasl_mechanism'"),
    ({"config": {"batch": {"max_batch": 4096}}}, "at '/config/batch/max_batch': maximum"),
    ({"heatmaps": {"storage": "s3"}}, "at '/heatmaps/s3/bucket': minLength"),
    ({"kafka": {"partitions": 0}}, "at '/kafka/partitions': minimum"),
    ({"replicaCount": "two"}, "at '/replicaCount'"),
    ({"probes": {"liveness": {"path": "/health"}}}, "at '/probes/liveness/path': value must be one of '/healthz', '/readyz'"),
    ({"config": {"telemetry": {"http_addr": "localhost:9464"}}}, "at '/config/telemetry/http_addr'"),
])
def test_schema_rejects(values, expected):
    assert expected in _schema_error(values)


@pytest.mark.parametrize("values,expected", [
    ({"autoscaling": {"enabled": True, "maxReplicas": 13}}, "autoscaling.maxReplicas (13) exceeds kafka.partitions (12)"),
    ({"keda": {"enabled": True, "maxReplicaCount": 7}, "kafka": {"partitions": 6}},
     "keda.maxReplicaCount (7) exceeds kafka.partitions (6)"),
    ({"replicaCount": 3, "kafka": {"partitions": 2}}, "replicaCount (3) exceeds kafka.partitions (2)"),
    ({"kafka": {"sasl": {"existingSecret": "s"}}}, "config.kafka.security_protocol is \"plaintext\""),
    ({"keda": {"enabled": True}, "config": {"kafka": {"security_protocol": "sasl_plaintext", "sasl_mechanism": "PLAIN"}},
      "kafka": {"sasl": {"existingSecret": "s"}}}, "kafka.sasl.usernameKey"),
])
def test_template_guards(values, expected):
    chart().validate_schema(values)  # valid per schema; the cross-field rule is the template's
    with pytest.raises(helm().HelmRenderError) as err:
        render(values)
    assert expected in str(err.value)


def test_replicas_omitted_with_autoscaling():
    docs = manifests({"autoscaling": {"enabled": True, "maxReplicas": 12}})
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["maxReplicas"] == 12
    assert "replicas" not in workload(docs)["spec"]


def test_schema_is_strict_everywhere():
    """additionalProperties: false on every object schema with fixed properties (except pass-through k8s)."""
    schema = chart().schema
    loose = []

    def walk(node, path):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and node.get("additionalProperties") is not False:
                loose.append(path or "/")
            for key, value in node.items():
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}/{i}")

    walk(copy.deepcopy(schema), "")
    assert not loose, f"object schemas without additionalProperties: false: {loose}"


def test_readme_documents_every_value():
    """The chart README's values table lists every leaf key of values.yaml."""
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = []

    def walk(node, prefix):
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict) and value and dotted not in ("resources", "podSecurityContext", "securityContext"):
                walk(value, dotted + ".")
            elif f"`{dotted}`" not in readme:
                missing.append(dotted)

    walk(values, "")
    assert not missing, f"helm/dcam-stream/README.md lacks {missing}"


def test_package_and_render_archive(tmp_path):
    """`helm package` works; the archive carries the schema and README but not the CI values."""
    archive = helm().package(str(CHART), destination=str(tmp_path))
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "dcam-stream/values.schema.json" in names
    assert "dcam-stream/README.md" in names
    assert not [n for n in names if "/ci/" in n]
    packaged = helm().Chart.load(archive)
    try:
        rendered = packaged.render(values={}, name=RELEASE, namespace="dcam")
    finally:
        packaged.close()
    assert rendered.keys() == render({}).keys()


def test_shutdown_finishes_inside_the_grace_period(values_set):
    """The operator's own shutdown deadline ends before Kubernetes' SIGKILL."""
    name, values = values_set
    docs = manifests(values)
    pod = workload(docs)["spec"]["template"]["spec"]
    shutdown_ms = tomllib.loads(config_toml(docs))["pipeline"]["shutdown_timeout_ms"]
    assert shutdown_ms / 1000 + 10 <= pod["terminationGracePeriodSeconds"], name
