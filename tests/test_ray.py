"""The Ray runner: segment planning and stitching (pure), then real Ray end to end.

Real Ray only, bound to 127.0.0.1, in private temp folders; never ``ray stop`` (it would kill
every Ray process of the machine): each test ends exactly what it started.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only (read at ray import)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest



# ----------------------------------------------------------------------------- real Ray

# Options shared by every run below: 4 frames/s so a 6 s video split at 2 s gives 3 segments
# that overlap by 4 sampled frames (1 s = lost_s); smoothing on, so it is recomputed across the
# segment borders; threads=1 so runs compare bit for bit.
OPTS = dict(fps=4.0, lost_s=1.0, threads=1, device="cpu", segment_seconds=2.0, smooth=1.0)
SORT = [("source_path", "ascending"), ("frame_index", "ascending"), ("x1", "ascending"), ("y1", "ascending")]
REPO = Path(__file__).resolve().parents[1]


def _children_of(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parents[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - out
        out |= frontier
    return out


def _listen_addresses(pids: set[int]) -> set[str]:
    """Local addresses of TCP sockets in LISTEN state owned by ``pids`` (from /proc)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    link = os.readlink(fd)
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes[link[8:-1]] = pid
        except OSError:
            continue
    addrs = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A = LISTEN
                continue
            hexip = f[1].split(":")[0]
            raw = bytes.fromhex(hexip)
            if name == "tcp":
                addrs.add(".".join(str(b) for b in raw[::-1]))
            else:  # four little-endian 32-bit words
                words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
                b = b"".join(words)
                addrs.add(str(ipaddress.IPv6Address(b)))
    return addrs


def _is_loopback(a: str) -> bool:
    ip = ipaddress.ip_address(a)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 6 s video (3 segments), a 4 s one (2 segments), a photo and a file that is no video."""
    from fer_batch import synth

    d = tmp_path_factory.mktemp("ray_media")
    synth.make_sample_video(d / "a_long.mp4", seconds=6, fps=25, size=(640, 360), seed=1)
    synth.make_sample_video(d / "b_short.mp4", seconds=4, fps=25, size=(640, 360), seed=2)
    img = synth.load_t1()
    cv2.imwrite(str(d / "c_photo.jpg"), cv2.resize(img, (640, 443)))
    synth.write_random_bytes(d / "d_broken.mp4", 20_000)
    return d


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """The local runner's output on the same inputs."""
    from fer_batch.api import run

    out = tmp_path_factory.mktemp("local") / "report.parquet"
    res = run([inputs], out=out, runner="local", **OPTS)
    return _read(out), res


def _read(out) -> dict[str, pa.Table]:
    from fer_batch.output import companion_paths, resolve_fs

    tables = {}
    for name, p in zip(("faces", "sources", "tracks"), companion_paths(str(out))):
        fs, path, _ = resolve_fs(p)
        tables[name] = pq.read_table(path, filesystem=fs)
    return tables


def _assert_same_output(got: dict[str, pa.Table], want: dict[str, pa.Table]) -> None:
    """Same rows (floats to 1e-5), same sources rows, track ids equal up to renumbering."""
    gf, wf = got["faces"].sort_by(SORT), want["faces"].sort_by(SORT)
    assert gf.schema.remove_metadata() == wf.schema.remove_metadata()
    assert gf.num_rows == wf.num_rows and gf.num_rows > 0
    for c in gf.column_names:
        if c == "track_id":
            continue
        a, b = gf.column(c).to_pylist(), wf.column(c).to_pylist()
        if pa.types.is_floating(gf.schema.field(c).type) or c == "landmarks":
            np.testing.assert_allclose(np.array(a, dtype=float), np.array(b, dtype=float), atol=1e-5, err_msg=c)
        else:
            assert a == b, c
    # ids: one-to-one within each source
    pairs = set(zip(gf.column("source_id").to_pylist(), gf.column("track_id").to_pylist(), wf.column("track_id").to_pylist()))
    assert len({(s, g) for s, g, _ in pairs}) == len(pairs) == len({(s, w) for s, _, w in pairs})
    key = ["source_id", "status", "kind", "frames_sampled", "faces", "tracks"]
    rows = lambda t: sorted(tuple(r[k] for k in key) for r in t.select(key).to_pylist())  # noqa: E731
    assert rows(got["sources"]) == rows(want["sources"])
    assert got["tracks"].num_rows == want["tracks"].num_rows
    assert sorted(got["tracks"].column("frames").to_pylist()) == sorted(want["tracks"].column("frames").to_pylist())


