#!/usr/bin/env python3
"""Offline tests of the gptj Helm chart (run by deploy/validate.sh inside its venv).

For each value set in tests/values (and the chart's defaults) it runs `helm lint --strict`,
renders the chart (helm-python-sdk: the Helm v4 Go SDK, no cluster), lints the output with
yamllint, validates core kinds with kubernetes-validate --strict and the InferenceService with
check-jsonschema against KServe's CRD schema (schemas/), then checks that every parameter of
the seed's service maps to the right rendered field and that Knative's rules hold. Values the
chart must refuse (schema or template checks) are tested too.

Usage: chart_test.py [--out DIR] [--kube-version 1.30.0] [-k SUBSTRING]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import helm_python as helm
import yaml

import promql_names

DEPLOY = Path(__file__).resolve().parent.parent
CHART = DEPLOY / "helm" / "gptj"
VALUES_DIR = DEPLOY / "tests" / "values"
ISVC_SCHEMA = DEPLOY / "schemas" / "inferenceservice-v1beta1.json"
# Custom resources the chart renders, validated with check-jsonschema against schemas made from
# their CRDs (deploy/schemas/README.md); kubernetes-validate knows only the core kinds.
CRD_SCHEMAS = {
    "InferenceService": ISVC_SCHEMA,
    "InferencePool": DEPLOY / "schemas" / "inferencepool-v1.json",
    "HTTPRoute": DEPLOY / "schemas" / "httproute-v1.json",
    "PrometheusRule": DEPLOY / "schemas" / "prometheusrule-v1.json",
    "ServiceMonitor": DEPLOY / "schemas" / "servicemonitor-v1.json",
    "PodMonitor": DEPLOY / "schemas" / "podmonitor-v1.json",
}
EXAMPLES = DEPLOY / "examples"
DASHBOARD_JSON = CHART / "files" / "gptj-dashboard.json"
# promtool (Debian's prometheus package): validate.sh finds or installs it and passes it here.
PROMTOOL = os.environ.get("PROMTOOL") or shutil.which("promtool")
# The generation routes (what the alerts' error ratios count): every route that generates text.
GENERATION_ROUTES = ["/v1/models/{name}:predict", "/v2/models/{name}/generate",
                     "/v2/models/{name}/generate_stream", "/openai/v1/completions"]
BIN = Path(sys.executable).parent
RELEASE = "gpt-j-6b-my"
NAMESPACE = "inference"
YAMLLINT_CONFIG = (
    "{extends: default, rules: {line-length: {max: 160}, document-start: disable, "
    "indentation: {spaces: consistent, indent-sequences: whatever}, "
    "comments: {min-spaces-from-content: 1}, truthy: {check-keys: false}}}"
)
# Ports Knative's queue-proxy takes (knative/serving pkg/apis/serving/k8s_validation.go).
KNATIVE_RESERVED_PORTS = {8012, 8013, 8022, 9090, 9091}
KNATIVE_RESERVED_ENV = {"PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"}
# Pod fields Knative refuses (fieldmask.go), by default or always.
KNATIVE_REFUSED_POD_FIELDS = {
    "initContainers", "terminationGracePeriodSeconds", "securityContext", "schedulerName",
    "priorityClassName", "dnsPolicy", "hostNetwork", "runtimeClassName",
}


# ---------------------------------------------------------------------------------------------
# A tiny test harness: named checks, every failure reported, a summary at the end.

class Report:
    def __init__(self, only: str | None):
        self.only = only
        self.passed = 0
        self.failed: list[str] = []

    def check(self, name: str, fn) -> None:
        if self.only and self.only not in name:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the run
            detail = str(e) if isinstance(e, AssertionError) else traceback.format_exc(limit=3)
            self.failed.append(name)
            print(f"FAIL {name}\n     {detail.strip()}".replace("\n", "\n     "), flush=True)
        else:
            self.passed += 1
            print(f"ok   {name}", flush=True)


def eq(actual, expected, what=""):
    assert actual == expected, f"{what}: expected {expected!r}, got {actual!r}"


# ---------------------------------------------------------------------------------------------
# Rendering

def load_values(name: str) -> dict:
    if name == "defaults":
        return {}
    return yaml.safe_load((VALUES_DIR / f"{name}.yaml").read_text()) or {}


def render(values: dict, revision: int = 1) -> dict[str, str]:
    """Template path -> manifest text, like `helm template` (schema validated first)."""
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values)
        return chart.render(values, name=RELEASE, namespace=NAMESPACE, revision=revision, is_install=True)


class Rendered:
    def __init__(self, name: str, values: dict, out: Path):
        self.name = name
        self.values = values
        self.files = render(values)
        self.notes = self.files.get("gptj/templates/NOTES.txt", "")
        self.docs: list[dict] = []
        chunks = []
        for path, text in sorted(self.files.items()):
            if path.endswith("NOTES.txt") or not text.strip():
                continue
            chunks.append(f"---\n# Source: {path}\n{text.strip()}\n")
            for doc in yaml.safe_load_all(text):
                if doc:
                    self.docs.append(doc)
        self.dir = out / name
        self.dir.mkdir(parents=True, exist_ok=True)
        for old in [*self.dir.glob("*.yaml"), *self.dir.glob("*.sh")]:
            old.unlink()
        self.all_file = self.dir / "all.yaml"
        self.all_file.write_text("".join(chunks))
        # check-jsonschema validates one document per file.
        for job in self.of_kind("Job"):
            if job["metadata"]["labels"].get("app.kubernetes.io/component") == "model-download":
                script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
                (self.dir / "download-job.sh").write_text("#!/bin/sh\n" + script)
        self.crd_files: dict[str, list[Path]] = {}
        for kind in CRD_SCHEMAS:
            for i, doc in enumerate(self.of_kind(kind)):
                f = self.dir / f"{kind.lower()}-{i}.yaml"
                f.write_text(yaml.safe_dump(doc, sort_keys=False))
                self.crd_files.setdefault(kind, []).append(f)

    def of_kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d.get("kind") == kind]

    def one(self, kind: str) -> dict:
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, found {len(found)}"
        return found[0]

    def kinds(self) -> list[str]:
        return sorted(d["kind"] for d in self.docs)


def docs_of(files: dict[str, str]) -> list[dict]:
    return [d for path, text in files.items() if not path.endswith("NOTES.txt")
            for d in yaml.safe_load_all(text) if isinstance(d, dict)]


def env_of(container: dict) -> dict:
    out = {}
    for e in container.get("env", []):
        out[e["name"]] = e.get("value", e.get("valueFrom"))
    return out


def predictor(r: Rendered) -> dict:
    return r.one("InferenceService")["spec"]["predictor"]


def server_container(r: Rendered) -> dict:
    if r.of_kind("InferenceService"):
        cs = predictor(r)["containers"]
    else:
        cs = r.one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(cs) == 1, f"expected one container, got {len(cs)}"
    return cs[0]


def jobs(r: Rendered, component: str) -> list[dict]:
    return [j for j in r.of_kind("Job")
            if j["metadata"]["labels"].get("app.kubernetes.io/component") == component]


def arg_after(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} not in {args}"
    return args[args.index(flag) + 1]


def run_tool(cmd: list[str]) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} exited {p.returncode}:\n{p.stdout}{p.stderr}"


def lint(values: dict, kube_version: str) -> None:
    report = helm.lint(str(CHART), values, strict=True, kube_version=f"v{kube_version}")
    bad = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    assert not report.get("errors") and not bad, f"helm lint: {report}"


# ---------------------------------------------------------------------------------------------
# Checks that hold for every value set

def generic_checks(rep: Report, r: Rendered, kube_version: str) -> None:
    n = r.name
    rep.check(f"{n}: helm lint --strict", lambda: lint(r.values, kube_version))
    rep.check(f"{n}: yamllint of the rendered manifests",
              lambda: run_tool([BIN / "yamllint", "-s", "-d", YAMLLINT_CONFIG, str(r.all_file)]))
    rep.check(f"{n}: kubernetes-validate --strict (core kinds, k8s {kube_version})",
              lambda: run_tool([BIN / "kubernetes-validate", "--strict", "--quiet", "-k", kube_version, str(r.all_file)]))
    for kind, files in r.crd_files.items():
        rep.check(f"{n}: check-jsonschema {kind} against its CRD's schema ({CRD_SCHEMAS[kind].name})",
                  lambda kind=kind, files=files: run_tool([BIN / "check-jsonschema", "--schemafile",
                                                           str(CRD_SCHEMAS[kind]), *map(str, files)]))
    operations_checks(rep, r)

    def names_unique():
        keys = [(d["kind"], d["metadata"]["name"]) for d in r.docs]
        assert len(keys) == len(set(keys)), f"duplicate objects: {keys}"
    rep.check(f"{n}: object names are unique", names_unique)

    def pvc_hook_kept():
        for pvc in r.of_kind("PersistentVolumeClaim"):
            a = pvc["metadata"]["annotations"]
            eq(a.get("helm.sh/hook"), "pre-install", "PVC hook")
            eq(a.get("helm.sh/resource-policy"), "keep", "PVC resource policy")
    rep.check(f"{n}: model-cache PVC is a pre-install hook kept on uninstall", pvc_hook_kept)

    def download_job_before_server():
        for job in jobs(r, "model-download"):
            a = job["metadata"]["annotations"]
            assert "pre-install" in a["helm.sh/hook"] and "pre-upgrade" in a["helm.sh/hook"], a
            pvcs = r.of_kind("PersistentVolumeClaim")
            if pvcs:
                assert int(pvcs[0]["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(a["helm.sh/hook-weight"]), \
                    "the PVC hook must come before the download Job"
            c = job["spec"]["template"]["spec"]["containers"][0]
            env = env_of(c)
            eq(env["NVIDIA_VISIBLE_DEVICES"], "void", "download Job GPU")
            assert "nvidia.com/gpu" not in str(c.get("resources")), "the download Job must not take a GPU"
            assert ".gptj-complete" in c["args"][0], "the download Job checks the cache's completeness marker"
    rep.check(f"{n}: download Job runs after the PVC, without a GPU, and checks the cache marker", download_job_before_server)

    def non_root():
        for d in r.docs:
            spec = (d.get("spec", {}).get("predictor") if d["kind"] == "InferenceService"
                    else d.get("spec", {}).get("template", {}).get("spec"))
            if not spec:
                continue
            for c in spec["containers"]:
                sc = c.get("securityContext", {})
                assert sc.get("runAsNonRoot") is True and sc.get("allowPrivilegeEscalation") is False, \
                    f"{d['kind']}/{c['name']}: {sc}"
    rep.check(f"{n}: every container runs as non-root without privilege escalation", non_root)


def server_checks(rep: Report, r: Rendered, v: dict) -> None:
    """The server's probes, port, environment, lifecycle (any mode with a server)."""
    n = r.name
    model_name = v.get("model", {}).get("name", "eleutherai-gpt-j-6b")

    def probes():
        c = server_container(r)
        eq(c["readinessProbe"]["httpGet"]["path"], f"/v1/models/{model_name}", "readiness path")
        eq(c["livenessProbe"]["httpGet"]["path"], "/", "liveness path")
        eq(c["startupProbe"]["httpGet"]["path"], f"/v1/models/{model_name}", "startup path")
        budget = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
        assert budget >= 900, f"startup probe allows only {budget}s for a 12 GB load"
        for p in ("startupProbe", "readinessProbe", "livenessProbe"):
            eq(c[p]["httpGet"]["port"], c["ports"][0]["containerPort"], f"{p} port")
    rep.check(f"{n}: startup (>= 15 min) and readiness on /v1/models/{{name}}, liveness on /", probes)

    def one_port():
        c = server_container(r)
        eq(len(c["ports"]), 1, "container ports")
        eq(c["ports"][0]["containerPort"], 8080, "containerPort")
        eq(c["args"][0], "serve", "the container runs `gptj serve`")
    rep.check(f"{n}: one container port, 8080, running `gptj serve`", one_port)

    def model_env():
        env = env_of(server_container(r))
        m = v.get("model", {})
        ref = m.get("id", "EleutherAI/gpt-j-6b")
        rev = m.get("revision", "float16")
        eq(env["GPTJ_MODEL"], f"{ref}@{rev}" if rev else ref, "GPTJ_MODEL")
        eq(env["GPTJ_MODEL_NAME"], model_name, "GPTJ_MODEL_NAME")
        eq(env["GPTJ_CACHE_DIR"], "/mnt/models", "GPTJ_CACHE_DIR")
        eq(env["GPTJ_PRECISION"], v.get("precision", "fp16"), "[seed] precision -> GPTJ_PRECISION")
        eq(env["GPTJ_DEVICE"], "cuda" if v.get("gpu", {}).get("enabled", True) else "cpu", "GPTJ_DEVICE")
        s = v.get("server", {})
        eq(env["GPTJ_SHUTDOWN_TIMEOUT"], f"{s.get('shutdownTimeoutSeconds', 30)}s", "GPTJ_SHUTDOWN_TIMEOUT")
        if s.get("kvCacheMemory"):
            eq(env["GPTJ_KV_CACHE_MEMORY"], s["kvCacheMemory"], "GPTJ_KV_CACHE_MEMORY")
        q = v.get("queue", {})
        eq(env["GPTJ_MAX_NUM_SEQS"], str(q.get("maxNumSeqs", 64)), "GPTJ_MAX_NUM_SEQS")
        eq(env["GPTJ_MAX_QUEUED_SEQS"], str(q.get("maxQueuedSeqs", 1024)), "GPTJ_MAX_QUEUED_SEQS")
        eq(env["GPTJ_MAX_QUEUED_TOKENS"], "1048576", "GPTJ_MAX_QUEUED_TOKENS (no float formatting)")
        g = v.get("generation", {})
        if g.get("maxLength") is not None:
            eq(env.get("GPTJ_MAX_LENGTH"), str(g["maxLength"]), "GPTJ_MAX_LENGTH")
            assert "GPTJ_MAX_NEW_TOKENS" not in env, "max_length and max_new_tokens conflict in gptj serve"
        else:
            eq(env.get("GPTJ_MAX_NEW_TOKENS"), "50", "GPTJ_MAX_NEW_TOKENS")
        for key, var, default in (("temperature", "GPTJ_TEMPERATURE", 1), ("topP", "GPTJ_TOP_P", 1)):
            eq(float(env[var]), float(g.get(key, default)), var)
        if g.get("seed") is not None:
            eq(env["GPTJ_SEED"], str(g["seed"]), "GPTJ_SEED")
    rep.check(f"{n}: model, precision, device, queue limits, KV cache and generation defaults -> GPTJ_* env", model_env)

    def api_keys():
        env = env_of(server_container(r))
        a = v.get("apiKeys", {})
        if a.get("existingSecret"):
            eq(env["GPTJ_API_KEY"], {"secretKeyRef": {"name": a["existingSecret"], "key": a.get("secretKey", "api-keys")}}, "GPTJ_API_KEY")
            assert not r.of_kind("Secret"), "no Secret is created when one exists"
        elif a.get("keys"):
            secret = r.one("Secret")
            eq(env["GPTJ_API_KEY"]["secretKeyRef"]["name"], secret["metadata"]["name"], "GPTJ_API_KEY secret")
            eq(secret["stringData"]["api-keys"], ",".join(a["keys"]), "secret content")
        else:
            assert "GPTJ_API_KEY" not in env, "no API key configured"
    rep.check(f"{n}: API keys come from a Secret", api_keys)

    def gpu():
        g = v.get("gpu", {})
        c = server_container(r)
        res = c["resources"]
        if g.get("enabled", True):
            eq(res["limits"].get("nvidia.com/gpu"), g.get("count", 1), "[seed] GPU -> limits nvidia.com/gpu")
            eq(res["requests"].get("nvidia.com/gpu"), g.get("count", 1), "requests nvidia.com/gpu")
        else:
            assert "nvidia.com/gpu" not in res.get("limits", {}), "no GPU requested"
    rep.check(f"{n}: [seed] GPU -> nvidia.com/gpu requests and limits", gpu)

    def placement():
        spec = predictor(r) if r.of_kind("InferenceService") else r.one("Deployment")["spec"]["template"]["spec"]
        check_placement(spec, v)
    rep.check(f"{n}: [seed] GPU model -> node selector / affinity", placement)

    def prometheus():
        if r.of_kind("InferenceService"):
            ann = predictor(r)["annotations"]
            eq(ann["prometheus.kserve.io/port"], "8080", "prometheus.kserve.io/port")
        else:
            ann = r.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
        eq(ann["prometheus.io/scrape"], "true", "prometheus.io/scrape")
        eq(ann["prometheus.io/port"], "8080", "prometheus.io/port")
        eq(ann["prometheus.io/path"], "/metrics", "prometheus.io/path")
        want = v.get("metrics", {}).get("serviceMonitor", {}).get("enabled", False)
        monitors = r.of_kind("ServiceMonitor") + r.of_kind("PodMonitor")
        eq(len(monitors), 1 if want else 0, "ServiceMonitor/PodMonitor count")
        if want and r.of_kind("PodMonitor"):
            pm = r.one("PodMonitor")
            eq(pm["spec"]["selector"]["matchLabels"], {"serving.kserve.io/inferenceservice": RELEASE}, "PodMonitor selector")
            port = "user-port" if v.get("deploymentMode", "Serverless") == "Serverless" else "http1"
            eq(pm["spec"]["podMetricsEndpoints"][0]["port"], port, "PodMonitor port")
        if want and r.of_kind("ServiceMonitor"):
            eq(r.one("ServiceMonitor")["spec"]["endpoints"][0]["port"], "http", "ServiceMonitor port")
    rep.check(f"{n}: Prometheus scrape annotations (+ ServiceMonitor/PodMonitor when enabled)", prometheus)

    def cache_for_server():
        c = server_container(r)
        claim = v.get("modelCache", {}).get("existingClaim") or f"{RELEASE}-model-cache"
        if r.of_kind("InferenceService"):
            eq(env_of(c)["STORAGE_URI"], f"pvc://{claim}/", "STORAGE_URI")
            assert not c.get("volumeMounts"), "KServe mounts the pvc:// STORAGE_URI itself"
        else:
            vols = r.one("Deployment")["spec"]["template"]["spec"]["volumes"]
            eq(vols[0]["persistentVolumeClaim"]["claimName"], claim, "cache claim")
            eq(c["volumeMounts"][0]["mountPath"], "/mnt/models", "cache mount")
    rep.check(f"{n}: every replica uses the shared model-cache PVC at /mnt/models", cache_for_server)


