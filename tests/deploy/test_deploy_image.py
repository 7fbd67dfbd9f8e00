"""The CPU image built by scripts/build-image.sh, inspected and run for real with rootful podman.

Opt-in (building the image takes minutes and needs root): DCAM_IMAGE_TESTS=1, after
`scripts/build-image.sh` (scripts/test.sh does both when DCAM_IMAGE_TESTS=1). Otherwise every test here
is skipped with the reason. Containers run the way the chart runs the pod: the image's user (10001),
read-only root filesystem, only /tmp and mounted volumes writable, all capabilities dropped.

DCAM_IMAGE overrides the image (default: the chart's image.repository:appVersion, what the script tags);
DCAM_DATASET the MVTec-layout dataset (default ../shared/datasets, mounted read-only).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
import tomllib
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from deploylib import CHART, REPO, config_toml, container, default_http_port, manifests, tool, workload

pytestmark = pytest.mark.skipif(
    os.environ.get("DCAM_IMAGE_TESTS") != "1",
    reason="image tests are opt-in: DCAM_IMAGE_TESTS=1 scripts/test.sh (or scripts/build-image.sh, then "
           "DCAM_IMAGE_TESTS=1 pytest tests/deploy/test_deploy_image.py); they need root and podman",
)

CHART_META = yaml.safe_load((CHART / "Chart.yaml").read_text())
CHART_VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
IMAGE = os.environ.get("DCAM_IMAGE") or f"{CHART_VALUES['image']['repository']}:{CHART_META['appVersion']}"
DATASET = Path(os.environ.get("DCAM_DATASET") or REPO.parent / "shared" / "datasets").resolve()
UID = CHART_VALUES["podSecurityContext"]["runAsUser"]

# Same podman settings as scripts/build-image.sh (see there why): runc, and rlimits this VM allows.
PODMAN = ["podman", "--runtime", os.environ.get("DCAM_PODMAN_RUNTIME", "runc")]
_NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
# What the chart's pod gets: read-only root, an empty writable /tmp, no capabilities, no privilege gain.
HARDENED = ["--ulimit", f"nofile={_NOFILE}:{_NOFILE}", "--ulimit", "nproc=4096:4096",
            "--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp:rw,size=512m,mode=1777",
            "--cap-drop=ALL", "--security-opt=no-new-privileges"]


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"podman {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def image() -> dict:
    """`podman image inspect` of the image under test; missing = a failure (the tests were asked for)."""
    if os.geteuid() != 0:
        pytest.fail("DCAM_IMAGE_TESTS=1 needs root (rootful podman)")
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: run scripts/build-image.sh (it installs it and builds the image)")
    result = podman("image", "inspect", IMAGE, check=False)
    if result.returncode != 0:
        pytest.fail(f"image {IMAGE} not found: run scripts/build-image.sh first\n{result.stderr}")
    return json.loads(result.stdout)[0]


@pytest.fixture(scope="module")
def rootfs(image):
    """The image's root filesystem, mounted read-only on the host (`podman image mount`)."""
    path = Path(podman("image", "mount", IMAGE).stdout.strip())
    yield path
    podman("image", "unmount", IMAGE, check=False)


