"""Helpers of the end-to-end tests: install the chart, run the operator as its ServiceAccount, and
play the kubelet for runner pods (the executor).

The control plane itself is `scripts/cluster.py`. There is no kubelet: kwok marks pods bound to
its fake GPU nodes Running, and `Executor` runs each such pod's container, then writes the pod's
phase, exit code and termination message to the API server as a kubelet would (pods/status). It
runs the container in its image with podman (`PodmanLaunch`, what CI runs: the images `make images`
builds, the pod's security context and volumes, the host's network to reach the S3 endpoint on
loopback), or as a local process of the test environment's runner (`ProcessLaunch`, the fast path:
CONSENSUSFIT_E2E_PODS=process, or a machine without podman).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_script(filename: str):
    """A module of scripts/ (not a package), imported by path once: scripts/cluster.py, scripts/images.py."""
    import importlib.util

    name = f"consensusfit_script_{Path(filename).stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / filename)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


clusterlib = load_script("cluster.py")

CHART = ROOT / "charts" / "consensusfit"
FIT_LABEL = clusterlib.FIT_LABEL
STEP_LABEL = clusterlib.STEP_LABEL
INDEX_ANNOTATION = clusterlib.INDEX_ANNOTATION
GROUP, VERSION, PLURAL = "consensusfit.dev", "v1alpha1", "consensusfits"
RELEASE = "consensusfit"
OPERATOR_NAMESPACE = "consensusfit-system"
NAMESPACE = "e2e"  # where the test fits live (watched by the operator)
SCALE_FIT = "scale-2000"  # kwok completes this fit's pods as the runner would
REBORN_FIT = "reborn"  # and this one's: a fit deleted with its Jobs orphaned, then applied again
FIT_TEMPLATE = Path(__file__).resolve().parent / "e2e_fit.yaml"
# Where a kubelet mounts a pod's ServiceAccount token, CA and namespace.
SERVICE_ACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def render_fit(name: str, bucket: str, **spec) -> str:
    """The example manifest with its name and bucket filled in (and spec keys replaced)."""
    import yaml

    text = FIT_TEMPLATE.read_text().replace("${NAME}", name).replace("${BUCKET}", bucket)
    if not spec:
        return text
    manifest = yaml.safe_load(text)
    manifest["spec"].update(spec)
    return json.dumps(manifest)


def wait_for(check: Callable[[], object], timeout: float, what: str, every: float = 0.5):
    """Poll `check` until it returns something truthy; its value is returned."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except AssertionError:
            raise  # a check that failed for good (the operator died): no point in waiting
        except Exception as error:  # noqa: BLE001 - report the last one on timeout
            last_error = error
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}" +
                       (f" (last error: {last_error})" if last_error else ""))


# ------------------------------------------------------------------------------------------
# Installing the operator's cluster side
# ------------------------------------------------------------------------------------------

class Installation:
    """Where the operator's ServiceAccount lives and which environment its Deployment sets."""

    def __init__(self, namespace: str, service_account: str, env: dict[str, str], how: str):
        self.namespace, self.service_account, self.env, self.how = namespace, service_account, env, how


def install(cluster: clusterlib.Cluster, values: list[str] = (), chart: Path = CHART) -> Installation:
    """Install the Helm chart with the real helm (CRD, RBAC, operator Deployment).

    The Deployment's pod never runs (no image here): the operator runs as a local process with the
    chart's ServiceAccount token instead, and the environment the chart gives its container.
    """
    cluster.kubectl("create", "namespace", OPERATOR_NAMESPACE)
    cluster.helm("install", RELEASE, str(chart), "--namespace", OPERATOR_NAMESPACE, *_settings(values))
    return _installed(cluster, "helm chart")


