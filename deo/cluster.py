"""Offline validation of cluster files: Ray launcher YAMLs and KubeRay manifests.

``python -m deo.cluster check FILE...`` checks each file without network or cloud credentials:

- Ray cluster launcher YAMLs (``ray up``): Ray's own autoscaler schema (``ray-schema.json``) on the file
  as written, then Ray's config preparation (defaults of the provider merged in, setup commands merged,
  per-node-type worker bounds filled) and Ray's ``validate_config`` on the result, as ``ray up`` does
  before it contacts the cloud.
- KubeRay manifests (``apiVersion: ray.io/v1``, ``kind: RayCluster`` or ``RayJob``): the
  ``openAPIV3Schema`` of KubeRay's CRDs vendored in ``deo/schemas/kuberay`` (Apache-2.0), with unknown
  fields rejected as ``kubectl apply --validate=strict`` does (the API server would silently prune them).
  CEL rules (``x-kubernetes-validations``) are not evaluated.
- Both: the Ray version a file pins equals the installed Ray (jobs submitted from another version fail),
  and no cloud secret is written in the file (credentials come from instance roles or service accounts).

Every error names the key path, e.g. ``available_node_types.gpu_worker.max_workers: expected integer,
got str 'eight'``. The command exits 1 when any file fails.

The resources below are the contract between the cluster files and the pipelines: worker node types
advertise them, ingestion tasks and training workers request them, so each pool scales for its stage.

The runtime side, used by every pipeline that runs on Ray: :func:`start_or_join` (the cluster at
``scaling.address`` or ``RAY_ADDRESS``, as inside a ``ray job submit`` driver, else the one a ``ray start``
left running on this machine, else a new local Ray), then checks that fail fast, naming the config key,
where Ray would otherwise wait forever or lose the output: :func:`check_resources` (tasks or workers ask
for more of a resource than the cluster has, or than any one node has, and no autoscaler can add nodes),
:func:`check_cluster_storage` (workers would write to a local path on a cluster with other nodes) and
:func:`warn_if_job_scratch` (a relative output path under ``ray job submit`` lands in Ray's temporary copy
of the working dir, which Ray deletes later).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from deo.config import ConfigError
from deo.io import storage

INGEST_RESOURCE = "deo_ingest"
"""Custom resource of the CPU ingestion pool: one unit per CPU of a node of that pool. Ingestion tasks
request it (e.g. ``{"deo_ingest": 1}`` with ``num_cpus=1``), so they never land on the head or on GPU
nodes, and a backlog of them scales the CPU pool."""

TRAIN_RESOURCE = "deo_train"
"""Custom resource of the GPU training pool: one unit per GPU of a node of that pool. Each Ray Train
worker requests ``{"GPU": 1, "deo_train": 1}`` (or ``{"CPU": c, "deo_train": 1}`` for CPU training on the
local fake cluster), so training workers scale the GPU pool and nothing else lands there."""

KUBERAY_KINDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
SCHEMA_DIR = Path(__file__).resolve().parent / "schemas" / "kuberay"

# ObjectMeta fields a user may set in a manifest (the CRD leaves top-level metadata untyped: the API
# server validates it against ObjectMeta, which this subset mirrors).
_OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}

# A Ray requirement pinned in a command or an image: ray==X, ray[extras]==X, rayproject/ray:X...
_RAY_PIN = re.compile(r"\bray(?:\[[a-z,\s]+\])?==([0-9][0-9A-Za-z.]*)")
_RAY_IMAGE = re.compile(r"rayproject/ray(?:-ml)?:([0-9][0-9.]*[0-9])")
_SECRETS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret access key": re.compile(r"aws_secret_access_key\s*[:=]\s*\S", re.IGNORECASE),
    "GCP service-account private key": re.compile(r"-----BEGIN (?:RSA )?PRIVATE KEY-----"),
}


def _key_path(parts: Sequence[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<root>"


def _format_error(err: jsonschema.ValidationError, prefix: str = "") -> str:
    """One schema error as ``key.path: what was expected``."""
    if err.validator in ("anyOf", "oneOf") and err.context:
        return _format_error(jsonschema.exceptions.best_match(err.context), prefix)
    path = list(err.absolute_path)
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = sorted(err.schema.get("properties", {}))
        extra = [k for k in err.instance if k not in allowed]
        patterns = err.schema.get("patternProperties", {})
        extra = [k for k in extra if not any(re.search(p, str(k)) for p in patterns)]
        return "; ".join(
            f"{prefix}{_key_path([*path, k])}: unknown key (allowed: {', '.join(allowed)})"
            for k in extra
        )
    if err.validator == "required":
        missing = re.match(r"'([^']+)' is a required property", err.message)
        name = missing.group(1) if missing else str(err.validator_value)
        return f"{prefix}{_key_path([*path, name])}: missing required key"
    if err.validator == "type":
        got = type(err.instance).__name__
        expected = err.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        return f"{prefix}{_key_path(path)}: expected {expected}, got {got} {err.instance!r}"[:300]
    return f"{prefix}{_key_path(path)}: {err.message}"[:300]


def _schema_errors(doc: Any, schema: dict[str, Any], prefix: str = "") -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    return [_format_error(e, prefix) for e in errors]


def _strings(doc: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], str]]:
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _strings(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _strings(v, (*path, i))
    elif isinstance(doc, str):
        yield path, doc


def _ray_version_errors(doc: Any, prefix: str = "") -> list[str]:
    """Every Ray version pinned in the document's strings must be the installed Ray's."""
    import ray

    errors = []
    for path, text in _strings(doc):
        found = _RAY_PIN.findall(text) + _RAY_IMAGE.findall(text)
        if path and path[-1] == "rayVersion":
            found.append(text)
        for version in found:
            if version != ray.__version__:
                errors.append(
                    f"{prefix}{_key_path(path)}: pins Ray {version}, expected the installed Ray "
                    f"{ray.__version__} (the version pyproject.toml pins)"
                )
    return errors


def _secret_errors(text: str) -> list[str]:
    errors = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for what, pattern in _SECRETS.items():
            if pattern.search(line):
                errors.append(
                    f"line {lineno}: looks like a {what}; credentials come from the instance role or "
                    "service account, never from a cluster file"
                )
    return errors


def _prepare_launcher_config(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's ``prepare_config``: the provider's defaults merged in, as ``ray up`` does."""
    from ray.autoscaler._private import util

    try:
        return util.prepare_config(copy.deepcopy(config))
    except FileNotFoundError:
        if config["provider"]["type"] != "fake_multinode":
            raise
    # Ray 2.60 wheels omit fake_multi_node/example.yaml, the defaults file of this provider: the same
    # preparation with no defaults to merge, so the file itself must be complete.
    prepared = copy.deepcopy(config)
    prepared.setdefault("auth", {})
    util.merge_setup_commands(prepared)
    util.validate_docker_config(prepared)
    util.fill_node_type_min_max_workers(prepared)
    return prepared


