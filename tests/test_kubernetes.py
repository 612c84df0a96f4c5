"""
``etc/kubernetes.yaml``: every manifest validated against the Kubernetes JSON schemas (PyPI's
``kubernetes-validate``, strict: unknown fields are errors), the pod template checked against
every control of the Pod Security Standards' ``restricted`` profile (baseline controls included;
the checker below follows the standard's table, and a test shows it refusing a privileged pod),
and the pieces that must agree: the config in the ConfigMap, the ports and probes, the grace
periods, the image's user, the NetworkPolicy guarding the admin port.
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
from typing import Any

import kubernetes_validate
import yaml  # type: ignore[import-untyped]
from twisted.trial.unittest import SynchronousTestCase

from tests.procs import REPO
from wsgate import config as configmod

MANIFEST = REPO / "etc" / "kubernetes.yaml"
DOCKERFILE = REPO / "Dockerfile"
# The Kubernetes releases the manifests must be valid for: the oldest still common, the newest.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())

# Pod Security Standards (kubernetes.io/docs/concepts/security/pod-security-standards/).
_BASELINE_CAPABILITIES = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}
_SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
_SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
_RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_violations(template: dict[str, Any]) -> list[str]:
    """
    Every way a pod template (``metadata`` and ``spec``) breaks the ``restricted`` Pod Security
    Standard, one line per control and place; empty: it passes.
    """
    spec = template["spec"]
    annotations = template.get("metadata", {}).get("annotations", {})
    pod = spec.get("securityContext", {})
    containers = [
        (kind, c)
        for kind in ("initContainers", "containers", "ephemeralContainers")
        for c in spec.get(kind, [])
    ]
    out = []

    # -- baseline ---------------------------------------------------------------------------
    contexts = [("pod", pod)] + [
        (f"{k} {c['name']}", c.get("securityContext", {})) for k, c in containers
    ]
    for where, ctx in contexts:
        if ctx.get("windowsOptions", {}).get("hostProcess"):
            out.append(f"HostProcess: {where}")
        selinux = ctx.get("seLinuxOptions", {})
        if selinux.get("type", "") not in _SELINUX_TYPES or "user" in selinux or "role" in selinux:
            out.append(f"SELinux: {where}")
        if ctx.get("appArmorProfile", {}).get("type", "RuntimeDefault") not in (
            "RuntimeDefault",
            "Localhost",
        ):
            out.append(f"AppArmor: {where}")
        if ctx.get("seccompProfile", {}).get("type") == "Unconfined":
            out.append(f"Seccomp: {where} Unconfined")
        if ctx.get("runAsUser") == 0:
            out.append(f"Running as Non-root user: {where} runAsUser 0")
        if ctx.get("runAsNonRoot") is False:
            out.append(f"Running as Non-root: {where} runAsNonRoot false")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            out.append(f"Host Namespaces: {key}")
    for name, value in annotations.items():
        if name.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
            value == "runtime/default" or value.startswith("localhost/")
        ):
            out.append(f"AppArmor: annotation {name}")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if "hostPath" in kinds:
            out.append(f"HostPath Volumes: {volume['name']}")
        if not kinds <= _RESTRICTED_VOLUMES:
            out.append(f"Volume Types: {volume['name']} {sorted(kinds)}")
    for sysctl in pod.get("sysctls", []):
        if sysctl["name"] not in _SAFE_SYSCTLS:
            out.append(f"Sysctls: {sysctl['name']}")

    for kind, container in containers:
        where = f"{kind} {container['name']}"
        ctx = container.get("securityContext", {})
        if ctx.get("privileged"):
            out.append(f"Privileged Containers: {where}")
        for port in container.get("ports", []):
            if port.get("hostPort", 0):
                out.append(f"Host Ports: {where} {port['hostPort']}")
        if ctx.get("procMount", "Default") != "Default":
            out.append(f"/proc Mount Type: {where}")
        capabilities = ctx.get("capabilities", {})
        added = set(capabilities.get("add", []))
        if not added <= _BASELINE_CAPABILITIES:
            out.append(f"Capabilities: {where} adds {sorted(added - _BASELINE_CAPABILITIES)}")
        # -- restricted ---------------------------------------------------------------------
        if ctx.get("allowPrivilegeEscalation") is not False:
            out.append(f"Privilege Escalation: {where} allowPrivilegeEscalation is not false")
        if not (ctx.get("runAsNonRoot") is True or pod.get("runAsNonRoot") is True):
            out.append(f"Running as Non-root: {where}")
        seccomp = ctx.get("seccompProfile", pod.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"Seccomp: {where} {seccomp}")
        if "ALL" not in capabilities.get("drop", []):
            out.append(f"Capabilities: {where} does not drop ALL")
        if not added <= {"NET_BIND_SERVICE"}:
            out.append(f"Capabilities: {where} adds {sorted(added - {'NET_BIND_SERVICE'})}")
    return out


def documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    [doc] = [
        d
        for d in documents()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    return doc


def gate_config(case: SynchronousTestCase) -> configmod.Config:
    text = one("ConfigMap")["data"]["wsgate.toml"]
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(text)
        f.flush()
        return configmod.load(f.name)


class SchemaTests(SynchronousTestCase):
    def test_valid(self) -> None:
        """Every manifest is valid for the oldest and newest Kubernetes, unknown fields refused."""
        for version in VERSIONS:
            for doc in documents():
                kubernetes_validate.validate(doc, version, strict=True)

    def test_validator_bites(self) -> None:
        """A misspelt field fails the strict validation (so a green test means something)."""
        deployment = copy.deepcopy(one("Deployment"))
        deployment["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
        self.assertRaises(
            kubernetes_validate.ValidationError,
            kubernetes_validate.validate,
            deployment,
            VERSIONS[-1],
            True,
        )


class PodSecurityTests(SynchronousTestCase):
    def test_restricted(self) -> None:
        """The Deployment's pod template meets the restricted Pod Security Standard."""
        template = one("Deployment")["spec"]["template"]
        self.assertEqual(restricted_violations(template), [])

    def test_namespace_enforces_restricted(self) -> None:
        """Every namespaced object lives in a namespace where admission enforces restricted."""
        namespace = one("Namespace")
        name = namespace["metadata"]["name"]
        labels = namespace["metadata"]["labels"]
        self.assertEqual(labels["pod-security.kubernetes.io/enforce"], "restricted")
        for doc in documents():
            if doc["kind"] != "Namespace":
                self.assertEqual(doc["metadata"].get("namespace"), name, doc["metadata"]["name"])

    def test_checker_refuses_a_privileged_pod(self) -> None:
        """The checker finds each control broken in a pod that breaks them all."""
        template = copy.deepcopy(one("Deployment")["spec"]["template"])
        spec = template["spec"]
        spec.update(hostNetwork=True, hostPID=True)
        spec["securityContext"] = {"runAsUser": 0, "sysctls": [{"name": "kernel.msgmax"}]}
        spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
        container = spec["containers"][0]
        container["ports"][0]["hostPort"] = 80
        container["securityContext"] = {
            "privileged": True,
            "allowPrivilegeEscalation": True,
            "capabilities": {"add": ["SYS_ADMIN"]},
            "procMount": "Unmasked",
            "seccompProfile": {"type": "Unconfined"},
            "seLinuxOptions": {"type": "spc_t"},
        }
        template["metadata"]["annotations"][
            "container.apparmor.security.beta.kubernetes.io/wsgate"
        ] = "unconfined"
        controls = {line.split(":")[0] for line in restricted_violations(template)}
        self.assertEqual(
            controls,
            {
                "Host Namespaces",
                "Running as Non-root user",
                "Running as Non-root",
                "Sysctls",
                "HostPath Volumes",
                "Volume Types",
                "Host Ports",
                "Privileged Containers",
                "Privilege Escalation",
                "Capabilities",
                "/proc Mount Type",
                "Seccomp",
                "SELinux",
                "AppArmor",
            },
        )

    def test_read_only_root_and_image_user(self) -> None:
        """
        A read-only root file system (wsgate writes nothing), and the pod's user is the image's
        own (Dockerfile USER), so files made for that user in the image stay readable.
        """
        pod = one("Deployment")["spec"]["template"]["spec"]
        [container] = pod["containers"]
        self.assertIs(container["securityContext"]["readOnlyRootFilesystem"], True)
        [user] = re.findall(r"^USER (\S+)$", DOCKERFILE.read_text(), re.M)
        uid, _, gid = user.partition(":")
        self.assertEqual(pod["securityContext"]["runAsUser"], int(uid))
        self.assertEqual(pod["securityContext"]["runAsGroup"], int(gid))
        self.assertIs(pod["automountServiceAccountToken"], False)