def upgrade(cluster: clusterlib.Cluster, values: list[str] = (), chart: Path = CHART) -> Installation:
    """Upgrade the release as the README says: Helm never upgrades a chart's crds/, so the CRD first,
    applied server-side (taking its fields over from Helm's create), then `helm upgrade`."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(chart / "crds"))
    cluster.helm("upgrade", RELEASE, str(chart), "--namespace", OPERATOR_NAMESPACE, *_settings(values))
    return _installed(cluster, "helm upgrade")


def _settings(values: list[str]) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


def _installed(cluster: clusterlib.Cluster, how: str) -> Installation:
    """The operator's ServiceAccount and environment, as the installed Deployment sets them."""
    deployments = json.loads(cluster.kubectl(
        "get", "deployments", "-n", OPERATOR_NAMESPACE, "-o", "json").stdout)["items"]
    assert deployments, "the chart installed no Deployment"
    pod = deployments[0]["spec"]["template"]["spec"]
    env = {item["name"]: item["value"] for item in pod["containers"][0].get("env", []) if "value" in item}
    return Installation(OPERATOR_NAMESPACE, pod.get("serviceAccountName") or "default", env, how)


def can_i(cluster: clusterlib.Cluster, installation: Installation, verb: str, resource: str,
          namespace: str, subresource: str = "") -> bool:
    """`kubectl auth can-i` as the operator's ServiceAccount."""
    user = f"system:serviceaccount:{installation.namespace}:{installation.service_account}"
    args = ["auth", "can-i", verb, resource, "-n", namespace, f"--as={user}"]
    if subresource:
        args.append(f"--subresource={subresource}")
    return cluster.kubectl(*args, check=False).stdout.strip() == "yes"


# ------------------------------------------------------------------------------------------
# The operator, as a local process acting as the chart's ServiceAccount
# ------------------------------------------------------------------------------------------

