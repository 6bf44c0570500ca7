"""The deployment files as written: the Kubernetes manifest's core kinds validate offline against the
Kubernetes API schemas (kubernetes-validate ships them), and the service Deployment runs `stillroom serve`
against the head's dashboard with its secrets from Kubernetes Secrets. (The image build itself cannot run
here: no Docker daemon.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"
CORE_KINDS = {"Deployment", "Service", "PersistentVolumeClaim", "Secret", "ConfigMap"}


def manifests() -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / "kuberay-raycluster.yaml").read_text()) if d]


def test_core_kinds_validate_against_the_kubernetes_schemas():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    core = [d for d in manifests() if d["kind"] in CORE_KINDS]
    assert {d["kind"] for d in core} == {"Deployment", "Service", "PersistentVolumeClaim"}
    for doc in core:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    broken = {**core[0], "spec": {**core[0]["spec"], "replicas": "one"}}  # the validator does reject
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_the_service_runs_beside_the_head_with_secrets_from_kubernetes():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in manifests()}
    cluster = docs[("RayCluster", "stillroom")]
    [container] = docs[("Deployment", "stillroom-service")]["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:2] == ["stillroom", "serve"]
    assert command[command.index("--ray-address") + 1] == f"http://{cluster['metadata']['name']}-head-svc:8265"
    env = {e["name"]: e for e in container["env"]}
    for name, secret in (("STILLROOM_API_TOKEN", "stillroom-api"), ("STILLROOM_DB", "stillroom-db")):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == secret and "value" not in env[name]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    images = {c["image"] for d in manifests() for c in _containers(d)}
    assert len(images) == 1  # one image, built from infra/Dockerfile
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{cluster['spec']['rayVersion']}-py311-gpu" in dockerfile


def _containers(doc: dict) -> list[dict]:
    if doc["kind"] == "RayCluster":
        groups = [doc["spec"]["headGroupSpec"], *doc["spec"]["workerGroupSpecs"]]
        return [c for g in groups for c in g["template"]["spec"]["containers"]]
    if doc["kind"] == "Deployment":
        return list(doc["spec"]["template"]["spec"]["containers"])
    return []


def test_a_failed_store_mount_stops_the_node_setup(tmp_path):
    """cluster.yaml's mount step, run with a `mount` that fails: the step fails (no `|| true` fallback to a node's
    own disk), and with one that succeeds it passes."""
    import subprocess

    config = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    [step] = [c for c in config["setup_commands"] if "mount -t nfs4" in c]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
    (bin_dir / "sudo").chmod(0o755)

    def run(mount_rc: int) -> int:
        state = tmp_path / "mounted"
        state.unlink(missing_ok=True)
        (bin_dir / "mount").write_text(f"#!/bin/sh\n[ {mount_rc} = 0 ] && touch {state}\nexit {mount_rc}\n")
        (bin_dir / "mountpoint").write_text(f"#!/bin/sh\n[ -e {state} ]\n")
        for name in ("mount", "mountpoint"):
            (bin_dir / name).chmod(0o755)
        command = step.replace("/mnt/stillroom", str(tmp_path / "mnt"))
        return subprocess.run(["bash", "-c", command], env={"PATH": f"{bin_dir}:/usr/bin:/bin"}).returncode

    assert run(32) != 0
    assert run(0) == 0