def test_embedded_ray_equals_local_and_leaves_nothing_running(inputs, reference, tmp_path):
    """--runner ray without an address: private loopback Ray, same files, all of it gone after."""
    import ray

    from fer_batch.api import run

    assert not ray.is_initialized(), "this test must run before the module's cluster fixture"
    before = _children_of(os.getpid())
    seen: dict = {"listen": set(), "units": []}

    def hook(step, payload):
        if step == "worker_ready" and not seen["listen"]:
            seen["listen"] = _listen_addresses(_children_of(os.getpid()) - before)
        if step == "unit_done":
            seen["units"].append((payload["source"].path.name, payload["index"], payload["count"]))

    out = tmp_path / "ray" / "report.parquet"
    res = run([inputs], out=out, runner="ray", hook=hook, **OPTS)
    assert res.out == str(out)
    _assert_same_output(_read(out), reference[0])
    # the long video ran as 3 segments, the short one as 2
    assert sorted(u for u in seen["units"] if u[0] == "a_long.mp4") == [("a_long.mp4", i, 3) for i in range(3)]
    assert sorted(u for u in seen["units"] if u[0] == "b_short.mp4") == [("b_short.mp4", i, 2) for i in range(2)]
    # it listened, on loopback only
    assert seen["listen"] and all(_is_loopback(a) for a in seen["listen"]), seen["listen"]
    # nothing left: no Ray process, no connection, no staging folder
    assert not ray.is_initialized()
    deadline = time.time() + 20
    while (_children_of(os.getpid()) - before) and time.time() < deadline:
        time.sleep(0.5)
    assert not (_children_of(os.getpid()) - before)
    assert [p.name for p in out.parent.iterdir()] and not [p for p in out.parent.iterdir() if "staging" in p.name]


@pytest.fixture(scope="module")
def small_inputs(tmp_path_factory):
    """A 6 s video (3 segments at 2 s), a photo and a broken file: the smallest mix that splits."""
    from fer_batch import synth

    d = tmp_path_factory.mktemp("eq_media")
    synth.make_sample_video(d / "a_long.mp4", seconds=6, fps=25, size=(480, 270), seed=3)
    cv2.imwrite(str(d / "c_photo.jpg"), cv2.resize(synth.load_t1(), (640, 443)))
    synth.write_random_bytes(d / "d_broken.mp4", 20_000)
    return d


@pytest.mark.slow
class TestLocalEqualsRay:
    """One Ray instance (started once for the class, loopback only, own temp folder) serves
    every parameter: the runner joins an initialised Ray instead of starting its own."""

    @pytest.fixture(scope="class")
    def local_ray(self):
        import shutil
        import tempfile

        import ray

        assert not ray.is_initialized(), "runs before the module's cluster fixture"
        tmp = tempfile.mkdtemp(prefix="fbq-", dir="/tmp")  # short: Ray's socket paths are limited
        ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=tmp,
                 object_store_memory=256 * 1024 * 1024, logging_level="WARNING", log_to_driver=False)  # fmt: skip
        try:
            yield
        finally:
            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)

    @pytest.mark.parametrize("segment_seconds", [None, 2.0], ids=["whole", "split"])
    def test_local_and_ray_runners_give_identical_outputs(self, local_ray, small_inputs, tmp_path, segment_seconds):
        """The same plan, stage code, merge and sink under both runners: identical rows (track
        ids included), tracks and sources, with and without splitting the video into segments."""
        from fer_batch.api import run

        opts = dict(fps=2.0, lost_s=1.0, threads=1, device="cpu", smooth=1.0, segment_seconds=segment_seconds)
        units: dict[str, list] = {"local": [], "ray": []}
        got = {}
        for runner in ("local", "ray"):
            def hook(step, payload, runner=runner):
                if step == "unit_done":
                    units[runner].append((payload["source"].path.name, payload["index"], payload["count"]))

            out = tmp_path / runner / "report.parquet"
            extra = {"num_workers": 2, "cpus_per_worker": 1.0} if runner == "ray" else {}
            res = run([small_inputs], out=out, runner=runner, hook=hook, **extra, **opts)
            assert res.exit_code == 1  # the broken file
            got[runner] = _read(out)
        n = 3 if segment_seconds else 1
        for runner in units:
            assert sorted(u for u in units[runner] if u[0] == "a_long.mp4") == [("a_long.mp4", i, n) for i in range(n)]
        local, remote = got["local"], got["ray"]
        for name in ("faces", "tracks"):
            a, b = local[name].replace_schema_metadata(None), remote[name].replace_schema_metadata(None)
            assert a.num_rows == b.num_rows and a.num_rows > 0
            assert a.schema == b.schema
            for c in a.column_names:
                x, y = a.column(c).to_pylist(), b.column(c).to_pylist()
                if pa.types.is_floating(a.schema.field(c).type) or c == "landmarks":
                    np.testing.assert_allclose(np.array(x, dtype=float), np.array(y, dtype=float), atol=1e-5, err_msg=c)
                else:
                    assert x == y, (name, c)  # track ids too: the same stitching of the same rows
        assert local["sources"].drop(["wall_s"]).to_pylist() == remote["sources"].drop(["wall_s"]).to_pylist()


