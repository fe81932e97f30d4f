# SPDX-License-Identifier: Apache-2.0
"""The Kubernetes manifests in deploy/ hold together, offline.

Every YAML under deploy/kubernetes/ is parsed and checked for what breaks a
deployment silently: a Service targeting a port its pods do not declare, a
readiness probe off /health, a kv-transfer-config kvbridge would refuse or
with the roles swapped, a producer that advertises loopback, a Secret or
ConfigMap referenced under a wrong name, GPUs not requested, a NetworkPolicy
that does not cover the kv port, a router pointing at a Service that does not
exist or with flags its parser rejects. The start script is run for real with
a stand-in ``vllm``. Each check is shown to fail on a mutated manifest.

No cluster and no network: ``kubectl kustomize`` (offline) runs when kubectl is
installed; Kubernetes OpenAPI schema validation is not here (it needs a
validator this venv lacks) - docs/deploy.md records the run by hand.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest

yaml = pytest.importorskip("yaml")

from kvbridge.vllm.config import KVBridgeConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
HELM_VALUES = ROOT / "deploy" / "helm" / "vllm-stack-values.yaml"
GPU = "nvidia.com/gpu"
SAMPLE_POD_IP = "10.42.7.9"
ROLES = {"prefill": "kv_producer", "decode": "kv_consumer"}


# ------------------------------------------------------------------ loading

def load_dir(path: Path) -> list[dict]:
    """Every object of every manifest YAML under ``path`` (kustomizations aside)."""
    docs = []
    for f in sorted(path.rglob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        for d in yaml.safe_load_all(f.read_text()):
            if d:
                d.setdefault("metadata", {})["_file"] = str(f.relative_to(ROOT))
                docs.append(d)
    return docs


def stack(variant: str) -> list[dict]:
    """The objects one kustomization applies, read from its resources list
    (recursively) - what ``kubectl apply -k`` would send, before images."""
    def walk(d: Path) -> list[dict]:
        kz = yaml.safe_load((d / "kustomization.yaml").read_text())
        out = []
        for r in kz["resources"]:
            p = (d / r).resolve()
            if p.is_dir():
                out += walk(p)
            else:
                for doc in yaml.safe_load_all(p.read_text()):
                    if doc:
                        doc.setdefault("metadata", {})["_file"] = str(p.relative_to(ROOT))
                        out.append(doc)
        return out
    return walk(K8S / variant if variant else K8S)


VARIANTS = {"kvbridge-proxy": "", "vllm-router": "vllm-router"}


def by_kind(docs, kind):
    return [d for d in docs if d.get("kind") == kind]


def named(docs, kind, name):
    return next((d for d in by_kind(docs, kind) if d["metadata"]["name"] == name), None)


def component(d) -> str | None:
    return d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")


def containers(dep):
    return dep["spec"]["template"]["spec"]["containers"]


def env_of(c) -> dict:
    return {e["name"]: e for e in c.get("env", [])}


def port_matches(ref, c) -> bool:
    return any(ref in (p.get("name"), p["containerPort"]) for p in c.get("ports", []))


def config_map_file(docs, dep, c, path: str) -> str | None:
    """The text a container sees at ``path``, through its ConfigMap volume mounts."""
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"].get("volumes", [])}
    for m in c.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/") + "/"
        if not path.startswith(mp) or "configMap" not in vols.get(m["name"], {}):
            continue
        cm = named(docs, "ConfigMap", vols[m["name"]]["configMap"]["name"])
        return None if cm is None else cm["data"].get(path[len(mp):])
    return None


def parse_kv(text: str, pod_ip: str = SAMPLE_POD_IP) -> tuple[dict, KVBridgeConfig]:
    """The JSON as start-vllm.sh renders it, and kvbridge's own parse of it."""
    cfg = json.loads(text.replace("${POD_IP}", pod_ip).replace("$(POD_IP)", pod_ip))
    ktc = SimpleNamespace(kv_connector=cfg.get("kv_connector"), kv_role=cfg.get("kv_role"),
                          kv_port=cfg.get("kv_port", 14579),
                          kv_connector_extra_config=cfg.get("kv_connector_extra_config"))
    return cfg, KVBridgeConfig.from_vllm(SimpleNamespace(kv_transfer_config=ktc))


# ------------------------------------------------------------------ checks
# Each returns a list of problems; empty means fine.

