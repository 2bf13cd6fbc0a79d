#!/usr/bin/env python3
"""A real Kubernetes control plane on loopback for the end-to-end tests (issue 8).

    python scripts/cluster.py build      # build the binaries once (cached; seconds when cached)
    python scripts/cluster.py up [DIR]   # start a cluster, print the kubeconfig path, Ctrl-C stops it

Build: one wrapper Go module requires `k8s.io/kubernetes` and replaces every staging module
(`k8s.io/api`, `k8s.io/client-go`, ...) with the published `v0.Y.Z` of the same release (`go install`
refuses modules with replace directives, kubernetes/kubernetes#79384), and also requires kwok;
then ONE `go build` makes etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
kubectl and kwok, so their shared packages compile once. helm comes from `scripts/tools.sh` (the
chart's tooling, same cache folder), which this script asks for it. The binaries land in
`${XDG_CACHE_HOME:-~/.cache}/consensusfit/bin/` with a stamp of the versions; a later build with the
same versions returns at once.

Start (`Cluster`): etcd, kube-apiserver (client-certificate auth, RBAC, service-account tokens,
OwnerReferencesPermissionEnforcement, an audit log of every ServiceAccount's requests),
kube-controller-manager (Job controller, garbage collector, service-account token controller, ...),
kube-scheduler and kwok (fake nodes with `nvidia.com/gpu` capacity; pods bound to them become
Running and stay so, except the pods of the fits named in `complete_fits`, which kwok completes
with the termination message the runner would write). All on 127.0.0.1, in a work folder holding certificates, logs and the admin kubeconfig. Starting needs the
`cryptography` package (in the test environment) for the certificates; building needs only Go.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# Pinned versions. kwok v0.8.0 is built against the k8s.io v0.36 libraries, so it shares one module
# graph with Kubernetes v1.36.3 (which pins etcd v3.6.8).
KUBERNETES = "v1.36.3"
STAGING = "v0.36.3"
KWOK = "v0.8.0"
ETCD = "v3.6.8"
TOOLS_SH = Path(__file__).resolve().parent / "tools.sh"
STAGING_MODULES = (
    "api apiextensions-apiserver apimachinery apiserver cli-runtime client-go cloud-provider "
    "cluster-bootstrap code-generator component-base component-helpers controller-manager cri-api "
    "cri-client cri-streaming csi-translation-lib dynamic-resource-allocation endpointslice "
    "externaljwt kms kube-aggregator kube-controller-manager kube-proxy kube-scheduler kubectl "
    "kubelet metrics mount-utils pod-security-admission sample-apiserver sample-cli-plugin "
    "sample-controller streaming"
).split()
PACKAGES = {
    "etcd": "go.etcd.io/etcd/server/v3",
    "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
    "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
    "kube-scheduler": "k8s.io/kubernetes/cmd/kube-scheduler",
    "kubectl": "k8s.io/kubernetes/cmd/kubectl",
    "kwok": "sigs.k8s.io/kwok/cmd/kwok",
}
# go build names a binary after its package path, without a major-version suffix: etcd's `server/v3` -> server.
_BUILT_NAME = {"etcd": "server"}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "consensusfit"


def bin_dir() -> Path:
    return cache_dir() / "bin"


def _stamp() -> dict:
    return {"kubernetes": KUBERNETES, "staging": STAGING, "kwok": KWOK, "etcd": ETCD}


def missing_go() -> str | None:
    """Why the tools cannot be built here, or None."""
    if shutil.which("go") is None:
        return "the Go toolchain (`go`) is not installed: the e2e tests need it to build Kubernetes"
    return None


def built() -> bool:
    stamp = bin_dir() / ".cluster-tools.json"
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return recorded == _stamp() and all((bin_dir() / name).is_file() for name in PACKAGES)


def _go_mod() -> str:
    lines = [
        "module consensusfit.dev/clustertools",
        "",
        "go 1.26.0",
        "",
        "require (",
        f"\tk8s.io/kubernetes {KUBERNETES}",
        f"\tsigs.k8s.io/kwok {KWOK}",
        f"\tgo.etcd.io/etcd/server/v3 {ETCD}",
        ")",
        "",
        "replace (",
        *(f"\tk8s.io/{name} => k8s.io/{name} {STAGING}" for name in STAGING_MODULES),
        ")",
        "",
    ]
    return "\n".join(lines)


def _ldflags() -> str:
    """Strip symbols; stamp the Kubernetes version (the API server reports it; helm checks charts' kubeVersion)."""
    major, minor, _ = KUBERNETES.lstrip("v").split(".")
    flags = ["-s", "-w"]
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {package}.gitVersion={KUBERNETES}",
            f"-X {package}.gitMajor={major}",
            f"-X {package}.gitMinor={minor}",
            f"-X {package}.gitTreeState=clean",
        ]
    return " ".join(flags)


