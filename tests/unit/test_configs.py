"""Deployment configs under cluster/ and infra/: they parse and hold what their tools need.

Checked with the tools' own rules wherever those are available offline: Ray's
cluster-launcher schema and config preparation (shipped inside the ray package), the
fields KubeRay's `ray.io/v1` CRDs mark required (from `ray-operator/apis/ray/v1/
raycluster_types.go` and `rayjob_types.go`: json tags without `omitempty`), sdbatch's
own spec parser, `terraform fmt` and an HCL parser. No Ray cluster, no network.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from sdbatch.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = ROOT / "infra" / "kuberay"
TERRAFORM = ROOT / "infra" / "terraform"
DOCKER = ROOT / "infra" / "docker"

CLUSTER_CONFIGS = sorted(CLUSTER.glob("*.yaml"))
CONFIG_FILES = sorted(
    p
    for base in (CLUSTER, ROOT / "infra")
    for pattern in ("*.yaml", "*.yml", "*.json")
    for p in base.rglob(pattern)
)
# The write probe sdbatch puts and deletes before a job; terraform lets nodes delete it.
WRITE_PROBE_KEY = "_sdbatch_write_probe"
# Kubernetes resource.Quantity, as the KubeRay CRDs' openAPIV3Schema spells it.
QUANTITY = re.compile(
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]"
    r"|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---------------------------------------------------------------- every file parses


def test_there_are_configs_to_check() -> None:
    names = {rel(p) for p in CONFIG_FILES}
    assert {
        "cluster/aws-gpu.yaml",
        "cluster/local.yaml",
        "infra/kuberay/rayjob.yaml",
        "infra/kuberay/raycluster.yaml",
        "infra/kuberay/configmap.yaml",
    } <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=rel)
def test_config_parses(path: Path) -> None:
    if path.suffix == ".json":
        docs = [json.loads(path.read_text())]
    else:
        docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) and d for d in docs), f"{rel(path)}: empty document"


# ---------------------------------------------------------------- Ray cluster launcher


def ray_schema() -> dict[str, Any]:
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=rel)
def test_cluster_config_matches_rays_schema(path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")  # a dependency of ray itself
    jsonschema.validate(load_yaml(path), ray_schema())


def prepared(path: Path) -> dict[str, Any]:
    """The config as `ray up` sees it after filling defaults, before any cloud call."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as err:  # private API: moved in some Ray release
        pytest.skip(f"ray's config preparation is not importable here: {err}")
    config = prepare_config(load_yaml(path))
    validate_config(config)
    return config


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=rel)
def test_cluster_config_survives_ray_up_preparation(path: Path) -> None:
    config = prepared(path)
    assert config["head_node_type"] in config["available_node_types"]


def test_aws_config_has_cpu_head_and_autoscaling_gpu_workers() -> None:
    raw = load_yaml(CLUSTER / "aws-gpu.yaml")
    config = prepared(CLUSTER / "aws-gpu.yaml")
    assert config["provider"]["type"] == "aws" and config["provider"].get("region")
    assert config["auth"]["ssh_user"] == "ubuntu"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head must not attract render actors"

    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    gpu = [t for t in workers if t["resources"].get("GPU", 0) >= 1]
    assert len(gpu) == 1
    group = gpu[0]
    assert group["min_workers"] == 0 and group["max_workers"] >= 2
    assert group["max_workers"] <= config["max_workers"]
    assert re.fullmatch(r"g[56]\.\w+", group["node_config"]["InstanceType"])

    # Each node type names its instance profile (the head's may launch workers).
    profiles = {t["node_config"]["IamInstanceProfile"]["Name"] for t in types.values()}
    outputs = terraform_text("outputs.tf")
    assert "head_instance_profile_name" in outputs and "worker_instance_profile_name" in outputs
    prefix = terraform_default("name_prefix")
    assert profiles == {f"{prefix}-ray-head", f"{prefix}-ray-worker"}
    assert raw["cluster_name"] == terraform_default("ray_cluster_name")


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=rel)
def test_cluster_setup_installs_cuda_torch_then_sdbatch(path: Path) -> None:
    config = prepared(path)
    assert config["file_mounts"].get("~/sdbatch") == ".", "the repo must reach every node"
    for key in ("head_setup_commands", "worker_setup_commands"):
        commands = config[key]  # prepare_config prepends setup_commands to both
        torch = next(i for i, c in enumerate(commands) if re.search(r"pip install.* torch\b", c))
        sdbatch = next(i for i, c in enumerate(commands) if "sdbatch[s3]" in c)
        assert torch < sdbatch, f"{key}: torch must be installed before sdbatch"
        assert not any("torchvision" in c for c in commands)
    worker_torch = " ".join(config["worker_setup_commands"])
    assert "download.pytorch.org/whl/cu" in worker_torch, "GPU workers need a CUDA torch"