class Operator:
    """The operator, logged in with a ServiceAccount token (RBAC applies): `python -m
    consensusfit.operator` with a kubeconfig, or, given `image`, the operator image run by podman
    as a kubelet would run the chart's pod (the token, ca.crt and namespace mounted at
    SERVICE_ACCOUNT_MOUNT, KUBERNETES_SERVICE_HOST/PORT naming the API server, uid 65532 on a
    read-only root, the host's network).

    Each start is a pod of its own: HOSTNAME `<name>-<start>`, the prefix of its identity in the
    Lease and in its requests' user agent (so the audit log tells replicas apart).
    """

    def __init__(self, cluster: clusterlib.Cluster, installation: Installation, workdir: Path,
                 resync_seconds: float = 1.0, name: str = "operator", image: str | None = None):
        self.cluster, self.installation, self.workdir = cluster, installation, Path(workdir)
        self.resync_seconds, self.name, self.image = resync_seconds, name, image
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.kubeconfig = cluster.token_kubeconfig(
            self.workdir / "operator.kubeconfig", installation.namespace, installation.service_account)
        self.user = f"system:serviceaccount:{installation.namespace}:{installation.service_account}"

    def start(self) -> Operator:
        self.metrics_port, self.readiness_port = clusterlib.free_port(), clusterlib.free_port()
        self.starts += 1
        self.hostname = f"{self.name}-{self.starts}"
        pod_env = {
            **self.installation.env,
            "HOSTNAME": self.hostname,
            "CONSENSUSFIT_RESYNC_SECONDS": str(self.resync_seconds),
            "CONSENSUSFIT_METRICS_PORT": str(self.metrics_port),
            "CONSENSUSFIT_LIVENESS_ENDPOINT": f"http://127.0.0.1:{clusterlib.free_port()}/healthz",
            "CONSENSUSFIT_READINESS_PORT": str(self.readiness_port),
        }
        self.log = self.workdir / f"{self.hostname}.log"
        with open(self.log, "wb") as log:
            if self.image:
                command, env = self._container(pod_env), load_script("images.py").podman_env()
            else:
                command = [sys.executable, "-m", "consensusfit.operator"]
                env = {**{k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "CONSENSUSFIT_"))},
                       **pod_env, "KUBECONFIG": str(self.kubeconfig)}
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        return self

    def _container(self, pod_env: dict[str, str]) -> list[str]:
        """`podman run` of the operator image as the chart's pod, its ServiceAccount's
        credentials mounted where the kubernetes client's in-cluster configuration reads them."""
        import yaml

        mount = self.workdir / f"{self.hostname}-serviceaccount"
        mount.mkdir()
        token = yaml.safe_load(self.kubeconfig.read_text())["users"][0]["user"]["token"]
        for name, text in (("token", token), ("ca.crt", Path(self.cluster.ca).read_text()),
                           ("namespace", self.installation.namespace)):
            (mount / name).write_text(text)
            (mount / name).chmod(0o644)
        host, port = self.cluster.server.removeprefix("https://").rsplit(":", 1)
        env = {**pod_env, "KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port}
        return ["podman", "run", "--rm", "--pull=never", "--network=host", "--passwd=false",
                f"--name={self.container_name}", "--read-only", "--read-only-tmpfs=false", "--tmpfs=/tmp",
                "--cap-drop=ALL", "--security-opt=no-new-privileges", "-v", f"{mount}:{SERVICE_ACCOUNT_MOUNT}:ro",
                *(arg for name, value in env.items() for arg in ("-e", f"{name}={value}")), self.image]

    @property
    def container_name(self) -> str:
        return f"e2e-{os.getpid()}-{self.workdir.name}-{self.hostname}"

    def _signal(self, number: signal.Signals) -> None:
        """The signal to the operator itself: to its container through podman, whose client a
        SIGKILL would leave the container running without."""
        if self.image:
            subprocess.run(["podman", "kill", f"--signal={number.name}", self.container_name],
                           env=load_script("images.py").podman_env(), capture_output=True)
        else:
            self.process.send_signal(number)

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as when a node dies."""
        if self.process and self.process.poll() is None:
            self._signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def holds(self, holder: str | None) -> bool:
        """Whether a Lease's holderIdentity is this start's."""
        return (holder or "").startswith(f"{self.hostname}_")

    def made(self, audit_event: dict) -> bool:
        """Whether this start sent the request (its user agent names its identity)."""
        return f"({self.hostname}_" in audit_event.get("userAgent", "")

    def ready(self) -> bool:
        """What the chart's readiness probe asks (GET /readyz)."""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.readiness_port}/readyz", timeout=5) as answer:
                return answer.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def metric(self, name: str) -> float | None:
        """One unlabelled series from its /metrics, or None."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        return next((sample.value for family in text_string_to_metric_families(text)
                     for sample in family.samples if sample.name == name and not sample.labels), None)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


# ------------------------------------------------------------------------------------------
# The executor: runs bound runner pods as local processes and reports like a kubelet
# ------------------------------------------------------------------------------------------

class Executor:
    """Runs every Running pod of the fits in `fits` once, with `launch` (a ProcessLaunch or a
    PodmanLaunch), and reports its end to the API server as a kubelet would.

    `hooks[fit](pod) -> dict | None` may return environment overrides for one run (to make a pod
    fail as the runner would) and may do other things first (corrupt a shard's data).
    """

    def __init__(self, kubeconfig: Path, namespace: str, workdir: Path, launch: ProcessLaunch | PodmanLaunch):
        from kubernetes import client, config

        self.api = client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
        self.namespace, self.workdir, self.launch = namespace, Path(workdir), launch
        self.fits: set[str] = set()
        self.hooks: dict[str, Callable[[dict], dict | None]] = {}
        self.runs: list[dict] = []  # one entry per pod run: fit, step, index, exit code, message
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._workers: list[threading.Thread] = []
        self.errors: list[str] = []

    def start(self) -> Executor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for worker in self._workers:
            worker.join(timeout=60)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                fits = sorted(self.fits)
                if fits:
                    selector = f"{FIT_LABEL} in ({','.join(fits)})"
                    pods = self.api.list_namespaced_pod(self.namespace, label_selector=selector).to_dict()
                    for pod in pods["items"]:
                        self._maybe_run(pod)
            except Exception as error:  # noqa: BLE001 - keep playing kubelet; tests see errors
                self.errors.append(repr(error))
            self._stop.wait(0.3)

    def _maybe_run(self, pod: dict) -> None:
        metadata, status = pod["metadata"], pod.get("status") or {}
        if metadata["uid"] in self._seen or metadata.get("deletion_timestamp"):
            return
        if status.get("phase") != "Running" or not pod["spec"].get("node_name"):
            return
        self._seen.add(metadata["uid"])
        worker = threading.Thread(target=self._run, args=(pod,), daemon=True)
        self._workers.append(worker)
        worker.start()

    def _pod_env(self, pod: dict, container: dict) -> dict[str, str]:
        """The container's environment as the kubelet builds it: envFrom, then env (values and
        the downward API's fieldRefs)."""
        env: dict[str, str] = {}
        for source in container.get("env_from") or []:
            prefix = source.get("prefix") or ""
            if source.get("secret_ref"):
                secret = self.api.read_namespaced_secret(source["secret_ref"]["name"], self.namespace)
                env.update({prefix + k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()})
            if source.get("config_map_ref"):
                config = self.api.read_namespaced_config_map(source["config_map_ref"]["name"], self.namespace)
                env.update({prefix + k: v for k, v in (config.data or {}).items()})
        for item in container.get("env") or []:
            if item.get("value") is not None:
                env[item["name"]] = item["value"]
            elif (item.get("value_from") or {}).get("field_ref"):
                path = item["value_from"]["field_ref"]["field_path"]
                env[item["name"]] = _field(pod["metadata"], path)
        return env

    def _run(self, pod: dict) -> None:
        metadata = pod["metadata"]
        labels, annotations = metadata.get("labels") or {}, metadata.get("annotations") or {}
        fit, step = labels.get(FIT_LABEL, ""), labels.get(STEP_LABEL, "")
        index = annotations.get(INDEX_ANNOTATION)
        container = next(c for c in pod["spec"]["containers"] if c["name"] == "runner")
        env = self._pod_env(pod, container)
        hook = self.hooks.get(fit)
        overrides = hook(pod) if hook else None
        env.update(overrides or {})
        started = now()
        scratch = Path(tempfile.mkdtemp(prefix=f"{metadata['name']}-", dir=self.workdir))
        exit_code, message, output = self.launch(pod, container, env, scratch)
        if not message and exit_code != 0:
            # terminationMessagePolicy: FallbackToLogsOnError: the log's tail stands in.
            message = output[-2048:]
        record = {"fit": fit, "step": step, "index": index, "pod": metadata["name"], "exit": exit_code,
                  "message": message, "stderr": output[-3000:], "env": overrides or {}}
        with self._lock:
            self.runs.append(record)
        terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                      "message": message, "startedAt": started, "finishedAt": now()}
        body = {"status": {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted"},
                           {"type": "ContainersReady", "status": "False", "reason": "PodCompleted"}],
            "containerStatuses": [{"name": "runner", "image": container["image"], "ready": False,
                                   "restartCount": 0, "state": {"terminated": terminated}}],
        }}
        try:
            self.api.patch_namespaced_pod_status(metadata["name"], self.namespace, body)
        except Exception as error:  # noqa: BLE001
            self.errors.append(f"patching {metadata['name']}: {error!r}")


