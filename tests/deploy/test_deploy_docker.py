"""docker/Dockerfile and docker/Dockerfile.cuda: hadolint, and their ties to the scripts, the chart and
the operator's config. There is no Docker engine here, so the build steps are the project's own scripts
(scripts/fetch-ort.sh, docker/fetch-ort-gpu.sh, cargo build --release --locked), checked here."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import subprocess
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

from deploylib import CHART, REPO, config_check, default_http_port, default_keys, flat_keys, tool

DOCKER = REPO / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]
IMAGE_CONFIG = DOCKER / "config.toml"
CHART_VALUES = yaml.safe_load((CHART / "values.yaml").read_text())


def ort_version() -> str:
    """The ONNX Runtime version scripts/fetch-ort.sh fetches by default."""
    text = (REPO / "scripts" / "fetch-ort.sh").read_text()
    match = re.search(r"VERSION=\$\{ORT_VERSION:-([0-9.]+)\}", text)
    assert match, "scripts/fetch-ort.sh: cannot find its default ONNX Runtime version"
    return match.group(1)


def parse(path: Path) -> list[dict]:
    """Stages of a Dockerfile: [{"from", "name", "args", "instructions": [(INSTR, rest)]}]."""
    lines, buf = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        lines.append(buf + stripped)
        buf = ""
    global_args: dict[str, str] = {}
    stages: list[dict] = []
    for line in lines:
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            words = rest.split()
            image = words[0]
            for name, value in global_args.items():
                image = image.replace(f"${{{name}}}", value)
            stages.append({"from": image, "name": words[2] if len(words) > 2 else None,
                           "args": {}, "instructions": []})
        elif not stages:
            if instr == "ARG":
                name, _, value = rest.partition("=")
                global_args[name] = value.strip('"')
        else:
            if instr == "ARG":
                name, _, value = rest.partition("=")
                stages[-1]["args"][name] = value.strip('"')
            stages[-1]["instructions"].append((instr, rest))
    return stages


def expand(text: str, args: dict[str, str]) -> str:
    for name, value in args.items():
        text = text.replace(f"${{{name}}}", value).replace(f"${name}", value)
    return text


def runtime(path: Path) -> dict:
    return parse(path)[-1]


def instructions(stage: dict, kind: str) -> list[str]:
    return [rest for instr, rest in stage["instructions"] if instr == kind]


def env_of(stage: dict) -> dict[str, str]:
    env = {}
    for rest in instructions(stage, "ENV"):
        for item in shlex.split(rest):
            key, _, value = item.partition("=")
            env[key] = expand(value, stage["args"])
    return env


def copies(stage: dict) -> list[tuple[str | None, list[str], str]]:
    """(from-stage or None, sources, destination) per COPY."""
    out = []
    for rest in instructions(stage, "COPY"):
        words = shlex.split(expand(rest, stage["args"]))
        source_stage = None
        plain = []
        for word in words:
            if word.startswith("--from="):
                source_stage = word.split("=", 1)[1]
            elif not word.startswith("--"):
                plain.append(word)
        out.append((source_stage, plain[:-1], plain[-1]))
    return out


def exec_form(stage: dict, kind: str) -> list[str]:
    found = instructions(stage, kind)
    assert len(found) == 1, f"one {kind} expected"
    return json.loads(found[0])


# ---- hadolint ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    hadolint = tool("hadolint")
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"hadolint {dockerfile.name}:\n{result.stdout}{result.stderr}"


# ---- structure -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_multi_stage_with_small_runtime(dockerfile):
    stages = parse(dockerfile)
    assert len(stages) >= 3, "ORT fetch, cargo build and runtime stages"
    build_images = {s["from"] for s in stages[:-1]}
    final = stages[-1]
    assert final["from"] not in build_images, "the runtime stage must not be a build image"
    assert not final["from"].startswith(("rust:", "python:")), final["from"]
    # Only built artifacts travel into the runtime stage: no toolchain, no sources.
    for source_stage, sources, dest in copies(final):
        if source_stage is None:
            assert all(s in ("models/dcam.onnx", "docker/config.toml") for s in sources), sources


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_builds_with_the_project_scripts(dockerfile):
    text = dockerfile.read_text()
    assert "cargo build --release --locked" in text
    if dockerfile.name == "Dockerfile":
        assert "scripts/fetch-ort.sh" in text
    else:
        assert "docker/fetch-ort-gpu.sh" in text
        assert re.search(r'CARGO_FEATURES="?cuda,tensorrt"?', text), "GPU image builds with the GPU EP features"
        assert re.search(r"nvidia/cuda:13\.[0-9.]+-cudnn-runtime", text), "CUDA 13 + cuDNN 9 runtime base"
    staged = "".join((REPO / "scripts" / n).read_text() for n in ("build-image.sh", "check-cuda-image.sh")
                     if (REPO / "scripts" / n).exists())
    for source_stage, sources, _ in [c for s in parse(dockerfile) for c in copies(s)]:
        for src in sources:
            if source_stage is None and src.startswith(".image-build/"):
                # Offline `prebuilt` stage: files the image scripts stage, not part of the repo.
                assert src.split("/")[1] in staged, f"{dockerfile.name} copies {src}, which nothing stages"
            elif source_stage is None and src not in (".", "models/dcam.onnx"):
                assert (REPO / src).exists(), f"{dockerfile.name} copies missing {src}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_non_root_user_matches_chart(dockerfile):
    final = runtime(dockerfile)
    users = instructions(final, "USER")
    assert users, "runtime stage must set USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, "numeric non-root uid (runAsNonRoot can verify it)"
    pod = CHART_VALUES["podSecurityContext"]
    assert int(uid) == pod["runAsUser"]
    assert int(gid or uid) == pod["runAsGroup"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_onnxruntime_library_is_pointed_to(dockerfile):
    final = runtime(dockerfile)
    env = env_of(final)
    version = ort_version()
    assert env["ORT_DYLIB_PATH"].endswith(f"libonnxruntime.so.{version}")
    lib_dir = os.path.dirname(env["ORT_DYLIB_PATH"])
    dests = [dest for stage, _, dest in copies(final) if stage == "ort"]
    assert any(d.rstrip("/") == lib_dir for d in dests), f"ORT libraries are not copied to {lib_dir}"
    # The CPU lib comes from the same place scripts/fetch-ort.sh puts it locally.
    if dockerfile.name == "Dockerfile":
        assert any(f".ort/libonnxruntime.so.{version}" in " ".join(src) for stage, src, _ in copies(final) if stage == "ort")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_model_and_config_paths_match_chart(dockerfile):
    final = runtime(dockerfile)
    dest = {tuple(src): d for _, src, d in copies(final)}
    model_path = dest[("models/dcam.onnx",)]
    assert model_path == CHART_VALUES["config"]["model"]["path"], "chart config.model.path = baked model"
    image_cfg = tomllib.loads(IMAGE_CONFIG.read_text())
    assert image_cfg["model"]["path"] == model_path, "docker/config.toml model.path = baked model"
    config_path = dest[("docker/config.toml",)]
    cmd = exec_form(final, "CMD")
    assert cmd == ["run", "--config", config_path]
    assert exec_form(final, "ENTRYPOINT")[0].endswith("/dcam-stream")
    # The chart mounts its ConfigMap over the directory of the baked config and runs the same command.
    assert os.path.dirname(config_path) == "/etc/dcam"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_exposes_operator_port(dockerfile):
    exposed = instructions(runtime(dockerfile), "EXPOSE")
    assert exposed == [str(default_http_port())]
    image_cfg = tomllib.loads(IMAGE_CONFIG.read_text())
    assert image_cfg["telemetry"]["http_addr"].endswith(f":{default_http_port()}")


def test_image_config_writes_only_to_tmp():
    """Read-only root: the image's own config writes heatmaps under /tmp (a tmpfs/emptyDir)."""
    image_cfg = tomllib.loads(IMAGE_CONFIG.read_text())
    assert image_cfg["heatmap"]["store"].startswith("file:///tmp/")


