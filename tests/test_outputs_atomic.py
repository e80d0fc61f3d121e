"""Issue 11 item 10: outputs appear only when complete, on local disk and on object stores.

A real S3-compatible server (moto) on 127.0.0.1; real Parquet files; no model needed.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from fer_batch.output import RunOutputs, companion_paths, resolve_fs
from fer_batch.schema import FACES_SCHEMA, SourceRow, read_metadata


@pytest.fixture(scope="module")
def s3_endpoint():
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true",
    }  # fmt: skip
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1",
                           access_key="testing", secret_key="testing", allow_bucket_creation=True)
    fs.create_dir("outputs")
    yield fs
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _faces(n: int, source_id: str = "s1") -> pa.Table:
    cols = {}
    for f in FACES_SCHEMA:
        if f.name in ("source_id", "source_path", "emotion"):
            cols[f.name] = pa.array([source_id] * n, f.type)
        elif pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type):
            cols[f.name] = pa.array([[0.0] * (f.type.list_size if pa.types.is_fixed_size_list(f.type) else 10)] * n, f.type)
        else:
            cols[f.name] = pa.array([0] * n).cast(f.type)
    return pa.table(cols, schema=FACES_SCHEMA)


def _row(i: int) -> dict:
    return SourceRow.not_processed(f"s{i}", f"/in/{i}.jpg", "image", "skipped", "test").to_dict()


def _listing(out: str) -> list[str]:
    fs, p, _ = resolve_fs(out)
    parent = p.rsplit("/", 1)[0]
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True)))


def _read(out: str) -> tuple[int, dict]:
    fs, p, _ = resolve_fs(out)
    with fs.open_input_file(p) as f:
        pf = pq.ParquetFile(f)
        return pf.metadata.num_rows, read_metadata(pf.schema_arrow)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_outputs_move_into_place_only_when_complete(where, tmp_path, request):
    if where == "s3":
        request.getfixturevalue("s3_endpoint")
        out = f"s3://outputs/run-{os.getpid()}/report.parquet"
    else:
        out = str(tmp_path / "report.parquet")
    names = sorted(p.rsplit("/", 1)[-1] for p in companion_paths(out))

    # a good run: complete
    good = RunOutputs(out, "test", {}, {})
    good.write_faces(_faces(5))
    good.finish([_row(1)])
    assert _listing(out) == names
    assert _read(out) == (5, {**_read(out)[1], "complete": True})

    # a run that fails while writing: nothing of it appears, the last good outputs stay
    bad = RunOutputs(out, "test", {}, {})
    bad.write_faces(_faces(3, "s2"))
    bad.abort()
    assert _listing(out) == names  # no temporary file or key left
    n, meta = _read(out)
    assert n == 5 and meta["complete"] is True

    # an interrupted run keeps the sources it completed, and says so
    part = RunOutputs(out, "test", {}, {})
    part.write_faces(_faces(2, "s3"))
    part.finish([_row(3)], complete=False)
    assert _listing(out) == names
    for p in companion_paths(out):
        assert _read(p)[1]["complete"] is False
    assert _read(out)[0] == 2