def _in_image(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


# ---- what the image contains ---------------------------------------------------------------------


def test_image_contents(image, rootfs):
    cfg = image["Config"]
    env = dict(item.split("=", 1) for item in cfg["Env"])
    size_mb = image["Size"] / 1e6
    print(f"\n{IMAGE}: {size_mb:.1f} MB, {len(image['RootFS']['Layers'])} layers, user {cfg['User']}")
    assert size_mb < 250, f"image is {size_mb:.1f} MB (target < 250 MB)"
    entry = cfg["Entrypoint"][0]
    baked = tomllib.loads(_in_image(rootfs, "/etc/dcam/config.toml").read_text())
    for path in (entry, env["ORT_DYLIB_PATH"], baked["model"]["path"], env["SSL_CERT_FILE"]):
        file = _in_image(rootfs, path)
        assert file.is_file() and file.stat().st_size > 0, f"{path} missing from the image"
        # Owned by root and not writable by the operator's user: the image cannot be modified at run time.
        assert file.stat().st_uid == 0 and not file.stat().st_mode & 0o022, f"{path} is writable by others"
    assert os.access(_in_image(rootfs, entry), os.X_OK)
    # Debian's CA bundle, not the build host's: no CA the host added locally (e.g. a TLS-intercepting proxy's).
    bundle = _in_image(rootfs, env["SSL_CERT_FILE"]).read_text()
    assert bundle.count("BEGIN CERTIFICATE") > 100
    for local in Path("/usr/local/share/ca-certificates").glob("**/*.crt"):
        body = "".join(local.read_text().split("-----")[2].split())
        assert body not in "".join(bundle.split()), f"the image trusts the build host's local CA {local}"
    # Nothing to build with: no compilers, linkers, cargo or Python.
    path_dirs = env["PATH"].split(":")
    for name in ("cc", "gcc", "c++", "ld", "as", "make", "cargo", "rustc", "python3", "pip", "pip3"):
        found = [d for d in path_dirs if _in_image(rootfs, f"{d}/{name}").exists()]
        assert not found, f"build tool {name} in the image: {found}"
    assert not _in_image(rootfs, "/usr/include").exists() or not any(_in_image(rootfs, "/usr/include").iterdir())


# ---- the chart's container spec against the image's config ------------------------------------------


def test_chart_container_matches_image(image, rootfs):
    docs = manifests({})
    c = container(docs)
    pod = workload(docs)["spec"]["template"]["spec"]
    cfg = image["Config"]
    # Image: the chart's default reference is what scripts/build-image.sh tagged (unless DCAM_IMAGE says otherwise).
    if not os.environ.get("DCAM_IMAGE"):
        assert c["image"] == IMAGE, "chart default image.repository:tag (appVersion) = the built image"
    # Command: the chart keeps the image's ENTRYPOINT and passes the same arguments as its CMD.
    assert "command" not in c, "the chart must not override the image's ENTRYPOINT"
    assert cfg["Entrypoint"] == ["/opt/dcam/bin/dcam-stream"]
    assert c["args"] == cfg["Cmd"], (c["args"], cfg["Cmd"])
    # Port: the one the image exposes, and the one its baked config listens on.
    exposed = {int(p.split("/")[0]) for p in cfg["ExposedPorts"]}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert exposed == {ports["http"]} == {default_http_port()}
    baked = tomllib.loads(_in_image(rootfs, "/etc/dcam/config.toml").read_text())
    assert baked["telemetry"]["http_addr"].endswith(f":{ports['http']}")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] == "http"
    # User: numeric, non-root, the same uid/gid the pod runs as (runAsNonRoot can verify a numeric USER).
    uid, _, gid = cfg["User"].partition(":")
    assert int(uid) == pod["securityContext"]["runAsUser"] == UID != 0
    assert int(gid) == pod["securityContext"]["runAsGroup"]
    passwd = _in_image(rootfs, "/etc/passwd").read_text()
    assert any(line.split(":")[2] == uid for line in passwd.splitlines()), "the image's user has a passwd entry"
    # Read-only root: the chart says so, and every path the operator writes is a volume.
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    config_path = cfg["Cmd"][cfg["Cmd"].index("--config") + 1]
    assert os.path.dirname(config_path) in mounts and mounts[os.path.dirname(config_path)]["readOnly"]
    assert _in_image(rootfs, config_path).is_file(), "the chart mounts its ConfigMap over a directory the image has"
    assert "/tmp" in mounts and not mounts["/tmp"].get("readOnly")
    chart_cfg = tomllib.loads(config_toml(docs))
    heatmaps = chart_cfg["heatmap"]["store"].removeprefix("file://")
    assert heatmaps in mounts and not mounts[heatmaps].get("readOnly")
    # The image's own config writes only under /tmp (what `docker run --read-only --tmpfs /tmp` allows).
    assert baked["heatmap"]["store"].startswith("file:///tmp/")
    # The model: the chart's config.model.path is the baked file; modelVolume mounts over its directory.
    assert chart_cfg["model"]["path"] == baked["model"]["path"]
    assert _in_image(rootfs, chart_cfg["model"]["path"]).is_file()
    with_model = container(manifests({"modelVolume": {"persistentVolumeClaim": {"claimName": "models"}}}))
    model_mount = {m["name"]: m for m in with_model["volumeMounts"]}["model"]
    assert model_mount["mountPath"] == os.path.dirname(baked["model"]["path"]) and model_mount["readOnly"]


