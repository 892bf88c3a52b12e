"""Shared fixtures: real sample data, a real S3 endpoint (moto server) and a real local Ray.

Nothing here reaches the network: moto listens on 127.0.0.1, Ray is started on loopback (the test
runner `scripts/test` puts the whole suite in a private network namespace when it can).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DEO_SHARED_DATA", REPO.parent / "shared" / "data"))
SAMPLES = REPO / "data" / "samples"

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray's temp dir holds the address file `ray start` (and ray.cluster_utils) leave: a private one per
# session keeps the pipelines, which join such a cluster, off a developer's own `ray start` and off one a
# crashed test left (CI: every later Ray test tried to join a dead one). Short: socket paths <= 107 chars.
RAY_TMPDIR = tempfile.mkdtemp(prefix="deo-ray-", dir="/tmp")
os.environ["RAY_TMPDIR"] = RAY_TMPDIR


def pytest_configure(config):
    # Tiny models on 2 cores: torch's default thread pool oversubscribes when Ray workers or moto share
    # the cores (a tiny step ran ~20x slower). DEO_TEST_THREADS overrides.
    import torch

    torch.set_num_threads(int(os.environ.get("DEO_TEST_THREADS", "1")))


def pytest_unconfigure(config):
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # before its temp dir goes
        ray.shutdown()
    shutil.rmtree(RAY_TMPDIR, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: the team's real imagery (README.md there describes each set)."""
    if not SHARED_DATA.exists():
        pytest.skip(f"real data not found at {SHARED_DATA} (set DEO_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def samples() -> Path:
    """data/samples: the real samples committed with the repo."""
    return SAMPLES


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """A moto S3 server on 127.0.0.1 plus the environment that points boto, s3fs, pyarrow and GDAL at it."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            # GDAL ignores AWS_ENDPOINT_URL: it has its own keys for S3-compatible endpoints.
            "AWS_S3_ENDPOINT": f"127.0.0.1:{self.port}",
            "AWS_HTTPS": "NO",
            "AWS_VIRTUAL_HOSTING": "FALSE",
            "AWS_NO_SIGN_REQUEST": "NO",
        }

    def start(self) -> S3Server:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def make_bucket(self, name: str) -> str:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        try:
            s3.create_bucket(Bucket=name)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass
        return f"s3://{name}"

    def upload_dir(self, local: Path, uri: str) -> str:
        """Copy a local folder (recursively) to ``uri`` and return it."""
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": self.endpoint})
        fs.put(str(local).rstrip("/") + "/", uri.removeprefix("s3://").rstrip("/") + "/", recursive=True)
        return uri


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint for the session (moto in server mode on a free loopback port)."""
    server = S3Server().start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh bucket per test: ``s3://<name>``."""
    name = "t-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    name = "".join(c for c in name if c.isalnum() or c == "-").strip("-")
    return s3_server.make_bucket(f"{name}-{int(time.time() * 1000) % 100000}")


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory) -> Path:
    """The committed samples ingested once per session (plain path, no Ray): a local shard dataset."""
    from deo.config import build_config
    from deo.ingest.config import IngestConfig
    from deo.ingest.run import ingest

    out = tmp_path_factory.mktemp("shards") / "samples"
    cwd = os.getcwd()
    os.chdir(REPO)  # the ingest defaults name data/samples relative to the repo root
    try:
        ingest(build_config(IngestConfig, overrides=[f"output={out}", "use_ray=false"]), log=lambda _: None)
    finally:
        os.chdir(cwd)
    return out


BIGEARTHNET_TILE = 60
"""Side of the shard tiles cut from the 120 px BigEarthNet patches (4 tiles per S1+S2 pair)."""


def bigearthnet_pairs(shared: Path) -> list[tuple[Path, Path]]:
    """(S2 patch folder, S1 patch folder) of every BigEarthNet example pair (S1 JSON names its S2)."""
    import json

    root = shared / "bigearthnet"
    pairs = []
    for s1 in sorted((root / "BigEarthNet-S1-Example").iterdir()):
        meta = json.loads(next(s1.glob("*_labels_metadata.json")).read_text())
        pairs.append((root / "BigEarthNet-S2-Example" / meta["corresponding_s2_patch"], s1))
    return pairs


