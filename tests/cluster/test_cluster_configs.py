"""cluster/: launcher YAMLs valid for the installed Ray's own schema, KubeRay / MLflow manifests
well-formed, the stages' custom resources consistent, job entrypoints present, no secrets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from raydapt.config import load_job
from raydapt.core.runtime import CLUSTER_RESOURCES

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
MANIFESTS = sorted((CLUSTER / "kuberay").glob("*.yaml")) + sorted((CLUSTER / "mlflow").glob("*.yaml"))
RECIPES = {"simda", "dallmi", "ntk_select"}
RAY_VERSION = "2.60.0"
NOT_PUBLIC = {8265, 3000, 9090, 8080}  # dashboard, Grafana, Prometheus, metrics


def _launcher(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


# --------------------------------------------------------------------------------------------
# Ray cluster launcher
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_yaml_validates_against_rays_schema(name):
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    assert ray.__version__ == RAY_VERSION
    cfg = _launcher(name)
    jsonschema.validate(cfg, _ray_schema())       # the schema file the Ray package ships
    validate_config(prepare_config(cfg))          # and after Ray merges its provider defaults


def test_the_schema_rejects_a_broken_config():
    """The validation above has teeth: a wrong type and an unknown key are caught."""
    cfg = _launcher("aws.yaml")
    bad = {**cfg, "max_workers": "many"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _ray_schema())
    bad = json.loads(json.dumps(cfg))
    bad["available_node_types"]["annotate_gpu"]["gpus"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _ray_schema())


def _spot(name: str, node_config: dict) -> bool:
    if name == "aws.yaml":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    sched = node_config.get("scheduling", {})
    return sched.get("preemptible") is True or sched.get("provisioningModel") == "SPOT"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_layout(name):
    cfg = _launcher(name)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must run no work"
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--num-cpus=0" in start
    # annotation GPUs: spot / preemptible, from zero, autoscaling, steered by annotate_gpu
    ann = types["annotate_gpu"]
    assert ann["min_workers"] == 0 and ann["max_workers"] >= 2
    assert ann["resources"]["GPU"] >= 1 and ann["resources"]["annotate_gpu"] == ann["resources"]["GPU"]
    assert _spot(name, ann["node_config"])
    # training: 8 GPUs per node, from zero, steered by train_gpu
    tr = types["train_gpu"]
    assert tr["min_workers"] == 0 and tr["max_workers"] >= 1
    assert tr["resources"]["GPU"] == 8 and tr["resources"]["train_gpu"] == 8
    # no other node type offers the steering resources
    for tname, t in types.items():
        for r in CLUSTER_RESOURCES:
            if r in t["resources"]:
                assert tname == r, f"{tname} offers {r}"
    assert cfg["max_workers"] >= sum(t.get("max_workers", 0) for t in types.values())
    # pinned Ray: images and a set-up check
    images = [cfg["docker"]["image"], cfg["docker"]["head_image"]]
    assert all(img.split(":")[1].startswith(RAY_VERSION + "-") for img in images), images
    assert any(f"'{RAY_VERSION}'" in c for c in cfg["setup_commands"])


@pytest.mark.parametrize("name", LAUNCHERS)
def test_dashboard_is_not_exposed(name):
    cfg = _launcher(name)
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start
    rules = cfg["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        ports = range(rule.get("FromPort", 0), rule.get("ToPort", 65535) + 1)
        public = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", []))
        assert not (public and NOT_PUBLIC & set(ports)), f"{name}: public rule for {rule}"
    assert "ray dashboard cluster/" + name in (CLUSTER / name).read_text()
    # token authentication on every node, the token file-mounted (never inline)
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token" in " ".join(cmds)
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


# --------------------------------------------------------------------------------------------
# Kubernetes manifests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_manifest_parses_and_is_a_kubernetes_object(path):
    docs = _docs(path)
    assert docs, f"{path} has no documents"
    for d in docs:
        assert d.get("apiVersion") and d.get("kind"), f"{path}: {d}"
        assert d["metadata"]["name"]
        if d["kind"] not in ("Namespace",):
            assert d["metadata"]["namespace"] == "raydapt"
        if d["kind"] == "Service":
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP", "nothing public"
        assert d["kind"] not in ("Ingress",), "nothing public"


def _gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def test_raycluster_autoscales_gpu_groups_from_zero():
    (rc,) = [d for d in _docs(CLUSTER / "kuberay" / "raycluster.yaml") if d["kind"] == "RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    steer = {}
    for g in groups.values():
        (c,) = g["template"]["spec"]["containers"]
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        if _gpus(c):
            assert g["minReplicas"] == 0 and g["replicas"] == 0, g["groupName"]
            res = json.loads(json.loads(g["rayStartParams"]["resources"]))
            steer.update({k: (v, _gpus(c)) for k, v in res.items()})
    assert steer == {"annotate_gpu": (1, 1), "train_gpu": (8, 8)}


def test_a_rayjob_per_recipe_on_that_cluster():
    (rc,) = [d for d in _docs(CLUSTER / "kuberay" / "raycluster.yaml") if d["kind"] == "RayCluster"]
    jobs = [d for p in MANIFESTS for d in _docs(p) if d["kind"] == "RayJob"]
    assert {j["metadata"]["labels"]["raydapt.io/method"] for j in jobs} == RECIPES
    for j in jobs:
        assert j["apiVersion"] == "ray.io/v1"
        assert j["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
        method = j["metadata"]["labels"]["raydapt.io/method"]
        m = re.search(r"raydapt run (\S+\.ya?ml)", j["spec"]["entrypoint"])
        assert m and m.group(1).startswith(f"jobs/{method}/") and ".gpu." in m.group(1)


def test_mlflow_server_uses_postgres_and_object_storage_with_referenced_secrets():
    docs = _docs(CLUSTER / "mlflow" / "mlflow.yaml")
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    args = " ".join(c.get("command", []) + c.get("args", []))
    assert "--backend-store-uri=postgresql://" in args and "$(MLFLOW_DB_PASSWORD)" in args
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_DB_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-db"
    assert re.match(r"(s3|gs)://", env["MLFLOW_ARTIFACTS_DESTINATION"]["value"])
    assert "--serve-artifacts" in args
    assert any(d["kind"] == "Service" and d["metadata"]["name"] == "mlflow" for d in docs)
    assert not [d for d in docs if d["kind"] == "Secret"], "secrets are created, not committed"
    assert (CLUSTER / "mlflow" / "README.md").is_file()


# --------------------------------------------------------------------------------------------
# Consistency with the code: custom resources, job entrypoints
# --------------------------------------------------------------------------------------------


def _resource_requests(node) -> list[dict]:
    if isinstance(node, dict):
        found = [node["resources"]] if isinstance(node.get("resources"), dict) else []
        return found + [r for v in node.values() for r in _resource_requests(v)]
    if isinstance(node, list):
        return [r for v in node for r in _resource_requests(v)]
    return []


def test_gpu_jobs_request_only_resources_the_clusters_offer():
    offered = set()
    for name in LAUNCHERS:
        for t in _launcher(name)["available_node_types"].values():
            offered |= set(t["resources"]) - {"CPU", "GPU", "memory"}
    assert offered == set(CLUSTER_RESOURCES)
    gpu_jobs = sorted((REPO / "jobs").rglob("*.gpu.yaml"))
    assert gpu_jobs
    for job in gpu_jobs:
        raw = yaml.safe_load(job.read_text())
        asked = {k for r in _resource_requests(raw) for k in r}
        assert asked <= offered, f"{job} asks for {asked - offered}, which no node type offers"
    simda = load_job(REPO / "jobs/simda/amazon-mistral7b.gpu.yaml")
    assert simda.teacher.pool.resources == {"annotate_gpu": 1}
    assert simda.distill.resources == {"train_gpu": 1}


def _entrypoints() -> dict[str, list[str]]:
    """Every ``raydapt run <job>.yaml`` named in cluster/ -> the files naming it."""
    out: dict[str, list[str]] = {}
    for f in sorted(CLUSTER.rglob("*")):
        if f.is_file() and f.suffix in (".yaml", ".yml", ".md", ""):
            for m in re.finditer(r"raydapt (?:run|submit) ([\w./-]+\.ya?ml)", f.read_text()):
                out.setdefault(m.group(1), []).append(str(f.relative_to(REPO)))
    return out


def test_every_job_entrypoint_exists_and_loads():
    eps = _entrypoints()
    assert {p.split("/")[1] for p in eps if p.startswith("jobs/")} >= RECIPES
    missing = {p: files for p, files in eps.items() if not (REPO / p).is_file()}
    assert not missing, ("job files named in cluster/ do not exist: "
                         + "; ".join(f"{p} (in {', '.join(f)})" for p, f in missing.items()))
    for p in eps:
        load_job(REPO / p)  # and they are valid job configs


# --------------------------------------------------------------------------------------------
# No literal secrets
# --------------------------------------------------------------------------------------------

_SECRET_NAME = re.compile(r"(password|passwd|secret|token|api[_-]?key|access[_-]?key)", re.I)
_REF = re.compile(r"^\s*(\$\(|\$\{|<|\.\.\.|~/|$)")  # a reference: $(VAR), ${VAR}, ~/file
_LITERALS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),                        # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bhf_[A-Za-z0-9]{30,}"),                   # Hugging Face token
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"),            # GitHub token
    re.compile(r"\"private_key\"\s*:"),                     # GCP service account key file
]
_URI_PASSWORD = re.compile(r"://[^/\s:@'\"]+:([^@\s/'\"]+)@")


def secret_findings(text: str, docs: list | None = None) -> list[str]:
    """Literal credentials in a file: known key formats, passwords inside URIs, Secret objects
    with data, and secret-named keys / env vars holding a literal value."""
    found = [f"literal {p.pattern}" for p in _LITERALS if p.search(text)]
    found += [f"password in URI: {m.group(0)}" for m in _URI_PASSWORD.finditer(text)
              if not _REF.match(m.group(1))]

    def walk(node, key=""):
        if isinstance(node, dict):
            if node.get("kind") == "Secret" and (node.get("data") or node.get("stringData")):
                found.append(f"Secret {node.get('metadata', {}).get('name')} with data")
            if isinstance(node.get("name"), str) and _SECRET_NAME.search(node["name"]) \
                    and isinstance(node.get("value"), str) and not _REF.match(node["value"]):
                found.append(f"env {node['name']} has a literal value")
            for k, v in node.items():
                if _SECRET_NAME.search(str(k)) and isinstance(v, str) and not _REF.match(v):
                    found.append(f"key {k} has a literal value")
                walk(v, str(k))
        elif isinstance(node, list):
            for v in node:
                walk(v, key)

    for d in docs or []:
        walk(d)
    return found


def test_the_secret_scanner_catches_planted_secrets():
    planted = yaml.safe_load_all("""