def test_local_config_lists_on_prem_machines() -> None:
    raw = load_yaml(CLUSTER / "local.yaml")
    assert raw["provider"]["type"] == "local"
    assert raw["provider"]["head_ip"] and raw["provider"]["worker_ips"]
    # The local provider rejects node types of its own; ray up makes one.
    assert "available_node_types" not in raw and "head_node_type" not in raw
    config = prepared(CLUSTER / "local.yaml")
    (node_type,) = config["available_node_types"].values()
    assert node_type["max_workers"] == len(raw["provider"]["worker_ips"])


# ---------------------------------------------------------------- Ray versions agree


def ray_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for path in CLUSTER_CONFIGS:
        for version in re.findall(r"ray\[[\w,]+\]==([\w.]+)", path.read_text()):
            pins[f"{rel(path)} ray==…"] = version
    for name in ("rayjob.yaml", "raycluster.yaml"):
        doc = load_yaml(KUBERAY / name)
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        pins[f"infra/kuberay/{name} rayVersion"] = spec["rayVersion"]
    image = re.search(r"rayproject/ray:([\d.]+)-", (DOCKER / "Dockerfile").read_text())
    assert image, "Dockerfile: base image should be rayproject/ray:<version>-..."
    pins["infra/docker/Dockerfile base image"] = image.group(1)
    return pins