class ProcessLaunch:
    """The fast path: the pod's command as a local process of the test environment's runner, with
    the pod's environment and a scratch folder for HOME, TMPDIR and the caches."""

    how = "local processes"
    values: list[str] = []  # the chart's runner image is never pulled
    operator_image = None  # the operator runs as a local process too

    def __init__(self, runner: str):
        self.runner = runner

    def __call__(self, pod: dict, container: dict, env: dict[str, str], scratch: Path) -> tuple[int, str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(scratch), "TMPDIR": str(scratch), "XDG_CACHE_HOME": str(scratch / ".cache"),
            "JAX_PLATFORMS": "cpu", **env,
        }
        termination = scratch / "termination-log"
        termination.write_text("")  # the runner writes it only if it exists, as /dev/termination-log
        command = list(container["command"]) + list(container.get("args") or [])
        assert command[0] == "consensusfit-runner", command
        command = [self.runner, "--termination-log", str(termination), *command[1:]]
        result = subprocess.run(command, env=env, cwd=scratch, capture_output=True, text=True)
        return result.returncode, termination.read_text(), result.stdout + result.stderr


class PodmanLaunch:
    """The image path: the pod's container run by podman as a kubelet would run it (its image,
    command and args, environment only, securityContext, emptyDir volumes as host folders, the
    termination message file at its terminationMessagePath), on the host's network so that it
    reaches the loopback S3 endpoint."""

    how = "containers (podman)"

    def __init__(self, images_module):
        self.images = images_module
        # The chart's values that name the CPU runner image `make images` builds.
        self.values = [f"runner.image.tag={images_module.cpu_tag()}"]
        wanted = os.environ.get(OPERATOR_VARIABLE, "image")
        if wanted not in ("image", "process"):
            raise ValueError(f"{OPERATOR_VARIABLE} must be image or process, not {wanted!r}")
        self.operator_image = images_module.operator_reference() if wanted == "image" else None

    def __call__(self, pod: dict, container: dict, env: dict[str, str], scratch: Path) -> tuple[int, str, str]:
        user = run_as(pod, container) or self._image_user(container["image"])
        if non_root_required(pod, container) and user.split(":")[0] in ("", "0", "root"):
            return 1, "", f"container's runAsUser breaks non-root policy (user {user!r})"
        termination = scratch / "termination-log"
        termination.write_text("")
        termination.chmod(0o666)
        args = podman_run_args(pod, container, env, user, scratch, termination)
        result = subprocess.run(args, env=self.images.podman_env(), capture_output=True, text=True)
        return result.returncode, termination.read_text(), result.stdout + result.stderr

    def _image_user(self, image: str) -> str:
        inspect = subprocess.run(["podman", "image", "inspect", "--format", "{{.Config.User}}", image],
                                 env=self.images.podman_env(), capture_output=True, text=True)
        return inspect.stdout.strip()