def check_placement(spec: dict, v: dict) -> None:
    g = v.get("gpu", {})
    label, kind = g.get("nodeLabel", "gpu.nvidia.com/class"), g.get("type", "")
    if not (g.get("enabled", True) and kind):
        assert label not in str(spec.get("nodeSelector", {})) + str(spec.get("affinity", {})), "no GPU placement"
    elif g.get("placement", "nodeSelector") == "nodeSelector":
        eq(spec["nodeSelector"].get(label), kind, f"nodeSelector {label}")
    else:
        term = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
        eq(term["matchExpressions"][0], {"key": label, "operator": "In", "values": [kind]}, "node affinity")


def pvc_checks(rep: Report, r: Rendered, v: dict) -> None:
    mc = v.get("modelCache", {})

    def pvc():
        pvcs = r.of_kind("PersistentVolumeClaim")
        if mc.get("existingClaim"):
            eq(len(pvcs), 0, "no PVC with existingClaim")
            return
        spec = r.one("PersistentVolumeClaim")["spec"]
        eq(spec["resources"]["requests"]["storage"], mc.get("diskSize", "40Gi"), "[seed] disk size -> PVC storage")
        eq(spec["accessModes"], mc.get("accessModes", ["ReadWriteMany"]), "access modes")
        if mc.get("storageClassName"):
            eq(spec["storageClassName"], mc["storageClassName"], "storage class")
    rep.check(f"{r.name}: [seed] disk size -> model-cache PVC size", pvc)