# ---- running it ---------------------------------------------------------------------------------------


def _dataset() -> Path:
    if not (DATASET / "bottle").is_dir():
        pytest.fail(f"dataset not found at {DATASET} (set DCAM_DATASET)")
    return DATASET


def test_runs_as_non_root_with_read_only_root(image):
    """In the hardened container the process is uid/gid 10001, / is read-only, /tmp is writable."""
    probe = ("id -u; id -g; touch /opt/dcam/x 2>/dev/null && echo root-writable || echo root-read-only; "
             "touch /tmp/x && echo tmp-writable; awk '/^CapEff/ {print $2}' /proc/self/status")
    result = podman("run", "--rm", "--network=none", *HARDENED, "--entrypoint", "/bin/sh", IMAGE, "-c", probe)
    print(f"\n{result.stdout}")
    uid, gid, root, tmp, caps = result.stdout.split()
    assert (int(uid), int(gid)) == (UID, CHART_VALUES["podSecurityContext"]["runAsGroup"])
    assert root == "root-read-only" and tmp == "tmp-writable"
    assert int(caps, 16) == 0, "no capabilities (the chart drops ALL)"


def test_demo_in_container(image):
    """`dcam-stream demo` (in-process Kafka) in a hardened container, dataset mounted read-only."""
    started = time.monotonic()
    result = podman("run", "--rm", "--network=none", *HARDENED, "-v", f"{_dataset()}:/data:ro",
                    IMAGE, "demo", "--dataset", "/data", "--per-class", "3", "--quiet", timeout=600, check=False)
    print(f"\n$ podman run ... {IMAGE} demo --dataset /data --per-class 3 --quiet  "
          f"({time.monotonic() - started:.0f} s)\n{result.stdout}")
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert "model " in out and " on cpu" in out.lower(), out
    keys = ("images scored", "anomalies", "agree with labels", "throughput", "heatmaps")
    summary = {}
    for line in out.split("\nsummary\n", 1)[1].splitlines():
        key = next((k for k in keys if line.strip().startswith(k)), None)
        if key:
            summary[key] = line.strip().removeprefix(key).strip()
    classes = [d for d in _dataset().iterdir() if (d / "test").is_dir()]
    expected = 3 * len(classes)
    assert summary["images scored"] == str(expected), summary
    agree, labelled = summary["agree with labels"].split()[0].split("/")
    assert int(labelled) == expected and int(agree) >= expected // 2, summary
    # Heatmaps (anomalies policy) went to the container's /tmp: the only writable path besides volumes.
    assert int(summary["heatmaps"].split()[0]) == int(summary["anomalies"]) and "under /tmp/" in summary["heatmaps"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on {port} after {timeout} s")


@pytest.fixture
def broker(tmp_path):
    """A noida-db broker process on the host (its own session: it ignores SIGTERM and forks a child)."""
    port = _free_port()
    log = open(tmp_path / "broker.log", "w")
    proc = subprocess.Popen([tool("noida-db"), "start", "--only", "kafka", "--kafka-port", str(port),
                             "--data-dir", str(tmp_path / "broker-data")],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_port(port, 30)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()


def _http(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def test_run_against_broker(image, broker, tmp_path):
    """`dcam-stream run` in a hardened container with the chart's rendered config, against a noida-db
    broker on the host network: probes answer, scores come back, heatmaps land on the mounted volume."""
    kcat = shutil.which("kcat") or pytest.fail("kcat not installed (scripts/build-image.sh installs it)")
    http_port = _free_port()
    per_class = 2
    # The config the chart would mount at /etc/dcam, pointed at this broker; heatmaps for every image.
    values = {"config": {"kafka": {"brokers": broker}, "heatmap": {"policy": "all"},
                         "telemetry": {"http_addr": f"127.0.0.1:{http_port}", "log_format": "json"}}}
    docs = manifests(values)
    spec = container(docs)
    config_dir = tmp_path / "etc-dcam"
    config_dir.mkdir()
    (config_dir / "config.toml").write_text(config_toml(docs))
    heatmap_path = tomllib.loads(config_toml(docs))["heatmap"]["store"].removeprefix("file://")
    heatmaps = tmp_path / "heatmaps"
    heatmaps.mkdir()
    os.chown(heatmaps, UID, UID)  # an emptyDir/PVC with fsGroup; rootful podman maps uids 1:1

    produced = podman("run", "--rm", "--network=host", *HARDENED, "-v", f"{_dataset()}:/data:ro", IMAGE,
                      "produce", "/data", "--per-class", str(per_class), "--topic", "images",
                      "--format", "mixed", "--brokers", broker, timeout=300)
    count = int(produced.stdout.split("published ", 1)[1].split()[0])
    print(f"\n$ podman run ... {IMAGE} produce /data --per-class {per_class} ...: {produced.stdout.strip()}")
    assert count == per_class * len([d for d in _dataset().iterdir() if (d / "test").is_dir()])

    name = f"dcam-image-test-{uuid.uuid4().hex[:8]}"
    podman("run", "-d", "--name", name, "--network=host", *HARDENED,
           "-v", f"{config_dir}:/etc/dcam:ro", "-v", f"{heatmaps}:{heatmap_path}",
           IMAGE, *spec["args"])
    try:
        # The chart's probes: /healthz (liveness) once the HTTP server is up, /readyz when subscribed.
        base = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 180
        ready = (0, "")
        while time.monotonic() < deadline:
            ready = _http(base + spec["readinessProbe"]["httpGet"]["path"])
            if ready[0] == 200:
                break
            time.sleep(1)
        assert ready[0] == 200, f"/readyz never became ready: {ready}\n{podman('logs', name, check=False).stderr[-3000:]}"
        assert _http(base + spec["livenessProbe"]["httpGet"]["path"])[0] == 200
        print(f"\n/readyz: {ready[1].strip()}")

        # The operator creates `scores` with its first record (broker auto-creation); kcat -C needs it to exist.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            meta = subprocess.run([kcat, "-L", "-b", broker, "-t", "scores", "-J"], capture_output=True, text=True, timeout=30)
            if meta.returncode == 0 and any(t["topic"] == "scores" and t.get("partitions") and not t.get("err")
                                            for t in json.loads(meta.stdout)["topics"]):
                break
            time.sleep(1)
        read = subprocess.run([kcat, "-C", "-b", broker, "-t", "scores", "-o", "beginning", "-c", str(count),
                               "-q", "-f", "%s\n"], capture_output=True, text=True, timeout=300)
        assert read.returncode == 0, read.stderr
        scores = [json.loads(line) for line in read.stdout.splitlines() if line.strip()]
        assert len(scores) == count
        for s in scores:
            print(f"  {s['image_id']:<44} {s['class']:<14} score {s['score']:.3f} "
                  f"{'ANOMALY' if s['is_anomaly'] else 'ok':<8} {s['heatmap_uri']}")
        assert len({s["image_id"] for s in scores}) == count
        for s in scores:
            assert 0.0 <= s["score"] <= 1.0 and s["is_anomaly"] == (s["raw_score"] >= s["threshold"])
            assert s["heatmap_uri"].startswith(f"file://{heatmap_path}/")
            on_host = heatmaps / s["heatmap_uri"].removeprefix(f"file://{heatmap_path}/")
            assert on_host.is_file() and on_host.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", on_host
            assert on_host.stat().st_uid == UID, "written by the image's user"
        metrics = _http(base + "/metrics")[1]
        assert 'dcam_execution_provider{provider="cpu"} 1' in metrics
    finally:
        # SIGTERM (what Kubernetes sends): the operator drains, commits and exits 0.
        podman("stop", "-t", "60", name, timeout=120, check=False)
        state = json.loads(podman("inspect", name, check=False).stdout or "[{}]")[0].get("State", {})
        logs = podman("logs", name, check=False)
        podman("rm", "-f", name, check=False)
    lines = [ln for ln in (logs.stdout + logs.stderr).splitlines() if ln.strip()]
    print(f"container exit code after SIGTERM: {state.get('ExitCode')}; last log line: {lines[-1] if lines else None}")
    assert state.get("ExitCode") == 0, "\n".join(lines[-30:])
    # log_format = json from the chart's config: every line is a JSON object.
    assert lines and all(json.loads(ln) for ln in lines)
