"""infra/ without a cluster: every manifest and config parses and has what KubeRay, the Ray cluster
launcher and Docker need, names job scripts, presets and config keys that exist, holds no credentials, and
keeps the security settings (token auth on, loopback binds locally)."""

from __future__ import annotations

import copy
import importlib.util
import re
import shlex
import socket
import sys
from pathlib import Path

import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
CLUSTER_YAML = INFRA / "aws" / "cluster.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
DOCS = REPO / "docs" / "cluster.md"
IMAGE_IN_CONTAINER = "/app/"  # where the Dockerfile puts the repository

YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def _load_stack_module():
    spec = importlib.util.spec_from_file_location("local_stack", INFRA / "local" / "stack.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["local_stack"] = module
    spec.loader.exec_module(module)
    return module


def k8s_objects() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(K8S.rglob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def of_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in k8s_objects() if d["kind"] == kind]


def to_bytes(quantity: str | int) -> int:
    """A Kubernetes quantity (24Gi, 512Mi, 21474836480) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", str(quantity))
    assert m, quantity
    return int(m.group(1)) * units.get(m.group(2), 1)


def ray_groups(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])]
    return groups + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


# ------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_file_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no document"
    assert all(isinstance(d, dict) for d in docs)


def test_kubernetes_objects_are_complete() -> None:
    objects = k8s_objects()
    kinds = {d["kind"] for _, d in objects}
    assert {"RayCluster", "RayJob", "ConfigMap", "Deployment", "Service"} <= kinds
    for path, obj in objects:
        assert obj.get("apiVersion") and obj.get("metadata", {}).get("name"), path
        if obj["kind"] in ("RayCluster", "RayJob"):
            assert obj["apiVersion"] == "ray.io/v1", f"{path}: use the current KubeRay API"
        assert obj["kind"] != "Secret", f"{path}: no Secret manifests (credentials are created with kubectl)"


# ------------------------------------------------------------------------------------------ KubeRay


def test_raycluster_has_autoscaling_gpu_group_shm_and_token_auth() -> None:
    [(_, cluster)] = of_kind("RayCluster")
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__, "the cluster must run the Ray the project is tested with"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    images = set()
    gpu_groups = []
    for name, group in ray_groups(spec):
        params = group["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), f"{name}: rayStartParams values are strings"
        if name != "head":
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        pod = group["template"]["spec"]
        [container] = pod["containers"]
        images.add(container["image"])
        resources = container["resources"]
        assert resources["requests"] and resources["limits"], f"{name}: requests and limits"
        assert "env" not in container or all("value" not in e for e in container["env"] if "KEY" in e["name"])
        assert {"configMapRef": {"name": "videomae-settings"}} in container["envFrom"]
        assert any(
            e.get("secretRef", {}).get("name") == "videomae-s3-credentials" for e in container["envFrom"]
        )
        # /dev/shm holds the object store: a memory emptyDir above it and inside the memory limit
        [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["emptyDir"]["medium"] == "Memory"
        shm = to_bytes(volume["emptyDir"]["sizeLimit"])
        assert to_bytes(params["object-store-memory"]) < shm < to_bytes(resources["limits"]["memory"])
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        if "nvidia.com/gpu" in resources["limits"]:
            gpu_groups.append(name)
            assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
    assert gpu_groups == ["gpu"]
    assert "cpu-decode" in dict(ray_groups(spec)), (
        "a CPU-only decode group scales decoding apart from training"
    )
    assert len(images) == 1, f"one image for every node: {images}"


def test_gpu_pods_advertise_only_the_trainers_cpus() -> None:
    """Decode lands on the decode group because the GPU pods have no spare Ray CPUs (docs/cluster.md)."""
    [(_, cluster)] = of_kind("RayCluster")
    gpu = dict(ray_groups(cluster["spec"]))["gpu"]
    gpus_per_pod = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    preset = yaml.safe_load((REPO / "configs" / "pretrain_vit_b_k400.yaml").read_text())
    assert float(gpu["rayStartParams"]["num-cpus"]) == gpus_per_pod * preset["scaling"]["cpus_per_worker"]


def test_rayjobs_run_on_the_raycluster_spec() -> None:
    [(_, cluster)] = of_kind("RayCluster")
    jobs = of_kind("RayJob")
    assert {d["metadata"]["name"] for _, d in jobs} >= {"videomae-pretrain", "videomae-pipeline"}
    for path, job in jobs:
        assert job["spec"]["rayClusterSpec"] == cluster["spec"], f"{path} drifted from raycluster.yaml"
        assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_configmap_holds_settings_and_no_credentials() -> None:
    [(_, configmap)] = of_kind("ConfigMap")
    data = configmap["data"]
    assert {"AWS_REGION", "MLFLOW_TRACKING_URI"} <= set(data)
    assert not any(re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", key) for key in data)


# ------------------------------------------------------------------------------------------ job references


def entrypoints() -> list[tuple[str, str]]:
    """(where, command) of every job command infra/ and docs/cluster.md give users."""
    found = [(str(p.relative_to(REPO)), d["spec"]["entrypoint"]) for p, d in of_kind("RayJob")]
    text = DOCS.read_text() if DOCS.exists() else ""
    joined = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
    found += [
        ("docs/cluster.md", m.group(0)) for m in re.finditer(r"python \S*jobs/\w+\.py[^\n`|;&]*", joined)
    ]
    return found


def repo_path(path: str) -> Path:
    return REPO / (path[len(IMAGE_IN_CONTAINER) :] if path.startswith(IMAGE_IN_CONTAINER) else path)


def test_referenced_job_scripts_presets_and_keys_exist() -> None:
    from pipeline import config as config_lib
    from pipeline.train.pretrain import PretrainConfig

    commands = entrypoints()
    assert len(commands) >= 4
    for where, command in commands:
        argv = shlex.split(command)
        script = next(a for a in argv if a.endswith(".py"))
        assert repo_path(script).is_file(), f"{where}: {script} does not exist"
        overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        preset = argv[argv.index("--config") + 1] if "--config" in argv else None
        if preset:
            path = repo_path(preset)
            assert path.is_file() or (REPO / "configs" / f"{preset}.yaml").is_file(), f"{where}: {preset}"
        path = str(repo_path(preset)) if preset else None
        if script.endswith("pretrain.py"):  # unknown or mistyped keys fail here, as they would at start
            config_lib.load(PretrainConfig, path, overrides)
        if script.endswith("chain.py"):
            from pipeline.chain import PipelineConfig

            chain = config_lib.load(PipelineConfig, path, overrides)
            for stage_preset in (chain.pretrain_config, chain.finetune_config, chain.evaluate_config):
                if stage_preset:
                    assert (REPO / "configs" / f"{stage_preset}.yaml").is_file() or repo_path(
                        stage_preset
                    ).is_file(), f"{where}: stage preset {stage_preset} missing"


# ------------------------------------------------------------------------------------------ AWS


def test_aws_cluster_config_is_valid_for_the_ray_cluster_launcher() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CLUSTER_YAML.read_text())
    validate_config(config)
    validate_config(prepare_config(copy.deepcopy(config)))
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    decode = [t for t in types.values() if t is not types["head"] and not t["resources"].get("GPU")]
    assert gpu and decode, "GPU training nodes and CPU-only decode nodes"
    assert all(re.match(r"(c|m|r)\d", t["node_config"]["InstanceType"]) for t in decode)
    preset = yaml.safe_load((REPO / "configs" / "pretrain_vit_b_k400.yaml").read_text())
    for t in gpu:
        assert t["resources"]["CPU"] == t["resources"]["GPU"] * preset["scaling"]["cpus_per_worker"]
    for local in config["file_mounts"].values():
        if not local.startswith("~"):
            assert (REPO / local).is_dir(), f"file_mounts source {local} missing (docker needs directories)"
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command and "RAY_AUTH_TOKEN_PATH=" in command
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert (
        config["docker"]["image"]
        == of_kind("RayCluster")[0][1]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    )


# ------------------------------------------------------------------------------------------ Docker


def test_dockerfile_installs_the_project_from_pyproject_with_pinned_versions() -> None:
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    assert args["RAY_VERSION"] == ray.__version__
    assert args["PYTHON_TAG"] == f"py{sys.version_info.major}{sys.version_info.minor}"
    # one base per architecture (multi-arch builds with docker buildx), chosen by BuildKit's TARGETARCH
    base = r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-gpu"
    assert re.search(base + r" AS base-amd64$", text, re.M)
    assert re.search(base + r"-aarch64 AS base-arm64$", text, re.M)
    assert re.search(r"^FROM base-\$\{TARGETARCH\}$", text, re.M)
    assert "--platform linux/amd64,linux/arm64" in text
    assert args["TORCHCODEC_VERSION"] == "0.17.0"
    makefile_torch = re.search(r"TORCH_SPEC \?= torch==(\S+)", (REPO / "Makefile").read_text()).group(1)
    assert args["TORCH_VERSION"] == makefile_torch
    copies = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M)
    sources = [s for line in copies for s in line.split()]
    assert "pyproject.toml" in sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    assert text.index("COPY --chown=ray:users pyproject.toml") < text.index(
        "pip install -c /home/ray/constraints.txt ."
    )
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users[-1] == "ray", "the image must not run as root"
    ignore = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "**/*.env", "**/*auth_token*"} <= set(ignore)


# ------------------------------------------------------------------------------------------ credentials

CREDENTIAL_PATTERNS = [
    (r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", "AWS access key id"),
    (r"-----BEGIN [A-Z ]*PRIVATE KEY-----", "private key"),
    (r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?(?![<$]|\.\.\.)[A-Za-z0-9/+]{20,}", "AWS secret key"),
    (
        r"(?i)\b(password|passwd|secret|token|api_key)\b['\"]?\s*[:=]\s*['\"]?[A-Za-z0-9_\-/+]{12,}",
        "secret value",
    ),
    (r"(?i)MINIO_ROOT_PASSWORD\s*[:=]\s*['\"]?\w{6,}", "MinIO password"),
    (r"\b[0-9a-f]{64}\b", "hex token"),
]


def find_credentials(text: str) -> list[str]:
    return [what for pattern, what in CREDENTIAL_PATTERNS if re.search(pattern, text)]


def test_credential_scanner_catches_planted_secrets() -> None:
    planted = [
        "aws_access_key_id: AKIAIOSFODNN7EXAMPLE",
        "aws_secret_access_key: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "RAY_AUTH_TOKEN: token=3f1c2a9e8b7d6c5f4e3d2c1b0a9f8e7d",
        "password: hunter2hunter2hunter2",
        "-----BEGIN OPENSSH PRIVATE KEY-----",
        "f" * 64,
    ]
    for line in planted:
        assert find_credentials(line), line
    assert not find_credentials("--from-literal=AWS_SECRET_ACCESS_KEY=...  # your key")


@pytest.mark.parametrize(
    "path",
    sorted(p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts) + [DOCS],
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_no_credentials_in_infra(path: Path) -> None:
    if not path.exists():
        pytest.fail(f"{path} missing")
    assert find_credentials(path.read_text()) == [], f"{path} looks like it holds a credential"


def test_token_auth_is_never_disabled() -> None:
    for path in [p for p in INFRA.rglob("*") if p.is_file() and p.suffix in (".yaml", ".py", ".env", "")]:
        text = path.read_text()
        assert not re.search(r"RAY_AUTH_MODE\W+disabled|mode:\s*disabled", text), path


# ------------------------------------------------------------------------------------------ local stack


@pytest.fixture()
def stack_state(tmp_path: Path):
    mod = _load_stack_module()
    ports = {name: 40000 + off for name, off in mod.PORT_OFFSETS.items()}
    state = mod.StackState(str(tmp_path), "moto", "videomae", ports, (40020, 40119), "/tmp/vmae-ray-x")
    return mod, state


def test_local_stack_binds_loopback_and_turns_token_auth_on(stack_state) -> None:
    mod, state = stack_state
    env = mod._service_env(state)
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(state.token_path)
    assert "RAY_ADDRESS" not in env and "RAY_AUTH_TOKEN" not in env
    for minio in (False, True):
        state.s3_backend = "minio" if minio else "moto"
        specs = mod.service_specs(state, env)
        assert list(specs) == ["s3", "mlflow", "ray"]
        for name, (cmd, _) in specs.items():
            hosts = [cmd[i + 1] for i, a in enumerate(cmd) if a in ("-H", "--host", "--dashboard-host",
                                                                       "--node-ip-address")]  # fmt: skip
            hosts += [a.rsplit(":", 1)[0] for a in cmd if re.fullmatch(r"[\d.]+:\d+", a)]
            assert hosts and set(hosts) == {"127.0.0.1"}, (name, cmd)
    ray_cmd = specs["ray"][0]
    for flag in ("--port", "--dashboard-port", "--node-manager-port", "--object-manager-port",
                 "--min-worker-port", "--metrics-export-port", "--runtime-env-agent-port"):  # fmt: skip
        assert flag in ray_cmd, f"{flag}: every Ray port pinned so stacks do not collide"


def test_local_stack_secrets_are_private_and_never_printed(stack_state) -> None:
    mod, state = stack_state
    env = mod.job_environment(state)
    mod._write_env_file(state)
    for path in (state.token_path, state.env_file, state.secrets_dir / "s3_credentials.json"):
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert state.secrets_dir.stat().st_mode & 0o777 == 0o700
    printed = mod.env_lines(state)
    assert env["AWS_SECRET_ACCESS_KEY"] not in printed and state.token_path.read_text() not in printed
    assert f"export RAY_AUTH_TOKEN_PATH={state.token_path}" in printed
    assert f". {state.env_file}" in printed
    assert mod.job_environment(state) == env, "secrets are generated once per state dir"


def test_local_stack_refuses_busy_ports_before_starting_anything(tmp_path: Path) -> None:
    mod = _load_stack_module()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        base = port - mod.PORT_OFFSETS["dashboard"]
        with pytest.raises(mod.StackError, match=rf"dashboard={port}"):
            mod.up(tmp_path / "stack", base_port=base, s3="moto")
    assert not (tmp_path / "stack" / "state.json").exists()
    assert mod.down(tmp_path / "stack", quiet=True) == []


def test_local_stack_down_stops_only_its_own_processes(stack_state) -> None:
    """A recorded pid reused by another program is never signalled; the stack's own processes are."""
    mod, state = stack_state
    env = mod._service_env(state)
    mod._write_env_file(state)
    assert env[mod.MARKER_VAR] == state.state_dir
    assert mod.MARKER_VAR not in state.env_file.read_text(), "the user's shell must not carry the marker"
    import subprocess

    ours = subprocess.Popen(["sleep", "60"], env=env, start_new_session=True)
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        state.pids = {"s3": ours.pid, "mlflow": stranger.pid}
        state.save()
        assert mod.stack_pids(state) == [ours.pid]
        assert mod.down(Path(state.state_dir), quiet=True) == []
        assert ours.wait(timeout=10) is not None
        assert stranger.poll() is None, "down signalled a process that is not the stack's"
    finally:
        for proc in (ours, stranger):
            proc.kill()
            proc.wait()


def test_paths_named_in_the_cluster_docs_exist() -> None:
    text = DOCS.read_text()
    named = set(re.findall(r"(?<![\w/.])((?:infra|jobs|configs|benchmarks|docs|tests)/[\w./*-]*[\w*])", text))
    assert len(named) > 10
    missing = sorted(p for p in named if not (REPO / p).exists() and "*" not in p)
    assert not missing, f"docs/cluster.md names files that do not exist: {missing}"