def test_image_config_keys_exist():
    unknown = flat_keys(tomllib.loads(IMAGE_CONFIG.read_text())) - default_keys()
    assert not unknown, f"docker/config.toml has keys not in config/default.toml: {sorted(unknown)}"


def test_image_config_passes_operator_config_check(tmp_path):
    result = config_check(IMAGE_CONFIG.read_text(), tmp_path)
    assert result.returncode == 0, f"config check failed:\n{result.stdout}\n{result.stderr}"


def test_model_baked_from_repo():
    model = REPO / "models" / "dcam.onnx"
    if not model.is_file():
        pytest.skip("models/dcam.onnx is not exported yet (training/ produces it); the image build needs it")
    assert model.stat().st_size > 0


# ---- online and offline sources of the runtime's files -----------------------------------------


def _stage_args(path: Path) -> dict[str, str]:
    """Global ARGs (before the first FROM) with their defaults."""
    out = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.upper().startswith("FROM "):
            break
        if line.upper().startswith("ARG "):
            name, _, value = line[4:].partition("=")
            out[name.strip()] = value.strip('"')
    return out


def _provides(stage: dict, path: str) -> bool:
    """Whether a stage puts `path` in place: COPY to it/its directory, `install -D ... path`, or it comes
    with the base image (a CA bundle in a Debian-based build image)."""
    for _, sources, dest in copies(stage):
        if dest == path or (dest.endswith("/") and dest + os.path.basename(path) == path):
            return True
    runs = " ".join(instructions(stage, "RUN"))
    if re.search(rf"install -D[^&]* {re.escape(path)}\b", runs):
        return True
    # A RUN that ends by checking its output: `test -f "<relative path>"` in the stage's WORKDIR.
    workdir = (instructions(stage, "WORKDIR") or ["/"])[-1]
    for made in re.findall(r'test -f "?([^"\s]+)', runs):
        made = os.path.join(workdir, expand(made, stage["args"]))
        if made == path or (path.endswith("/") and made.startswith(path)):
            return True
    return path == "/etc/ssl/certs/ca-certificates.crt" and re.match(r"rust:.*bookworm", stage["from"]) is not None


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_online_and_prebuilt_sources(path):
    """BINARY_SOURCE / ORT_SOURCE pick the stages the runtime copies from: by default the online build
    and download stages (rust:* builder, PyPI wheels), with `prebuilt` the host files that
    scripts/build-image.sh (CPU) or scripts/check-cuda-image.sh (CUDA) stage. Both must provide every
    path the runtime copies."""
    args = _stage_args(path)
    assert args["BINARY_SOURCE"] == "build" and args["ORT_SOURCE"] == "ort-download", "online by default"
    stages = {s["name"]: s for s in parse(path)}
    assert stages["binary"]["from"] == "build" and stages["ort"]["from"] == "ort-download"
    assert stages["prebuilt"]["from"] == "scratch"
    wanted = {"binary": [], "ort": []}
    for source_stage, sources, _ in copies(runtime(path)):
        if source_stage in wanted:
            wanted[source_stage] += sources
    assert wanted["binary"] and wanted["ort"], "the runtime copies from the selected stages only"
    assert not {s for s, _, _ in copies(runtime(path)) if s} - set(wanted), "no copy bypasses the selection"
    for alias, online in (("binary", "build"), ("ort", "ort-download")):
        for src in wanted[alias]:
            assert _provides(stages[online], src), f"{online} does not provide {src}"
            assert _provides(stages["prebuilt"], expand(src, stages["prebuilt"]["args"])), f"prebuilt does not provide {src}"
    script_name, base_arg = ("build-image.sh", "RUNTIME_IMAGE=") if path.name == "Dockerfile" else ("check-cuda-image.sh", "CUDA_IMAGE=")
    script = (REPO / "scripts" / script_name).read_text()
    for flag in ("BINARY_SOURCE=prebuilt", "ORT_SOURCE=prebuilt", base_arg):
        assert flag in script, f"scripts/{script_name} does not pass {flag}"