def benchmark_checks(rep: Report, r: Rendered, v: dict) -> None:
    b = v.get("benchmark", {})

    def job():
        found = jobs(r, "benchmark")
        if not b.get("batchSize", 0):
            eq(len(found), 0, "benchmark Job with batchSize 0")
            return
        eq(len(found), 1, "benchmark Jobs")
        j = found[0]
        eq(j["metadata"]["name"], f"{RELEASE}-benchmark-r1", "benchmark Job name (one per revision)")
        eq(j["metadata"]["annotations"].get("helm.sh/resource-policy"), "keep", "benchmark Job kept on uninstall")
        spec = j["spec"]["template"]["spec"]
        c = spec["containers"][0]
        args = c["args"]
        eq(args[0], "bench", "gptj bench")
        eq(arg_after(args, "--batch-size"), str(b["batchSize"]), "[seed] batch size -> --batch-size")
        eq(arg_after(args, "--warmup-rounds"), str(b.get("warmupRounds", 1)), "[seed] warm-up rounds -> --warmup-rounds")
        eq(arg_after(args, "--precision"), v.get("precision", "fp16"), "[seed] precision -> --precision")
        eq(arg_after(args, "--model"), "EleutherAI/gpt-j-6b@float16", "--model")
        eq(env_of(c)["GPTJ_CACHE_DIR"], "/mnt/models", "benchmark cache dir")
        eq(env_of(c)["GPTJ_MAX_NUM_SEQS"], str(v.get("queue", {}).get("maxNumSeqs", 64)), "benchmark batching limit")
        eq(arg_after(args, "--out-dir"), f"/mnt/models/benchmarks/{RELEASE}-benchmark-r1", "results kept in the cache PVC")
        eq(c["volumeMounts"][0].get("readOnly"), False, "the results need a writable cache mount")
        if v.get("gpu", {}).get("enabled", True):
            eq(c["resources"]["limits"].get("nvidia.com/gpu"), v.get("gpu", {}).get("count", 1), "benchmark GPU")
        check_placement(spec, v)
        eq(spec["restartPolicy"], "Never", "restartPolicy")
    rep.check(f"{r.name}: [seed] benchmark batch size / warm-up -> Job args (Job only when batchSize > 0)", job)


# ---------------------------------------------------------------------------------------------
# Mode-specific checks

def serverless_checks(rep: Report, r: Rendered, v: dict) -> None:
    n = r.name

    def isvc():
        d = r.one("InferenceService")
        eq(d["apiVersion"], "serving.kserve.io/v1beta1", "apiVersion")
        eq(d["metadata"]["name"], RELEASE, "InferenceService name")
        a = d["metadata"]["annotations"]
        eq(a["serving.kserve.io/deploymentMode"], "Serverless", "deploymentMode annotation")
        p = predictor(r)
        eq(p["containers"][0]["name"], "kserve-container", "container name")
        eq(p["minReplicas"], v["minReplicas"], "[seed] minReplicas -> spec.predictor.minReplicas")
        eq(p["maxReplicas"], v["maxReplicas"], "[seed] maxReplicas -> spec.predictor.maxReplicas")
        eq(a.get("autoscaling.knative.dev/scale-to-zero-pod-retention-period"), v["scaleToZeroPodRetentionPeriod"],
           "[seed] scaleToZeroPodRetentionPeriod -> autoscaling.knative.dev/scale-to-zero-pod-retention-period")
        for bad in ("autoscaling.knative.dev/minScale", "autoscaling.knative.dev/maxScale",
                    "autoscaling.knative.dev/min-scale", "autoscaling.knative.dev/max-scale"):
            assert bad not in a, f"{bad}: KServe filters it; use min/maxReplicas"
        eq(p["scaleMetric"], "concurrency", "scaleMetric")
        k = v.get("autoscaling", {}).get("knative", {})
        waiting = v.get("autoscaling", {}).get("llm", {}).get("requestsWaiting", 4)
        want = k.get("target") or v.get("queue", {}).get("maxNumSeqs", 64) + math.ceil(waiting)
        eq(p["scaleTarget"], want, "Knative concurrency target: the batch plus the queue aimed at")
        eq(a.get("autoscaling.knative.dev/target-utilization-percentage"), str(k.get("targetUtilizationPercentage", 100)),
           "target utilisation annotation")
        assert int(a["serving.knative.dev/progress-deadline"].rstrip("s")) > \
            p["containers"][0]["startupProbe"]["periodSeconds"] * p["containers"][0]["startupProbe"]["failureThreshold"], \
            "progress deadline must exceed the startup probe's budget"
        assert p["timeout"] >= v.get("server", {}).get("shutdownTimeoutSeconds", 30), \
            "timeout (Knative's grace period) must cover --shutdown-timeout"
    rep.check(f"{n}: Serverless InferenceService: kserve-container, [seed] min/max replicas, scale-to-zero retention", isvc)

    def knative_rules():
        p = predictor(r)
        refused = KNATIVE_REFUSED_POD_FIELDS & set(p)
        assert not refused, f"Knative refuses pod fields {refused}"
        c = p["containers"][0]
        assert "lifecycle" not in c, "Knative refuses lifecycle"
        eq(len(p["containers"]), 1, "containers")
        eq(len(c["ports"]), 1, "Knative allows one port")
        assert c["ports"][0]["containerPort"] not in KNATIVE_RESERVED_PORTS, "reserved port"
        assert c["ports"][0]["name"] in ("http1", "h2c"), "port name must be http1 or h2c"
        reserved = KNATIVE_RESERVED_ENV & set(env_of(c))
        assert not reserved, f"Knative reserves env {reserved}"
        assert not c.get("volumeMounts") and not p.get("volumes"), "PVC volumes need a Knative flag: use STORAGE_URI"
    rep.check(f"{n}: nothing Knative refuses (initContainers, grace period, lifecycle, PORT, 2nd port, PVC volume)", knative_rules)


