"""deo/io/storage.py: object storage that refuses access is a one-line error naming the URI."""

import os
import pickle
import subprocess
import sys

import pytest

from deo.io import storage

from tests_helpers import REPO

KEEP = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_CA_BUNDLE")
"""The AWS_* variables kept: every other one may be a source of credentials (keys, profiles, web
identity, container credentials), all of which the test takes away."""


@pytest.mark.parametrize("pipeline", [["pretrain.py", "data=s3://{bucket}/shards"],
                                      ["ingest.py", "s2=[s3://{bucket}/s2/]", "aerial=[]", "output={out}"],
                                      ["evaluate.py", "checkpoint=s3://{bucket}/run"]])
def test_pipelines_without_credentials_name_the_uri_in_one_line(pipeline, s3_server, s3_bucket, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") or k in KEEP}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_CONFIG_FILE=str(tmp_path / "none"))
    bucket = s3_bucket.removeprefix("s3://")
    args = [a.format(bucket=bucket, out=tmp_path / "out") for a in pipeline[1:]]
    r = subprocess.run([sys.executable, str(REPO / "pipelines" / pipeline[0]), *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: s3://{bucket}/") and "no usable s3 credentials" in last, r.stderr[-3000:]
    assert "Traceback" not in r.stderr


def test_access_errors_in_the_cause_chain_are_recognised_and_others_pass_through():
    @storage.reports_access_errors
    def read(uri, error):
        try:
            raise error
        except Exception as e:  # as s3fs does: its own error raised from botocore's
            raise OSError("wrapped") from e

    with pytest.raises(storage.StorageAccessError, match=r"^s3://b/k: access denied \(Forbidden\)$"):
        read("s3://b/k", PermissionError("Forbidden"))
    with pytest.raises(OSError, match="wrapped"):  # not an access problem: unchanged
        read("s3://b/k", ValueError("bad bytes"))
    with pytest.raises(storage.StorageAccessError) as e:
        read("s3://b/k", PermissionError("Forbidden"))
    again = pickle.loads(pickle.dumps(e.value))  # as it crosses from a Ray worker
    assert (str(again), again.kind) == (str(e.value), "denied") == ("s3://b/k: access denied (Forbidden)", "denied")


def test_ingest_stops_on_missing_credentials_and_records_a_denied_source(monkeypatch):
    import deo.ingest.run as run
    from deo.ingest.config import IngestConfig

    source = {"kind": "s2_stacked", "uri": "s3://b/a.tif", "files": {"image": "s3://b/a.tif"}}

    def refuse(kind):
        def probe_s2(*_):
            raise storage.StorageAccessError(f"s3://b/a.tif: {kind}", kind)
        return probe_s2

    monkeypatch.setattr(run, "probe_s2", refuse("credentials"))
    with pytest.raises(storage.StorageAccessError):
        run.probe(source, IngestConfig(), None)
    monkeypatch.setattr(run, "probe_s2", refuse("denied"))
    assert run.probe(source, IngestConfig(), None)["error"] == "s3://b/a.tif: denied"