def _security(pod: dict, container: dict) -> tuple[dict, dict]:
    return (pod["spec"].get("security_context") or {}), (container.get("security_context") or {})


def run_as(pod: dict, container: dict) -> str:
    """`uid[:gid]` from runAsUser/runAsGroup, the container's over the pod's; empty: the image's."""
    pod_context, own = _security(pod, container)
    uid = own.get("run_as_user", pod_context.get("run_as_user"))
    gid = own.get("run_as_group", pod_context.get("run_as_group"))
    return "" if uid is None else f"{uid}:{gid}" if gid is not None else str(uid)


def non_root_required(pod: dict, container: dict) -> bool:
    pod_context, own = _security(pod, container)
    return bool(own.get("run_as_non_root", pod_context.get("run_as_non_root")))


def podman_run_args(pod: dict, container: dict, env: dict[str, str], user: str, scratch: Path,
                    termination: Path) -> list[str]:
    """`podman run` for one container: what a kubelet would give it, and no more."""
    _, own = _security(pod, container)
    capabilities = own.get("capabilities") or {}
    # --passwd=false: no /etc/passwd entry for the user, which a kubelet would not add either.
    args = ["podman", "run", "--rm", "--pull=never", "--network=host", "--passwd=false",
            f"--name=pod-{pod['metadata']['uid']}"]
    if user:
        args.append(f"--user={user}")
    if own.get("read_only_root_filesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]
    if own.get("allow_privilege_escalation") is False:
        args.append("--security-opt=no-new-privileges")
    args += [f"--cap-drop={cap}" for cap in capabilities.get("drop") or []]
    args += [f"--cap-add={cap}" for cap in capabilities.get("add") or []]
    args += [arg for mount in _volume_mounts(pod, container, scratch) for arg in ("-v", mount)]
    args += ["-v", f"{termination}:{container.get('termination_message_path') or '/dev/termination-log'}"]
    args += [arg for name, value in env.items() for arg in ("-e", f"{name}={value}")]
    if container.get("working_dir"):
        args.append(f"--workdir={container['working_dir']}")
    command, rest = list(container.get("command") or []), list(container.get("args") or [])
    if command:
        args.append(f"--entrypoint={command[0]}")
    return [*args, container["image"], *command[1:], *rest]


def _volume_mounts(pod: dict, container: dict, scratch: Path) -> list[str]:
    """Each volumeMount as `host:path[:ro]`: an emptyDir is a fresh folder the pod's user may
    write; another volume type is not something this kubelet provides (it says so)."""
    volumes = {volume["name"]: volume for volume in pod["spec"].get("volumes") or []}
    mounts = []
    for mount in container.get("volume_mounts") or []:
        volume = volumes[mount["name"]]
        if volume.get("empty_dir") is None:
            raise NotImplementedError(f"volume {mount['name']}: only emptyDir volumes are run here")
        folder = scratch / "volumes" / mount["name"]
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o777)
        mounts.append(f"{folder}:{mount['mount_path']}" + (":ro" if mount.get("read_only") else ""))
    return mounts