def helm_path() -> str | None:
    """The helm that scripts/tools.sh built (or None)."""
    found = subprocess.run(["bash", str(TOOLS_SH), "path", "helm"], capture_output=True, text=True)
    return found.stdout.strip() or None if found.returncode == 0 else None


def build(verbose: bool = True) -> Path:
    """Build every binary into bin_dir() unless the cached ones match the pinned versions; and helm."""
    if helm_path() is None and shutil.which("go"):
        subprocess.run(["bash", str(TOOLS_SH), "install", "helm"], check=False)
    if built():
        return bin_dir()
    why = missing_go()
    if why:
        raise RuntimeError(why)
    started = time.monotonic()
    module = cache_dir() / "clustertools"
    module.mkdir(parents=True, exist_ok=True)
    (module / "go.mod").write_text(_go_mod())
    out = cache_dir() / "bin.partial"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "GOFLAGS": "-trimpath -mod=mod", "CGO_ENABLED": "0"}
    command = ["go", "build", "-ldflags", _ldflags(), "-o", str(out) + "/", *PACKAGES.values()]
    if verbose:
        print(f"building {', '.join(PACKAGES)} (Kubernetes {KUBERNETES}) into {bin_dir()}; "
              "the first build takes a while", file=sys.stderr, flush=True)
    subprocess.run(command, cwd=module, env=env, check=True)
    for name in PACKAGES:
        (out / _BUILT_NAME.get(name, name)).rename(out / (name + ".new"))
    target = bin_dir()
    target.mkdir(parents=True, exist_ok=True)
    for name in PACKAGES:
        os.replace(out / (name + ".new"), target / name)
    shutil.rmtree(out, ignore_errors=True)
    (target / ".cluster-tools.json").write_text(json.dumps(_stamp()))
    if verbose:
        print(f"built in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return target


# --------------------------------------------------------------------------------------------
# Starting a cluster
# --------------------------------------------------------------------------------------------

SERVICE_CIDR = "10.96.0.0/24"
SERVICE_IP = "10.96.0.1"  # the first address of the range: the `kubernetes` Service
# Which kube-controller-manager controllers run: the defaults (Job, garbage collector, service
# accounts and their tokens, node lifecycle: it lifts the not-ready taint once kwok reports a node
# Ready, and watches the node leases kwok renews).
CONTROLLERS = "*"
FIT_LABEL = "consensusfit.dev/fit"
STEP_LABEL = "consensusfit.dev/step"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _Certificates:
    """A CA, the API server's serving certificate, client certificates and the service-account keys."""

    def __init__(self, folder: Path):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from cryptography.x509.oid import NameOID

        self._x509, self._hashes, self._ser, self._ec, self._oid = x509, hashes, serialization, ec, NameOID
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "consensusfit-e2e-ca")])
        now = self._now()
        self.ca_cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self.ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + _days(3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca = self._write("ca.crt", self.ca_cert.public_bytes(serialization.Encoding.PEM))
        # Service-account token signing: RSA, as the API server and controller-manager expect.
        sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.sa_key = self._write("sa.key", sa.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        self.sa_pub = self._write("sa.pub", sa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    @staticmethod
    def _now():
        from datetime import UTC, datetime, timedelta

        return datetime.now(UTC) - timedelta(minutes=5)

    def _write(self, name: str, data: bytes) -> Path:
        path = self.folder / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    def issue(self, name: str, common_name: str, organizations=(), server: bool = False) -> tuple[Path, Path]:
        """A key and certificate signed by the CA: a client identity, or the API server's serving one."""
        import ipaddress

        x509, NameOID = self._x509, self._oid
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        attributes += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
        now = self._now()
        builder = (
            x509.CertificateBuilder().subject_name(x509.Name(attributes))
            .issuer_name(self.ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + _days(365))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server:
            names = [x509.DNSName(n) for n in ("localhost", "kubernetes", "kubernetes.default",
                                               "kubernetes.default.svc", "kubernetes.default.svc.cluster.local")]
            names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", SERVICE_IP)]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
            usage = [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
        else:
            usage = [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        cert = builder.sign(self.ca_key, self._hashes.SHA256())
        ser = self._ser
        key_path = self._write(f"{name}.key", key.private_bytes(
            ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
        cert_path = self._write(f"{name}.crt", cert.public_bytes(ser.Encoding.PEM))
        return cert_path, key_path


def _days(n: int):
    from datetime import timedelta

    return timedelta(days=n)


def write_kubeconfig(path: Path, server: str, ca: Path, *, cert: Path | None = None,
                     key: Path | None = None, token: str | None = None, namespace: str = "default") -> Path:
    """A kubeconfig with one cluster, one user (client certificate or bearer token) and one context."""
    import base64

    def data(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    user = {"token": token} if token else {"client-certificate-data": data(cert), "client-key-data": data(key)}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {"server": server, "certificate-authority-data": data(ca)}}],
        "users": [{"name": "e2e", "user": user}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "e2e", "namespace": namespace}}],
        "current-context": "e2e",
    }
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML: no yaml dependency needed
    path.chmod(0o600)
    return path


def _kwok_stages(complete_fits: tuple[str, ...]) -> str:
    """kwok's configuration: which nodes it manages and how their pods move.

    Pods bound to a kwok node become Running and stay Running (the test's executor finishes
    them), except pods of the fits named in `complete_fits`: kwok completes those at once with the
    termination message the runner would have written for their step (docs/contract.md).
    Deleted pods are removed (there is no kubelet to do it).
    """
    stages = """
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokConfiguration
options:
  manageAllNodes: false
  manageNodesWithAnnotationSelector: kwok.x-k8s.io/node=fake
  nodeLeaseDurationSeconds: 40
  nodeLeaseParallelism: 4
  podPlayStageParallelism: 16
  nodePlayStageParallelism: 4
  enableCRDs: []
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata: {name: node-ready}
spec:
  resourceRef: {apiGroup: v1, kind: Node}
  selector:
    matchExpressions:
    - {key: '.status.conditions.[] | select( .type == "Ready" ) | .status', operator: NotIn, values: ["True"]}
  next:
    statusTemplate: |
      {{ $now := Now }}
      conditions:
      - {type: Ready, status: "True", reason: KubeletReady, message: "kwok node", lastHeartbeatTime: {{ $now | Quote }}, lastTransitionTime: {{ $now | Quote }}}
      addresses:
      - {type: InternalIP, address: {{ NodeIP | Quote }}}
      - {type: Hostname, address: {{ NodeName | Quote }}}
      allocatable:
      {{ YAML .status.allocatable 1 }}
      capacity:
      {{ YAML .status.capacity 1 }}
      nodeInfo: {architecture: amd64, operatingSystem: linux, kubeletVersion: kwok, containerRuntimeVersion: kwok}
      phase: Running
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata: {name: pod-running}
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - {key: .metadata.deletionTimestamp, operator: DoesNotExist}
    - {key: .status.phase, operator: In, values: [Pending]}
  next:
    statusTemplate: |
      {{ $now := Now }}
      conditions:
      - {type: Initialized, status: "True", lastTransitionTime: {{ $now | Quote }}}
      - {type: Ready, status: "True", lastTransitionTime: {{ $now | Quote }}}
      - {type: ContainersReady, status: "True", lastTransitionTime: {{ $now | Quote }}}
      containerStatuses:
      {{ range .spec.containers }}
      - name: {{ .name | Quote }}
        image: {{ .image | Quote }}
        ready: true
        restartCount: 0
        state: {running: {startedAt: {{ $now | Quote }}}}
      {{ end }}
      hostIP: {{ NodeIPWith .spec.nodeName | Quote }}
      podIP: {{ PodIPWith .spec.nodeName false .metadata.uid .metadata.name .metadata.namespace | Quote }}
      phase: Running
      startTime: {{ $now | Quote }}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata: {name: pod-delete}
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - {key: .metadata.deletionTimestamp, operator: Exists}
  next:
    finalizers: {empty: true}
    delete: true
"""
    if complete_fits:
        values = json.dumps(list(complete_fits))
        stages += f"""---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata: {{name: pod-complete-as-runner}}
spec:
  resourceRef: {{apiGroup: v1, kind: Pod}}
  selector:
    matchExpressions:
    - {{key: .metadata.deletionTimestamp, operator: DoesNotExist}}
    - {{key: .status.phase, operator: In, values: [Running]}}
    - {{key: '.metadata.labels["{FIT_LABEL}"]', operator: In, values: {values}}}
  next:
    statusTemplate: |
      {{{{ $now := Now }}}}
      {{{{ $step := index .metadata.labels "{STEP_LABEL}" }}}}
      {{{{ $message := `{{"ok":true,"rows":100000,"groups":4000}}` }}}}
      {{{{ if eq $step "sample" }}}}
      {{{{ $message = printf `{{"ok":true,"shard":%s,"rhatMax":1.004,"essBulkMin":812.5,"divergences":0,"seconds":61.0}}` (index .metadata.annotations "{INDEX_ANNOTATION}") }}}}
      {{{{ else if eq $step "globals" }}}}
      {{{{ $message = `{{"ok":true,"stage":"globals","uri":"s3://seeded/combined/draws.parquet","draws":4000,"warnings":0}}` }}}}
      {{{{ else if eq $step "resample" }}}}
      {{{{ $message = printf `{{"ok":true,"shard":%s,"seconds":12.0,"acceptProb":0.9}}` (index .metadata.annotations "{INDEX_ANNOTATION}") }}}}
      {{{{ else if eq $step "combine" }}}}
      {{{{ $message = `{{"ok":true,"uri":"s3://seeded/combined/","parameters":{{"mu":{{"mean":1.0,"sd":0.1,"q05":0.8,"q50":1.0,"q95":1.2}}}}}}` }}}}
      {{{{ end }}}}
      containerStatuses:
      {{{{ range .spec.containers }}}}
      - name: {{{{ .name | Quote }}}}
        image: {{{{ .image | Quote }}}}
        ready: false
        restartCount: 0
        state:
          terminated:
            exitCode: 0
            reason: Completed
            message: {{{{ $message | Quote }}}}
            startedAt: {{{{ $now | Quote }}}}
            finishedAt: {{{{ $now | Quote }}}}
      {{{{ end }}}}
      phase: Succeeded
"""
    return stages


AUDIT_POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: None
  userGroups: ["system:nodes", "system:masters"]
- level: None
  resources: [{group: coordination.k8s.io, resources: [leases]}]
- level: Metadata
  userGroups: ["system:serviceaccounts"]
- level: None
"""


def kwok_node(name: str, *, cpu: int, memory_gi: int, pods: int, gpus: int = 0,
              labels: dict[str, str] | None = None, taints: tuple[dict, ...] = ()) -> dict:
    """A fake node kwok keeps Ready: a GPU node (`gpus` > 0: `nvidia.com/gpu` capacity and the GPU
    feature discovery's label) or a CPU-only one, with further `labels` and `taints` (e.g. the
    `nvidia.com/gpu` NoSchedule taint GPU node pools usually carry)."""
    capacity = {"cpu": str(cpu), "memory": f"{memory_gi}Gi", "pods": str(pods)}
    node_labels = {"kubernetes.io/hostname": name, "type": "kwok", **(labels or {})}
    if gpus:
        capacity["nvidia.com/gpu"] = str(gpus)
        node_labels["nvidia.com/gpu.present"] = "true"
    node = {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake"}, "labels": node_labels},
        "status": {"capacity": capacity, "allocatable": capacity},
    }
    if taints:
        node["spec"] = {"taints": list(taints)}
    return node


class Cluster:
    """etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok on 127.0.0.1.

    `complete_fits`: names of fits whose pods kwok completes as the runner would (scale tests);
    every other pod stays Running until someone else (the test's executor) finishes it.
    `gpu_nodes` fake nodes, each with `gpus_per_node` `nvidia.com/gpu`, untainted; `add_nodes` adds
    others (CPU-only nodes, tainted GPU nodes).
    The audit log (`audit_log`) records every request of service accounts (the operator, the
    controllers) at Metadata level, one JSON object per line.
    """

    def __init__(self, workdir: Path, *, complete_fits: tuple[str, ...] = (), gpu_nodes: int = 4,
                 gpus_per_node: int = 512, bin: Path | None = None):
        self.workdir = Path(workdir)
        self.bin = Path(bin) if bin else bin_dir()
        self.complete_fits = tuple(complete_fits)
        self.gpu_nodes, self.gpus_per_node = gpu_nodes, gpus_per_node
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        self.audit_log = self.workdir / "logs" / "audit.log"
        self.server = ""

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> Cluster:
        deadline = time.monotonic() + timeout
        try:
            self._start(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, deadline: float) -> None:
        work = self.workdir
        (work / "logs").mkdir(parents=True, exist_ok=True)
        certs = _Certificates(work / "pki")
        serving = certs.issue("apiserver", "kube-apiserver", server=True)
        admin = certs.issue("admin", "consensusfit-e2e-admin", ["system:masters"])
        kcm = certs.issue("controller-manager", "system:kube-controller-manager")
        scheduler = certs.issue("scheduler", "system:kube-scheduler")
        kwok = certs.issue("kwok", "kwok", ["system:masters"])
        self.ca = certs.ca

        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        self.server = f"https://127.0.0.1:{api_port}"
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self._spawn("etcd", [
            "--name=e2e", f"--data-dir={work / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster=e2e=http://127.0.0.1:{peer_port}",
            "--unsafe-no-fsync", "--log-level=warn", "--quota-backend-bytes=4294967296",
        ])
        self._wait(lambda: _http_ok(f"{etcd_url}/health"), deadline, "etcd")

        (work / "audit-policy.yaml").write_text(AUDIT_POLICY)
        self._spawn("kube-apiserver", [
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={api_port}",
            f"--tls-cert-file={serving[0]}", f"--tls-private-key-file={serving[1]}",
            f"--client-ca-file={certs.ca}",
            f"--service-account-key-file={certs.sa_pub}",
            f"--service-account-signing-key-file={certs.sa_key}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            # Beyond the defaults: setting blockOwnerDeletion on a child needs permission to
            # update the owner's finalizers (as on OpenShift), so the chart's RBAC must say so.
            "--enable-admission-plugins=NodeRestriction,OwnerReferencesPermissionEnforcement",
            f"--audit-policy-file={work / 'audit-policy.yaml'}", f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json", "--audit-log-mode=blocking",
            "--allow-privileged=true", "--profiling=false",
            f"--cert-dir={work / 'pki'}",
        ])
        write_kubeconfig(self.kubeconfig, self.server, certs.ca, cert=admin[0], key=admin[1])
        self._wait(self._ready, deadline, "kube-apiserver /readyz")

        kcm_config = write_kubeconfig(work / "controller-manager.kubeconfig", self.server, certs.ca,
                                      cert=kcm[0], key=kcm[1])
        self._spawn("kube-controller-manager", [
            f"--kubeconfig={kcm_config}", f"--authentication-kubeconfig={kcm_config}",
            f"--authorization-kubeconfig={kcm_config}",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            "--leader-elect=false", "--use-service-account-credentials=true",
            f"--service-account-private-key-file={certs.sa_key}", f"--root-ca-file={certs.ca}",
            f"--controllers={CONTROLLERS}",
            # The Job controller creates thousands of pods in the scale test: the client-side
            # rate limit (default 20/s) would otherwise be what is measured.
            "--kube-api-qps=300", "--kube-api-burst=600", "--concurrent-job-syncs=10",
        ])
        scheduler_config = write_kubeconfig(work / "scheduler.kubeconfig", self.server, certs.ca,
                                            cert=scheduler[0], key=scheduler[1])
        (work / "scheduler.yaml").write_text(json.dumps({
            "apiVersion": "kubescheduler.config.k8s.io/v1",
            "kind": "KubeSchedulerConfiguration",
            "clientConnection": {"kubeconfig": str(scheduler_config), "qps": 300, "burst": 600},
            "leaderElection": {"leaderElect": False},
        }))
        self._spawn("kube-scheduler", [
            f"--config={work / 'scheduler.yaml'}",
            f"--authentication-kubeconfig={scheduler_config}",
            f"--authorization-kubeconfig={scheduler_config}",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
        ])
        kwok_config = write_kubeconfig(work / "kwok.kubeconfig", self.server, certs.ca,
                                       cert=kwok[0], key=kwok[1])
        (work / "kwok.yaml").write_text(_kwok_stages(self.complete_fits))
        self._spawn("kwok", [
            f"--kubeconfig={kwok_config}", f"--config={work / 'kwok.yaml'}",
            "--manage-all-nodes=false", "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            f"--server-address=127.0.0.1:{free_port()}", "--cidr=10.244.0.0/16",
            "--node-ip=127.0.0.2",
        ])
        # The service-account controllers are up once `default` has its ServiceAccount.
        self._wait(lambda: self.kubectl("get", "serviceaccount", "default", check=False).returncode == 0,
                   deadline, "kube-controller-manager (the default ServiceAccount)")
        self.kubectl("apply", "-f", "-", input=json.dumps(self._nodes()))
        self._wait(self._nodes_ready, deadline, "kwok nodes Ready")

    def _nodes(self) -> dict:
        # Room for the chart's runner defaults (2 CPUs, 8Gi per pod) on every GPU.
        items = [kwok_node(f"gpu-node-{i}", cpu=4 * self.gpus_per_node, memory_gi=32 * self.gpus_per_node,
                           pods=self.gpus_per_node + 16, gpus=self.gpus_per_node)
                 for i in range(self.gpu_nodes)]
        return {"apiVersion": "v1", "kind": "List", "items": items}

    def add_nodes(self, nodes: list[dict], timeout: float = 60.0) -> None:
        """Create more kwok nodes (`kwok_node`) and wait until they are Ready."""
        self.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": nodes}))
        names = {node["metadata"]["name"] for node in nodes}
        self._wait(lambda: names <= self._ready_nodes(), time.monotonic() + timeout, f"nodes {sorted(names)} Ready")

    def _nodes_ready(self) -> bool:
        return len(self._ready_nodes()) == self.gpu_nodes

    def _ready_nodes(self) -> set[str]:
        """The nodes Ready and without the node lifecycle controller's taints (it lifted `not-ready`)."""
        nodes = json.loads(self.kubectl("get", "nodes", "-o", "json").stdout)["items"]
        return {n["metadata"]["name"] for n in nodes
                if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))
                and not any(t["key"].startswith("node.kubernetes.io/") for t in n["spec"].get("taints", []))}

    def _ready(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.workdir / "pki" / "admin.crt"), str(self.workdir / "pki" / "admin.key"))
        return _http_ok(f"{self.server}/readyz", context)

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.workdir / "logs" / f"{name}.log", "ab")
        process = subprocess.Popen([str(self.bin / name), *args], stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.processes.append((name, process))

    def _wait(self, check, deadline: float, what: str) -> None:
        while True:
            for name, process in self.processes:
                if process.poll() is not None:
                    tail = (self.workdir / "logs" / f"{name}.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{name} exited with {process.returncode} while waiting for {what}:\n{tail}")
            try:
                if check():
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}; logs in {self.workdir / 'logs'}")
            time.sleep(0.25)

    def stop(self) -> None:
        """Stop every process, newest first (SIGTERM, then SIGKILL after 10 s)."""
        for name, process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for name, process in reversed(self.processes):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- using it --------------------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                kubeconfig: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return self._tool("kubectl", args, input, check, kubeconfig, timeout)

    def helm(self, *args: str, input: str | None = None, check: bool = True,
             kubeconfig: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return self._tool("helm", args, input, check, kubeconfig, timeout)

    def _tool(self, tool, args, input, check, kubeconfig, timeout) -> subprocess.CompletedProcess:
        env = {**os.environ, "KUBECONFIG": str(kubeconfig or self.kubeconfig),
               "HELM_CACHE_HOME": str(self.workdir / "helm" / "cache"),
               "HELM_CONFIG_HOME": str(self.workdir / "helm" / "config"),
               "HELM_DATA_HOME": str(self.workdir / "helm" / "data")}
        executable = (helm_path() or "helm") if tool == "helm" else str(self.bin / tool)
        result = subprocess.run([executable, *args], input=input, capture_output=True,
                                text=True, env=env, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)[:300]} failed ({result.returncode}):\n"
                               f"{result.stdout[-2000:]}{result.stderr[-3000:]}")
        return result

    def token_kubeconfig(self, path: Path, namespace: str, service_account: str,
                         duration: str = "2h") -> Path:
        """A kubeconfig that acts as a ServiceAccount (a TokenRequest token): RBAC applies in full."""
        token = self.kubectl("create", "token", service_account, "-n", namespace,
                             f"--duration={duration}").stdout.strip()
        return write_kubeconfig(path, self.server, self.ca, token=token, namespace=namespace)

    def audit_events(self) -> list[dict]:
        events = []
        with open(self.audit_log) as lines:
            for line in lines:
                if line.strip():
                    events.append(json.loads(line))
        return events


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as answer:
            return answer.status == 200
    except Exception:  # noqa: BLE001 - not up yet
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build or start the e2e test cluster (Kubernetes on loopback).")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help=f"build the binaries into {bin_dir()} (cached)")
    commands.add_parser("check", help="exit 0 when the cached binaries match the pinned versions")
    up = commands.add_parser("up", help="start a cluster until Ctrl-C")
    up.add_argument("workdir", nargs="?", help="folder for certificates, logs, kubeconfig (default: a temp folder)")
    up.add_argument("--complete-fit", action="append", default=[],
                    help="a fit whose pods kwok completes as the runner would")
    args = parser.parse_args(argv)
    if args.command == "build":
        print(build())
        return 0
    if args.command == "check":
        return 0 if built() else 1
    build()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="consensusfit-cluster-"))
    with Cluster(workdir, complete_fits=tuple(args.complete_fit)) as cluster:
        print(f"export KUBECONFIG={cluster.kubeconfig}", flush=True)
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        try:
            while not stop:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