def test_ray_version_is_the_same_everywhere_and_allowed_by_pyproject() -> None:
    from packaging.specifiers import SpecifierSet  # a dependency of ray

    pins = ray_pins()
    assert len(set(pins.values())) == 1, f"Ray versions differ: {pins}"
    required = re.search(r'"ray\[data\]([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert required, "pyproject.toml: no ray[data] requirement"
    version = next(iter(pins.values()))
    assert version in SpecifierSet(required.group(1)), f"{version} vs {required.group(1)}"


# ---------------------------------------------------------------- KubeRay

# Required by the ray.io/v1 CRDs (json tags without omitempty in KubeRay's API types).
# rayStartParams became optional in later KubeRay releases; kept so older CRDs accept it.
HEAD_GROUP_REQUIRED = ("rayStartParams", "template")
WORKER_GROUP_REQUIRED = ("groupName", "maxReplicas", "minReplicas", "rayStartParams", "template")
JOB_SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode")


def kuberay(name: str) -> dict[str, Any]:
    return load_yaml(KUBERAY / name)


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_problems(where: str, template: dict[str, Any]) -> list[str]:
    """What a Kubernetes API server would reject in a pod template (the parts used here)."""
    problems = []
    spec = template.get("spec") or {}
    containers = spec.get("containers") or []
    if not containers:
        problems.append(f"{where}: template.spec.containers is required")
    volumes = {v["name"] for v in spec.get("volumes", [])}
    for c in [*spec.get("initContainers", []), *containers]:
        name = c.get("name", "?")
        if not (c.get("name") and c.get("image")):
            problems.append(f"{where}: container {name}: name and image are required")
        for m in c.get("volumeMounts", []):
            if not (m.get("name") and m.get("mountPath")):
                problems.append(f"{where}: {name}: volumeMount needs name and mountPath")
            elif m["name"] not in volumes:
                problems.append(f"{where}: {name}: mounts undeclared volume {m['name']!r}")
        for e in c.get("env", []):
            if "name" not in e or ("value" in e) == ("valueFrom" in e):
                problems.append(f"{where}: {name}: env {e} needs a name and value or valueFrom")
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None and not (ref.get("name") and ref.get("key")):
                problems.append(f"{where}: {name}: secretKeyRef needs name and key")
        for kind in ("requests", "limits"):
            for res, qty in (c.get("resources", {}).get(kind) or {}).items():
                if not QUANTITY.match(str(qty)):
                    problems.append(f"{where}: {name}: {kind}.{res}={qty!r} is not a quantity")
    return problems


def ray_cluster_problems(where: str, spec: dict[str, Any]) -> list[str]:
    problems = []
    head = spec.get("headGroupSpec")
    if head is None:
        return [f"{where}: headGroupSpec is required"]
    problems += [
        f"{where}.headGroupSpec: {k} is required" for k in HEAD_GROUP_REQUIRED if k not in head
    ]
    groups = spec.get("workerGroupSpecs", [])
    for i, group in enumerate(groups):
        at = f"{where}.workerGroupSpecs[{i}]"
        problems += [f"{at}: {k} is required" for k in WORKER_GROUP_REQUIRED if k not in group]
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        if not (0 <= lo <= group.get("replicas", lo) <= hi):
            problems.append(f"{at}: need 0 <= minReplicas <= replicas <= maxReplicas")
    names = [g.get("groupName") for g in groups]
    if len(set(names)) != len(names):
        problems.append(f"{where}: groupName must be unique, got {names}")
    for at, params in [("headGroupSpec", head.get("rayStartParams") or {})] + [
        (f"workerGroupSpecs[{i}]", g.get("rayStartParams") or {}) for i, g in enumerate(groups)
    ]:
        # map[string]string in the CRD: `num-cpus: 0` (an int) is rejected.
        problems += [
            f"{where}.{at}.rayStartParams.{k}: must be a string, got {v!r}"
            for k, v in params.items()
            if not isinstance(v, str)
        ]
    problems += pod_problems(f"{where}.headGroupSpec", head.get("template") or {})
    for i, group in enumerate(groups):
        problems += pod_problems(f"{where}.workerGroupSpecs[{i}]", group.get("template") or {})
    return problems


@pytest.mark.parametrize(
    ("name", "kind"), [("rayjob.yaml", "RayJob"), ("raycluster.yaml", "RayCluster")]
)
def test_kuberay_manifest_has_what_the_crd_requires(name: str, kind: str) -> None:
    doc = kuberay(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    assert DNS1123_SUBDOMAIN.match(doc["metadata"]["name"])
    assert ray_cluster_problems(f"{name}: spec", cluster_spec(doc)) == []


def test_crd_checks_catch_broken_manifests() -> None:
    spec = json.loads(json.dumps(cluster_spec(kuberay("raycluster.yaml"))))
    del spec["workerGroupSpecs"][0]["groupName"]
    spec["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = (
        "4 cores"
    )
    spec["workerGroupSpecs"][0]["template"]["spec"]["volumes"] = []
    problems = "\n".join(ray_cluster_problems("x", spec))
    assert "groupName is required" in problems
    assert "num-cpus: must be a string" in problems
    assert "'4 cores' is not a quantity" in problems
    assert "undeclared volume 'hf-cache'" in problems


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml"])
def test_kuberay_gpu_workers_and_cpu_head(name: str) -> None:
    spec = cluster_spec(kuberay(name))
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head.get("resources", {}).get("limits", {})
    (group,) = spec["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    # Kubernetes schedules extended resources by limits (requests must equal them).
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert worker["resources"]["requests"].get("nvidia.com/gpu", 1) == 1
    images = {
        c["image"]
        for pod in [spec["headGroupSpec"], group]
        for c in pod["template"]["spec"]["containers"]
        + pod["template"]["spec"].get("initContainers", [])
    }
    assert len(images) == 1, f"one sdbatch image for every container, got {images}"


def test_rayjob_runs_sdbatch_on_the_mounted_spec() -> None:
    job = kuberay("rayjob.yaml")["spec"]
    assert job.get("submissionMode", "K8sJobMode") in JOB_SUBMISSION_MODES
    # K8sJobMode and HTTPMode submit the entrypoint, so it must be set.
    spec_path = re.fullmatch(r"sdbatch run (\S+) --address auto", job["entrypoint"])
    assert spec_path, job["entrypoint"]
    assert job["shutdownAfterJobFinishes"] is True
    assert isinstance(job["ttlSecondsAfterFinished"], int) and job["ttlSecondsAfterFinished"] >= 0
    assert "clusterSelector" not in job, "the RayJob brings its own cluster"

    # The entrypoint runs on the head: the ConfigMap must be mounted there, by that name.
    spec_file = Path(spec_path.group(1))
    pod = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {
        m["name"]: m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])
    }
    configmaps = {v["name"]: v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    (volume,) = [v for v, path in mounts.items() if path == str(spec_file.parent)]
    configmap = kuberay("configmap.yaml")
    assert configmaps[volume] == configmap["metadata"]["name"]
    assert spec_file.name in configmap["data"]


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml"])
def test_kuberay_pods_get_s3_credentials_from_an_optional_secret(name: str) -> None:
    spec = cluster_spec(kuberay(name))
    for pod in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        (container,) = pod["template"]["spec"]["containers"]
        refs = {
            e["name"]: e["valueFrom"]["secretKeyRef"]
            for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        assert set(refs) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        # optional: with IRSA instead of the Secret the pods still start.
        assert all(r["optional"] is True and r["name"] == "sdbatch-s3" for r in refs.values())


def kubernetes_validate() -> Any:
    return pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (test extra)"
    )


@pytest.mark.parametrize("name", ["configmap.yaml", "serviceaccount.yaml"])
def test_core_objects_match_the_kubernetes_schema(name: str) -> None:
    kv = kubernetes_validate()
    kv.validate(kuberay(name), kv.latest_version(), strict=True)


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml"])
def test_kuberay_pod_templates_match_the_kubernetes_schema(name: str) -> None:
    # KubeRay embeds core/v1 PodTemplateSpecs; wrapped as a PodTemplate they get the
    # API server's own schema, strict: a misspelled field fails here, not at apply time.
    kv = kubernetes_validate()
    doc = kuberay(name)
    spec = cluster_spec(doc)
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        wrapped = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": doc["metadata"],
            "template": group["template"],
        }
        kv.validate(wrapped, kv.latest_version(), strict=True)


def test_irsa_service_account_annotation() -> None:
    account = kuberay("serviceaccount.yaml")
    assert account["kind"] == "ServiceAccount"
    assert account["metadata"]["name"] == terraform_default("k8s_service_account")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith(
        "arn:aws:iam::"
    )


def test_configmap_job_spec_is_valid_for_sdbatch() -> None:
    configmap = kuberay("configmap.yaml")
    assert configmap["apiVersion"] == "v1" and configmap["kind"] == "ConfigMap"
    (key,) = configmap["data"]
    spec = parse_spec(yaml.safe_load(configmap["data"][key]), f"infra/kuberay/configmap.yaml:{key}")
    # Pods share no disk: inputs and outputs live in the bucket terraform creates,
    # under the prefixes its policy grants.
    assert spec.manifest.startswith("s3://") and spec.output.startswith("s3://")
    bucket = spec.manifest.split("/")[2]
    assert spec.output.split("/")[2] == bucket
    assert spec.manifest.startswith(f"s3://{bucket}/{terraform_default('manifest_prefix')}")
    assert spec.output.startswith(f"s3://{bucket}/{terraform_default('output_prefix')}")
    assert spec.compute.actors == "auto" and spec.compute.gpus_per_actor == 1


# ---------------------------------------------------------------- Terraform

TF_FILES = ("main.tf", "variables.tf", "outputs.tf", "versions.tf")


def terraform_text(name: str) -> str:
    return (TERRAFORM / name).read_text()


def terraform_default(variable: str) -> Any:
    """A variable's default from variables.tf: a string, or True/False."""
    block = re.search(
        rf'variable "{variable}" {{(.*?)\n}}', terraform_text("variables.tf"), re.DOTALL
    )
    assert block, f"variables.tf: no variable {variable!r}"
    default = re.search(r'^\s*default\s*=\s*("([^"]*)"|true|false)\s*$', block.group(1), re.M)
    assert default, f"variables.tf: variable {variable!r} has no string or bool default"
    return default.group(2) if default.group(2) is not None else default.group(1) == "true"


def test_terraform_files_exist() -> None:
    assert all((TERRAFORM / name).is_file() for name in TF_FILES)


@pytest.mark.skipif(shutil.which("terraform") is None, reason="terraform is not installed")
def test_terraform_fmt_check() -> None:
    # `terraform validate` needs the AWS provider from the registry (offline here);
    # fmt parses every file and checks the canonical layout without it.
    result = subprocess.run(
        ["terraform", "fmt", "-check", "-diff", "-recursive", "-no-color", str(TERRAFORM)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def unquote(value: Any) -> Any:
    """python-hcl2 output with quotes, comments and block markers removed (7.x and 8.x differ)."""
    if isinstance(value, dict):
        return {unquote(k): unquote(v) for k, v in value.items() if not str(k).startswith("__")}
    if isinstance(value, list):
        return [unquote(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def parse_hcl(name: str) -> dict[str, Any]:
    hcl2 = pytest.importorskip("hcl2", reason="python-hcl2 is not installed (test extra)")
    with open(TERRAFORM / name) as f:
        return unquote(hcl2.load(f))


def blocks(parsed: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    """{'aws_s3_bucket.data': body, ...} for resource/data blocks of a parsed file."""
    found = {}
    for entry in parsed.get(kind, []):
        for type_, named in entry.items():
            for name, body in named.items():
                found[f"{type_}.{name}"] = body
    return found


def test_terraform_parses_and_every_reference_is_declared() -> None:
    parsed = {name: parse_hcl(name) for name in TF_FILES}
    variables = {k for v in parsed["variables.tf"]["variable"] for k in v}
    locals_ = {k for entry in parsed["main.tf"].get("locals", []) for k in entry}
    resources = set(blocks(parsed["main.tf"], "resource"))
    data = set(blocks(parsed["main.tf"], "data"))
    text = "\n".join(terraform_text(name) for name in TF_FILES)
    code = re.sub(r"#[^\n]*", "", text)

    used_vars = set(re.findall(r"\bvar\.(\w+)", code))
    assert used_vars - variables == set(), "undeclared variables"
    assert variables - used_vars == set(), "declared but unused variables"
    assert set(re.findall(r"\blocal\.(\w+)", code)) - locals_ == set()
    refs = set(re.findall(r"(?<![\w.])(aws_\w+\.\w+)(?:\[\d+\])?\.\w+", code))
    assert refs - resources == set(), "references to undeclared resources"
    data_refs = {f"{t}.{n}" for t, n in re.findall(r"\bdata\.(aws_\w+)\.(\w+)", code)}
    assert data_refs - data == set(), "references to undeclared data sources"
    for entry in parsed["variables.tf"]["variable"]:
        for name, body in entry.items():
            assert body.get("description") and body.get("type"), f"variable {name}"
    assert all(
        o.get("description") for entry in parsed["outputs.tf"]["output"] for o in entry.values()
    )


def test_terraform_bucket_is_private_and_cleans_up_multipart_uploads() -> None:
    resources = blocks(parse_hcl("main.tf"), "resource")
    public = resources["aws_s3_bucket_public_access_block.data"]
    for flag in (
        "block_public_acls",
        "block_public_policy",
        "ignore_public_acls",
        "restrict_public_buckets",
    ):
        assert public[flag] is True, flag
    (rule,) = [
        r
        for r in resources["aws_s3_bucket_lifecycle_configuration.data"]["rule"]
        if "abort_incomplete_multipart_upload" in r
    ]
    assert rule["status"] == "Enabled"
    assert "var.abort_incomplete_multipart_days" in str(rule["abort_incomplete_multipart_upload"])
    # Versioning is off unless asked for.
    versioning = resources["aws_s3_bucket_versioning.data"]
    assert "var.versioning_enabled" in str(versioning["count"])
    assert terraform_default("versioning_enabled") is False


def policy_statements(name: str) -> list[dict[str, Any]]:
    doc = blocks(parse_hcl("main.tf"), "data")[f"aws_iam_policy_document.{name}"]
    return doc["statement"]


def test_terraform_data_policy_is_least_privilege() -> None:
    statements = policy_statements("data_access")
    granted: dict[str, set[str]] = {}
    for s in statements:
        assert s.get("effect", "Allow") == "Allow"
        for action in s["actions"]:
            assert "*" not in action, f"wildcard action {action}"
            granted.setdefault(action, set()).update(s["resources"])

    manifest = "${local.bucket_arn}/${var.manifest_prefix}*"
    output = "${local.bucket_arn}/${var.output_prefix}*"
    assert granted["s3:GetObject"] == {manifest, output}
    assert granted["s3:PutObject"] == {output}
    assert granted["s3:ListBucket"] == {"${local.bucket_arn}"}
    (listing,) = [s for s in statements if "s3:ListBucket" in s["actions"]]
    (condition,) = listing["condition"]
    assert condition["variable"] == "s3:prefix" and condition["test"] == "StringLike"
    # Deleting is allowed for the write probe only, the one object sdbatch deletes.
    assert granted["s3:DeleteObject"]
    assert all(
        r.endswith(WRITE_PROBE_KEY) or r.endswith("${local.write_probe_key}")
        for r in granted["s3:DeleteObject"]
    )
    assert f'"{WRITE_PROBE_KEY}"' in terraform_text("main.tf")
    assert f'"{WRITE_PROBE_KEY}"' in (ROOT / "sdbatch" / "store.py").read_text(), (
        "sdbatch's write probe key changed: update infra/terraform/main.tf"
    )
    assert set(granted) <= {
        "s3:ListBucket",
        "s3:GetObject",
        "s3:PutObject",
        "s3:DeleteObject",
        "s3:AbortMultipartUpload",
        "s3:ListMultipartUploadParts",
    }


def test_terraform_node_roles_and_optional_irsa() -> None:
    resources = blocks(parse_hcl("main.tf"), "resource")
    for role in ("head", "worker"):
        profile = resources[f"aws_iam_instance_profile.{role}"]
        assert f"aws_iam_role.{role}" in profile["role"]
        attachment = resources[f"aws_iam_role_policy_attachment.{role}_data"]
        assert "aws_iam_policy.data_access" in attachment["policy_arn"]
    (assume,) = policy_statements("ec2_assume")
    assert assume["actions"] == ["sts:AssumeRole"]
    assert assume["principals"][0]["identifiers"] == ["ec2.amazonaws.com"]
    # The head may pass only the worker role, and only to EC2.
    (passrole,) = [s for s in policy_statements("autoscaler") if "iam:PassRole" in s["actions"]]
    assert passrole["resources"] == ["${aws_iam_role.worker.arn}"]
    irsa = resources["aws_iam_role.irsa"]
    assert "var.create_irsa_role" in str(irsa["count"])
    (web,) = blocks(parse_hcl("main.tf"), "data")["aws_iam_policy_document.irsa_assume"][
        "statement"
    ]
    assert web["actions"] == ["sts:AssumeRoleWithWebIdentity"]
    assert any("system:serviceaccount:" in str(c["values"]) for c in web["condition"])


# ---------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    text = (DOCKER / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, args = line.strip().partition(" ")
            out.append((word.upper(), args.strip()))
    return out


def test_dockerfile_builds_a_cuda_image_with_sdbatch() -> None:
    steps = dockerfile_instructions()
    words = [w for w, _ in steps]
    assert set(words[: words.index("FROM")]) <= {"ARG"}, "only ARG may come before FROM"
    args = dict(a.split("=", 1) for w, a in steps if w == "ARG" and "=" in a)
    (base,) = [a for w, a in steps if w == "FROM"]
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert re.fullmatch(r"rayproject/ray:[\d.]+-py3\d+-(gpu|cu\d+)", image), image

    runs = [a for w, a in steps if w == "RUN"]
    torch = next(i for i, r in enumerate(runs) if re.search(r"pip install torch\b", r))
    assert "--index-url" in runs[torch]
    sdbatch = next(i for i, r in enumerate(runs) if re.search(r"pip install \S*\[s3\]", r))
    assert torch < sdbatch, "torch (CUDA build) must be installed before sdbatch"
    assert not any(re.search(r"pip install[^&;]*torchvision", r) for r in runs)

    env = " ".join(a for w, a in steps if w == "ENV")
    assert "HF_HOME=" in env
    (user,) = [a for w, a in steps if w == "USER"]
    assert user not in ("root", "0")
    assert [a for w, a in steps if w == "ENTRYPOINT"] == ['["sdbatch"]']


def test_dockerignore_lets_the_copied_files_through() -> None:
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore, "ignore everything by default"
    for _, args in [s for s in dockerfile_instructions() if s[0] == "COPY"]:
        sources = [a for a in args.split() if not a.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert source.rstrip("/") in kept, f"COPY {source}: excluded by the dockerignore"


# ---------------------------------------------------------------- docs point at real files


@pytest.mark.parametrize("readme", [CLUSTER / "README.md", KUBERAY / "README.md"], ids=rel)
def test_readme_mentions_only_existing_files(readme: Path) -> None:
    text = readme.read_text()
    # Repository paths, not the ends of URLs (…/cluster/kubernetes/…).
    for path in set(re.findall(r"(?<![\w/.])((?:cluster|infra)/[\w./-]*\w)", text)):
        assert (ROOT / path).exists(), f"{rel(readme)} mentions missing {path}"
    for name in set(re.findall(r"`(\w[\w.-]*\.yaml)`", text)):
        assert any(p.name == name for p in CONFIG_FILES) or name in ("job.yaml", "cats.yaml"), name