def raw_checks(rep: Report, r: Rendered, v: dict) -> None:
    n = r.name

    def isvc():
        d = r.one("InferenceService")
        a = d["metadata"]["annotations"]
        cls = v.get("kserve", {}).get("autoscalerClass", "hpa")
        eq(a["serving.kserve.io/deploymentMode"], "RawDeployment", "deploymentMode annotation")
        eq(a["serving.kserve.io/autoscalerClass"], cls, "autoscalerClass")
        assert "autoscaling.knative.dev/scale-to-zero-pod-retention-period" not in a, "no Knative annotation in raw mode"
        p = predictor(r)
        eq(p["containers"][0]["name"], "kserve-container", "container name")
        eq(p["minReplicas"], max(1, v["minReplicas"]), "[seed] minReplicas -> minReplicas (>= 1)")
        eq(p["maxReplicas"], v["maxReplicas"], "[seed] maxReplicas -> maxReplicas")
        llm = v.get("autoscaling", {}).get("llm", {})
        if cls == "keda" and llm.get("enabled", True):
            assert "scaleMetric" not in p and "scaleTarget" not in p, "KEDA scales on autoScaling.metrics alone"
            ms = p["autoScaling"]["metrics"]
            want = [(m, t) for m, t in (("gptj_num_requests_waiting", llm.get("requestsWaiting", 4)),
                                        ("gptj_kv_cache_usage_perc", llm.get("kvCacheUsage", 0.8))) if t]
            eq(len(ms), len(want), "one KEDA metric per non-zero target")
            for m, (name, target) in zip(ms, want):
                e = m["external"]
                eq(e["metric"]["backend"], "prometheus", "backend")
                eq(e["metric"]["serverAddress"], llm.get("prometheusAddress", "http://prometheus-operated.monitoring.svc:9090"), "serverAddress")
                eq(e["metric"]["query"], f'sum({name}{{namespace="{NAMESPACE}",pod=~"{RELEASE}-.*"}})', "query")
                eq((e["target"]["type"], float(e["target"]["averageValue"])), ("AverageValue", float(target)), "target")
        else:
            hpa = v.get("autoscaling", {}).get("hpa", {})
            eq(p["scaleMetric"], hpa.get("metric", "cpu"), "scaleMetric")
            eq(p["scaleTarget"], hpa.get("target", 80), "scaleTarget")
        s = {"shutdownTimeoutSeconds": 30, "preStopSleepSeconds": 10, **v.get("server", {})}
        assert p["terminationGracePeriodSeconds"] >= s["shutdownTimeoutSeconds"] + s["preStopSleepSeconds"], \
            "grace period must cover preStop + --shutdown-timeout"
        eq(p["containers"][0]["lifecycle"]["preStop"]["exec"]["command"], ["sleep", str(s["preStopSleepSeconds"])], "preStop")
        eq(p["securityContext"]["fsGroup"], 10001, "fsGroup")
        eq(env_of(p["containers"][0])["PORT"], "8080", "PORT")
        eq(p.get("tolerations", []), v.get("tolerations", []), "tolerations")
    rep.check(f"{n}: RawDeployment InferenceService: HPA or KEDA knobs, grace period covers --shutdown-timeout, preStop", isvc)


def deployment_checks(rep: Report, r: Rendered, v: dict) -> None:
    n = r.name

    def objects():
        assert not r.of_kind("InferenceService"), "no InferenceService in Deployment mode"
        dep = r.one("Deployment")
        assert "replicas" not in dep["spec"], "the HPA owns the replica count"
        pod = dep["spec"]["template"]["spec"]
        s = v.get("server", {})
        assert pod["terminationGracePeriodSeconds"] >= s.get("shutdownTimeoutSeconds", 30) + s.get("preStopSleepSeconds", 10), \
            "grace period must cover preStop + --shutdown-timeout"
        svc = r.one("Service")
        eq(svc["spec"]["selector"], dep["spec"]["selector"]["matchLabels"], "Service selector")
        eq([(p["name"], p["targetPort"]) for p in svc["spec"]["ports"]], [("http", "http")], "Service ports")
        hpa = r.one("HorizontalPodAutoscaler")
        eq(hpa["spec"]["minReplicas"], v["minReplicas"], "[seed] minReplicas -> HPA minReplicas")
        eq(hpa["spec"]["maxReplicas"], v["maxReplicas"], "[seed] maxReplicas -> HPA maxReplicas")
        eq(hpa["spec"]["scaleTargetRef"]["name"], dep["metadata"]["name"], "HPA target")
        llm = v.get("autoscaling", {}).get("llm", {})
        if llm.get("enabled", True):
            want = [("gptj_num_requests_waiting", llm.get("requestsWaiting", 4)), ("gptj_kv_cache_usage_perc", llm.get("kvCacheUsage", 0.8))]
            got = [(m["pods"]["metric"]["name"], m["pods"]["target"]) for m in hpa["spec"]["metrics"]]
            eq([(name, t["type"]) for name, t in got], [(name, "AverageValue") for name, w in want if w], "HPA Pods metrics")
            for (name, t), (_, w) in zip(got, [x for x in want if x[1]]):
                q = t["averageValue"]
                eq(float(q[:-1]) / 1000 if q.endswith("m") else float(q), float(w), f"{name} target")
        else:
            eq(hpa["spec"]["metrics"][0]["resource"]["name"], v.get("autoscaling", {}).get("hpa", {}).get("metric", "cpu"), "HPA metric")
        eq(r.one("PodDisruptionBudget")["spec"]["minAvailable"], 1, "PDB")
    rep.check(f"{n}: Deployment + Service + HPA ([seed] min/max replicas) + PDB", objects)


def benchmark_only_checks(rep: Report, r: Rendered, v: dict) -> None:
    def only_job():
        for kind in ("InferenceService", "Deployment", "Service", "HorizontalPodAutoscaler", "PodMonitor", "ServiceMonitor", "Secret"):
            eq(len(r.of_kind(kind)), 0, f"[seed] benchmark only: no {kind}")
        eq(len(jobs(r, "benchmark")), 1, "benchmark Job")
        eq(len(jobs(r, "model-download")), 1, "the model is still downloaded first")
        assert "Benchmark only" in r.notes, "NOTES explain benchmark-only"
    rep.check(f"{r.name}: [seed] benchmark only -> the benchmark Job and no service", only_job)


# ---------------------------------------------------------------------------------------------
# Operations: alerts, dashboard, autoscaling metrics, InferencePool

def known_metrics() -> dict[str, str]:
    return promql_names.exposed()


def check_names(exprs: dict[str, str], allow: set[str] = frozenset()) -> None:
    """Every expression names only metrics docs/metrics.md lists (and names at least one)."""
    known = known_metrics()
    problems = []
    for where, expr in exprs.items():
        names = promql_names.names_in(expr)
        if not names:
            problems.append(f"{where}: no metric found in {expr!r}")
        bad = promql_names.unknown(names, known, allow)
        if bad:
            problems.append(f"{where}: {sorted(bad)} not in docs/metrics.md (or being renamed): {expr!r}")
    assert not problems, "\n".join(problems)


def promtool(args: list[str]) -> None:
    assert PROMTOOL, "promtool not found: deploy/validate.sh installs it (Debian's prometheus package)"
    run_tool([PROMTOOL, *args])


