"""The deployment files, checked without Docker or Kubernetes: the KubeRay manifests against
KubeRay v1.7.0's CRD schemas with unknown fields rejected (as `kubectl apply --validate=strict`
does), the compose files against the compose spec, the image's Dockerfile and .dockerignore, and
one Ray version across pyproject, the image, the manifests and the compose stack."""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

from wrn_cluster.spec import load

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "deploy" / "kuberay"
COMPOSE = ROOT / "deploy" / "compose"
COMPOSE_FILES = [COMPOSE / "compose.yaml", COMPOSE / "compose.gpu.yaml"]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
# Unchanged upstream schemas, shared by the workspace (see their README).
SCHEMAS = Path(os.environ.get("WRN_CLUSTER_SCHEMAS", ROOT.parent / "shared" / "schemas"))
CREDENTIAL = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|KEY_ID|CREDENTIAL", re.I)
SECRET = re.compile(r"SECRET|PASSWORD|TOKEN", re.I)  # the half of a credential never shown
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


# --------------------------------------------------------------------------------------------
# Reading the files


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement(name: str) -> Requirement:
    found = [Requirement(r) for r in pyproject()["project"]["dependencies"]]
    return next(r for r in found if r.name == name)


def manifests() -> list[tuple[str, dict]]:
    """(file name, document) for every YAML document under deploy/kuberay."""
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def manifest(kind: str) -> dict:
    (doc,) = [doc for _, doc in manifests() if doc["kind"] == kind]
    return doc