def _field(metadata: dict, path: str) -> str:
    """The downward API's fieldRef for the few paths a Job's pod uses."""
    if path.startswith("metadata.annotations['"):
        return (metadata.get("annotations") or {}).get(path.split("'")[1], "")
    if path.startswith("metadata.labels['"):
        return (metadata.get("labels") or {}).get(path.split("'")[1], "")
    return {"metadata.name": metadata["name"], "metadata.namespace": metadata["namespace"],
            "metadata.uid": metadata["uid"]}.get(path, "")


def runner_executable() -> str:
    found = Path(sys.executable).parent / "consensusfit-runner"
    return str(found) if found.exists() else (shutil.which("consensusfit-runner") or "consensusfit-runner")


# How the executor runs pods: `image` (the CI path, podman and `make images`) or `process` (fast,
# the test environment's runner). Unset: image where podman and the images are there.
PODS_VARIABLE = "CONSENSUSFIT_E2E_PODS"
# With the image path, `image` (the default) runs the operator from its image too (podman,
# in-cluster configuration); `process` runs it as a local process.
OPERATOR_VARIABLE = "CONSENSUSFIT_E2E_OPERATOR"


def pod_launch() -> tuple[ProcessLaunch | PodmanLaunch, str | None]:
    """The executor's way of running pods, and why it is not the image path (None when it is).
    Asking for images (`image` in either variable) where they cannot run is an error, not a fallback."""
    choice = os.environ.get(PODS_VARIABLE, "")
    if choice not in ("", "image", "process"):
        raise ValueError(f"{PODS_VARIABLE} must be image or process, not {choice!r}")
    images = load_script("images.py")
    why = f"{PODS_VARIABLE}=process" if choice == "process" else images.unavailable()
    if why and "image" in (choice, os.environ.get(OPERATOR_VARIABLE)):
        raise RuntimeError(f"{PODS_VARIABLE}={choice} {OPERATOR_VARIABLE}={os.environ.get(OPERATOR_VARIABLE)}, but {why}")
    return (ProcessLaunch(runner_executable()), why) if why else (PodmanLaunch(images), None)


# ------------------------------------------------------------------------------------------
# Control-plane cost of a many-shard fit (the scale test and benchmarks/control_plane.py)
# ------------------------------------------------------------------------------------------