class GateTests(SynchronousTestCase):
    def test_ports_and_probes(self) -> None:
        """
        The container ports are the config's listener and admin ports; readiness asks /ready on
        the admin port, liveness only that the admin listener answers; the image's CMD runs.
        """
        config = gate_config(self)
        [container] = one("Deployment")["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        self.assertEqual(ports["ws"], int(config.listeners[0].endpoint.split(":")[1]))
        assert config.admin is not None
        self.assertEqual(ports["admin"], int(config.admin.endpoint.split(":")[1]))
        self.assertEqual(
            container["readinessProbe"]["httpGet"], {"path": "/ready", "port": "admin"}
        )
        self.assertEqual(container["livenessProbe"]["tcpSocket"], {"port": "admin"})
        self.assertNotIn("command", container)
        self.assertNotIn("args", container)
        [cmd] = re.findall(r"^CMD (.+)$", DOCKERFILE.read_text(), re.M)
        self.assertEqual(json.loads(cmd)[-1], "/etc/wsgate/wsgate.toml")
        [mount] = container["volumeMounts"]
        self.assertEqual(mount["mountPath"], "/etc/wsgate")

    def test_grace(self) -> None:
        """terminationGracePeriodSeconds covers the preStop sleep plus shutdown_grace."""
        config = gate_config(self)
        pod = one("Deployment")["spec"]["template"]["spec"]
        [container] = pod["containers"]
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        self.assertEqual(command[0], "sleep")
        self.assertGreater(
            pod["terminationGracePeriodSeconds"],
            float(command[1]) + config.limits.shutdown_grace,
        )

    def test_admin_port_protected(self) -> None:
        """
        The admin port is in no Service, and the NetworkPolicy admits to it only the monitoring
        namespace, while the WebSocket port is open.
        """
        for service in (d for d in documents() if d["kind"] == "Service"):
            for port in service["spec"]["ports"]:
                self.assertNotIn(port.get("targetPort"), ("admin", 9020))
        policy = one("NetworkPolicy")
        self.assertEqual(policy["spec"]["policyTypes"], ["Ingress"])
        self.assertEqual(
            policy["spec"]["podSelector"]["matchLabels"],
            one("Deployment")["spec"]["template"]["metadata"]["labels"],
        )
        rules = {
            tuple(p["port"] for p in rule["ports"]): rule for rule in policy["spec"]["ingress"]
        }
        self.assertEqual(set(rules), {("ws",), ("admin",)})
        self.assertNotIn("from", rules[("ws",)])
        [source] = rules[("admin",)]["from"]
        self.assertEqual(
            source,
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
        )

    def test_backend_in_namespace(self) -> None:
        """The upstream resolves the headless Service of this manifest, in its namespace."""
        config = gate_config(self)
        backend = one("Service", "chat-backend")
        [server] = [s for u in config.upstreams.values() for s in u.servers]
        host = f"{backend['metadata']['name']}.{backend['metadata']['namespace']}.svc.cluster.local"
        self.assertEqual(server.url, f"ws://{host}:{backend['spec']['ports'][0]['port']}")
        self.assertEqual(backend["spec"]["clusterIP"], "None")