def pod_specs(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCluster":
        groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
        return [group["template"]["spec"] for group in groups]
    if doc["kind"] == "RayJob":
        return [spec["submitterPodTemplate"]["spec"]] if "submitterPodTemplate" in spec else []
    return []


def containers(doc: dict) -> list[dict]:
    return [c for pod in pod_specs(doc) for c in pod["containers"]]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            instruction, _, args = current.partition(" ")
            lines.append((instruction.upper(), args.strip()))
            current = ""
    return lines


def dockerfile_args() -> dict[str, str]:
    return dict(
        args.split("=", 1)
        for instruction, args in dockerfile()
        if instruction == "ARG" and "=" in args
    )


def expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], text)


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (COMPOSE / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


COMPOSE_VARIABLE = re.compile(r"(?<!\$)\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(text: str, values: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} (and $$ for a literal $)."""

    def value(match: re.Match) -> str:
        name, operator, rest = match.groups()
        if values.get(name):
            return values[name]
        if operator and operator.endswith("?"):
            raise KeyError(f"{name} is required: {rest}")
        return rest if operator and operator.endswith("-") else ""

    return COMPOSE_VARIABLE.sub(value, text).replace("$$", "$")


def compose(path: Path = COMPOSE_FILES[0]) -> dict:
    return yaml.safe_load(path.read_text())


def compose_as_run(path: Path = COMPOSE_FILES[0]) -> dict:
    """The file as compose sees it with .env.example filled in (secrets with placeholders)."""
    values = {k: v or f"test-{k.lower()}" for k, v in env_example().items()}
    return yaml.safe_load(interpolate(path.read_text(), values))


# --------------------------------------------------------------------------------------------
# Schemas


def _closed(schema):
    """`kubectl --validate=strict`: an object schema that lists properties and neither allows
    additional ones nor preserves unknown fields rejects keys it does not list."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {name: _closed(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            out[key] = _closed(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            out[key] = _closed(schema[key])
    return out


@functools.cache
def crd_schema(file_name: str) -> dict:
    path = SCHEMAS / "kuberay-v1.7.0" / file_name
    if not path.exists():
        pytest.fail(f"{path} is missing; set WRN_CLUSTER_SCHEMAS to the shared schemas folder")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _closed(v1["schema"]["openAPIV3Schema"])


# What the API server checks of ObjectMeta for these manifests (the CRDs leave it open).
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
CONFIG_MAP = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "data"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "v1"},
        "kind": {"const": "ConfigMap"},
        "metadata": OBJECT_META,
        "data": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def schema_problems(doc: dict) -> list[str]:
    if doc.get("kind") == "ConfigMap":
        schema = CONFIG_MAP
    elif doc.get("kind") in ("RayCluster", "RayJob"):
        schema = crd_schema(f"ray.io_{doc['kind'].lower()}s.yaml")
        properties = {**schema["properties"], "metadata": OBJECT_META}
        properties["apiVersion"] = {"const": "ray.io/v1"}
        schema = {**schema, "properties": properties}
    else:
        return [f"kind {doc.get('kind')!r} has no schema here; add one to this test"]
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'.'.join(str(p) for p in error.absolute_path) or '(document)'}: {error.message}"
        for error in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    ]


def compose_problems(document: dict) -> list[str]:
    schema = json.loads((SCHEMAS / "compose-spec" / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'.'.join(str(p) for p in error.absolute_path) or '(document)'}: {error.message}"
        for error in validator.iter_errors(document)
    ]


# --------------------------------------------------------------------------------------------
# KubeRay


def test_kuberay_manifests_validate_against_kuberay_v1_7_crds_rejecting_unknown_fields():
    found = manifests()
    assert {doc["kind"] for _, doc in found} == {"RayCluster", "RayJob", "ConfigMap"}
    problems = [f"{name}: {p}" for name, doc in found for p in schema_problems(doc)]
    assert problems == []


def test_a_misspelt_field_fails_validation_as_on_a_strict_cluster():
    cluster = copy.deepcopy(manifest("RayCluster"))
    cluster["spec"]["headGroupSpec"]["rayStartParms"] = {}
    cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "imagePulPolicy"
    ] = "Always"
    problems = schema_problems(cluster)
    assert any("'rayStartParms' was unexpected" in p for p in problems), problems
    assert any("'imagePulPolicy' was unexpected" in p for p in problems), problems
    assert len(problems) == 2, problems


def test_raycluster_head_trains_nothing_and_gpu_workers_autoscale_around_the_imagenet_job():
    cluster = manifest("RayCluster")
    spec = cluster["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["enableInTreeAutoscaling"] is True
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert group["minReplicas"] < group["maxReplicas"]
    (worker,) = group["template"]["spec"]["containers"]
    gpus, cpus = (
        int(worker["resources"]["limits"]["nvidia.com/gpu"]),
        int(worker["resources"]["limits"]["cpu"]),
    )
    # The driver checks resources when the job starts, so the minimum must already hold it; an
    # elastic job's maximum is what the autoscaler can grow it to.
    for name in ("imagenet_wrn50_2.yaml", "imagenet_wrn50_2_spot.yaml"):
        job = load(ROOT / "jobs" / name)
        scaling = job.scaling
        assert scaling.use_gpu
        assert scaling.min_workers * scaling.gpus_per_worker <= group["minReplicas"] * gpus
        assert scaling.min_workers * scaling.cpus_per_worker <= group["minReplicas"] * cpus
        assert scaling.max_workers * scaling.gpus_per_worker <= group["maxReplicas"] * gpus
    # The spot job's range runs on one pod as well as on two.
    spot = load(ROOT / "jobs" / "imagenet_wrn50_2_spot.yaml").scaling
    assert spot.elastic and spot.min_workers <= gpus and spot.max_workers >= 2 * gpus
    # An evicted worker pod lives long enough for its just-in-time checkpoint: Ray drains its
    # node on SIGTERM for the drain timeout, which must end before Kubernetes kills the pod.
    grace = group["template"]["spec"]["terminationGracePeriodSeconds"]
    env = {e["name"]: e.get("value") for e in worker.get("env", [])}
    drain = float(env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"])
    assert 60 <= drain < grace, (drain, grace)
    for pod in pod_specs(cluster):
        shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        (container,) = pod["containers"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert [mounts.get(v["name"]) for v in shm] == ["/dev/shm"]


@pytest.mark.parametrize(
    "job",
    [d for _, d in manifests() if d["kind"] == "RayJob"],
    ids=lambda d: d["metadata"]["name"],
)
def test_rayjob_runs_a_spec_from_jobs_on_the_token_authenticated_raycluster(job):
    cluster = manifest("RayCluster")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    auth = cluster["spec"]["authOptions"]
    assert auth["mode"] == "token"

    command = job["spec"]["entrypoint"].split()
    assert command[:3] == ["python", "-m", "wrn_cluster.driver"]
    image_jobs = Path(dockerfile_workdir()) / "jobs"
    spec_in_image = Path(command[3])
    assert spec_in_image.parent == image_jobs
    assert load(ROOT / "jobs" / spec_in_image.name).name == job["metadata"]["name"]

    (submitter,) = containers(job)
    env = {e["name"]: e for e in submitter["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    token = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token == {"name": auth["secretName"], "key": "auth_token"}


def test_credentials_come_only_from_secrets_the_readme_creates():
    readme = (ROOT / "README.md").read_text()
    created = set(re.findall(r"kubectl create secret generic ([\w.-]+)", readme))
    config_maps = {
        doc["metadata"]["name"]: doc["data"] for _, doc in manifests() if doc["kind"] == "ConfigMap"
    }
    secrets_used = {manifest("RayCluster")["spec"]["authOptions"]["secretName"]}
    for _, doc in manifests():
        for container in containers(doc):
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    secrets_used.add(source["secretRef"]["name"])
                else:
                    assert source["configMapRef"]["name"] in config_maps
            for var in container.get("env", []):
                if CREDENTIAL.search(var["name"]):
                    assert "value" not in var, f"{var['name']} is inline; use a secretKeyRef"
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    secrets_used.add(ref["name"])
    assert secrets_used <= created, f"the README never creates {secrets_used - created}"
    for data in config_maps.values():
        assert not [k for k in data if CREDENTIAL.search(k)]
    text = "".join(p.read_text() for p in KUBERAY.glob("*.yaml"))
    assert not AWS_KEY_ID.search(text)
    head_service = f"svc/{manifest('RayCluster')['metadata']['name']}-head-svc 8265:8265"
    assert f"kubectl port-forward {head_service}" in readme


# --------------------------------------------------------------------------------------------
# Compose


def test_compose_files_validate_against_the_compose_spec_before_and_after_interpolation():
    for path in COMPOSE_FILES:
        assert compose_problems(compose(path)) == [], path.name
        assert compose_problems(compose_as_run(path)) == [], path.name


def test_compose_stack_runs_ray_head_two_workers_mlflow_on_postgres_and_minio_with_health_checks():
    stack = compose_as_run()
    services = stack["services"]
    assert set(services) == {
        "ray-head", "ray-worker-1", "ray-worker-2", "mlflow", "postgres", "minio", "minio-init",
    }  # fmt: skip
    assert services["ray-head"]["command"][:3] == ["ray", "start", "--head"]
    for worker in ("ray-worker-1", "ray-worker-2"):
        assert "--address=ray-head:6379" in services[worker]["command"]
        assert services[worker]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    mlflow = services["mlflow"]["environment"]
    assert mlflow["MLFLOW_BACKEND_STORE_URI"] == (
        "postgresql://mlflow:test-postgres_password@postgres:5432/mlflow"
    )
    assert mlflow["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert (
        mlflow["MLFLOW_S3_ENDPOINT_URL"]
        == services["ray-head"]["environment"]["AWS_ENDPOINT_URL_S3"]
        == "http://minio:9000"
    )

    for name, service in services.items():
        if name != "minio-init":  # a one-shot job
            assert "test" in service["healthcheck"], name
        for dependency, condition in service.get("depends_on", {}).items():
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits on {dependency}"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in stack["volumes"], f"{name}: {source} is not a named volume"
    assert set(stack["volumes"]) == {"postgres-data", "minio-data"}


def test_compose_creates_the_buckets_the_imagenet_job_and_mlflow_write_to():
    services = compose()["services"]
    buckets = set(services["minio-init"]["environment"]["BUCKETS"].split())
    job = load(ROOT / "jobs" / "imagenet_wrn50_2.yaml")
    wanted = {
        job.data.url.split("://")[1].split("/")[0],
        job.checkpoint.storage.split("://")[1].split("/")[0],
        services["mlflow"]["environment"]["MLFLOW_ARTIFACTS_DESTINATION"].split("://")[1],
    }
    assert wanted <= buckets


def test_mlflow_server_image_is_a_release_the_clients_accept_and_runs_unprivileged():
    text = (COMPOSE / "mlflow.Dockerfile").read_text()
    version = re.search(r"^ARG MLFLOW_VERSION=(\S+)$", text, re.M).group(1)
    assert Version(version) in requirement("mlflow").specifier
    assert compose()["services"]["mlflow"]["image"] == f"wrn-cluster-mlflow:{version}"
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0")


def test_env_example_names_every_variable_compose_reads_and_holds_no_secret():
    example = env_example()
    used = {
        m.group(1) for path in COMPOSE_FILES for m in COMPOSE_VARIABLE.finditer(path.read_text())
    }
    assert used == set(example)
    secrets = {k for k in example if SECRET.search(k)}
    assert secrets >= {
        "RAY_AUTH_TOKEN",
        "MINIO_ROOT_PASSWORD",
        "S3_SECRET_KEY",
        "POSTGRES_PASSWORD",
    }
    assert {k: example[k] for k in secrets} == dict.fromkeys(secrets, "")
    # Compose refuses to start while a secret is unset, instead of running with an empty one.
    values = {k: v for k, v in example.items() if k not in secrets}
    with pytest.raises(KeyError, match="is required"):
        interpolate(COMPOSE_FILES[0].read_text(), values)


# --------------------------------------------------------------------------------------------
# The image


def dockerfile_workdir() -> str:
    return [args for instruction, args in dockerfile() if instruction == "WORKDIR"][-1]


def test_one_ray_version_in_pyproject_the_image_the_manifests_and_compose():
    pinned = requirement("ray").specifier
    image = dockerfile_args()["RAY_VERSION"]
    cluster = manifest("RayCluster")["spec"]["rayVersion"]
    tags = [c["image"] for _, doc in manifests() for c in containers(doc)]
    tags += [
        s["image"] for path in COMPOSE_FILES for s in compose(path)["services"].values()
        if "wrn-cluster:" in s.get("image", "")
    ]  # fmt: skip
    tagged = {re.search(r"-ray(\d+\.\d+\.\d+)-", interpolate(t, {})).group(1) for t in tags}
    assert {image, cluster} | tagged == {image}
    assert Version(image) in pinned
    assert importlib.metadata.version("ray") in pinned  # the Ray the tests run


def test_image_builds_from_the_official_ray_image_for_a_supported_python_and_the_torch_pair():
    args = dockerfile_args()
    (base,) = [a for i, a in dockerfile() if i == "FROM"]
    assert base == "rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${VARIANT}"
    assert expand(base, args) == f"rayproject/ray:{args['RAY_VERSION']}-py311-gpu"
    python = re.fullmatch(r"py3(\d+)", args["PYTHON_TAG"]).group(1)
    assert Version(f"3.{python}") in SpecifierSet(pyproject()["project"]["requires-python"])
    makefile = (ROOT / "Makefile").read_text()
    torch, vision = re.search(r"TORCH := torch==(\S+) torchvision==(\S+)", makefile).groups()
    assert (args["TORCH_VERSION"], args["TORCHVISION_VERSION"]) == (torch, vision)
    assert Version(torch) in requirement("torch").specifier
    assert Version(vision) in requirement("torchvision").specifier


def test_image_runs_as_non_root_installs_the_project_with_pip_and_holds_no_credentials():
    steps = dockerfile()
    users = [args for instruction, args in steps if instruction == "USER"]
    assert users[-1] not in ("root", "0") and not users[-1].startswith("0:")
    runs = " ".join(args for instruction, args in steps if instruction == "RUN")
    assert "pip install ." in runs
    assert "/etc/sudoers" in runs  # the base image's password-less sudo is taken away
    for instruction, args in steps:
        if instruction in ("ENV", "ARG"):
            names = re.findall(r"(\w+)=", args) or [args.split()[0]]
            assert not [n for n in names if CREDENTIAL.search(n)], args
        if instruction in ("COPY", "ADD"):
            assert ".env" not in args and ".aws" not in args, args


def test_dockerignore_lets_in_only_what_the_image_copies():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        # Docker's rule: the last pattern matching the path or one of its parents decides.
        parts = path.split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        verdict = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            regex = _glob_regex(pattern.lstrip("!"))
            if any(regex.fullmatch(c) for c in candidates):
                verdict = not negate
        return verdict

    copied = [
        src for instruction, args in dockerfile() if instruction == "COPY"
        for src in args.split()[1:-1] if not src.startswith("--")
    ]  # fmt: skip
    assert set(copied) == {"pyproject.toml", "README.md", "wrn_cluster", "jobs"}
    for path in [
        "pyproject.toml",
        "README.md",
        "wrn_cluster/cli.py",
        "jobs/quickstart.yaml",
    ]:
        assert not ignored(path), path
    for path in [
        ".env", "deploy/compose/.env", ".git/config", ".venv/bin/python", ".wrn-cluster/mlflow.db",
        "tests/test_deploy.py", "wrn_cluster/__pycache__/spec.cpython-311.pyc", "bench/out/x.json",
    ]:  # fmt: skip
        assert ignored(path), path


def _glob_regex(pattern: str) -> re.Pattern:
    out = ""
    for token in re.split(r"(\*\*/?|\*|\?)", pattern.strip("/")):
        if token.startswith("**"):
            out += "(.*/)?" if token.endswith("/") else ".*"
        elif token == "*":
            out += "[^/]*"
        elif token == "?":
            out += "[^/]"
        else:
            out += re.escape(token)
    return re.compile(out)