@pytest.fixture(scope="module")
def s3_endpoint():
    """A real S3-compatible server (moto) on 127.0.0.1, with credentials in the environment."""
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
    yield env["AWS_ENDPOINT_URL"]
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def cluster(s3_endpoint, tmp_path_factory):
    """A real two-node Ray cluster on this machine (1 CPU each), the test process connected.

    Started after the S3 endpoint so that its worker processes inherit the credentials.
    """
    import ray
    from ray.cluster_utils import Cluster

    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="fbt-", dir="/tmp")  # short: Ray's socket paths are limited
    os.makedirs(os.path.join(tmp, "ray"))
    old_tmpdir = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp  # Cluster writes its address file under this, not /tmp/ray
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": tmp, "include_dashboard": False})
    c.add_node(num_cpus=1, temp_dir=tmp)
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        if old_tmpdir is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old_tmpdir


@pytest.mark.slow
def test_two_nodes_share_the_work_and_equal_local(cluster, inputs, reference, tmp_path):
    from fer_batch.api import run

    nodes, workers = [], []

    def hook(step, payload):
        if step == "unit_done":
            nodes.append(payload["node_id"])
        elif step == "worker_ready":
            workers.append(payload["node_id"])

    out = tmp_path / "report.parquet"
    run([inputs], out=out, runner="ray", num_workers=2, cpus_per_worker=1.0, hook=hook, **OPTS)
    _assert_same_output(_read(out), reference[0])
    assert len(set(workers)) == 2, "one worker actor per node"
    assert len(set(nodes)) == 2, f"units ran on {len(set(nodes))} node(s)"


@pytest.mark.slow
def test_killed_worker_is_retried_without_lost_or_duplicated_rows(cluster, inputs, reference, tmp_path):
    import signal

    from fer_batch.api import run

    ready: dict[int, str] = {}
    done_pids: list[int] = []
    killed: list[int] = []

    def hook(step, payload):
        if step == "worker_ready":
            ready[payload["pid"]] = payload["node_id"]
        elif step == "unit_done":
            done_pids.append(payload["pid"])
            if not killed:
                # kill the *other* worker: it is in the middle of its own unit now
                victim = next((p for p in ready if p != payload["pid"]), payload["pid"])
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)

    out = tmp_path / "report.parquet"
    res = run([inputs], out=out, runner="ray", num_workers=2, cpus_per_worker=1.0, hook=hook, **OPTS)
    assert killed, "no unit finished?"
    _assert_same_output(_read(out), reference[0])  # every row exactly once, same as local
    assert killed[0] not in done_pids[1:], "the killed process cannot have finished a unit later"
    assert set(done_pids) - set(ready), "a restarted worker process (new pid) finished units"
    assert res.exit_code == 1  # only the broken file failed
    assert [r["status"] for r in res.sources.to_pylist()].count("failed") == 1