# ---- .dockerignore -------------------------------------------------------------------------------


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes; a match on a parent dir counts."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/")
        regex = fnmatch.translate(pat).replace(".*", "[^/]*").replace("[^/]*[^/]*", ".*")
        if pat.startswith("**/"):
            regex = "(.*/)?" + fnmatch.translate(pat[3:]).replace(".*", "[^/]*")
        if any(re.fullmatch(regex, p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_build_inputs():
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for needed in ("Cargo.toml", "Cargo.lock", ".cargo/config.toml", "src/main.rs", "config/default.toml",
                   "scripts/fetch-ort.sh", "docker/fetch-ort-gpu.sh", "docker/config.toml", "models/dcam.onnx",
                   ".image-build/dist/dcam-stream"):
        assert not _ignored(needed, patterns), f".dockerignore drops {needed}"
    for heavy in ("target/debug/dcam-stream", ".venv/bin/python", ".git/HEAD", "training/runs/x.pt",
                  "models/checkpoint.pt", ".ort/libonnxruntime.so", ".image-build/rootfs/usr/bin/bash"):
        assert _ignored(heavy, patterns), f".dockerignore keeps {heavy}"


# ---- docker/fetch-ort-gpu.sh (offline, with stand-in wheels) ---------------------------------------


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_fetch_ort_gpu_extracts_provider_libraries(tmp_path):
    version = ort_version()
    capi = "onnxruntime/capi/"
    ort = _wheel(tmp_path / "onnxruntime_gpu.whl", {
        capi + f"libonnxruntime.so.{version}": b"core",
        capi + "libonnxruntime_providers_shared.so": b"shared",
        capi + "libonnxruntime_providers_cuda.so": b"cuda",
        capi + "libonnxruntime_providers_tensorrt.so": b"trt",
        capi + "onnxruntime_pybind11_state.so": b"python only",
    })
    trt = _wheel(tmp_path / "tensorrt_libs.whl", {"tensorrt_libs/libnvinfer.so.10": b"nvinfer",
                                                 "tensorrt_libs/libnvonnxparser.so.10": b"parser",
                                                 "tensorrt_libs/__init__.py": b""})
    dest = tmp_path / "out"
    env = {**os.environ, "ORT_GPU_WHEEL": str(ort), "TENSORRT_WHEEL": str(trt), "ORT_VERSION": version}
    result = subprocess.run(["bash", str(DOCKER / "fetch-ort-gpu.sh"), str(dest)], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in dest.iterdir())
    assert names == sorted([f"libonnxruntime.so.{version}", "libonnxruntime.so", "libonnxruntime_providers_shared.so",
                            "libonnxruntime_providers_cuda.so", "libonnxruntime_providers_tensorrt.so", "tensorrt"])
    assert (dest / "libonnxruntime.so").resolve().name == f"libonnxruntime.so.{version}"
    assert (dest / "tensorrt" / "libnvinfer.so.10").read_bytes() == b"nvinfer"
    assert (dest / "tensorrt" / "libnvonnxparser.so.10").exists()
    # The Dockerfile's ORT_DYLIB_PATH names the file the script produced.
    env_cuda = env_of(runtime(DOCKER / "Dockerfile.cuda"))
    assert os.path.basename(env_cuda["ORT_DYLIB_PATH"]) in names
    assert "/opt/dcam/lib/tensorrt" in env_cuda["LD_LIBRARY_PATH"].split(":")


def test_fetch_ort_gpu_fails_without_cuda_provider(tmp_path):
    version = ort_version()
    ort = _wheel(tmp_path / "cpu_only.whl", {f"onnxruntime/capi/libonnxruntime.so.{version}": b"core"})
    env = {**os.environ, "ORT_GPU_WHEEL": str(ort), "ORT_VERSION": version}
    result = subprocess.run(["bash", str(DOCKER / "fetch-ort-gpu.sh"), str(tmp_path / "out")], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "libonnxruntime_providers_cuda.so" in result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_rust_toolchain_meets_msrv(dockerfile):
    cargo = tomllib.loads((REPO / "Cargo.toml").read_text())
    msrv = tuple(int(x) for x in cargo["package"]["rust-version"].split("."))
    build = next(s for s in parse(dockerfile) if s["name"] == "build")
    match = re.match(r"rust:(\d+)\.(\d+)", build["from"])
    assert match, f"build stage should use an official rust image, got {build['from']}"
    assert tuple(int(x) for x in match.groups()) >= msrv[:2]