def check_services(docs) -> list[str]:
    errs = []
    deps = by_kind(docs, "Deployment")
    for svc in by_kind(docs, "Service"):
        sel = svc["spec"].get("selector") or {}
        pods = [d for d in deps
                if sel and sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        name = svc["metadata"]["name"]
        if not pods:
            errs.append(f"Service {name}: selector {sel} matches no Deployment")
        for dep in pods:
            for sp in svc["spec"]["ports"]:
                tp = sp.get("targetPort", sp["port"])
                if not any(port_matches(tp, c) for c in containers(dep)):
                    errs.append(f"Service {name} targets port {tp!r}, which Deployment "
                                f"{dep['metadata']['name']} does not declare")
    return errs


def check_probes(docs) -> list[str]:
    errs = []
    for dep in by_kind(docs, "Deployment"):
        for c in containers(dep):
            rp = (c.get("readinessProbe") or {}).get("httpGet")
            where = f"{dep['metadata']['name']}/{c['name']}"
            if not rp or rp.get("path") != "/health":
                errs.append(f"{where}: readinessProbe is not an httpGet on /health")
            elif not port_matches(rp["port"], c):
                errs.append(f"{where}: readinessProbe port {rp['port']!r} not a containerPort")
    return errs


def check_engines(docs) -> list[str]:
    errs = []
    engines = {component(d): d for d in by_kind(docs, "Deployment")
               if component(d) in ROLES}
    if set(engines) != set(ROLES):
        return [f"engine Deployments found: {sorted(engines)}; want {sorted(ROLES)}"]
    models = set()
    for comp, dep in engines.items():
        c = containers(dep)[0]
        name, env = dep["metadata"]["name"], env_of(c)
        res = c.get("resources", {})
        if str(res.get("limits", {}).get(GPU, "0")) in ("0", ""):
            errs.append(f"{name}: no {GPU} limit")
        if str(res.get("requests", {}).get(GPU, res.get("limits", {}).get(GPU))) != \
                str(res.get("limits", {}).get(GPU)):
            errs.append(f"{name}: {GPU} request differs from its limit")
        # the secret, by name and key
        ref = (env.get("KVBRIDGE_SECRET", {}).get("valueFrom") or {}).get("secretKeyRef")
        if not ref:
            errs.append(f"{name}: KVBRIDGE_SECRET does not come from a Secret")
        else:
            sec = named(docs, "Secret", ref["name"])
            if sec is None:
                errs.append(f"{name}: Secret {ref['name']!r} is not in the manifests")
            elif ref["key"] not in {**sec.get("data", {}), **sec.get("stringData", {})}:
                errs.append(f"{name}: Secret {ref['name']} has no key {ref['key']!r}")
        # model from the shared ConfigMap
        mref = (env.get("MODEL", {}).get("valueFrom") or {}).get("configMapKeyRef")
        cm = mref and named(docs, "ConfigMap", mref["name"])
        if not cm or mref["key"] not in cm["data"]:
            errs.append(f"{name}: MODEL does not come from a ConfigMap key that exists")
        else:
            models.add(cm["data"][mref["key"]])
        if "$(MODEL)" not in c.get("args", []):
            errs.append(f"{name}: args do not pass $(MODEL) to vllm serve")
        # the kv-transfer-config
        path = env.get("KV_TRANSFER_CONFIG_FILE", {}).get("value", "")
        text = config_map_file(docs, dep, c, path)
        if text is None:
            errs.append(f"{name}: KV_TRANSFER_CONFIG_FILE {path!r} is not a mounted "
                        f"ConfigMap key")
            continue
        try:
            cfg, kb = parse_kv(text)
        except (ValueError, KeyError) as e:
            errs.append(f"{name}: kv-transfer-config rejected: {e}")
            continue
        if cfg.get("kv_connector") != "KVBridgeConnector":
            errs.append(f"{name}: kv_connector is {cfg.get('kv_connector')!r}")
        if kb.role != ROLES[comp]:
            errs.append(f"{name}: kv_role {kb.role}, want {ROLES[comp]}")
        if kb.is_producer:
            tc = kb.transport_config
            if tc.host in ("127.0.0.1", "localhost"):
                errs.append(f"{name}: producer binds {tc.host}: decode pods cannot dial it")
            if tc.advertise_host != SAMPLE_POD_IP:
                errs.append(f"{name}: producer advertises {tc.advertise_host!r}, "
                            f"not the pod IP (${{POD_IP}})")
            fr = (env.get("POD_IP", {}).get("valueFrom") or {}).get("fieldRef", {})
            if fr.get("fieldPath") != "status.podIP":
                errs.append(f"{name}: POD_IP is not the downward API's status.podIP")
            if not port_matches(kb.base_port, c):
                errs.append(f"{name}: kv port {kb.base_port} is not a containerPort")
            errs += check_netpol(docs, dep, kb.base_port, engines["decode"])
    if len(models) > 1:
        errs.append(f"prefill and decode serve different models: {sorted(models)}")
    return errs


def check_netpol(docs, prefill, kv_port: int, decode) -> list[str]:
    """Some NetworkPolicy selects the prefill pods, and every ingress rule that
    covers the kv port admits decode pods only."""
    labels = prefill["spec"]["template"]["metadata"]["labels"]
    dlabels = decode["spec"]["template"]["metadata"]["labels"]
    pols = [p for p in by_kind(docs, "NetworkPolicy")
            if p["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()
            and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not pols:
        return ["no NetworkPolicy selects the prefill pods"]

    def covers(p) -> bool:
        port = p.get("port")
        if port is None:
            return True
        if isinstance(port, str):
            return port == "kv"
        return port <= kv_port <= p.get("endPort", port)

    errs, reachable = [], False
    for pol in pols:
        for rule in pol["spec"].get("ingress", []):
            if not any(covers(p) for p in rule.get("ports") or [{}]):
                continue
            srcs = rule.get("from") or []
            if srcs and all(set(s) == {"podSelector"} and s["podSelector"].get("matchLabels")
                            and s["podSelector"]["matchLabels"].items() <= dlabels.items()
                            for s in srcs):
                reachable = True
            else:
                errs.append(f"NetworkPolicy {pol['metadata']['name']}: kv port {kv_port} "
                            f"is open to more than the decode pods")
    if not reachable and not errs:
        errs.append(f"NetworkPolicy: no rule lets decode pods reach kv port {kv_port}")
    return errs


def _svc_port(docs, url: str) -> str | None:
    u = urlparse(url)
    svc = named(docs, "Service", u.hostname)
    if svc is None:
        return f"{url}: no Service {u.hostname!r}"
    if not any(p["port"] == u.port for p in svc["spec"]["ports"]):
        return f"{url}: Service {u.hostname} has no port {u.port}"
    return None


def check_router(docs) -> list[str]:
    routers = [d for d in by_kind(docs, "Deployment") if component(d) == "router"]
    if len(routers) != 1:
        return [f"want one router Deployment, found {len(routers)}"]
    c = containers(routers[0])[0]
    argv = list(c.get("command", [])) + list(c.get("args", []))
    errs = []
    if argv[:2] == ["kvbridge", "proxy"]:
        from kvbridge.serve.proxy import add_arguments

        p = argparse.ArgumentParser(exit_on_error=False)
        add_arguments(p)
        try:
            ns = p.parse_args(argv[2:])
        except (argparse.ArgumentError, SystemExit) as e:
            return [f"kvbridge proxy rejects its args: {e}"]
        prefill, decode, host = ns.prefill, ns.decode, ns.host
    elif argv[0] == "vllm-router":
        kv = {}
        for a in argv[1:]:
            k, _, v = a.partition("=")
            kv.setdefault(k, []).append(v)
        if "--vllm-pd-disaggregation" not in kv:
            errs.append("vllm-router runs without --vllm-pd-disaggregation")
        prefill, decode = kv.get("--prefill", []), kv.get("--decode", [])
        host = (kv.get("--host") or ["127.0.0.1"])[0]
    else:
        return [f"unknown router command {argv[:2]}"]
    if host in ("127.0.0.1", "localhost"):
        errs.append(f"router binds {host}: its Service cannot reach it")
    if not prefill or not decode:
        errs.append("router has no prefill or no decode backend")
    for url in prefill + decode:
        if err := _svc_port(docs, url):
            errs.append(err)
    return errs


ALL_CHECKS = (check_services, check_probes, check_engines, check_router)


def problems(docs) -> list[str]:
    return [e for check in ALL_CHECKS for e in check(docs)]


# ------------------------------------------------------------------ the tests

@pytest.fixture(params=sorted(VARIANTS))
def docs(request):
    return stack(VARIANTS[request.param])


def test_every_manifest_parses_and_is_applied_by_a_kustomization():
    everything = {d["metadata"]["_file"] for d in load_dir(K8S)}
    applied = {d["metadata"]["_file"] for v in VARIANTS.values() for d in stack(v)}
    assert everything, "no manifests found"
    assert everything == applied, f"not in any kustomization: {sorted(everything - applied)}"
    for d in load_dir(K8S):
        assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"), d


def test_variant_holds_together(docs):
    assert problems(docs) == []


# Each mutation must be caught, with a message naming the problem.
def _dep(docs, comp):
    return next(d for d in by_kind(docs, "Deployment") if component(d) == comp)


def _cm(docs):
    return named(docs, "ConfigMap", "kvbridge-config")


def _mut_target_port(docs):
    named(docs, "Service", "kvbridge-prefill")["spec"]["ports"][0]["targetPort"] = 8080


def _mut_readiness(docs):
    containers(_dep(docs, "decode"))[0]["readinessProbe"]["httpGet"]["path"] = "/v1/models"


def _mut_roles_swapped(docs):
    cm = _cm(docs)["data"]
    cm["prefill-kv-transfer-config.json"] = cm["prefill-kv-transfer-config.json"].replace(
        "kv_producer", "kv_consumer")


def _mut_unknown_key(docs):
    cm = _cm(docs)["data"]
    cm["decode-kv-transfer-config.json"] = cm["decode-kv-transfer-config.json"].replace(
        '"transport"', '"transprt"')


def _mut_loopback(docs):
    cm = _cm(docs)["data"]
    cm["prefill-kv-transfer-config.json"] = cm["prefill-kv-transfer-config.json"].replace(
        '"${POD_IP}"', '"127.0.0.1"')


def _mut_secret_name(docs):
    env_of(containers(_dep(docs, "prefill"))[0])["KVBRIDGE_SECRET"]["valueFrom"][
        "secretKeyRef"]["name"] = "kvbridge-secrets"


def _mut_no_gpu(docs):
    res = containers(_dep(docs, "decode"))[0]["resources"]
    res["limits"].pop(GPU)
    res["requests"].pop(GPU)


def _mut_kv_port(docs):
    for p in containers(_dep(docs, "prefill"))[0]["ports"]:
        if p["name"] == "kv":
            p["containerPort"] = 14600


def _mut_netpol_open(docs):
    named(docs, "NetworkPolicy", "kvbridge-prefill-kv")["spec"]["ingress"][0].pop("from")


def _mut_router_url(docs):
    c = containers(_dep(docs, "router"))[0]
    c["args"] = [a.replace("kvbridge-decode:8000", "kvbridge-decode:8001") for a in c["args"]]


MUTATIONS = {
    "wrong targetPort": (_mut_target_port, "does not declare"),
    "readiness not /health": (_mut_readiness, "readinessProbe"),
    "roles swapped": (_mut_roles_swapped, "kv_role kv_consumer, want kv_producer"),
    "unknown extra key": (_mut_unknown_key, "unknown kv_connector_extra_config keys"),
    "producer advertises loopback": (_mut_loopback, "not the pod IP"),
    "secret misnamed": (_mut_secret_name, "'kvbridge-secrets' is not in the manifests"),
    "no GPU": (_mut_no_gpu, f"no {GPU} limit"),
    "kv port not declared": (_mut_kv_port, "is not a containerPort"),
    "kv port open to all": (_mut_netpol_open, "open to more than the decode pods"),
    "router to a wrong port": (_mut_router_url, "has no port 8001"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_checks_catch_a_broken_manifest(name):
    docs = copy.deepcopy(stack(""))
    assert problems(docs) == []
    mutate, expected = MUTATIONS[name]
    mutate(docs)
    found = problems(docs)
    assert any(expected in e for e in found), found


def _run_start_script(tmp_path, role: str, secret: str, pod_ip: str = SAMPLE_POD_IP):
    docs = stack("")
    cm = _cm(docs)["data"]
    etc = tmp_path / "etc"
    etc.mkdir(exist_ok=True)
    for k, v in cm.items():
        (etc / k).write_text(v)
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "vllm"  # stand-in vllm: prints its argv as JSON
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "POD_IP": pod_ip, "KVBRIDGE_SECRET": secret,
           "KV_TRANSFER_CONFIG_FILE": str(etc / f"{role}-kv-transfer-config.json")}
    return subprocess.run(["/bin/sh", str(etc / "start-vllm.sh"), "Qwen/Qwen3-8B",
                           "--port=8000"], env=env, capture_output=True, text=True,
                          timeout=30)


@pytest.mark.parametrize("role", sorted(ROLES))
def test_start_script_renders_pod_ip_and_execs_vllm_serve(tmp_path, role):
    r = _run_start_script(tmp_path, role, secret="s3cr3t")
    assert r.returncode == 0, r.stderr
    argv = json.loads(r.stdout)
    assert argv[:3] == ["serve", "Qwen/Qwen3-8B", "--port=8000"]
    assert argv[3] == "--kv-transfer-config"
    assert "${POD_IP}" not in argv[4] and "s3cr3t" not in argv[4]
    cfg = json.loads(argv[4])
    _, kb = parse_kv(argv[4], pod_ip="unused")
    assert kb.role == ROLES[role]
    if role == "prefill":
        assert cfg["kv_connector_extra_config"]["advertise_host"] == SAMPLE_POD_IP
        assert kb.transport_config.host == "0.0.0.0"


@pytest.mark.parametrize("secret", ["", "CHANGE-ME-openssl-rand-hex-32"])
def test_start_script_refuses_a_missing_or_placeholder_secret(tmp_path, secret):
    r = _run_start_script(tmp_path, "prefill", secret=secret)
    assert r.returncode == 78 and "KVBRIDGE_SECRET" in r.stderr and r.stdout == ""


def test_vllm_router_flags_exist():
    exe = shutil.which("vllm-router", path=str(Path(sys.executable).parent)) or \
        shutil.which("vllm-router")
    if not exe:
        pytest.skip("vllm-router is not installed")
    helptext = subprocess.run([exe, "--help"], capture_output=True, text=True,
                              timeout=60).stdout
    c = containers(_dep(stack("vllm-router"), "router"))[0]
    for a in c["args"]:
        flag = a.partition("=")[0]
        assert flag in helptext, f"vllm-router has no {flag}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kustomize_builds_offline(variant):
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl is not installed")
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    r = subprocess.run([kubectl, "kustomize", str(K8S / VARIANTS[variant])],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    built = [d for d in yaml.safe_load_all(r.stdout) if d]
    kinds = sorted(d["kind"] for d in built)
    assert kinds == sorted(d["kind"] for d in stack(VARIANTS[variant]))
    for d in by_kind(built, "Deployment"):
        for c in containers(d):
            assert c["image"].startswith("registry.example.com/kvbridge-vllm:"), c["image"]
    # the built stack passes the same checks (anchors expanded, images set)
    assert problems(built) == []


def test_helm_values_for_vllm_stack():
    values = yaml.safe_load(HELM_VALUES.read_text())
    specs = {m["name"]: m for m in values["servingEngineSpec"]["modelSpec"]}
    assert set(specs) == set(ROLES)
    assert len({m["modelURL"] for m in specs.values()}) == 1
    for name, m in specs.items():
        extra = m["vllmConfig"]["extraArgs"]
        i = extra.index("--kv-transfer-config")
        cfg, kb = parse_kv(extra[i + 1])
        assert cfg["kv_connector"] == "KVBridgeConnector" and kb.role == ROLES[name]
        if kb.is_producer:
            # the chart defines POD_IP; the kubelet expands $(POD_IP) in args
            assert "$(POD_IP)" in extra[i + 1]
            assert kb.transport_config.advertise_host == SAMPLE_POD_IP
        env = {e["name"]: e for e in m["env"]}
        assert env["KVBRIDGE_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "kvbridge-secret"
        assert int(m["requestGPU"]) >= 1
    assert values["routerSpec"]["enableRouter"] is False
    objs = values["extraObjects"]
    svc_names = {f"kvb-{n}-engine-service" for n in specs}  # release name kvb
    router = next(o for o in objs if o["kind"] == "Deployment")
    c = router["spec"]["template"]["spec"]["containers"][0]
    port = values["servingEngineSpec"]["servicePort"]
    for a in c["args"]:
        if a.startswith(("--prefill=", "--decode=")):
            u = urlparse(a.partition("=")[2])
            assert u.hostname in svc_names and u.port == port, a
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