@pytest.fixture(scope="session")
def bigearthnet_sar_shards(tmp_path_factory) -> Path:
    """Real BigEarthNet S2 + co-located S1 VV/VH written with deo.io.shards (``sar`` column, 24 rows of
    60 px; no optical, so training uses the S2 true colour). One extra row has no SAR (null)."""
    import json

    import numpy as np
    import rasterio
    from rasterio.enums import Resampling

    from deo.bands import DEO_BANDS, RGB_BANDS, SAR_BANDS
    from deo.io.shards import MANIFEST, SCHEMA_VERSION, rows_to_table, shard_schema, write_table

    t = BIGEARTHNET_TILE
    rows = []
    for s2, s1 in bigearthnet_pairs(SHARED_DATA):
        bands = []
        for b in DEO_BANDS:  # 20 m bands to the 10 m grid (120 px), bilinear
            with rasterio.open(next(s2.glob(f"*_{b}.tif"))) as src:
                bands.append(src.read(1, out_shape=(120, 120), resampling=Resampling.bilinear))
        ms = np.clip(np.stack(bands), 1, None).astype(np.uint16)
        sar = []
        for b in SAR_BANDS:
            with rasterio.open(next(s1.glob(f"*_{b}.tif"))) as src:
                sar.append(src.read(1))
                crs, transform = src.crs.to_string(), src.transform
        sar = np.stack(sar).astype(np.float32)
        for i, (y, x) in enumerate([(0, 0), (0, t), (t, 0), (t, t)]):
            rows.append({"sample_id": f"{s2.name}_{i}", "ms": ms[:, y:y + t, x:x + t].copy(),
                         "sar": sar[:, y:y + t, x:x + t].copy(), "ms_gsd": 10.0, "optical_gsd": 10.0,
                         "crs": crs, "source_ms": str(s2), "source_optical": None,
                         "bounds": [transform.c + x * transform.a, transform.f + (y + t) * transform.e,
                                    transform.c + (x + t) * transform.a, transform.f + y * transform.e]})
    rows.append({**rows[0], "sample_id": "no-sar", "sar": None})
    out = tmp_path_factory.mktemp("bigearthnet") / "shards"
    out.mkdir()
    write_table(str(out / "part-0.parquet"), rows_to_table(rows, shard_schema(t, t, sar=True)))
    ms_all = np.stack([r["ms"] for r in rows]).astype(np.float64)
    sar_all = np.stack([r["sar"] for r in rows if r["sar"] is not None]).astype(np.float64)
    rgb = np.clip(ms_all[:, [2, 1, 0]] * 255 / 3000, 0, 255)
    stats = {k: {"mean": a.mean((0, 2, 3)).tolist(), "std": a.std((0, 2, 3)).tolist()}
             for k, a in (("ms", ms_all), ("optical", rgb), ("sar", sar_all))}
    manifest = {"schema_version": SCHEMA_VERSION, "files": ["part-0.parquet"],
                "bands": {"ms": list(DEO_BANDS), "optical": list(RGB_BANDS), "sar": list(SAR_BANDS)},
                "counts": {"rows": len(rows), "ms": len(rows), "optical": 0, "paired": 0, "rejected": 0},
                "stats": stats}
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


@pytest.fixture
def ray_local():
    """A real local Ray (2 CPUs, loopback only) for one test, then shut down.

    Not session-wide: tests that start their own clusters (ray job submit, sweeps, fake multi-node)
    must not run beside it, because Ray's state API (used by Ray Train's placement-group cleaner)
    refuses to guess between several local instances and placement groups then leak.
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            configure_logging=False,
            log_to_driver=False,
        )
    yield ray
    ray.shutdown()


def stop_process_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Stop what a test started with ``start_new_session=True`` (e.g. ``ray start --head --block``), by its
    process group: SIGINT (``ray start --block`` stops its node in about a second; it ignored SIGTERM for
    the whole grace period), then SIGKILL after ``grace_s``, then SIGKILL to stragglers of the group."""
    import signal

    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(1)
    try:  # children that outlived the leader (a fake cluster's raylets)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_cli(args: list[str], env: dict | None = None, cwd: Path | None = None, timeout: int = 900):
    """Run a pipeline as a user does (``python pipelines/x.py ...``); returns CompletedProcess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, *args], cwd=cwd or REPO, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )
