"""The Helm chart: lint, rendering with default and other values, the schema, and what the operator
makes of the values it renders (config, runner pods); the files derived from single sources."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib

import jsonschema
import pytest
import yaml
from platform_support import CHART, DASHBOARD, ALERTS, ROOT, container_env, find, helm, render, tool

from consensusfit.operator.__main__ import READINESS_PATH
from consensusfit.operator.children import job_manifest
from consensusfit.operator.config import Config, Policy

MONITORING = ["metrics.serviceMonitor.enabled=true", "metrics.prometheusRule.enabled=true",
              "dashboard.enabled=true"]
WATCHING = ["watchNamespaces={team-a,team-b}"]
S3 = ["runner.s3.endpoint=http://minio.storage:9000", "runner.s3.region=eu-west-1",
      "runner.s3.credentialsSecret=s3-credentials"]

# What the operator calls (handlers, kube, kopf standalone), and no more.
NAMESPACED_RULES = [
    {"apiGroups": ["consensusfit.dev"], "resources": ["consensusfits"],
     "verbs": ["get", "list", "watch", "patch", "delete"]},
    {"apiGroups": ["consensusfit.dev"], "resources": ["consensusfits/status"], "verbs": ["get", "patch"]},
    {"apiGroups": ["consensusfit.dev"], "resources": ["consensusfits/finalizers"], "verbs": ["update"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "list"]},
]
CRDS_RULE = {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
             "verbs": ["get", "list", "watch"]}
NAMESPACES_RULE = {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]}


@pytest.mark.parametrize("values", [[], MONITORING + WATCHING + S3], ids=["defaults", "everything-on"])
def test_helm_lint_strict(values):
    args = ["lint", "--strict", str(CHART)]
    for value in values:
        args += ["--set", value]
    result = helm(*args, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_defaults_render_a_restricted_operator_with_cluster_wide_rights():
    objects = render()
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ClusterRole"] * 3 + ["ClusterRoleBinding", "Deployment", "PodDisruptionBudget", "Role",
                                           "RoleBinding", "Service", "ServiceAccount", "ServiceAccount"]
    (deployment,) = find(objects, "Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "consensusfit"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/consensusfit/consensusfit-operator:0.1.0"
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    # kopf's liveness endpoint and the metrics port, as the operator's config reads them.
    config = Config.from_env(container_env(objects))
    assert config.liveness_endpoint == "http://0.0.0.0:8081/healthz" and config.metrics_port == 8080
    assert config.namespaces == () and config.resync_seconds == 5.0
    assert config.runner_image == "ghcr.io/consensusfit/consensusfit-runner:0.1.0"
    probe = container["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert probe == {"path": "/healthz", "port": "health"}
    assert ports == {"metrics": 8080, "health": 8081, "readiness": config.readiness_port}
    assert container["readinessProbe"]["httpGet"] == {"path": READINESS_PATH, "port": "readiness"}
    (service,) = find(objects, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    (role,) = find(objects, "ClusterRole", "consensusfit")
    assert role["rules"] == [*NAMESPACED_RULES, CRDS_RULE]
    (binding,) = find(objects, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "consensusfit",
                                    "namespace": "consensusfit-system"}]
    (runner_account,) = find(objects, "ServiceAccount", "consensusfit-runner")
    assert runner_account["automountServiceAccountToken"] is False


def test_defaults_run_two_replicas_with_leader_election_over_a_lease_in_the_release_namespace():
    """Only the Lease's holder reconciles, so a rollout starts the new pod before it stops an old
    one; a PodDisruptionBudget keeps a follower through node drains; the operator may create a
    Lease in its own namespace and read and update only its own."""
    objects = render(namespace="ops", release="cfit")
    (deployment,) = find(objects, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    config = Config.from_env(container_env(objects))
    assert config.leader_election and (config.lease_namespace, config.lease_name) == ("ops", "cfit-consensusfit")
    assert (config.lease_seconds, config.renew_deadline_seconds, config.retry_seconds) == (15, 10, 2)
    (budget,) = find(objects, "PodDisruptionBudget")
    assert budget["metadata"]["namespace"] == "ops" and budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"] == spec["selector"]
    (role,) = find(objects, "Role", "cfit-consensusfit-leader-election", namespace="ops")
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [config.lease_name],
         "verbs": ["get", "update"]},
    ]
    (binding,) = find(objects, "RoleBinding", "cfit-consensusfit-leader-election", namespace="ops")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "cfit-consensusfit", "namespace": "ops"}]
    assert not any("coordination.k8s.io" in rule["apiGroups"] for r in find(objects, "ClusterRole") for rule in r["rules"])


def test_one_replica_without_leader_election_is_replaced_with_recreate_and_needs_no_lease():
    objects = render("operator.replicas=1", "operator.leaderElection.enabled=false", "podDisruptionBudget.enabled=false")
    (deployment,) = find(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert not Config.from_env(container_env(objects)).leader_election
    assert not find(objects, "PodDisruptionBudget") and not find(objects, "Role")
    # The readiness probe stays: the one replica is ready once its loop runs.
    assert deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] == READINESS_PATH


@pytest.mark.parametrize("values, message", [
    (["operator.leaderElection.enabled=false"],
     "operator.replicas > 1 needs operator.leaderElection.enabled"),
    (["operator.replicas=1"], "podDisruptionBudget.minAvailable must be below operator.replicas"),
    (["operator.leaderElection.renewDeadlineSeconds=15"],
     "operator.leaderElection needs retryPeriodSeconds < renewDeadlineSeconds < leaseDurationSeconds"),
    (["operator.leaderElection.retryPeriodSeconds=10"],
     "operator.leaderElection needs retryPeriodSeconds < renewDeadlineSeconds < leaseDurationSeconds"),
])
def test_values_that_would_let_two_operators_write_or_block_every_drain_are_refused(values, message):
    args = ["template", "x", str(CHART)] + [arg for value in values for arg in ("--set", value)]
    result = helm(*args, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_watch_namespaces_render_roles_only_in_those_namespaces():
    objects = render(*WATCHING)
    assert Config.from_env(container_env(objects)).namespaces == ("team-a", "team-b")
    (cluster_role,) = find(objects, "ClusterRole", "consensusfit")
    assert cluster_role["rules"] == [CRDS_RULE, NAMESPACES_RULE]  # read-only discovery, no fits, Jobs or pods
    for namespace in ("team-a", "team-b"):
        (role,) = find(objects, "Role", "consensusfit", namespace=namespace)
        assert role["rules"] == NAMESPACED_RULES
        (binding,) = find(objects, "RoleBinding", namespace=namespace)
        assert binding["roleRef"]["name"] == role["metadata"]["name"]
        assert binding["subjects"][0]["namespace"] == "consensusfit-system"
        (runner_account,) = find(objects, "ServiceAccount", namespace=namespace)
        assert runner_account["metadata"]["name"] == "consensusfit-runner"
    defaults = Config.from_env(container_env(objects)).runner_defaults
    assert defaults["serviceAccountName"] == "consensusfit-runner"


def test_users_roles_are_aggregated_into_edit_and_view_unless_turned_off():
    """admin/edit gain every verb on fits but no write of their status (the operator's); view gains
    reading them."""
    roles = {r["metadata"]["name"]: r for r in find(render(), "ClusterRole")}
    edit, view = roles["consensusfit-edit"], roles["consensusfit-view"]
    assert {k for k, v in edit["metadata"]["labels"].items() if k.startswith("rbac.") and v == "true"} == {
        "rbac.authorization.k8s.io/aggregate-to-admin", "rbac.authorization.k8s.io/aggregate-to-edit"}
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert {"create", "delete", "patch"} <= set(edit["rules"][0]["verbs"])
    assert edit["rules"][1] == {"apiGroups": ["consensusfit.dev"], "resources": ["consensusfits/status"],
                                "verbs": ["get", "list", "watch"]}
    assert all(set(rule["verbs"]) == {"get", "list", "watch"} for rule in view["rules"])
    off = find(render("rbac.aggregateToDefaultRoles=false"), "ClusterRole")
    assert [r["metadata"]["name"] for r in off] == ["consensusfit"]


def test_monitoring_on_renders_service_monitor_rules_and_dashboard_from_their_files():
    objects = render(*MONITORING, "dashboard.namespace=monitoring", "metrics.prometheusRule.labels.release=kps")
    (monitor,) = find(objects, "ServiceMonitor")
    (service,) = find(objects, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert {"action": "replace", "targetLabel": "job", "replacement": "consensusfit-operator"} in endpoint["relabelings"]
    (rule,) = find(objects, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kps"
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
    (board,) = find(objects, "ConfigMap")
    assert board["metadata"]["namespace"] == "monitoring"
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(board["data"]["consensusfit.json"]) == json.loads(DASHBOARD.read_text())


def test_monitoring_is_off_by_default_and_needs_the_service():
    assert not {"ServiceMonitor", "PrometheusRule", "ConfigMap"} & {o["kind"] for o in render()}
    result = helm("template", "x", str(CHART), "--set", "metrics.serviceMonitor.enabled=true",
                  "--set", "metrics.service.enabled=false", check=False)
    assert result.returncode != 0 and "metrics.serviceMonitor.enabled needs metrics.service.enabled" in result.stderr


@pytest.mark.parametrize("value, message", [
    ("watchNamespaces={Team_A}", "at '/watchNamespaces/0': 'Team_A' does not match pattern"),
    ("metrics.port=70000", "at '/metrics/port': maximum: got 70,000, want 65,535"),
    ("operator.resyncSeconds=0", "at '/operator/resyncSeconds': exclusiveMinimum"),
    ("image.pullPolicy=Sometimes", "at '/image/pullPolicy': value must be one of 'Always', 'IfNotPresent', 'Never'"),
    ("runner.s3.endpoint=minio:9000", "at '/runner/s3/endpoint': 'minio:9000' does not match pattern"),
    ("runner.s3.credentialSecret=s3", "additional properties 'credentialSecret' not allowed"),
    ("runner.resources.limits.memory=lots", "at '/runner/resources/limits/memory'"),
    ("metrics.serviceMonitor.interval=often", "at '/metrics/serviceMonitor/interval'"),
    ("dashboard.enabled=yes-please", "at '/dashboard/enabled': got string, want boolean"),
    ("runner.policy.volumeTypes={hostPath}", "at '/runner/policy/volumeTypes/0'"),
    ("runner.steps.sample.resources.limits.memory=lots", "at '/runner/steps/sample/resources/limits/memory'"),
    ("runner.steps.training.nodeSelector.pool=gpu", "additional properties 'training' not allowed"),
    ("runner.podSecurityContext.runAsUser=0", "additional properties 'runAsUser' not allowed"),
    ("runner.volumes[0].name=node,runner.volumes[0].hostPath.path=/", "at '/runner/volumes/0'"),
    ("runner.imagePullSecrets[0]=registry", "at '/runner/imagePullSecrets/0'"),
    ("operator.replicas=0", "at '/operator/replicas': minimum: got 0, want 1"),
    ("podDisruptionBudget.minAvailable=half", "at '/podDisruptionBudget/minAvailable'"),
    ("operator.leaderElection.leaseDuration=15", "additional properties 'leaseDuration' not allowed"),
])
def test_the_schema_rejects_bad_values_with_a_clear_message(value, message):
    result = helm("template", "x", str(CHART), "--set", value, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


def _fit(runner: dict | None = None) -> dict:
    # As the API server stores it (the CRD gives spec.runner no resources: the chart's steps do).
    spec = {"data": {"uri": "s3://b/d/"}, "shards": 2, "model": {"formula": "y ~ 1"},
            "output": {"uri": "s3://b/f/"}, "maxRetriesPerShard": 3, "runner": runner or {}}
    return {"metadata": {"name": "fit", "namespace": "team-a", "uid": "u"}, "spec": spec}


def _restricted(pod: dict) -> None:
    """The restricted Pod Security Standard, as far as a pod spec shows it."""
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
        assert context["readOnlyRootFilesystem"] is True


def test_runner_defaults_reach_the_runner_pods_and_a_fit_overrides_them():
    config = Config.from_env(container_env(render(*S3, *WATCHING)))
    job = job_manifest(_fit(), "sample", config.runner_defaults, config.runner_image)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    _restricted(pod)
    assert container["image"] == "ghcr.io/consensusfit/consensusfit-runner:0.1.0"
    assert container["resources"] == {"requests": {"cpu": "2", "memory": "8Gi"},
                                      "limits": {"memory": "16Gi", "nvidia.com/gpu": "1"}}
    assert container["env"] == [{"name": "AWS_ENDPOINT_URL", "value": "http://minio.storage:9000"},
                                {"name": "AWS_REGION", "value": "eu-west-1"}]
    assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    assert pod["serviceAccountName"] == "consensusfit-runner"
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]

    own = _fit({"image": "my/runner:dev", "resources": {"limits": {"nvidia.com/gpu": 2}},
                "envFrom": [{"secretRef": {"name": "team-a-s3"}}], "serviceAccountName": "team-a-runner"})
    pod = job_manifest(own, "sample", config.runner_defaults, config.runner_image)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    _restricted(pod)
    assert container["image"] == "my/runner:dev"
    assert container["resources"]["limits"] == {"memory": "16Gi", "nvidia.com/gpu": "2"}
    assert container["envFrom"] == [{"secretRef": {"name": "team-a-s3"}}]
    assert container["env"][0]["name"] == "AWS_ENDPOINT_URL"  # not overridden: kept
    assert pod["serviceAccountName"] == "team-a-runner"


def test_a_compilation_cache_volume_from_the_values_reaches_the_sampling_pods():
    claim = {"persistentVolumeClaim": {"claimName": "jax-cache"}}
    config = Config.from_env(container_env(render("runner.compilationCache.persistentVolumeClaim.claimName=jax-cache")))
    pod = job_manifest(_fit(), "sample", config.runner_defaults, config.runner_image)["spec"]["template"]["spec"]
    assert {"name": "compilation-cache", **claim} in pod["volumes"]


def test_the_runner_policy_and_the_blocked_grace_period_reach_the_operator():
    default = Config.from_env(container_env(render()))
    assert default.policy == Policy() and default.blocked_grace_seconds == 600
    assert "hostPath" not in default.policy.volume_types
    config = Config.from_env(container_env(render(
        "runner.policy.images={registry.local/team/*}", "runner.policy.serviceAccounts={team-a}",
        "runner.policy.volumeTypes={persistentVolumeClaim}", "runner.policy.pythonModels=false",
        "operator.blockedGraceSeconds=120")))
    assert config.policy == Policy(images=("registry.local/team/*",), service_accounts=("team-a",),
                                   volume_types=("persistentVolumeClaim",), python_models=False)
    assert config.blocked_grace_seconds == 120


def test_cluster_wide_runner_defaults_name_no_service_account():
    # A ServiceAccount exists per namespace: cluster-wide, fits anywhere use their namespace's default.
    defaults = Config.from_env(container_env(render())).runner_defaults
    assert "serviceAccountName" not in defaults and "envFrom" not in defaults and "env" not in defaults


def test_chart_app_version_is_the_package_version():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]


# --- files derived from single sources ---------------------------------------------------------

def _rendered(tmp_path) -> None:
    tool("helm")
    subprocess.run([str(ROOT / "scripts" / "render.sh"), str(tmp_path)], check=True, capture_output=True,
                   text=True, timeout=120)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("rendered")
    _rendered(out)
    return out


@pytest.mark.parametrize("path", [
    "charts/consensusfit/crds/consensusfit.dev_consensusfits.yaml",
    "manifests/install.yaml",
    "manifests/argocd/argocd-cm.yaml",
])
def test_derived_files_are_in_sync(rendered, path):
    assert (ROOT / path).read_bytes() == (rendered / path).read_bytes(), (
        f"{path} is stale: run scripts/render.sh and commit the result")


def test_the_chart_crd_is_manifests_crd_without_anchors_or_merge_keys():
    """kustomize (Flux) refuses YAML merge keys, and the chart's copy is what install.yaml holds."""
    crd = yaml.safe_load((ROOT / "manifests" / "crd.yaml").read_text())
    text = (CHART / "crds" / "consensusfit.dev_consensusfits.yaml").read_text()
    assert yaml.safe_load(text) == crd, "run scripts/render.sh: the chart's CRD is manifests/crd.yaml expanded"
    assert "<<:" not in text and not re.search(r"[&*][A-Za-z]\w*\s*$", text, re.MULTILINE)
    assert "<<:" not in (ROOT / "manifests" / "install.yaml").read_text()


def test_install_bundle_is_restricted_and_complete():
    objects = [o for o in yaml.safe_load_all((ROOT / "manifests" / "install.yaml").read_text()) if o]
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "CustomResourceDefinition", "Deployment", "ClusterRole", "ServiceAccount"} <= kinds
    (namespace,) = find(objects, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for o in objects:
        if o["kind"] not in ("Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"):
            assert o["metadata"]["namespace"] == "consensusfit-system", o["metadata"]["name"]


@pytest.mark.parametrize("example, local", [("fvc-decline.yaml", "fvc.yaml"),
                                            ("fvc-decline-python.yaml", "fvc-python.yaml")])
def test_example_fits_are_valid_and_match_the_local_examples(example, local):
    fit = yaml.safe_load((ROOT / "manifests" / "examples" / example).read_text())
    crd = yaml.safe_load((ROOT / "manifests" / "crd.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    # A CRD's schema is OpenAPI 3.0's: its exclusiveMinimum is a boolean, as in draft 4.
    jsonschema.validate(fit, schema, cls=jsonschema.Draft4Validator)
    assert fit["spec"]["data"]["uri"].startswith("s3://") and fit["spec"]["output"]["uri"].startswith("s3://")
    original = yaml.safe_load((ROOT / "examples" / local).read_text())
    for key in ("shards", "sampler", "combine"):
        assert fit["spec"][key] == original["spec"][key]
    if "formula" in original["spec"]["model"]:
        assert fit["spec"]["model"] == original["spec"]["model"]
    assert fit["metadata"]["name"] == original["metadata"]["name"]