def grafana_to_promql(expr: str) -> str:
    """A dashboard query as plain PromQL: Grafana's variables replaced by values."""
    return (expr.replace("$__rate_interval", "5m").replace("${datasource}", "x")
            .replace("$namespace", "inference").replace("$pod", ".*"))


def promtool_check_exprs(exprs: dict[str, str], path: Path) -> None:
    """promtool parses each expression (written as recording rules into one rules file)."""
    rules = [{"record": f"gptj_check:q{i}", "expr": grafana_to_promql(e)} for i, e in enumerate(exprs.values())]
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}))
    promtool(["check", "rules", str(path)])


def dashboard_exprs(dash: dict) -> dict[str, str]:
    out = {}
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out[f"panel {p['title']!r} {t['refId']}"] = t["expr"]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q)
            assert m, f"variable {v['name']}: expected label_values(<selector>, label), got {q!r}"
            out[f"variable {v['name']}"] = m.group(1)
    return out


def operations_checks(rep: Report, r: Rendered) -> None:
    n = r.name
    for i, rule in enumerate(r.of_kind("PrometheusRule")):
        spec_file = r.dir / f"prometheusrule-{i}.rules.yaml"
        spec_file.write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
        rep.check(f"{n}: promtool check rules on the PrometheusRule's rules", lambda f=spec_file: promtool(["check", "rules", str(f)]))

        def alert_names(rule=rule):
            exprs = {f"alert {a['alert']}": a["expr"] for g in rule["spec"]["groups"] for a in g["rules"]}
            check_names(exprs)
            want = {"GptjQueueGrowingKVCacheFull", "GptjServerErrors", "GptjOverloaded", "GptjTimeToFirstTokenHigh",
                    "GptjReplicaNotReady", "GptjEngineThreadDead"}
            eq({a["alert"] for g in rule["spec"]["groups"] for a in g["rules"]}, want, "alerts")
            for a in (a for g in rule["spec"]["groups"] for a in g["rules"]):
                assert a["labels"].get("severity") in ("warning", "critical"), f"{a['alert']}: severity"
                assert "summary" in a["annotations"], f"{a['alert']}: summary"
                assert r.values.get("metrics", {}).get("selector") or 'pod=~"gpt-j-6b-my-.*"' in a["expr"], \
                    f"{a['alert']}: not scoped to the release's pods"
        rep.check(f"{n}: every alert's query names only gptj's metrics (docs/metrics.md), scoped to the release", alert_names)

    for cm in r.of_kind("ConfigMap"):
        if "gptj.json" not in cm.get("data", {}):
            continue

        def dashboard(cm=cm):
            dash = json.loads(cm["data"]["gptj.json"])
            eq(dash, json.loads(DASHBOARD_JSON.read_text()), "the ConfigMap holds files/gptj-dashboard.json")
            labels = r.values.get("grafana", {}).get("dashboard", {}).get("labels", {"grafana_dashboard": "1"})
            for k, val in labels.items():
                eq(cm["metadata"]["labels"].get(k), val, f"sidecar label {k}")
            exprs = dashboard_exprs(dash)
            check_names(exprs)
            promtool_check_exprs(exprs, r.dir / "dashboard-queries.rules.yaml")
            titles = " | ".join(p["title"] for p in dash["panels"]).lower()
            for what in ("throughput", "time to first token", "inter-token", "end-to-end", "queue", "kv cache",
                         "preemptions", "rejections by reason", "request errors"):
                assert what in titles, f"no panel for {what!r}: {titles}"
            ids = [p["id"] for p in dash["panels"]]
            assert len(ids) == len(set(ids)), "panel ids must be unique"
            for p in dash["panels"]:
                assert 0 <= p["gridPos"]["x"] and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, f"{p['title']}: gridPos"
                for t in p["targets"]:
                    assert 'namespace="$namespace"' in t["expr"] and 'pod=~"$pod"' in t["expr"], \
                        f"{p['title']}: query not filtered by $namespace/$pod: {t['expr']}"
        rep.check(f"{n}: Grafana dashboard ConfigMap: sidecar label, panels, queries name gptj's metrics, promtool parses them",
                  dashboard)

    for hpa in r.of_kind("HorizontalPodAutoscaler"):
        def pods_metrics(hpa=hpa):
            pods = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
            check_names({f"HPA Pods metric {p}": p for p in pods})
            adapter = yaml.safe_load((EXAMPLES / "prometheus-adapter-values.yaml").read_text())
            served = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
            assert set(pods) <= served, f"the HPA asks for {pods}; the prometheus-adapter example serves {served}"
        rep.check(f"{n}: HPA Pods metrics are gptj's and served by the prometheus-adapter example", pods_metrics)

    for isvc in r.of_kind("InferenceService"):
        metrics = isvc["spec"]["predictor"].get("autoScaling", {}).get("metrics", [])
        if metrics:
            rep.check(f"{n}: KServe/KEDA autoscaling queries name only gptj's metrics",
                      lambda metrics=metrics: check_names(
                          {f"autoScaling.metrics[{i}]": m["external"]["metric"]["query"] for i, m in enumerate(metrics)}))