apiVersion: v1
kind: Secret
metadata: {name: db}
stringData: {password: hunter2}
---
env:
  - {name: MLFLOW_DB_PASSWORD, value: hunter2}
  - {name: OK_PASSWORD, valueFrom: {secretKeyRef: {name: db, key: password}}}
args: ["--backend-store-uri=postgresql://mlflow:hunter2@db:5432/mlflow"]
""")
    docs = list(planted)
    text = "postgresql://mlflow:hunter2@db:5432/mlflow AKIAABCDEFGHIJKLMNOP"
    found = secret_findings(text, docs)
    assert any("Secret db" in f for f in found)
    assert any("MLFLOW_DB_PASSWORD" in f for f in found)
    assert any("password in URI" in f for f in found)
    assert any("AKIA" in f for f in found)
    assert not any("OK_PASSWORD" in f for f in found)
    assert secret_findings("postgresql://mlflow:$(MLFLOW_DB_PASSWORD)@db:5432/mlflow") == []


def test_no_manifest_or_config_contains_a_literal_secret():
    bad = {}
    for f in sorted(CLUSTER.rglob("*")):
        if not f.is_file():
            continue
        text = f.read_text()
        docs = [d for d in yaml.safe_load_all(text) if d] if f.suffix == ".yaml" else []
        if found := secret_findings(text, docs):
            bad[str(f.relative_to(REPO))] = found
    assert not bad, bad


def test_pool_sections_pass_custom_resources_to_ray_data():
    from raydapt.config import ActorPoolSection
    from raydapt.stages.common import pool_kwargs as _pool

    kw = _pool(ActorPoolSection(num_gpus=1, resources={"annotate_gpu": 1}))
    assert kw["resources"] == {"annotate_gpu": 1.0} and kw["num_gpus"] == 1
    assert "resources" not in _pool(ActorPoolSection())


# --------------------------------------------------------------------------------------------
# One node-types file: cluster/node_types.yaml
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launchers_carry_the_node_types_file(name):
    """aws.yaml / gcp.yaml cannot include a file, so they carry a copy of the node types; this
    is what keeps the copy equal to cluster/node_types.yaml (the local cluster and
    `raydapt plan` read that file)."""
    from raydapt.ops import node_types

    raw = node_types.load()
    cfg = _launcher(name)
    assert cfg["head_node_type"] == raw["head_node_type"]
    assert cfg["idle_timeout_minutes"] == raw["idle_timeout_minutes"]
    got = {n: {k: t[k] for k in ("resources", "min_workers", "max_workers") if k in t}
           for n, t in cfg["available_node_types"].items()}
    assert got == raw["node_types"], f"{name} drifted from cluster/node_types.yaml"


def test_local_node_types_mirror_the_cloud_ones():
    from raydapt.ops import node_types

    cl, lo = node_types.cloud(), node_types.local()
    assert set(lo.types) == set(cl.types) and lo.head == cl.head == "head"
    assert lo.offered("head") == {"CPU": 0.0}                   # the driver only
    assert lo.types["annotate_gpu"]["min_workers"] == 0 and lo.types["annotate_gpu"]["max_workers"] == 3
    assert lo.types["train_gpu"]["min_workers"] == 0 and lo.types["train_gpu"]["max_workers"] == 2
    assert lo.types["cpu"]["min_workers"] == 0
    assert lo.idle_timeout_minutes < 1
    for n in cl.types:  # the same steering resources, no GPU
        custom = set(cl.offered(n)) - {"CPU", "GPU"}
        assert set(lo.offered(n)) - {"CPU"} == custom, n
        assert "GPU" not in lo.offered(n)
    # a teacher actor {CPU: 0.5, annotate_gpu: 1} fits only annotation nodes, in both halves
    for nt in (cl, lo):
        assert nt.fitting({"CPU": 0.5, "annotate_gpu": 1}) == ["annotate_gpu"]
        assert nt.fitting({"CPU": 1, "train_gpu": 1}) == ["train_gpu"]
        assert "head" not in nt.fitting({"CPU": 0.25})
    cfg = node_types.autoscaler_config(lo, "127.0.0.1:1", nodes_dir="/tmp/x")
    assert cfg["available_node_types"]["ray.head.default"]["resources"]["CPU"] == 0
    assert cfg["max_workers"] == sum(t["max_workers"] for n, t in lo.types.items() if n != "head")


def test_a_broken_node_types_file_is_refused(tmp_path):
    from raydapt.ops import node_types

    raw = node_types.load()
    bad = json.loads(json.dumps(raw))
    bad["local"]["node_types"]["cpu"]["resources"]["train_gpu"] = 1
    p = tmp_path / "nt.yaml"
    p.write_text(yaml.safe_dump(bad))
    with pytest.raises(node_types.NodeTypesError, match="cpu offers .'train_gpu'., which its cloud"):
        node_types.load(p)
    bad = json.loads(json.dumps(raw))
    bad["node_types"]["cpu"]["min_workers"] = 9
    p.write_text(yaml.safe_dump(bad))
    with pytest.raises(node_types.NodeTypesError, match="min_workers <= max_workers"):
        node_types.load(p)