def scale_manifest(name: str, shards: int, bucket: str) -> dict:
    """A fit whose pods kwok completes as the runner would (the cluster's `complete_fits`)."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ConsensusFit",
        "metadata": {"name": name},
        "spec": {
            "data": {"uri": f"{bucket}/scale-data/", "groupColumn": "g"},
            "shards": shards,
            "model": {"formula": "y ~ 1 + (1 | g)"},
            # One-shot: kwok completes the steps of a one-shot fit (scripts/cluster.py).
            "combine": {"method": "consensus"},
            "output": {"uri": f"{bucket}/fits/"},
        },
    }


def seed_shard_outputs(root: str, shards: int, threads: int = 16) -> None:
    """What the sample pods would have left under ROOT (docs/contract.md): per shard
    diagnostics.json and, last, _SUCCESS.json. The operator reads none of it; it is there so the
    object store looks as it would after a real run of this size."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    bucket, _, prefix = root.removeprefix("s3://").partition("/")
    s3 = boto3.client("s3")

    def seed(k: int) -> None:
        base = f"{prefix}shards/{k}/"
        s3.put_object(Bucket=bucket, Key=base + "diagnostics.json",
                      Body=json.dumps({"shard": k, "shards": shards, "rows": 50, "groups": 2}).encode())
        s3.put_object(Bucket=bucket, Key=base + "_SUCCESS.json",
                      Body=json.dumps({"fingerprint": "seeded", "files": {}, "finished": now()}).encode())

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(seed, range(shards)))


def measure_many_shards(cluster: clusterlib.Cluster, operator: Operator, namespace: str, name: str,
                        shards: int, bucket: str, timeout: float = 900, seed: bool = True) -> dict:
    """Apply a `shards`-shard fit whose pods kwok completes; time its phases from the apply and
    count the operator's API requests (from the audit log) while it ran."""
    from kubernetes import client, config

    custom = client.CustomObjectsApi(config.new_client_from_config(config_file=str(cluster.kubeconfig)))
    started_wall = datetime.now(UTC)
    started = time.monotonic()
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(scale_manifest(name, shards, bucket)))
    fit = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    seeding = None
    if seed:
        root = f"{bucket}/fits/{namespace}/{name}/{fit['metadata']['uid']}/"
        seeding = threading.Thread(target=seed_shard_outputs, args=(root, shards), daemon=True)
        seeding.start()
    reached: dict[str, float] = {}
    deadline = started + timeout
    while time.monotonic() < deadline:
        status = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name).get("status") or {}
        phase = status.get("phase")
        if phase and phase not in reached:
            reached[phase] = round(time.monotonic() - started, 2)
        if phase in ("Succeeded", "Failed"):
            break
        if not operator.alive():
            raise RuntimeError(f"the operator exited:\n{operator.log_tail()}")
        time.sleep(0.2)
    else:
        raise TimeoutError(f"fit {name} did not finish in {timeout} s; reached {reached}; status {status}")
    finished_wall = datetime.now(UTC)
    time.sleep(2 * operator.resync_seconds)  # requests in flight at the end are part of the cost
    if seeding:
        seeding.join()
    window = [e for e in cluster.audit_events()
              if e["user"]["username"] == operator.user
              and started_wall.isoformat() <= _audit_time(e) <= finished_wall.isoformat()]
    by_kind: dict[str, int] = {}
    for event in window:
        ref = event.get("objectRef") or {}
        key = f"{event['verb']} {ref.get('resource', event.get('requestURI', '?'))}"
        if ref.get("subresource"):
            key += "/" + ref["subresource"]
        by_kind[key] = by_kind.get(key, 0) + 1
    return {
        "shards": shards,
        "phase": phase,
        "seconds_to_phase": reached,
        "seconds_apply_to_combining": reached.get("Combining"),
        "operator_requests": len(window),
        "operator_requests_per_shard": round(len(window) / shards, 4),
        "operator_requests_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "status_shards": status.get("shards"),
        "resync_seconds": operator.resync_seconds,
    }


def _audit_time(event: dict) -> str:
    """The audit event's receive time in the same ISO form as datetime.isoformat() in UTC."""
    stamp = event.get("requestReceivedTimestamp") or event.get("stageTimestamp") or ""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone(UTC).isoformat()
