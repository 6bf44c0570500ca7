"""The deployment files as written, both ways (the store on object storage, the default, or on a shared
volume): the Kubernetes manifests' core kinds validate offline against the
Kubernetes API schemas (kubernetes-validate ships them), and the service Deployment runs `stillroom serve`
against the head's dashboard with its secrets from Kubernetes Secrets. (The image build itself cannot run
here: no Docker daemon.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"
CORE_KINDS = {"Deployment", "Service", "PersistentVolumeClaim", "Secret", "ConfigMap", "ServiceAccount"}
OBJECT_STORAGE, SHARED_VOLUME = "kuberay-raycluster.yaml", "kuberay-raycluster-shared-volume.yaml"


def manifests(name: str = OBJECT_STORAGE) -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d]


@pytest.mark.parametrize("name, kinds", [
    (OBJECT_STORAGE, {"Deployment", "Service", "ServiceAccount"}),
    (SHARED_VOLUME, {"Deployment", "Service", "PersistentVolumeClaim"})])
def test_core_kinds_validate_against_the_kubernetes_schemas(name, kinds):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    core = [d for d in manifests(name) if d["kind"] in CORE_KINDS]
    assert {d["kind"] for d in core} == kinds
    for doc in core:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    deployment = next(d for d in core if d["kind"] == "Deployment")
    broken = {**deployment, "spec": {**deployment["spec"], "replicas": "one"}}  # the validator does reject
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("name", [OBJECT_STORAGE, SHARED_VOLUME])
def test_the_service_runs_beside_the_head_with_secrets_from_kubernetes(name):
    docs = {(d["kind"], d["metadata"]["name"]): d for d in manifests(name)}
    cluster = docs[("RayCluster", "stillroom")]
    [container] = docs[("Deployment", "stillroom-service")]["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:2] == ["stillroom", "serve"]
    assert command[command.index("--ray-address") + 1] == f"http://{cluster['metadata']['name']}-head-svc:8265"
    env = {e["name"]: e for e in container["env"]}
    for var, secret in (("STILLROOM_API_TOKEN", "stillroom-api"), ("STILLROOM_DB", "stillroom-db")):
        assert env[var]["valueFrom"]["secretKeyRef"]["name"] == secret and "value" not in env[var]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    images = {c["image"] for d in manifests(name) for c in _containers(d)}
    assert len(images) == 1  # one image, built from infra/Dockerfile
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{cluster['spec']['rayVersion']}-py311-gpu" in dockerfile


def test_the_object_storage_variant_mounts_nothing_on_ray_and_reads_credentials_only_from_a_secret_or_role():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in manifests()}
    service_pod = docs[("Deployment", "stillroom-service")]["spec"]["template"]["spec"]
    [service] = service_pod["containers"]
    env = {e["name"]: e for e in service["env"]}
    for root in ("STILLROOM_STORE_ROOT", "STILLROOM_DATA_ROOT", "STILLROOM_WORK_ROOT"):  # job files too
        assert env[root]["value"].startswith("s3://")
    assert not [d for d in docs.values() if d["kind"] == "PersistentVolumeClaim"]  # no claim at all
    ray_pods = [g["template"]["spec"] for g in (docs[("RayCluster", "stillroom")]["spec"]["headGroupSpec"],
                                                *docs[("RayCluster", "stillroom")]["spec"]["workerGroupSpecs"])]
    for pod in ray_pods:  # nothing shared with the service: no volume, no mount
        assert not pod.get("volumes") and not any(c.get("volumeMounts") for c in pod["containers"])
    # the service's state dir (the token and SQLite defaults, both replaced by Secrets here) is its own emptyDir
    assert [m["mountPath"] for m in service["volumeMounts"]] == [env["STILLROOM_STATE_DIR"]["value"]]
    [volume] = service_pod["volumes"]
    assert "emptyDir" in volume and "STILLROOM_DB" in env and "STILLROOM_API_TOKEN" in env
    for pod in (*ray_pods, service_pod):
        assert pod["serviceAccountName"] == "stillroom"  # the pod role (IRSA) where no Secret is made
        for c in pod["containers"]:
            for e in c.get("env", []):
                if e["name"].startswith("AWS_"):  # never a literal value: a Secret's, and optional
                    assert "value" not in e and e["valueFrom"]["secretKeyRef"]["optional"] is True
    cluster = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    assert not any("mount" in c for c in cluster["setup_commands"])  # nothing to mount
    for node in cluster["available_node_types"].values():
        assert node["node_config"]["IamInstanceProfile"]["Name"]  # credentials from the instance role


def _containers(doc: dict) -> list[dict]:
    if doc["kind"] == "RayCluster":
        groups = [doc["spec"]["headGroupSpec"], *doc["spec"]["workerGroupSpecs"]]
        return [c for g in groups for c in g["template"]["spec"]["containers"]]
    if doc["kind"] == "Deployment":
        return list(doc["spec"]["template"]["spec"]["containers"])
    return []


def test_a_failed_store_mount_stops_the_node_setup(tmp_path):
    """cluster-shared-volume.yaml's mount step, run with a `mount` that fails: the step fails (no `|| true`
    fallback to a node's own disk), and with one that succeeds it passes."""
    import subprocess

    config = yaml.safe_load((INFRA / "cluster-shared-volume.yaml").read_text())
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
