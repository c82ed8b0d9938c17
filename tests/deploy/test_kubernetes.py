"""k8s-deployment.yaml: every document valid for Kubernetes, and in step with the code."""

from __future__ import annotations

import copy
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest

from gateway.config import ENVIRONMENT_VARIABLES, SERVICE_NAME, VERSION, ConfigError, load_settings
from tests.constants import GATEWAY_KEY, UPSTREAM_KEY
from tests.deploy.conftest import (
    REPO,
    SECRETS,
    app_for,
    bind_port,
    run_gunicorn_config,
    variables_named_by,
)
from tests.deploy.parsers import Instruction, final_stage

# A version kubernetes-validate ships schemas for (it works offline); autoscaling/v2 and
# policy/v1 are GA from 1.23 and 1.21.
KUBERNETES_VERSION = "1.32.0"
Document = dict[str, Any]


def find(documents: list[Document], kind: str, name: str) -> Document:
    found = [d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_spec(deployment: Document) -> Document:
    return deployment["spec"]["template"]["spec"]


def pod_labels(deployment: Document) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def named_port(container: Document, port: int | str) -> int:
    """A probe's or Service's port, resolved through the container's named ports."""
    if isinstance(port, int):
        return port
    matches = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    assert len(matches) == 1, f"no container port named {port!r}"
    return matches[0]


def security(pod: Document, container: Document, field: str) -> Any:
    """The effective value: the container's securityContext overrides the pod's."""
    return container.get("securityContext", {}).get(
        field, pod.get("securityContext", {}).get(field)
    )


def container_env(documents: list[Document], container: Document) -> dict[str, str]:
    """Every variable the container gets: ConfigMaps and Secrets via envFrom, then env."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find(documents, "ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            secret = find(documents, "Secret", source["secretRef"]["name"])
            env.update(secret.get("stringData", {}))
    for variable in container.get("env", []):
        env[variable["name"]] = variable.get("value", "")
    return env


def prestop_sleep_seconds(container: Document) -> int:
    handler = container["lifecycle"]["preStop"]
    if "sleep" in handler:
        return int(handler["sleep"]["seconds"])
    command = handler["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    return int(command[1])


@pytest.fixture(scope="module")
def gateway(k8s_documents: list[Document]) -> Document:
    return find(k8s_documents, "Deployment", SERVICE_NAME)


@pytest.fixture(scope="module")
def gateway_container(gateway: Document) -> Document:
    containers = pod_spec(gateway)["containers"]
    assert len(containers) == 1
    return containers[0]


def mounted_file(documents: list[Document], deployment: Document, path: str) -> str:
    """The text of the file at `path` in the gateway container: a ConfigMap volume's key."""
    container = pod_spec(deployment)["containers"][0]
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    for mount in container["volumeMounts"]:
        directory = mount["mountPath"].rstrip("/") + "/"
        source = volumes[mount["name"]].get("configMap")
        if path.startswith(directory) and source is not None:
            return find(documents, "ConfigMap", source["name"])["data"][path[len(directory) :]]
    raise AssertionError(f"nothing is mounted at {path}")


@pytest.fixture(scope="module")
def gateway_config(
    k8s_documents: list[Document], gateway: Document, gateway_container: Document
) -> str:
    """The GATEWAY_CONFIG file the container reads."""
    path = container_env(k8s_documents, gateway_container)["GATEWAY_CONFIG"]
    return mounted_file(k8s_documents, gateway, path)


@pytest.fixture(scope="module")
def secret_variables(gateway_config: str) -> set[str]:
    """What the Secret must carry: the client keys and every variable the file names."""
    return {"GATEWAY_API_KEYS", *variables_named_by(gateway_config)}


@pytest.fixture(scope="module")
def local_env(
    k8s_documents: list[Document],
    gateway_container: Document,
    gateway_config: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:
    """The container's environment, its GATEWAY_CONFIG file written here."""
    path = tmp_path_factory.mktemp("k8s") / "gateway.yaml"
    path.write_text(gateway_config)
    return {**container_env(k8s_documents, gateway_container), "GATEWAY_CONFIG": str(path)}


@pytest.fixture(scope="module")
def gateway_env(local_env: dict[str, str], secret_variables: set[str]) -> dict[str, str]:
    """The container's environment with stand-ins for the Secret's (empty) placeholders."""
    stand_ins = {
        n: GATEWAY_KEY if n == "GATEWAY_API_KEYS" else UPSTREAM_KEY for n in secret_variables
    }
    return {**local_env, **stand_ins}


def test_every_document_is_valid(k8s_documents: list[Document]) -> None:
    kinds = sorted(f"{d['apiVersion']}/{d['kind']}" for d in k8s_documents)
    assert {
        "v1/Secret",
        "v1/ConfigMap",
        "apps/v1/Deployment",
        "v1/Service",
        "autoscaling/v2/HorizontalPodAutoscaler",
        "policy/v1/PodDisruptionBudget",
    } <= set(kinds)
    for document in k8s_documents:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_validation_rejects_a_misspelt_field(gateway: Document) -> None:
    # Guards the check above against a validator that accepts anything offline.
    broken = copy.deepcopy(gateway)
    pod_spec(broken)["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_at_least_two_replicas_always(k8s_documents: list[Document], gateway: Document) -> None:
    assert gateway["spec"]["replicas"] >= 2
    hpa = find(k8s_documents, "HorizontalPodAutoscaler", SERVICE_NAME)
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", SERVICE_NAME)
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    # A budget as large as the replica count would block every node drain.
    pdb = find(k8s_documents, "PodDisruptionBudget", SERVICE_NAME)
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels(gateway))
    assert 1 <= pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


def test_each_service_selects_one_deployment(k8s_documents: list[Document]) -> None:
    deployments = [d for d in k8s_documents if d["kind"] == "Deployment"]
    services = [d for d in k8s_documents if d["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == {d["metadata"]["name"] for d in deployments}
    for service in services:
        selected = [d for d in deployments if selects(service["spec"]["selector"], pod_labels(d))]
        assert [d["metadata"]["name"] for d in selected] == [service["metadata"]["name"]]
        for port in service["spec"]["ports"]:
            container = pod_spec(selected[0])["containers"][0]
            assert named_port(container, port["targetPort"]) == port["port"]


def test_every_container_has_requests_and_limits(k8s_documents: list[Document]) -> None:
    for deployment in (d for d in k8s_documents if d["kind"] == "Deployment"):
        for container in pod_spec(deployment)["containers"]:
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), container["name"]
            assert {"cpu", "memory"} <= set(resources["limits"]), container["name"]


def test_every_container_is_locked_down(k8s_documents: list[Document]) -> None:
    for deployment in (d for d in k8s_documents if d["kind"] == "Deployment"):
        pod = pod_spec(deployment)
        for container in pod["containers"]:
            name = container["name"]
            assert security(pod, container, "runAsNonRoot") is True, name
            assert security(pod, container, "runAsUser") not in (None, 0), name
            assert security(pod, container, "readOnlyRootFilesystem") is True, name
            assert security(pod, container, "allowPrivilegeEscalation") is False, name
            assert security(pod, container, "capabilities")["drop"] == ["ALL"], name
            assert security(pod, container, "seccompProfile") == {"type": "RuntimeDefault"}
            assert security(pod, container, "privileged") in (None, False), name


def test_runs_as_the_images_user(
    dockerfile: list[Instruction], gateway: Document, gateway_container: Document
) -> None:
    user = [i.arguments for i in final_stage(dockerfile) if i.keyword == "USER"][-1]
    uid, _, gid = user.partition(":")
    pod = pod_spec(gateway)
    assert security(pod, gateway_container, "runAsUser") == int(uid)
    assert security(pod, gateway_container, "runAsGroup") in (None, int(gid or uid))


def test_tmp_is_a_writable_empty_dir(gateway: Document, gateway_container: Document) -> None:
    volumes = {v["name"]: v for v in pod_spec(gateway)["volumes"]}
    mounts = {m["mountPath"]: m for m in gateway_container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert not mounts["/tmp"].get("readOnly", False)


def test_sets_only_variables_the_gateway_reads(
    k8s_documents: list[Document], gateway_container: Document, gateway_config: str
) -> None:
    env = set(container_env(k8s_documents, gateway_container))
    named = variables_named_by(gateway_config)
    assert named, "the mounted GATEWAY_CONFIG file names no key variable"
    # The gateway's own variables, and exactly those the mounted file names besides.
    assert env - set(ENVIRONMENT_VARIABLES) == named
    assert {"GATEWAY_CONFIG", "GATEWAY_API_KEYS", "RATE_LIMIT_STORAGE_URI"} <= env
    # Dead with the file: its providers replace the single one.
    assert not env & {"TARGET_API_URL", "TARGET_API_KEY"}


def test_the_file_starts_with_the_secrets_variables_and_no_fewer(
    gateway_env: dict[str, str], secret_variables: set[str]
) -> None:
    settings = load_settings({**gateway_env, "ENV_FILE": ""})
    assert settings.gateway_config == gateway_env["GATEWAY_CONFIG"]
    assert len(settings.providers) > 1
    # Each variable the file names is needed: without it the file is refused.
    for name in secret_variables - {"GATEWAY_API_KEYS"}:
        without = {k: v for k, v in gateway_env.items() if k != name}
        with pytest.raises(ConfigError, match=name):
            load_settings({**without, "ENV_FILE": ""})


def test_secret_holds_only_placeholders(
    k8s_documents: list[Document], local_env: dict[str, str], secret_variables: set[str]
) -> None:
    secrets = [d for d in k8s_documents if d["kind"] == "Secret"]
    assert secrets
    for secret in secrets:
        # base64 `data` would hide a real key from review: plain stringData only.
        assert "data" not in secret
        assert set(secret["stringData"]) == secret_variables
        assert all(value == "" for value in secret["stringData"].values())
    config = find(k8s_documents, "ConfigMap", "ai-gateway-config")["data"]
    assert not set(config) & (secret_variables | set(SECRETS))
    assert urlsplit(config["RATE_LIMIT_STORAGE_URI"]).password is None
    # Unfilled, the Secret stops the gateway at start-up instead of serving a dummy key.
    with pytest.raises(ConfigError):
        load_settings({**local_env, "ENV_FILE": ""})


def test_probes_hit_routes_the_app_serves_on_the_bound_port(
    gateway_container: Document, gateway_env: dict[str, str]
) -> None:
    port = bind_port(run_gunicorn_config(gateway_env))
    assert port == 8080
    probes = {
        kind: gateway_container[kind]
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
        if kind in gateway_container
    }
    assert probes["livenessProbe"]["httpGet"]["path"] == "/health"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/ready"
    with app_for(load_settings({**gateway_env, "ENV_FILE": ""})) as app:
        client = app.test_client()
        for kind, probe in probes.items():
            assert named_port(gateway_container, probe["httpGet"]["port"]) == port, kind
            assert client.get(probe["httpGet"]["path"]).status_code == 200, kind


def test_termination_grace_covers_prestop_and_drain(
    gateway: Document, gateway_container: Document, gateway_env: dict[str, str]
) -> None:
    graceful = run_gunicorn_config(gateway_env)["graceful_timeout"]
    pause = prestop_sleep_seconds(gateway_container)
    assert pause >= 5, "too short for endpoints to be removed everywhere"
    assert pod_spec(gateway)["terminationGracePeriodSeconds"] >= pause + graceful


def test_replicas_share_the_redis_in_the_manifest(
    k8s_documents: list[Document], gateway_env: dict[str, str]
) -> None:
    uri = urlsplit(gateway_env["RATE_LIMIT_STORAGE_URI"])
    assert uri.scheme == "redis"
    service = find(k8s_documents, "Service", str(uri.hostname))
    assert [p["port"] for p in service["spec"]["ports"]] == [uri.port]
    redis = find(k8s_documents, "Deployment", str(uri.hostname))
    assert redis["spec"]["replicas"] == 1
    assert pod_spec(redis)["containers"][0]["image"].startswith("redis:")


def test_image_is_the_compose_image_at_this_version(
    gateway_container: Document, compose: dict[str, Any]
) -> None:
    assert gateway_container["image"] == f"{SERVICE_NAME}:{VERSION}"
    assert compose["services"]["gateway"]["image"] == gateway_container["image"]
    # No command or args: the image's CMD, the README's start command, runs.
    assert "command" not in gateway_container and "args" not in gateway_container


def test_the_providers_config_map_is_the_example_file_mounted_where_documented(
    k8s_documents: list[Document], gateway: Document, gateway_container: Document
) -> None:
    example = (REPO / "gateway.example.yaml").read_text()
    config_map = find(k8s_documents, "ConfigMap", "ai-gateway-providers")
    assert config_map["data"]["gateway.yaml"] == example
    volumes = {v["name"]: v for v in pod_spec(gateway)["volumes"]}
    mounts = {m["mountPath"]: m for m in gateway_container["volumeMounts"]}
    mount = mounts["/etc/ai-gateway"]
    assert mount["readOnly"] is True
    assert volumes[mount["name"]]["configMap"]["name"] == "ai-gateway-providers"
    # GATEWAY_CONFIG names the mounted file, which the kubelet updates in place.
    assert "subPath" not in mount
    env = container_env(k8s_documents, gateway_container)
    assert env["GATEWAY_CONFIG"] == "/etc/ai-gateway/gateway.yaml"
    assert mounted_file(k8s_documents, gateway, env["GATEWAY_CONFIG"]) == example