@pytest.mark.slow
def test_output_to_s3_compatible_store(cluster, s3_endpoint, inputs, reference, tmp_path):
    import boto3
    import pyarrow.fs as pafs

    from fer_batch.api import run

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="fer")
    uri = "s3://fer/runs/night1/report.parquet"
    res = run([inputs], out=uri, runner="ray", num_workers=2, **OPTS)
    got = _read(uri)
    _assert_same_output(got, reference[0])
    assert res.out == uri
    fs, _ = pafs.FileSystem.from_uri(uri)
    keys = sorted(i.path for i in fs.get_file_info(pafs.FileSelector("fer/runs", recursive=True)) if i.type == pafs.FileType.File)
    # exactly the three outputs: the _staging/ prefix is gone
    assert keys == ["fer/runs/night1/report.parquet", "fer/runs/night1/report.sources.parquet",
                    "fer/runs/night1/report.tracks.parquet"], keys  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_members(pgid: int) -> set[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    out.add(int(d.name))
            except (OSError, ValueError, IndexError):
                continue
    return out


def _stop_group(pgid: int, grace_s: float = 10.0) -> None:
    """SIGTERM a process group, then SIGKILL what is left; wait until it is gone."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + grace_s
        while _group_members(pgid) and time.time() < deadline:
            time.sleep(0.3)
        if not _group_members(pgid):
            return


@pytest.mark.slow
def test_job_submission_to_a_token_protected_head(inputs, tmp_path):
    """`ray start --head` on 127.0.0.1 with token auth; the documented `ray job submit` commands.

    Two jobs run side by side: the one-liner (`--working-dir . -- fer-batch process ...`) and
    the ready entrypoint with its runtime_env. Only the head this test started is stopped (its
    process group); `ray stop` would stop every Ray process of the machine.
    """
    import secrets
    import shutil
    import subprocess
    import tempfile
    import urllib.error
    import urllib.request

    bindir = Path(sys.executable).parent
    ray_bin = bindir / "ray"
    if not ray_bin.exists():
        pytest.skip("the `ray` command is not installed next to this Python")
    tmp = Path(tempfile.mkdtemp(prefix="fbh-", dir="/tmp"))  # short: Ray's socket paths are limited
    token = secrets.token_hex(24)
    env = dict(os.environ)
    env.update(
        PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_TMPDIR=str(tmp),
        OMP_NUM_THREADS="1",
    )  # fmt: skip
    for k in ("RAY_ADDRESS", "AWS_ENDPOINT_URL"):
        env.pop(k, None)
    port, dport, cport = _free_port(), _free_port(), _free_port()
    # Ray's fixed default ports (dashboard agent 52365, metrics 44217/44227) may be taken by
    # another Ray on this machine (the cluster fixture): a job needs its own agent's port.
    env.update(DASHBOARD_METRIC_PORT=str(_free_port()), AUTOSCALER_METRIC_PORT=str(_free_port()))
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dport), "--ray-client-server-port", str(cport),
         "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
         "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
         "--temp-dir", str(tmp), "--num-cpus", "2", "--include-dashboard", "true", "--disable-usage-stats"],
        env=env, stdout=open(tmp / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    api = f"http://127.0.0.1:{dport}"
    try:
        deadline = time.time() + 120
        while True:  # the Jobs API answers (401 without the token) once the head is up
            try:
                urllib.request.urlopen(f"{api}/api/version", timeout=2)
                raise AssertionError("the Jobs API answered without the token")
            except urllib.error.HTTPError as e:
                assert e.code == 401, e.code
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.time() > deadline or head.poll() is not None:
                    raise AssertionError("the head did not come up: " + (tmp / "head.log").read_text()[-2000:])
                time.sleep(1)
        # an unauthenticated submission is refused
        req = urllib.request.Request(f"{api}/api/jobs/", data=b'{"entrypoint": "id"}', method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=10)
        assert exc.value.code == 401
        # every listener of the head is on loopback
        assert all(_is_loopback(a) for a in _listen_addresses(_group_members(head.pid)))

        video = inputs / "b_short.mp4"
        out1, out2 = tmp_path / "one" / "report.parquet", tmp_path / "two" / "report.parquet"
        common = ["--fps", "2", "--num-workers", "1", "--threads", "1", "--device", "cpu"]
        jobs = [
            [str(ray_bin), "job", "submit", "--address", api, "--working-dir", ".", "--",
             "fer-batch", "process", str(video), "--out", str(out1), "--runner", "ray", "--quiet", *common],
            [str(ray_bin), "job", "submit", "--address", api, "--runtime-env", "jobs/ray/runtime_env.yaml", "--",
             "sh", "jobs/ray/entrypoint.sh", str(video), "--out", str(out2), *common],
        ]  # fmt: skip

        def submit(cmd: list[str]) -> subprocess.CompletedProcess:
            # Right after start-up the head may answer "No available agent to submit job,
            # please try again later": do what it says.
            for _ in range(30):
                r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
                if r.returncode == 0 or "No available agent" not in r.stdout + r.stderr:
                    return r
                time.sleep(2)
            return r

        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(submit, jobs))
        for r in results:
            assert r.returncode == 0 and "succeeded" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
        for out in (out1, out2):
            t = _read(out)
            src = t["sources"].to_pylist()
            assert [r["status"] for r in src] == ["ok"] and src[0]["frames_sampled"] == 8
            assert t["faces"].num_rows == 6 * 8 and t["tracks"].num_rows == 6
            assert not [p for p in out.parent.iterdir() if "staging" in p.name]
    finally:
        _stop_group(head.pid)  # only the head this test started (never `ray stop`)
        head.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    assert not _group_members(head.pid)


def test_job_files_are_well_formed():
    """jobs/ray: the RayJob asks for token auth and the Ray runner; runtime_env ships the code."""
    import yaml

    docs = [d for d in yaml.safe_load_all((REPO / "jobs" / "ray" / "rayjob.yaml").read_text()) if d]
    assert [d["kind"] for d in docs] == ["RayJob"]  # no Service / Ingress exposing Ray's ports
    spec = docs[0]["spec"]
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert spec["entrypoint"].startswith("fer-batch process ") and "--runner ray" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    env = yaml.safe_load((REPO / "jobs" / "ray" / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "." and ".venv/" in env["excludes"]
    assert not any("KEY" in k or "SECRET" in k for k in env.get("env_vars", {}))  # no credentials in it
    script = (REPO / "jobs" / "ray" / "entrypoint.sh").read_text()
    assert 'fer-batch process "$@" --runner ray' in script and "RAY_ADDRESS" in script


@pytest.fixture(scope="module")
def stuck_inputs(tmp_path_factory):
    """A 30 s video (minutes of work at --every 1) before a photo."""
    from fer_batch import synth

    d = tmp_path_factory.mktemp("ray_stuck")
    synth.make_sample_video(d / "a_long.mp4", seconds=30, fps=25, size=(320, 180), seed=5)
    cv2.imwrite(str(d / "b_photo.jpg"), cv2.resize(synth.load_t1(), (640, 443)))
    return d


@pytest.mark.slow
def test_a_unit_over_its_time_limit_fails_and_its_worker_is_replaced(cluster, stuck_inputs, tmp_path):
    """--source-timeout on Ray: the stuck unit's actor is killed (the work really stops), the
    unit is failed naming the file, and a fresh actor runs the photo after it."""
    from fer_batch.api import run

    ready: list[int] = []

    def hook(step, payload):
        if step == "worker_ready":
            ready.append(payload["pid"])

    t0 = time.monotonic()
    res = run([stuck_inputs], out=tmp_path / "r.parquet", runner="ray", num_workers=1, every=1, reid="off",
              threads=1, source_timeout="5", hook=hook)  # fmt: skip
    rows = {Path(r["path"]).name: r for r in res.sources.to_pylist()}
    assert rows["a_long.mp4"]["status"] == "failed" and "timed out after 5 s" in rows["a_long.mp4"]["error"]
    assert "a_long.mp4" in rows["a_long.mp4"]["error"]
    assert rows["b_photo.jpg"]["status"] == "ok" and rows["b_photo.jpg"]["faces"] > 0
    assert len(ready) == 2, ready  # the stuck worker was replaced
    assert time.monotonic() - t0 < 180
    assert res.exit_code == 1


@pytest.mark.slow
def test_a_busy_worker_reports_its_units_time_limit(cluster, stuck_inputs):
    """--source-timeout auto on Ray: while a unit runs, its actor answers with the unit's full
    limit (base + media seconds + sampled frames) once the media is open."""
    import ray

    from fer_batch.config import AUTO_TIMEOUT_BASE_S, config_from_options
    from fer_batch.plan import WorkUnit
    from fer_batch.runners.ray import FerWorker
    from fer_batch.types import MediaSource

    cfg = config_from_options(every=1, reid="off", threads=1)
    h = ray.remote(FerWorker).options(num_cpus=1, max_concurrency=2).remote(cfg, 0.0)
    try:
        ray.get(h.ready.remote(), timeout=300)
        unit = WorkUnit(MediaSource(stuck_inputs / "a_long.mp4", "video", "x1"))
        ref = h.run.remote(unit)
        got = None
        deadline = time.monotonic() + 120
        while got is None and time.monotonic() < deadline:
            got = ray.get(h.limit.remote(unit.key), timeout=30)
            time.sleep(0.2)
        assert got == pytest.approx(cfg.source_time_limit(30.0, 750), abs=3.0), got
        assert got > AUTO_TIMEOUT_BASE_S + 2 * 29 + 700
        assert ray.get(h.limit.remote("another"), timeout=30) is None
        ray.cancel(ref, force=False)
    finally:
        ray.kill(h, no_restart=True)