def check_launcher_config(config: dict[str, Any]) -> list[str]:
    """Validate a Ray cluster launcher config as ``ray up`` would, offline.

    Args:
        config: the parsed YAML of a ``ray up`` cluster file.

    Returns:
        One ``key.path: message`` string per problem; empty when the config is valid.
    """
    import ray.autoscaler
    from ray.autoscaler._private.providers import _DEFAULT_CONFIGS
    from ray.autoscaler._private.util import validate_config

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    errors = _schema_errors(config, schema)
    if errors:
        return errors
    provider = config["provider"]["type"]
    if provider not in _DEFAULT_CONFIGS:
        return [
            f"provider.type: unknown provider {provider!r}, expected one of {sorted(_DEFAULT_CONFIGS)}"
        ]
    try:
        prepared = _prepare_launcher_config(config)
        validate_config(prepared)
    except jsonschema.ValidationError as e:
        return [_format_error(e) + " (after Ray filled in the provider's defaults)"]
    except (ValueError, RuntimeError, KeyError, AssertionError) as e:
        # Ray names the offending key in backticks (e.g. `head_node_type`): lead with it.
        named = re.search(r"`([A-Za-z_.]+)`", str(e))
        return [
            f"{named.group(1) if named else '<config>'}: Ray's config preparation rejected it: {e}"
        ]
    return _ray_version_errors(config)


