"""deo.cluster: every file in cluster/ validates offline; broken copies fail naming the key."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from deo.cluster import INGEST_RESOURCE, TRAIN_RESOURCE, check_file

from conftest import REPO

CLUSTER_FILES = sorted((REPO / "cluster").rglob("*.yaml"))
LAUNCHERS = [REPO / "cluster" / n for n in ("aws.yaml", "gcp.yaml", "local-fake.yaml")]
MANIFESTS = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))


def _write(tmp_path: Path, doc: dict, name: str = "broken.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc))
    return p


def test_cluster_folder_holds_every_kind() -> None:
    kinds = {yaml.safe_load(p.read_text()).get("kind", "launcher") for p in CLUSTER_FILES}
    assert {"launcher", "RayCluster", "RayJob"} <= kinds and len(LAUNCHERS) == 3


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_every_cluster_file_validates(path: Path) -> None:
    assert check_file(path) == []


def test_cli_exit_codes(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "deo.cluster", "check", *map(str, CLUSTER_FILES)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert ok.returncode == 0, ok.stderr
    doc = yaml.safe_load(LAUNCHERS[0].read_text())
    doc["available_node_types"]["gpu_spot"]["max_workers"] = "eight"
    bad = subprocess.run(
        [sys.executable, "-m", "deo.cluster", "check", str(_write(tmp_path, doc))],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert bad.returncode == 1
    assert (
        "available_node_types.gpu_spot.max_workers: expected integer, got str 'eight'" in bad.stderr
    )


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            lambda d: d["available_node_types"]["cpu_ingest"].update(max_worker=3),
            "available_node_types.cpu_ingest.max_worker: unknown key",
        ),
        (lambda d: d.update(idle_timout_minutes=5), "idle_timout_minutes: unknown key"),
        (
            lambda d: d["available_node_types"]["gpu_spot"].update(min_workers=1.5),
            "available_node_types.gpu_spot.min_workers: expected integer",
        ),
        (
            lambda d: d["available_node_types"]["gpu_spot"].pop("resources"),
            "available_node_types.gpu_spot.resources: missing required key",
        ),
        (lambda d: d.pop("provider"), "provider: missing required key"),
        (lambda d: d.update(head_node_type="gpu-head"), "head_node_type: Ray's config preparation"),
        (
            lambda d: d["setup_commands"].__setitem__(0, 'pip install "ray[default]==2.59.0"'),
            "setup_commands[0]: pins Ray 2.59.0",
        ),
    ],
    ids=[
        "unknown-node-key",
        "unknown-top-key",
        "bad-type",
        "missing-resources",
        "missing-provider",
        "bad-head-type",
        "wrong-ray-pin",
    ],
)
@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_broken_launcher_fails_naming_the_key(
    tmp_path: Path, name: str, edit, expected: str
) -> None:
    doc = yaml.safe_load((REPO / "cluster" / name).read_text())
    broken = copy.deepcopy(doc)
    edit(broken)
    errors = check_file(_write(tmp_path, broken))
    assert any(e.startswith(expected) for e in errors), errors


def test_fake_launcher_missing_field_fails(tmp_path: Path) -> None:
    doc = yaml.safe_load((REPO / "cluster" / "local-fake.yaml").read_text())
    del doc["available_node_types"]["cpu_ingest"]["node_config"]
    assert check_file(_write(tmp_path, doc)) == [
        "available_node_types.cpu_ingest.node_config: missing required key"
    ]


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplica=3),
            "RayCluster/deo: spec.workerGroupSpecs[0].maxReplica: unknown key",
        ),
        (
            lambda d: d["spec"]["workerGroupSpecs"][1].update(maxReplicas="four"),
            "RayCluster/deo: spec.workerGroupSpecs[1].maxReplicas: expected integer, got str 'four'",
        ),
        (
            lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName"),
            "RayCluster/deo: spec.workerGroupSpecs[0].groupName: missing required key",
        ),
        (
            lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
                imag="x"
            ),
            "RayCluster/deo: spec.headGroupSpec.template.spec.containers[0].imag: unknown key",
        ),
        (lambda d: d["metadata"].pop("name"), "RayCluster/?: metadata.name: missing required key"),
        (lambda d: d.update(rayVersion="2.60.0"), "RayCluster/deo: rayVersion: unknown key"),
        (
            lambda d: d["spec"].update(rayVersion="2.59.0"),
            "RayCluster/deo: spec.rayVersion: pins Ray 2.59.0",
        ),
    ],
    ids=[
        "unknown-key",
        "bad-type",
        "missing-field",
        "unknown-pod-key",
        "no-name",
        "misplaced",
        "wrong-ray",
    ],
)
def test_broken_raycluster_fails_naming_the_key(tmp_path: Path, edit, expected: str) -> None:
    doc = yaml.safe_load((REPO / "cluster" / "kuberay" / "raycluster-train.yaml").read_text())
    edit(doc)
    errors = check_file(_write(tmp_path, doc))
    assert any(e.startswith(expected) for e in errors), errors


def test_broken_rayjob_fails_naming_the_key(tmp_path: Path) -> None:
    doc = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayjob-pretrain.yaml").read_text())
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["replica"] = 1
    doc["spec"]["shutdownAfterJobFinishes"] = "yes"
    errors = check_file(_write(tmp_path, doc))
    assert len(errors) == 2, errors
    assert errors[0].startswith(
        "RayJob/deo-pretrain: spec.rayClusterSpec.workerGroupSpecs[1].replica: unknown key (allowed: "
    )
    assert (
        errors[1]
        == "RayJob/deo-pretrain: spec.shutdownAfterJobFinishes: expected boolean, got str 'yes'"
    )


def test_secret_in_file_fails(tmp_path: Path) -> None:
    text = (REPO / "cluster" / "aws.yaml").read_text()
    text = text.replace(
        "setup_commands:\n",
        "setup_commands:\n    - export AWS_ACCESS_KEY_ID=AKIAABCDEFGHIJKLMNOP\n",
        1,
    )
    p = tmp_path / "leaky.yaml"
    p.write_text(text)
    errors = check_file(p)
    line = text.splitlines().index("    - export AWS_ACCESS_KEY_ID=AKIAABCDEFGHIJKLMNOP") + 1
    assert errors == [
        f"line {line}: looks like a AWS access key id; credentials come from the instance "
        "role or service account, never from a cluster file"
    ]


def test_ray_pin_agrees_with_pyproject() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d for d in deps if d.startswith("ray["))
    version = pin.split("==")[1]
    for path in LAUNCHERS[:2]:
        doc = yaml.safe_load(path.read_text())
        assert f'pip install -q "{pin}"' in doc["setup_commands"], path
        assert doc["docker"]["image"].startswith(f"rayproject/ray:{version}-"), path
    for path in MANIFESTS:
        doc = yaml.safe_load(path.read_text())
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["rayVersion"] == version, path
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    assert f'"{pin}"' in dockerfile and f"FROM rayproject/ray:{version}-" in dockerfile


def test_deployed_wheel_is_the_project_version() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    wheel = f"deo-{version}-py3-none-any.whl"
    for path in LAUNCHERS[:2]:
        assert (
            f"pip install -q ~/deo-dist/{wheel}"
            in yaml.safe_load(path.read_text())["setup_commands"]
        )
    assert (
        re.findall(r"deo-[0-9][^ ]*\.whl", (REPO / "cluster" / "Dockerfile").read_text())
        == [wheel] * 3
    )


def test_pools_advertise_the_documented_resources() -> None:
    for path in LAUNCHERS:
        types = yaml.safe_load(path.read_text())["available_node_types"]
        head = types.pop(next(k for k in types if k.startswith(("head", "ray.head"))))
        assert head["resources"] == {"CPU": 0}, path  # no task runs on the head
        ingest = [t for t in types.values() if INGEST_RESOURCE in t["resources"]]
        train = [t for t in types.values() if TRAIN_RESOURCE in t["resources"]]
        assert ingest and train and len(ingest) + len(train) == len(types), path
        for t in ingest:
            assert "GPU" not in t["resources"] and t["min_workers"] == 0
        for t in train:
            assert t["min_workers"] == 0
            if path.name != "local-fake.yaml":  # one deo_train unit per GPU
                assert t["resources"][TRAIN_RESOURCE] == t["resources"]["GPU"] == 8
    docs = (REPO / "docs" / "cluster.md").read_text()
    assert INGEST_RESOURCE in docs and TRAIN_RESOURCE in docs