def pool_checks(rep: Report, r: Rendered, v: dict) -> None:
    n = r.name
    if not v.get("inferencePool", {}).get("enabled"):
        def none():
            eq(r.of_kind("InferencePool") + r.of_kind("HTTPRoute"), [], "InferencePool/HTTPRoute without inferencePool.enabled")
        rep.check(f"{n}: no InferencePool unless enabled", none)
        return
    p = v["inferencePool"]

    def pool():
        ip = r.one("InferencePool")
        spec = ip["spec"]
        sel = spec["selector"]["matchLabels"]
        c = server_container(r)
        eq(spec["targetPorts"], [{"number": c["ports"][0]["containerPort"]}], "targetPorts = the server's port")
        epp = spec["endpointPickerRef"]
        eq((epp["name"], epp["port"]["number"], epp["failureMode"]),
           (p["endpointPicker"]["name"], p["endpointPicker"].get("port", 9002), p["endpointPicker"].get("failureMode", "FailClose")),
           "endpointPickerRef")
        if r.of_kind("Deployment"):
            pod_labels = r.one("Deployment")["spec"]["template"]["metadata"]["labels"]
            assert sel.items() <= pod_labels.items(), f"the pool's selector {sel} does not select the server pods {pod_labels}"
            for job in r.of_kind("Job"):
                jl = job["spec"]["template"]["metadata"]["labels"]
                assert not sel.items() <= jl.items(), f"the pool would take Job {job['metadata']['name']}'s pods"
        else:
            eq(sel, {"serving.kserve.io/inferenceservice": RELEASE}, "the pool selects the predictor pods KServe labels")
            pod_labels = predictor(r)["labels"]
        eq(pod_labels.get("llm-d.ai/engine-type"), "gptj", "the EPP's engine-type label on the server pods")
        assert f"InferencePool/{RELEASE}" in r.notes, "NOTES name the pool"
    rep.check(f"{n}: InferencePool selects the server pods (not the Jobs'), their port, the named endpoint picker", pool)

    def route():
        hr = r.one("HTTPRoute")
        eq(hr["spec"]["parentRefs"], p["httpRoute"]["parentRefs"], "parentRefs")
        h = p["httpRoute"]
        pool_paths = h.get("poolPathPrefixes", ["/openai/", "/v1/completions", "/v1/chat/completions"])
        service_paths = h.get("servicePathPrefixes", ["/"])
        rules = hr["spec"]["rules"]
        eq([r_["matches"][0]["path"]["value"] for r_ in rules], pool_paths + service_paths, "path prefixes")
        service = ({"name": RELEASE, "port": v.get("service", {}).get("port", 80)} if r.of_kind("Deployment")
                   else {"name": f"{RELEASE}-predictor", "port": 80})
        for rule, path in zip(rules, pool_paths + service_paths):
            want = ([{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": RELEASE}]
                    if path in pool_paths else [service])
            eq(rule["backendRefs"], want, f"backendRefs of {path}")
            eq(rule["matches"][0]["path"]["type"], "PathPrefix", "path match")
            eq(rule["timeouts"]["request"], h.get("timeout", "300s"), "request timeout")
        assert "/openai/" in pool_paths or any("/openai/".startswith(x) for x in pool_paths), \
            "the OpenAI routes (what the EPP parses) go through the pool"
        if r.of_kind("Service"):
            eq(service["name"], r.one("Service")["metadata"]["name"], "the Service the other routes go to")
    rep.check(f"{n}: HTTPRoute: OpenAI routes to the InferencePool, the KServe routes to the Service", route)


def example_checks(rep: Report) -> None:
    rep.check("promql_names self-test: histogram suffixes, keywords, and bogus names refused", promql_names.self_test)

    def adapter():
        a = yaml.safe_load((EXAMPLES / "prometheus-adapter-values.yaml").read_text())
        exprs = {}
        for i, rule in enumerate(a["rules"]["custom"]):
            exprs[f"rules.custom[{i}].seriesQuery"] = rule["seriesQuery"]
            exprs[f"rules.custom[{i}].name.as"] = rule["name"]["as"]
            eq(rule["resources"]["overrides"]["pod"], {"resource": "pod"}, "a Pods metric needs the pod resource")
        check_names(exprs)
    rep.check("examples/prometheus-adapter-values.yaml: gptj's metrics, per pod", adapter)

    def epp():
        cfg = yaml.safe_load((EXAMPLES / "epp-config.yaml").read_text())
        eq(cfg["kind"], "EndpointPickerConfig", "kind")
        plugins = {pl["type"]: pl.get("parameters", {}) for pl in cfg["plugins"]}
        engines = plugins["core-metrics-extractor"]["engineConfigs"]
        gptj = next(e for e in engines if e["name"] == "gptj")
        exprs = {f"engineConfigs.gptj.{k}": val for k, val in gptj.items() if k.endswith("Spec")}
        # gptj_cache_config_info is on its way (vLLM's cache_config_info); the EPP ignores a missing one.
        check_names(exprs, allow={"gptj_cache_config_info"})
        values = yaml.safe_load((CHART / "values.yaml").read_text())
        eq(plugins["approx-prefix-cache-producer"]["blockSizeTokens"], values["server"]["blockSize"],
           "the EPP hashes prompts in gptj's KV block size")
        eq(plugins["core-metrics-extractor"]["defaultEngine"], "gptj", "defaultEngine")
        eq(values["inferencePool"]["engineTypeLabel"], "llm-d.ai/engine-type", "the label llm-d's EPP reads")
        refs = {pl["pluginRef"] for prof in cfg["schedulingProfiles"] for pl in prof["plugins"]}
        assert refs <= set(plugins), f"scheduling profile names unknown plugins {refs - set(plugins)}"
    rep.check("examples/epp-config.yaml: gptj's metric names and block size for the endpoint picker", epp)

    def tiny_checkpoint():
        # image-test.sh's model (not run in CI): a GPT-J checkpoint whose tensors match its config.
        import struct
        import tempfile
        import fake_hub
        with tempfile.TemporaryDirectory() as d:
            fake_hub.make(Path(d))
            cfg = json.loads((Path(d) / "config.json").read_text())
            with open(Path(d) / "model.safetensors", "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
                size = f.seek(0, 2) - 8 - n
            e, v = cfg["n_embd"], cfg["vocab_size"]
            eq(header["transformer.wte.weight"]["shape"], [v, e], "wte")
            eq(header["lm_head.weight"]["shape"], [v, e], "lm_head")
            eq(header[f"transformer.h.{cfg['n_layer'] - 1}.mlp.fc_in.weight"]["shape"], [4 * e, e], "fc_in")
            eq(max(t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), size, "data size")
            assert v >= 50257, "the vocabulary must hold GPT-J's tokenizer"
            assert (Path(d) / "tokenizer.json").is_file(), "tokenizer.json"
    rep.check("deploy/tests/fake_hub.py writes a consistent tiny GPT-J checkpoint (image-test.sh's model)", tiny_checkpoint)

    rep.check("the dashboard JSON is what deploy/grafana/make_dashboard.py writes",
              lambda: run_tool([sys.executable, str(DEPLOY / "grafana" / "make_dashboard.py"), "--check"]))


def alert_unit_tests(rep: Report, out: Path) -> None:
    """promtool test rules: each alert fires on the series it is about (and not on others)."""
    docs = docs_of(render({"deploymentMode": "Deployment", "metrics": {"prometheusRule": {"enabled": True}}}))
    rule = next(d for d in docs if d.get("kind") == "PrometheusRule")
    scratch = out / "alert-tests"
    scratch.mkdir(parents=True, exist_ok=True)
    # Annotations are templates that promtool check rules already parses; without them the tests
    # compare what matters: expressions, for: and labels.
    spec = json.loads(json.dumps(rule["spec"]))
    for g in spec["groups"]:
        for a in g["rules"]:
            a.pop("annotations", None)
    rules_file = scratch / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(spec))
    mine = f'namespace="{NAMESPACE}",pod="{RELEASE}-7d9f-abcde"'
    other = f'namespace="other",pod="{RELEASE}-7d9f-abcde"'  # another release's namespace: never alerts
    pod = {"namespace": NAMESPACE, "pod": f"{RELEASE}-7d9f-abcde"}
    predict = 'route="/v1/models/{name}:predict"'
    cases = [
        ("GptjEngineThreadDead", [(f"gptj_engine_alive{{{mine}}}", "1 1 0 0 0 0 0"), (f"gptj_engine_alive{{{other}}}", "0x6")],
         [("1m", []), ("3m", []), ("6m", [{"severity": "critical", **pod}])]),
        ("GptjReplicaNotReady", [(f"gptj_server_ready{{{mine}}}", "0x45")],
         [("30m", []), ("40m", [{"severity": "warning", **pod}])]),
        ("GptjQueueGrowingKVCacheFull",
         [(f"gptj_num_requests_waiting{{{mine}}}", "0+1x30"), (f"gptj_kv_cache_usage_perc{{{mine}}}", "0.95x30"),
          (f"gptj_num_requests_waiting{{namespace=\"{NAMESPACE}\",pod=\"{RELEASE}-7d9f-fghij\"}}", "5x30"),
          (f"gptj_kv_cache_usage_perc{{namespace=\"{NAMESPACE}\",pod=\"{RELEASE}-7d9f-fghij\"}}", "0.99x30")],
         [("3m", []), ("20m", [{"severity": "warning", **pod}])]),
        ("GptjServerErrors",
         [(f'gptj_http_requests_total{{{mine},{predict},status="200"}}', "0+100x30"),
          (f'gptj_http_requests_total{{{mine},{predict},status="500"}}', "0+10x30"),
          (f'gptj_http_requests_total{{{mine},route="/metrics",status="500"}}', "0+1000x30")],
         [("20m", [{"severity": "critical", "namespace": NAMESPACE}])]),
        ("GptjServerErrors",  # 5xx on /metrics alone are not generation errors
         [(f'gptj_http_requests_total{{{mine},{predict},status="200"}}', "0+100x30"),
          (f'gptj_http_requests_total{{{mine},route="/metrics",status="500"}}', "0+1000x30")],
         [("20m", [])]),
        ("GptjOverloaded",
         [(f'gptj_http_requests_total{{{mine},route="/openai/v1/completions",status="200"}}', "0+100x30"),
          (f'gptj_http_requests_total{{{mine},route="/openai/v1/completions",status="429"}}', "0+20x30")],
         [("4m", []), ("20m", [{"severity": "warning", "namespace": NAMESPACE}])]),
        ("GptjTimeToFirstTokenHigh",
         [(f'gptj_time_to_first_token_seconds_bucket{{{mine},le="5"}}', "0+1x30"),
          (f'gptj_time_to_first_token_seconds_bucket{{{mine},le="10"}}', "0+2x30"),
          (f'gptj_time_to_first_token_seconds_bucket{{{mine},le="20"}}', "0+100x30"),
          (f'gptj_time_to_first_token_seconds_bucket{{{mine},le="+Inf"}}', "0+100x30")],
         [("20m", [{"severity": "warning", "namespace": NAMESPACE}])]),
        ("GptjTimeToFirstTokenHigh",  # p99 under 10 s
         [(f'gptj_time_to_first_token_seconds_bucket{{{mine},le="1"}}', "0+100x30"),
          (f'gptj_time_to_first_token_seconds_bucket{{{mine},le="+Inf"}}', "0+100x30")],
         [("20m", [])]),
    ]
    for i, (alert, series, evals) in enumerate(cases):
        def unit(alert=alert, series=series, evals=evals, i=i):
            test = {
                "rule_files": [str(rules_file)],
                "evaluation_interval": "1m",
                "tests": [{
                    "interval": "1m",
                    "input_series": [{"series": s, "values": v} for s, v in series],
                    "alert_rule_test": [{"eval_time": t, "alertname": alert,
                                         "exp_alerts": [{"exp_labels": labels} for labels in exp]}
                                        for t, exp in evals],
                }],
            }
            f = scratch / f"test-{i}-{alert}.yaml"
            f.write_text(yaml.safe_dump(test, sort_keys=False))
            promtool(["test", "rules", str(f)])
        what = ", ".join(f"{'fires' if exp else 'silent'} at {t}" for t, exp in evals)
        rep.check(f"promtool test rules: {alert} ({what})", unit)


def crd_schema_refusals(rep: Report, out: Path) -> None:
    """The CRD schemas catch wrong manifests (a render with a field changed by hand)."""
    values = {"deploymentMode": "Deployment",
              "inferencePool": {"enabled": True, "endpointPicker": {"name": "gptj-epp"},
                                "httpRoute": {"parentRefs": [{"name": "gw"}]}},
              "metrics": {"prometheusRule": {"enabled": True}, "serviceMonitor": {"enabled": True}}}
    docs = {d["kind"]: d for d in docs_of(render(values))}
    breakages = [
        ("InferencePool failureMode FailSoft", "InferencePool", lambda d: d["spec"]["endpointPickerRef"].update(failureMode="FailSoft")),
        ("InferencePool without targetPorts", "InferencePool", lambda d: d["spec"].update(targetPorts=[])),
        ("InferencePool typo targetPort", "InferencePool", lambda d: d["spec"].update(targetPort=[{"number": 8080}])),
        ("HTTPRoute path type Prefix", "HTTPRoute", lambda d: d["spec"]["rules"][0]["matches"][0]["path"].update(type="Prefix")),
        ("HTTPRoute backendRef port 0", "HTTPRoute", lambda d: d["spec"]["rules"][1]["backendRefs"][0].update(port=0)),
        ("HTTPRoute timeout '5 minutes'", "HTTPRoute", lambda d: d["spec"]["rules"][0]["timeouts"].update(request="5 minutes")),
        ("PrometheusRule alert without expr", "PrometheusRule", lambda d: d["spec"]["groups"][0]["rules"][0].pop("expr")),
        ("ServiceMonitor endpoints not a list", "ServiceMonitor", lambda d: d["spec"].update(endpoints={"port": "http"})),
    ]
    scratch = out / "crd-refusals"
    scratch.mkdir(parents=True, exist_ok=True)
    for what, kind, breakit in breakages:
        def refused(kind=kind, breakit=breakit, what=what):
            doc = json.loads(json.dumps(docs[kind]))
            breakit(doc)
            f = scratch / (re.sub(r"[^a-z0-9]+", "-", what.lower()) + ".yaml")
            f.write_text(yaml.safe_dump(doc))
            p = subprocess.run([BIN / "check-jsonschema", "--schemafile", str(CRD_SCHEMAS[kind]), str(f)],
                               capture_output=True, text=True)
            assert p.returncode != 0, f"the {kind} schema accepted it:\n{p.stdout}"
        rep.check(f"refused by the CRD schemas: {what}", refused)


# ---------------------------------------------------------------------------------------------
# Values that must be refused

BAD_VALUES = [
    ("minReplicas -1", {"minReplicas": -1}),
    ("maxReplicas 0", {"maxReplicas": 0}),
    ("minReplicas as a string", {"minReplicas": "1"}),
    ("precision fp8", {"precision": "fp8"}),
    ("precision float16 (the server's alias, not the chart's enum)", {"precision": "float16"}),
    ("deploymentMode Knativ", {"deploymentMode": "Knativ"}),
    ("scaleToZeroPodRetentionPeriod '30 minutes'", {"scaleToZeroPodRetentionPeriod": "30 minutes"}),
    ("scaleToZeroPodRetentionPeriod as a number", {"scaleToZeroPodRetentionPeriod": 30}),
    ("disk size 'lots'", {"modelCache": {"diskSize": "lots"}}),
    ("disk size 0Gi", {"modelCache": {"diskSize": "0Gi"}}),
    ("benchmark batchSize -1", {"benchmark": {"batchSize": -1}}),
    ("benchmark only with batchSize 0", {"benchmark": {"batchSize": 0, "only": True}}),
    ("warmupRounds -2", {"benchmark": {"warmupRounds": -2}}),
    ("gpu count 0", {"gpu": {"count": 0}}),
    ("gpu placement 'anywhere'", {"gpu": {"placement": "anywhere"}}),
    ("typo at the top level (minReplica)", {"minReplica": 0}),
    ("typo in a section (gpu.typ)", {"gpu": {"typ": "A40"}}),
    ("Knative queue-proxy port 9091", {"server": {"containerPort": 9091}}),
    ("PORT in extraEnv", {"server": {"extraEnv": [{"name": "PORT", "value": "80"}]}}),
    ("kvCacheMemory '4XB'", {"server": {"kvCacheMemory": "4XB"}}),
    ("topP 1.5", {"generation": {"topP": 1.5}}),
    ("temperature -1", {"generation": {"temperature": -1}}),
    ("maxNewTokens 4096 (over GPT-J's 2048)", {"generation": {"maxNewTokens": 4096}}),
    ("autoscaling.knative.metric qps (KServe rejects it)", {"autoscaling": {"knative": {"metric": "qps"}}}),
    ("autoscalerClass kpa in RawDeployment", {"kserve": {"autoscalerClass": "kpa"}}),
    ("API key with a comma", {"apiKeys": {"keys": ["a,b"]}}),
    ("model id without an owner", {"model": {"id": "gpt-j-6b"}}),
    ("accessModes empty", {"modelCache": {"accessModes": []}}),
    ("fullnameOverride with capitals", {"fullnameOverride": "GPT-J"}),
    ("autoscaling.llm.kvCacheUsage 1.5 (a fraction)", {"autoscaling": {"llm": {"kvCacheUsage": 1.5}}}),
    ("autoscaling.llm.requestsWaiting -1", {"autoscaling": {"llm": {"requestsWaiting": -1}}}),
    ("autoscaling.llm.requestsWaiting as a string", {"autoscaling": {"llm": {"requestsWaiting": "4"}}}),
    ("autoscaling.llm.prometheusAddress without a scheme", {"autoscaling": {"llm": {"prometheusAddress": "prometheus:9090"}}}),
    ("autoscaling.knative.targetUtilizationPercentage 150", {"autoscaling": {"knative": {"targetUtilizationPercentage": 150}}}),
    ("inferencePool.endpointPicker.failureMode FailSoft", {"inferencePool": {"endpointPicker": {"failureMode": "FailSoft"}}}),
    ("inferencePool.endpointPicker.port 0", {"inferencePool": {"endpointPicker": {"port": 0}}}),
    ("inferencePool.endpointPicker.name with capitals", {"inferencePool": {"endpointPicker": {"name": "GPTJ-EPP"}}}),
    ("inferencePool.apiVersion v1alpha2 (the pre-GA group)", {"inferencePool": {"apiVersion": "inference.networking.x-k8s.io/v1alpha2"}}),
    ("inferencePool.httpRoute.hostnames with a port", {"inferencePool": {"httpRoute": {"hostnames": ["gptj.example.com:80"]}}}),
    ("inferencePool.httpRoute.poolPathPrefixes without /", {"inferencePool": {"httpRoute": {"poolPathPrefixes": ["openai"]}}}),
    ("inferencePool.httpRoute.poolPathPrefixes empty", {"inferencePool": {"httpRoute": {"poolPathPrefixes": []}}}),
    ("inferencePool.httpRoute.timeout '5 minutes'", {"inferencePool": {"httpRoute": {"timeout": "5 minutes"}}}),
    ("inferencePool.httpRoute.parentRefs without a name", {"inferencePool": {"httpRoute": {"parentRefs": [{"namespace": "gw"}]}}}),
    ("typo in inferencePool (endpointPiker)", {"inferencePool": {"endpointPiker": "x"}}),
    ("metrics.prometheusRule.errorRatio 5 (a fraction)", {"metrics": {"prometheusRule": {"errorRatio": 5}}}),
    ("metrics.prometheusRule.ttftP99Seconds 0", {"metrics": {"prometheusRule": {"ttftP99Seconds": 0}}}),
    ("metrics.prometheusRule.for '5 minutes'", {"metrics": {"prometheusRule": {"for": "5 minutes"}}}),
    ("metrics.selector that is not PromQL matchers", {"metrics": {"selector": "namespace: inference"}}),
    ("grafana.dashboard.namespace with capitals", {"grafana": {"dashboard": {"namespace": "Monitoring"}}}),
    ("grafana.dashboard.labels with a number", {"grafana": {"dashboard": {"labels": {"grafana_dashboard": 1}}}}),
]

# Values the schema lets through but the templates refuse (relations between values).
BAD_RENDERS = [
    ("minReplicas > maxReplicas", {"minReplicas": 3, "maxReplicas": 2}),
    ("Serverless timeout below --shutdown-timeout", {"kserve": {"timeoutSeconds": 20}, "server": {"shutdownTimeoutSeconds": 60}}),
    ("InferencePool in Serverless (routes past Knative)",
     {"inferencePool": {"enabled": True, "endpointPicker": {"name": "epp"}, "httpRoute": {"parentRefs": [{"name": "gw"}]}}}),
    ("InferencePool without an endpoint picker",
     {"deploymentMode": "Deployment", "inferencePool": {"enabled": True, "httpRoute": {"parentRefs": [{"name": "gw"}]}}}),
    ("HTTPRoute without a Gateway",
     {"deploymentMode": "Deployment", "inferencePool": {"enabled": True, "endpointPicker": {"name": "epp"}}}),
    ("Knative rps with the derived target 0", {"autoscaling": {"knative": {"metric": "rps", "target": 0}}}),
]


def refusal_checks(rep: Report) -> None:
    def refused_by_schema(values):
        # The error must name the bad value: its path, or (for an unknown key) the key.
        keys, node = [], values
        while isinstance(node, dict):
            key = next(iter(node))
            keys.append(key)
            node = node[key]
        path = "/" + "/".join(keys)
        with helm.Chart.load(str(CHART)) as chart:
            try:
                chart.validate_schema(values)
            except helm.HelmError as e:
                msg = str(e)
                assert f"at '{path}" in msg or f"'{keys[-1]}' not allowed" in msg, f"error does not name {path}: {msg}"
                return
        raise AssertionError(f"the schema accepted {values}")

    def refused_by_lint(values):
        report = helm.lint(str(CHART), values, strict=True)
        assert report.get("errors") or any(m.get("severity", 0) >= 3 for m in report.get("messages", [])), \
            f"helm lint accepted {values}"

    def refused_by_render(values):
        try:
            render(values)
        except helm.HelmError:
            return
        raise AssertionError(f"rendered {values}")

    for what, values in BAD_VALUES:
        rep.check(f"refused by values.schema.json: {what}", lambda v=values: refused_by_schema(v))
    rep.check("refused by helm lint too: minReplicas -1", lambda: refused_by_lint({"minReplicas": -1}))
    for what, values in BAD_RENDERS:
        rep.check(f"refused by the templates: {what}", lambda v=values: refused_by_render(v))

    def good_variants():
        # Edge values that must be accepted.
        for values in ({"scaleToZeroPodRetentionPeriod": ""}, {"scaleToZeroPodRetentionPeriod": "1h30m"},
                       {"precision": "native"}, {"model": {"revision": ""}}, {"benchmark": {"batchSize": 0}},
                       {"kserve": {"apiVersion": "serving.kubeflow.org/v1beta1"}},
                       {"server": {"kvCacheMemory": "8GiB"}}, {"gpu": {"enabled": False}}):
            render(values)
    rep.check("accepted: edge values (empty retention, native, no revision, legacy API group, CPU)", good_variants)


def variant_checks(rep: Report) -> None:
    def no_revision():
        r = render({"model": {"revision": ""}})
        text = "\n".join(r.values())
        assert '"EleutherAI/gpt-j-6b"' in text and "EleutherAI--gpt-j-6b/main/.gptj-complete" in text, \
            "without a revision the server uses main"
    rep.check("model without revision -> GPTJ_MODEL id, cache dir <id>/main", no_revision)

    def no_download():
        docs = docs_of(render({"modelCache": {"download": {"enabled": False}}}))
        assert not [d for d in docs if d.get("kind") == "Job"], "no download Job"
        isvc = next(d for d in docs if d.get("kind") == "InferenceService")
        eq(isvc["metadata"]["annotations"].get("storage.kserve.io/readonly"), "false",
           "the server downloads into a writable cache")
    rep.check("download Job off -> the server fills the cache itself (read-write pvc:// mount)", no_download)

    def minzero_raw():
        docs = docs_of(render({"deploymentMode": "RawDeployment", "minReplicas": 0}))
        isvc = next(d for d in docs if d.get("kind") == "InferenceService")
        eq(isvc["spec"]["predictor"]["minReplicas"], 1, "RawDeployment keeps one replica")
    rep.check("minReplicas 0 outside Serverless -> 1 (as KServe clamps it)", minzero_raw)

    def upgrade_revision():
        files = render({"benchmark": {"batchSize": 2}}, revision=3)
        assert "gpt-j-6b-my-benchmark-r3" in "".join(files.values()), "benchmark Job named by revision"
    rep.check("benchmark Job per Helm revision (Jobs are immutable)", upgrade_revision)

    def results_in_log_only():
        docs = docs_of(render({"benchmark": {"batchSize": 2, "saveToCache": False}}))
        job = next(d for d in docs if d.get("kind") == "Job" and "benchmark" in d["metadata"]["name"])
        c = job["spec"]["template"]["spec"]["containers"][0]
        eq(arg_after(c["args"], "--out-dir"), "/results", "scratch out-dir")
        eq(c["volumeMounts"][0].get("readOnly"), True, "cache read-only when only read")
    rep.check("benchmark.saveToCache false -> results in a scratch volume, cache read-only", results_in_log_only)

    def cpu_image():
        files = "".join(render({"gpu": {"enabled": False}, "image": {"tag": ""}}).values())
        assert "ghcr.io/gptj-rs/gptj:0.1.0\n" in files and "-cuda" not in files, "CPU image without -cuda"
        files = "".join(render({}).values())
        assert "ghcr.io/gptj-rs/gptj:0.1.0-cuda" in files, "GPU image is the -cuda tag"
    rep.check("image tag: appVersion, -cuda with GPUs", cpu_image)


# ---------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEPLOY / ".out"), help="where rendered manifests go")
    ap.add_argument("--kube-version", default="1.30.0")
    ap.add_argument("-k", dest="only", help="run only checks whose name contains this")
    args = ap.parse_args()
    helm.disable_logging() if hasattr(helm, "disable_logging") else None
    out = Path(args.out)
    rep = Report(args.only)
    started = time.monotonic()

    sets = ["defaults"] + sorted(p.stem for p in VALUES_DIR.glob("*.yaml"))
    for name in sets:
        values = load_values(name)
        try:
            r = Rendered(name, values, out)
        except Exception as e:  # noqa: BLE001
            rep.check(f"{name}: renders", lambda e=e: (_ for _ in ()).throw(AssertionError(str(e))))
            continue
        rep.check(f"{name}: renders ({', '.join(r.kinds())})", lambda: None)
        generic_checks(rep, r, args.kube_version)
        pvc_checks(rep, r, values)
        benchmark_checks(rep, r, values)
        if values.get("benchmark", {}).get("only"):
            benchmark_only_checks(rep, r, values)
            continue
        server_checks(rep, r, values)
        pool_checks(rep, r, values)
        mode = values.get("deploymentMode", "Serverless")
        if name != "defaults":
            {"Serverless": serverless_checks, "RawDeployment": raw_checks, "Deployment": deployment_checks}[mode](rep, r, values)

    refusal_checks(rep)
    variant_checks(rep)
    example_checks(rep)
    crd_schema_refusals(rep, out)
    alert_unit_tests(rep, out)

    took = time.monotonic() - started
    print(f"\n{rep.passed} passed, {len(rep.failed)} failed in {took:.1f}s; rendered manifests in {out}")
    for f in rep.failed:
        print(f"  FAILED: {f}")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