def _close_objects(schema: Any) -> Any:
    """Reject unknown fields: object schemas with ``properties`` get ``additionalProperties: false``.

    Kubernetes prunes unknown fields of structural schemas silently; ``kubectl --validate=strict``
    rejects them, which is what a typo in a manifest deserves.
    """
    if isinstance(schema, dict):
        out = {k: _close_objects(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_close_objects(v) for v in schema]
    return schema


@cache
def kuberay_schema(kind: str, version: str) -> dict[str, Any]:
    """The strict openAPIV3Schema of a vendored KubeRay CRD.

    Args:
        kind: ``RayCluster`` or ``RayJob``.
        version: the API version served by the CRD, e.g. ``v1``.

    Returns:
        A JSON schema (draft 7 compatible) of one manifest of that kind.

    Raises:
        ValueError: the kind or version is not in the vendored CRDs.
    """
    if kind not in KUBERAY_KINDS:
        raise ValueError(
            f"kind {kind!r} is not a vendored KubeRay CRD; expected one of {sorted(KUBERAY_KINDS)}"
        )
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((SCHEMA_DIR / KUBERAY_KINDS[kind]).read_text(), Loader=loader)
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served", True)}
    if version not in served:
        raise ValueError(
            f"apiVersion ray.io/{version} of {kind} is not served; expected one of {sorted(served)}"
        )
    schema = _close_objects(served[version]["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = _OBJECT_META
    schema["required"] = sorted(
        {*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"}
    )
    return schema


def check_kuberay_manifest(doc: dict[str, Any]) -> list[str]:
    """Validate one KubeRay manifest against the vendored CRD schema.

    Args:
        doc: one parsed YAML document with ``apiVersion: ray.io/...``.

    Returns:
        One ``Kind/name: key.path: message`` string per problem; empty when it is valid.
    """
    kind = doc.get("kind")
    name = (
        (doc.get("metadata") or {}).get("name", "?")
        if isinstance(doc.get("metadata"), dict)
        else "?"
    )
    prefix = f"{kind}/{name}: "
    version = str(doc.get("apiVersion", "")).removeprefix("ray.io/")
    try:
        schema = kuberay_schema(str(kind), version)
    except ValueError as e:
        return [f"{prefix}{e}"]
    errors = _schema_errors(doc, schema, prefix)
    return errors or _ray_version_errors(doc, prefix)


def check_file(path: str | Path) -> list[str]:
    """Validate one cluster file, whichever kind it is.

    Args:
        path: a ``ray up`` YAML or a file of KubeRay manifests (several documents allowed).

    Returns:
        Error messages (``key.path: message``); empty when the file is valid.
    """
    text = Path(path).read_text()
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        return [f"<file>: not valid YAML: {e}"]
    errors = _secret_errors(text)
    if not docs:
        return [*errors, "<file>: empty, expected a cluster config or KubeRay manifests"]
    for doc in docs:
        if not isinstance(doc, dict):
            errors.append(f"<root>: expected a mapping, got {type(doc).__name__}")
        elif str(doc.get("apiVersion", "")).startswith("ray.io/"):
            errors += check_kuberay_manifest(doc)
        elif "apiVersion" in doc:
            errors.append(
                f"apiVersion: {doc['apiVersion']!r} is not a KubeRay resource, expected ray.io/v1"
            )
        elif len(docs) > 1:
            errors.append("<file>: a ray up cluster file holds exactly one YAML document")
        else:
            errors += check_launcher_config(doc)
    return errors


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deo.cluster check FILE...``: print problems, return 1 if any file fails."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] != "check" or len(args) < 2:
        print(
            "usage: python -m deo.cluster check FILE...\n\n"
            "Validate Ray cluster launcher YAMLs (Ray's autoscaler schema and config preparation) and\n"
            "KubeRay RayCluster/RayJob manifests (vendored CRD schemas) offline. Exit 1 on any error.",
            file=sys.stderr if args and args[0] not in ("-h", "--help") else sys.stdout,
        )
        return 0 if args and args[0] in ("-h", "--help") else 2
    # Ray's config preparation logs each default it fills in at INFO: noise for a checker.
    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)
    failed = 0
    for path in args[1:]:
        if not Path(path).is_file():
            print(f"{path}: no such file", file=sys.stderr)
            failed += 1
            continue
        errors = check_file(path)
        for e in errors:
            print(f"{path}: {e}", file=sys.stderr)
        print(f"{path}: {'FAILED' if errors else 'ok'}")
        failed += bool(errors)
    return 1 if failed else 0


# --- the runtime side: starting or joining Ray, and checking the cluster before any work ---


_STARTED_HERE = ""
"""The GCS address of the local Ray that :func:`start_or_join` started itself (it has no autoscaler)."""


def start_or_join(address: str = "", log_to_driver: bool = True, key: str = "scaling.address") -> None:
    """Connect this process to Ray (nothing when it already is).

    Args:
        address: a Ray address; empty: ``RAY_ADDRESS``, else the cluster ``ray start`` left running on
            this machine, else a new local Ray with this machine's CPUs (Ray's own cgroup-aware count).
        log_to_driver: stream the workers' output to this process.
        key: the config key ``address`` came from, for errors.

    Raises:
        ConfigError: a Ray Client address (``ray://``), naming where it came from.
    """
    import ray

    if ray.is_initialized():
        return
    # the dashboard (when this starts Ray) serves the state API, which Ray Train's placement-group
    # cleaner and Tune use to watch their actors; joining a cluster ignores it
    kwargs = {"include_dashboard": True, "configure_logging": False, "log_to_driver": log_to_driver}
    given = f"{key}={address}" if address else f"RAY_ADDRESS={os.environ.get('RAY_ADDRESS', '')}"
    address = address or os.environ.get("RAY_ADDRESS", "")
    if "://" in address:  # Ray reads any scheme as Ray Client; Train and Tune drive actors from here
        raise ConfigError(f"{given}: Ray Client and dashboard addresses (scheme://) cannot run this pipeline; "
                          "submit it to the cluster instead: ray job submit --address http://<head>:8265 -- "
                          "python pipelines/... (the dashboard address belongs there), or unset it to use "
                          "this machine's Ray")
    if address not in ("", "local"):  # a GCS address, or "auto" (Ray's: the recorded cluster, else any here)
        ray.init(address=address, **kwargs)
        return
    if address != "local" and _ray_start_cluster_alive():
        # no address: Ray's own lookup of the recorded cluster, which also turns on token auth where that
        # cluster has it (an explicit address does not)
        ray.init(**kwargs)
        return
    global _STARTED_HERE
    # "local": a new Ray even where a stale address file is left. Ray truncates a fractional container
    # quota (a 0.5-CPU pod would get 0 CPUs): at least 1
    ray.init(address="local", num_cpus=max(1, len(os.sched_getaffinity(0))), **kwargs)
    _STARTED_HERE = ray.get_runtime_context().gcs_address


def _ray_start_cluster_alive() -> bool:
    """Whether Ray's address file names a cluster (left by ``ray start`` on this machine) that a Ray process
    here still serves; a note on stderr when the file is stale (its cluster was killed, not stopped with
    ``ray stop``, and ``ray.init`` would wait for it, then fail to connect)."""
    from ray._private.services import find_bootstrap_address, find_gcs_addresses
    from ray._private.utils import get_ray_address_file

    recorded = find_bootstrap_address(None)
    if not recorded:
        return False
    find_gcs_addresses.cache_clear()  # Ray caches what it found until its next ray.init
    if recorded in find_gcs_addresses():  # a raylet on this machine (head or worker node) serves it
        return True
    print(f"note: {get_ray_address_file(None)} names a Ray cluster at {recorded} that no Ray process on this "
          "machine serves any more (killed, not stopped with `ray stop`): starting a local Ray instead",
          file=sys.stderr, flush=True)
    return False


def autoscaler_present(wait_s: float = 0.0) -> bool:
    """Whether the connected cluster has an autoscaler that can launch nodes (not Ray's read-only one).

    A plain ``ray start``/``ray.init`` head also runs the autoscaler monitor, with a read-only provider
    whose node types are the live nodes themselves (named ``node_<node id>``); a launched cluster
    (``ray up``, KubeRay, ``cluster/local-fake.yaml``) names its node types in its config. A v1 monitor
    that has not reported yet (a head that just came up) is waited for up to ``wait_s``.
    """
    import ray
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    if ray.is_initialized() and _STARTED_HERE == ray.get_runtime_context().gcs_address:
        return False  # the local Ray started above: no autoscaler, and its monitor may not have reported yet
    if is_autoscaler_v2(fetch_from_server=True):
        return True
    deadline = time.monotonic() + wait_s
    while not (raw := _internal_kv_get("__autoscaling_status")) and time.monotonic() < deadline:
        time.sleep(1.0)
    if not raw:
        return False
    mapping = (json.loads(raw).get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return any(t != f"node_{node}" for node, t in mapping.items())


def check_resources(needed: Mapping[str, float], keys: Mapping[str, str], fix: str = "",
                    per_unit: Mapping[str, float] | None = None) -> None:
    """Fail fast when the cluster can never grant a request (Ray would leave it pending forever).

    Args:
        needed: resource -> amount the pipeline's tasks or workers ask for at once (cluster totals).
        keys: resource -> the config key(s) that asked for it, for the message.
        fix: what else to try, appended to the message.
        per_unit: what one task or worker asks for, which must fit on a single node.

    Raises:
        ConfigError: naming the key, when a resource is short on the cluster (or no node can hold one
            unit) and no autoscaler can add nodes.
    """
    import ray

    have = ray.cluster_resources()
    short = {k: v for k, v in needed.items() if _units(v) > _units(have.get(k, 0.0))}
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    unit = {k: v for k, v in (per_unit or {}).items() if v > 0}
    no_node = bool(unit) and not any(all(_units(v) <= _units(n.get(k, 0.0)) for k, v in unit.items())
                                     for n in nodes)
    if not (short or no_node) or autoscaler_present(wait_s=10.0):  # waits only on the way to an error
        return
    custom = {k: v for k, v in have.items() if not k.startswith(("node:", "accelerator_type:")) and k not in
              ("CPU", "GPU", "memory", "object_store_memory")}
    where = f"(custom resources here: {custom or 'none'})"
    if short:
        k, v = next(iter(short.items()))
        start = (f"start the nodes with --resources '{{\"{k}\": N}}', " if k not in ("CPU", "GPU") else "")
        raise ConfigError(
            f"{keys.get(k, k)} needs {v:g} {k} but the Ray cluster has {have.get(k, 0.0):g} and no autoscaler "
            f"to add nodes {where}; {start}use a cluster from cluster/" + (f", or {fix}" if fix else ""))
    ask = ", ".join(f"{v:g} {k}" for k, v in unit.items())
    biggest = ", ".join(f"{k} {max(n.get(k, 0.0) for n in nodes):g}" for k in unit)
    raise ConfigError(
        f"one worker asks for {ask} ({', '.join(keys.get(k, k) for k in unit)}) but no node of the Ray cluster "
        f"has that much (the most any node has: {biggest}) and no autoscaler can add one; "
        f"use a cluster from cluster/" + (f", or {fix}" if fix else ""))


def _units(amount: float) -> int:
    """Ray's fixed-point resource units (1e-4): 6 x 0.8 + 0.2 CPU fits 5 CPUs, as it does in Ray."""
    return round(amount * 10_000)


def check_cluster_storage(written: dict[str, str], read: dict[str, str]) -> None:
    """Fail fast when workers would write to a local path of a cluster that has (or may grow) other nodes.

    Args:
        written: config key -> URI the workers write to (checkpoints, run folders): object storage
            required on such a cluster (a ``file://`` URI is a local path too).
        read: config key -> URI they read: a local path only gets a warning (a shared filesystem
            mounted on every node at the same path works).

    Raises:
        ConfigError: naming the key, when a ``written`` URI is local on a multi-node or autoscaling cluster.
    """
    import ray

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes <= 1 and not autoscaler_present():
        return
    where = f"the cluster has {nodes} nodes" if nodes > 1 else "the cluster's autoscaler adds nodes"
    for key, uri in written.items():
        if not storage.is_remote(uri):
            raise ConfigError(f"{key}={uri!r} is a local path but {where}, whose workers cannot write "
                              "there for the others: use object storage (s3://, gs://)")
    for key, uri in read.items():
        if not storage.is_remote(uri):
            print(f"warning: {key}={uri!r} is a local path but {where}: every node must see it at that "
                  "path (a shared filesystem), or use object storage", file=sys.stderr, flush=True)


def warn_if_job_scratch(key: str, uri: str) -> bool:
    """Under ``ray job submit``, warn that a relative local ``uri`` (config ``key``) lands in the job's
    temporary copy of ``--working-dir``, which Ray deletes when the job no longer needs it; returns
    whether it warned."""
    # the job supervisor hands each job driver its JobConfig in this variable (Ray 2.60 sets no
    # RAY_JOB_SUBMISSION_ID, which this once read: the warning never fired under a real job)
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ or storage.is_remote(uri) \
            or os.path.isabs(storage.strip_file_scheme(uri)):
        return False
    print(f"warning: {key}={uri!r} is relative: under `ray job submit` it lands in Ray's temporary copy of "
          f"the working dir ({os.path.abspath(storage.strip_file_scheme(uri))}), which Ray deletes later; "
          f"give {key} an absolute path or object storage (s3://...)", file=sys.stderr, flush=True)
    return True

if __name__ == "__main__":
    sys.exit(main())
