"""Offline checks of the container image and the Kubernetes Jobs (no Docker engine, no API server).

What runs here, on the real Dockerfile and the real k8s/ manifests:
- kubernetes-validate --strict, for every Kubernetes version from 1.30 to the newest it ships,
  on each manifest and on the `kubectl kustomize k8s/` output;
- checkov on k8s/ and the Dockerfile, hadolint on the Dockerfile;
- this project's own policies (restartPolicy, failure policy, GPUs, securityContext, image tags,
  resources, the multi-worker wiring), as tables of valid and invalid cases: each invalid case
  is a mutated copy of a real manifest that the check must reject;
- every --flag in the manifests and the Dockerfile against the trainer's real absl flags;
- the Dockerfile's pip install line, in a fresh virtual environment.

The validators live in their own virtual environment, made by `.ci/k8s-tools`; `kubectl` comes
from PATH. A missing tool fails the test under CI (CI=true) and skips it elsewhere.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
DOCKERFILE = REPO / "Dockerfile"
MANIFESTS = sorted(p.name for p in K8S.glob("train-*.yaml"))
OLDEST_KUBERNETES = (1, 30)
TOOLS_VENV = Path(os.environ.get("CXR_K8S_TOOLS") or Path(
    os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "covid-cxr-trainer" / "k8s-tools")
FAILED_JOB_EXIT_CODES = {2, 3}  # trainer/errors.py: USAGE and DATA; retrying cannot help
GPU = "nvidia.com/gpu"
ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
WORKLOAD_IDENTITY = "iam.gke.io/gcp-service-account"


# ---------------------------------------------------------------------------------------------
# Tools and files
# ---------------------------------------------------------------------------------------------

def missing_tool(message: str) -> None:
    """A tool that is not installed: a failure in CI, a skip on a developer's machine."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def tool(name: str) -> str:
    """A validator from the .ci/k8s-tools environment, else from PATH."""
    for candidate in (TOOLS_VENV / "bin" / name, shutil.which(name)):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    missing_tool(f"{name} not found in {TOOLS_VENV}/bin or on PATH: run .ci/k8s-tools")


def kubectl() -> str:
    path = shutil.which("kubectl")
    if not path:
        missing_tool("kubectl not found on PATH: `kubectl kustomize` needs it (no registry this "
                     "project reaches ships it; see docs/kubernetes.md)")
    return path


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def write_docs(path: Path, docs: list[dict]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def render_kustomization(folder: Path) -> list[dict]:
    """`kubectl kustomize FOLDER`, offline, as a list of objects."""
    result = run([kubectl(), "kustomize", str(folder)])
    assert result.returncode == 0, f"kubectl kustomize {folder} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def copy_of_k8s(tmp_path: Path) -> Path:
    folder = tmp_path / "k8s"
    shutil.copytree(K8S, folder)
    return folder


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc.get("kind") == kind]


def pod_spec(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def containers(job: dict) -> list[dict]:
    spec = pod_spec(job)
    return spec.get("initContainers", []) + spec["containers"]


def env_of(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


# ---------------------------------------------------------------------------------------------
# Dockerfile reading: instructions with their arguments, as the builder sees them
# ---------------------------------------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            word, _, rest = current.strip().partition(" ")
            logical.append((word.upper(), rest.strip()))
        current = ""
    return logical


def instruction_args(text: str, name: str) -> list[str]:
    return [args for word, args in dockerfile_instructions(text) if word == name]


def dockerfile_env(text: str) -> dict[str, str]:
    env = {}
    for args in instruction_args(text, "ENV"):
        for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', args):
            env[key] = value.strip('"')
    return env


def pip_install_line(text: str) -> str:
    lines = [args for args in instruction_args(text, "RUN") if re.search(r"\bpip\b.*\binstall\b", args)]
    assert len(lines) == 1, f"expected one RUN pip install line in the Dockerfile, found {lines}"
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Schema validation: kubernetes-validate --strict, 1.30 .. newest
# ---------------------------------------------------------------------------------------------

def kubernetes_versions() -> list[str]:
    """Every version kubernetes-validate ships a schema for, from OLDEST_KUBERNETES up."""
    python = tool("python") if (TOOLS_VENV / "bin" / "python").is_file() else sys.executable
    result = run([python, "-c", "from kubernetes_validate import utils; "
                                "print(' '.join(utils.all_versions()))"])
    assert result.returncode == 0, result.stderr
    versions = result.stdout.split()
    return [v for v in versions if tuple(int(p) for p in v.split(".")[:2]) >= OLDEST_KUBERNETES]


def validate_strict(paths: list[Path], version: str) -> subprocess.CompletedProcess:
    return run([tool("kubernetes-validate"), "--strict", "--quiet", "-k", version,
                *map(str, paths)])


def test_kubernetes_validate_ships_the_versions_we_claim():
    versions = kubernetes_versions()
    assert versions and versions[0].startswith("1.30."), versions


def test_every_manifest_and_the_kustomize_output_pass_strict_schema(tmp_path):
    rendered = write_docs(tmp_path / "kustomize-output.yaml", render_kustomization(K8S))
    paths = [K8S / name for name in MANIFESTS] + [rendered]
    failures = []
    for version in kubernetes_versions():
        result = validate_strict(paths, version)
        if result.returncode != 0:
            failures.append(f"Kubernetes {version}:\n{result.stdout}{result.stderr}")
    assert not failures, "\n".join(failures)


def test_strict_schema_rejects_an_unknown_field(tmp_path):
    """The validator really validates: a misspelt field fails --strict."""
    docs = load_docs(K8S / "train-inception.yaml")
    job = of_kind(docs, "Job")[0]
    job["spec"]["backofLimit"] = job["spec"].pop("backoffLimit")
    result = validate_strict([write_docs(tmp_path / "typo.yaml", docs)], kubernetes_versions()[-1])
    assert result.returncode != 0 and "backofLimit" in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# Kustomize: renders offline and sets the placeholders
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("manifest", MANIFESTS)
def test_kustomization_sets_image_bucket_and_service_account(tmp_path, manifest):
    folder = copy_of_k8s(tmp_path)
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    kustomization["resources"] = [manifest]
    kustomization["images"][0].update(newName="europe-docker.pkg.dev/p/r/cxr", newTag="1.2.3")
    kustomization["configMapGenerator"][0]["literals"] = [
        "bucket=my-cxr-bucket", "gcpServiceAccount=trainer@p.iam.gserviceaccount.com"]
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))

    docs = render_kustomization(folder)

    assert not of_kind(docs, "ConfigMap"), "the settings ConfigMap must stay local (local-config)"
    account = of_kind(docs, "ServiceAccount")[0]
    assert account["metadata"]["annotations"][WORKLOAD_IDENTITY] == "trainer@p.iam.gserviceaccount.com"
    for job in of_kind(docs, "Job"):
        trainer = pod_spec(job)["containers"][0]
        assert trainer["image"] == "europe-docker.pkg.dev/p/r/cxr:1.2.3"
        assert env_of(trainer)["CXR_BUCKET"]["value"] == "my-cxr-bucket"
    assert not policy_violations(docs)


# ---------------------------------------------------------------------------------------------
# Project policies, table-driven
# ---------------------------------------------------------------------------------------------

def job_policy_violations(job: dict) -> list[str]:
    """What a training Job must have: bounded retries and lifetime, and the right failure policy."""
    spec, name = job["spec"], job["metadata"]["name"]
    problems = [f"{name}: spec.{key} must be set" for key in
                ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished") if key not in spec]
    if pod_spec(job).get("restartPolicy") != "Never":
        problems.append(f"{name}: restartPolicy must be Never (podFailurePolicy requires it)")
    rules = spec.get("podFailurePolicy", {}).get("rules", [])
    fail_codes = {code for rule in rules if rule["action"] == "FailJob"
                  for code in rule.get("onExitCodes", {}).get("values", [])
                  if rule["onExitCodes"].get("operator") == "In"}
    if not FAILED_JOB_EXIT_CODES <= fail_codes:
        problems.append(f"{name}: podFailurePolicy must FailJob on exit codes 2 and 3, has {sorted(fail_codes)}")
    if not any(rule["action"] == "Ignore" and any(c["type"] == "DisruptionTarget"
                                                 for c in rule.get("onPodConditions", []))
               for rule in rules):
        problems.append(f"{name}: podFailurePolicy must Ignore the DisruptionTarget condition (preemption)")
    return problems


def security_violations(job: dict) -> list[str]:
    name, spec = job["metadata"]["name"], pod_spec(job)
    pod_context = spec.get("securityContext", {})
    problems = []
    if pod_context.get("runAsNonRoot") is not True:
        problems.append(f"{name}: pod securityContext.runAsNonRoot must be true")
    if pod_context.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append(f"{name}: pod securityContext.seccompProfile must be RuntimeDefault")
    for container in containers(job):
        context, where = container.get("securityContext", {}), f"{name}/{container['name']}"
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation must be false")
        if context.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: readOnlyRootFilesystem must be true")
        if "ALL" not in context.get("capabilities", {}).get("drop", []):
            problems.append(f"{where}: capabilities must drop ALL")
        if context.get("privileged"):
            problems.append(f"{where}: must not be privileged")
    return problems


def writable_mount_violations(job: dict) -> list[str]:
    """A read-only root needs emptyDirs where the trainer writes: /tmp and $HOME (~/.keras)."""
    name, spec = job["metadata"]["name"], pod_spec(job)
    empty_dirs = {v["name"]: v["emptyDir"] for v in spec.get("volumes", []) if "emptyDir" in v}
    problems = []
    for container in spec["containers"]:
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        home = env_of(container).get("HOME", {}).get("value", "/home/trainer")
        for path in ("/tmp", home):
            if mounts.get(path) not in empty_dirs:
                problems.append(f"{name}/{container['name']}: {path} must be a writable emptyDir mount")
    return problems


def image_violations(job: dict) -> list[str]:
    problems = []
    for container in containers(job):
        image = container["image"]
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        if "@sha256:" not in image and tag in ("", "latest"):
            problems.append(f"{job['metadata']['name']}/{container['name']}: image {image} "
                            "needs a fixed tag (not latest) or a digest")
    return problems


def resource_violations(job: dict) -> list[str]:
    problems = []
    for container in containers(job):
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in resources.get(kind, {}):
                    problems.append(f"{job['metadata']['name']}/{container['name']}: "
                                    f"resources.{kind}.{resource} must be set")
    return problems


def gpu_violations(job: dict) -> list[str]:
    """GPU jobs: GPUs in limits, the accelerator nodeSelector, the GPU toleration, a /dev/shm."""
    name, spec = job["metadata"]["name"], pod_spec(job)
    gpu_limits = [c for c in spec["containers"] if GPU in c.get("resources", {}).get("limits", {})]
    on_gpu_nodes = ACCELERATOR_LABEL in spec.get("nodeSelector", {})
    if not gpu_limits and not on_gpu_nodes:
        return []
    problems = []
    if not gpu_limits:
        problems.append(f"{name}: selects GPU nodes but no container has {GPU} in limits")
    if not on_gpu_nodes:
        problems.append(f"{name}: has {GPU} limits but no {ACCELERATOR_LABEL} nodeSelector")
    if not any(t.get("key") == GPU and t.get("effect") == "NoSchedule"
               for t in spec.get("tolerations", [])):
        problems.append(f"{name}: needs the {GPU} NoSchedule toleration")
    memory_dirs = {v["name"] for v in spec.get("volumes", [])
                   if v.get("emptyDir", {}).get("medium") == "Memory"}
    for container in gpu_limits:
        if not any(m["mountPath"] == "/dev/shm" and m["name"] in memory_dirs
                   for m in container.get("volumeMounts", [])):
            problems.append(f"{name}/{container['name']}: /dev/shm must be a memory emptyDir")
    return problems


def service_account_violations(job: dict, docs: list[dict]) -> list[str]:
    account = pod_spec(job).get("serviceAccountName")
    accounts = {a["metadata"]["name"]: a for a in of_kind(docs, "ServiceAccount")}
    if account not in accounts:
        return [f"{job['metadata']['name']}: serviceAccountName {account!r} is not defined beside it"]
    if WORKLOAD_IDENTITY not in accounts[account]["metadata"].get("annotations", {}):
        return [f"ServiceAccount {account}: needs the {WORKLOAD_IDENTITY} annotation"]
    return []


def multi_worker_violations(job: dict, docs: list[dict]) -> list[str]:
    """An Indexed Job whose env, size and headless Service agree with the trainer's contract."""
    trainer = pod_spec(job)["containers"][0]
    env = env_of(trainer)
    if "--strategy=multi_worker" not in trainer.get("args", []) and "CXR_NUM_WORKERS" not in env:
        return []
    name, spec = job["metadata"]["name"], job["spec"]
    problems = []
    if "--strategy=multi_worker" not in trainer.get("args", []):
        problems.append(f"{name}: a multi-worker Job must pass --strategy=multi_worker")
    if spec.get("completionMode") != "Indexed":
        problems.append(f"{name}: completionMode must be Indexed (JOB_COMPLETION_INDEX)")
    workers = env.get("CXR_NUM_WORKERS", {}).get("value")
    if not (str(spec.get("completions")) == str(spec.get("parallelism")) == workers):
        problems.append(f"{name}: completions ({spec.get('completions')}), parallelism "
                        f"({spec.get('parallelism')}) and CXR_NUM_WORKERS ({workers}) must agree")
    job_name = env.get("CXR_JOB_NAME", {})
    from_label = job_name.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == \
        "metadata.labels['batch.kubernetes.io/job-name']"
    if not (from_label or job_name.get("value") == name):
        problems.append(f"{name}: CXR_JOB_NAME must be the Job's name")
    service_name = env.get("CXR_WORKER_SERVICE", {}).get("value")
    if pod_spec(job).get("subdomain") != service_name:
        problems.append(f"{name}: subdomain must equal CXR_WORKER_SERVICE ({service_name})")
    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    service = services.get(service_name)
    if service is None:
        return problems + [f"{name}: no Service named {service_name} beside the Job"]
    labels = job["spec"]["template"]["metadata"].get("labels", {})
    port = int(env.get("CXR_WORKER_PORT", {}).get("value", 2222))
    if service["spec"].get("clusterIP") != "None":
        problems.append(f"Service {service_name}: must be headless (clusterIP: None)")
    if not service["spec"].get("selector") or \
            any(labels.get(k) != v for k, v in service["spec"]["selector"].items()):
        problems.append(f"Service {service_name}: selector must match the Job's pod labels")
    if port not in [p["port"] for p in service["spec"].get("ports", [])]:
        problems.append(f"Service {service_name}: must expose the worker port {port}")
    return problems


def policy_violations(docs: list[dict]) -> list[str]:
    """Every policy over every Job of one set of objects."""
    problems = []
    for job in of_kind(docs, "Job"):
        problems += job_policy_violations(job) + security_violations(job) + \
            writable_mount_violations(job) + image_violations(job) + resource_violations(job) + \
            gpu_violations(job) + service_account_violations(job, docs) + \
            multi_worker_violations(job, docs)
    if not of_kind(docs, "Job"):
        problems.append("no Job found")
    return problems


@pytest.mark.parametrize("manifest", MANIFESTS)
def test_policies_hold_for_manifest(manifest):
    assert policy_violations(load_docs(K8S / manifest)) == []


def test_policies_hold_for_kustomize_output():
    assert policy_violations(render_kustomization(K8S)) == []


def _job(docs: list[dict]) -> dict:
    return of_kind(docs, "Job")[0]


def _trainer(docs: list[dict]) -> dict:
    return pod_spec(_job(docs))["containers"][0]


def _env(docs: list[dict], name: str) -> dict:
    return env_of(_trainer(docs))[name]


Mutation = Callable[[list[dict]], None]
INVALID_CASES: list[tuple[str, str, Mutation, str]] = [
    ("restart-on-failure", "train-vanilla.yaml",
     lambda d: pod_spec(_job(d)).update(restartPolicy="OnFailure"), "restartPolicy must be Never"),
    ("no-backoff-limit", "train-vanilla.yaml",
     lambda d: _job(d)["spec"].pop("backoffLimit"), "backoffLimit must be set"),
    ("no-deadline", "train-inception.yaml",
     lambda d: _job(d)["spec"].pop("activeDeadlineSeconds"), "activeDeadlineSeconds must be set"),
    ("no-ttl", "train-inception.yaml",
     lambda d: _job(d)["spec"].pop("ttlSecondsAfterFinished"), "ttlSecondsAfterFinished must be set"),
    ("retries-data-errors", "train-inception.yaml",
     lambda d: _job(d)["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"].update(values=[2]),
     "FailJob on exit codes 2 and 3"),
    ("no-fail-fast", "train-vanilla.yaml",
     lambda d: _job(d)["spec"]["podFailurePolicy"]["rules"].pop(0), "FailJob on exit codes 2 and 3"),
    ("counts-preemption", "train-inception-multiworker.yaml",
     lambda d: _job(d)["spec"]["podFailurePolicy"]["rules"].pop(1), "DisruptionTarget"),
    ("root-allowed", "train-vanilla.yaml",
     lambda d: pod_spec(_job(d))["securityContext"].update(runAsNonRoot=False), "runAsNonRoot"),
    ("no-seccomp", "train-inception.yaml",
     lambda d: pod_spec(_job(d))["securityContext"].pop("seccompProfile"), "seccompProfile"),
    ("privilege-escalation", "train-inception.yaml",
     lambda d: _trainer(d)["securityContext"].update(allowPrivilegeEscalation=True),
     "allowPrivilegeEscalation must be false"),
    ("writable-root", "train-inception-multiworker.yaml",
     lambda d: _trainer(d)["securityContext"].update(readOnlyRootFilesystem=False),
     "readOnlyRootFilesystem must be true"),
    ("keeps-capabilities", "train-vanilla.yaml",
     lambda d: _trainer(d)["securityContext"].pop("capabilities"), "capabilities must drop ALL"),
    ("privileged", "train-vanilla.yaml",
     lambda d: _trainer(d)["securityContext"].update(privileged=True), "must not be privileged"),
    ("no-writable-tmp", "train-inception.yaml",
     lambda d: _trainer(d)["volumeMounts"].pop(1), "/tmp must be a writable emptyDir"),
    ("latest-tag", "train-inception.yaml",
     lambda d: _trainer(d).update(image="gcr.io/p/covid-cxr-trainer:latest"), "fixed tag"),
    ("untagged-image", "train-vanilla.yaml",
     lambda d: _trainer(d).update(image="localhost:5000/covid-cxr-trainer"), "fixed tag"),
    ("no-memory-limit", "train-inception.yaml",
     lambda d: _trainer(d)["resources"]["limits"].pop("memory"), "resources.limits.memory"),
    ("no-cpu-request", "train-vanilla.yaml",
     lambda d: _trainer(d)["resources"]["requests"].pop("cpu"), "resources.requests.cpu"),
    ("unbounded-init-container", "train-vanilla.yaml",
     lambda d: pod_spec(_job(d)).update(initContainers=[dict(copy.deepcopy(_trainer(d)), name="init",
                                                              resources={})]),
     "init: resources.requests.cpu"),
    ("gpu-nodes-without-gpus", "train-inception.yaml",
     lambda d: [r.pop(GPU) for r in _trainer(d)["resources"].values()], "no container has"),
    ("gpus-without-node-selector", "train-inception.yaml",
     lambda d: pod_spec(_job(d)).pop("nodeSelector"), "nodeSelector"),
    ("gpus-without-toleration", "train-inception-multiworker.yaml",
     lambda d: pod_spec(_job(d)).pop("tolerations"), "toleration"),
    ("gpus-without-shm", "train-inception.yaml",
     lambda d: _trainer(d)["volumeMounts"].pop(0), "/dev/shm"),
    ("no-workload-identity", "train-vanilla.yaml",
     lambda d: of_kind(d, "ServiceAccount")[0]["metadata"]["annotations"].pop(WORKLOAD_IDENTITY),
     WORKLOAD_IDENTITY),
    ("workers-disagree", "train-inception-multiworker.yaml",
     lambda d: _job(d)["spec"].update(completions=3, parallelism=3), "must agree"),
    ("not-indexed", "train-inception-multiworker.yaml",
     lambda d: _job(d)["spec"].pop("completionMode"), "Indexed"),
    ("wrong-subdomain", "train-inception-multiworker.yaml",
     lambda d: pod_spec(_job(d)).update(subdomain="workers"), "subdomain must equal"),
    ("service-not-headless", "train-inception-multiworker.yaml",
     lambda d: of_kind(d, "Service")[0]["spec"].pop("clusterIP"), "headless"),
    ("service-misses-pods", "train-inception-multiworker.yaml",
     lambda d: of_kind(d, "Service")[0]["spec"].update(selector={"app": "other"}), "selector"),
    ("wrong-worker-port", "train-inception-multiworker.yaml",
     lambda d: _env(d, "CXR_WORKER_PORT").update(value="3333"), "worker port 3333"),
    ("job-name-hard-coded-wrong", "train-inception-multiworker.yaml",
     lambda d: _trainer(d)["env"].__setitem__(
         [e["name"] for e in _trainer(d)["env"]].index("CXR_JOB_NAME"),
         {"name": "CXR_JOB_NAME", "value": "other-job"}), "CXR_JOB_NAME"),
    ("multi-worker-strategy-missing", "train-inception-multiworker.yaml",
     lambda d: _trainer(d)["args"].remove("--strategy=multi_worker"), "--strategy=multi_worker"),
]


@pytest.mark.parametrize("manifest,mutate,expected",
                         [case[1:] for case in INVALID_CASES], ids=[case[0] for case in INVALID_CASES])
def test_policies_reject_mutated_manifest(manifest, mutate, expected):
    docs = load_docs(K8S / manifest)
    mutate(docs)
    problems = policy_violations(docs)
    assert any(expected in problem for problem in problems), \
        f"expected a violation mentioning {expected!r}, got {problems}"


# ---------------------------------------------------------------------------------------------
# checkov and hadolint
# ---------------------------------------------------------------------------------------------

def checkov(args: list[str]) -> list[dict]:
    """checkov's JSON reports (one per framework), offline (--skip-download)."""
    result = run([tool("checkov"), *args, "--skip-download", "--output", "json", "--quiet"],
                 env=dict(os.environ, BC_SKIP_MAPPING="TRUE"))
    assert result.stdout.strip(), f"checkov printed no report:\n{result.stderr[-2000:]}"
    reports = json.loads(result.stdout)
    return reports if isinstance(reports, list) else [reports]


def checkov_problems(reports: list[dict]) -> list[str]:
    """Failed checks, parsing errors, and skips that give no reason."""
    problems = []
    for report in reports:
        summary = report.get("summary", {})
        if summary.get("parsing_errors"):
            problems.append(f"{report['check_type']}: {summary['parsing_errors']} parsing errors")
        for check in report.get("results", {}).get("failed_checks", []):
            problems.append(f"FAILED {check['check_id']} {check['resource']} ({check['file_path']}): "
                            f"{check['check_name']}")
        for check in report.get("results", {}).get("skipped_checks", []):
            reason = (check.get("check_result") or {}).get("suppress_comment", "")
            if len(reason.strip()) < 10:
                problems.append(f"skip of {check['check_id']} on {check['resource']} gives no reason")
    return problems


def test_checkov_passes_k8s_and_dockerfile():
    reports = checkov(["--directory", str(K8S), "--framework", "kubernetes"]) + \
        checkov(["--file", str(DOCKERFILE), "--framework", "dockerfile"])
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile"}
    assert sum(r["summary"]["passed"] for r in reports) > 50, "checkov ran almost no checks"
    assert checkov_problems(reports) == []


def test_checkov_fails_a_privileged_container(tmp_path):
    docs = load_docs(K8S / "train-vanilla.yaml")
    _trainer(docs)["securityContext"]["privileged"] = True
    reports = checkov(["--file", str(write_docs(tmp_path / "job.yaml", docs)),
                       "--framework", "kubernetes"])
    assert any("CKV_K8S_16" in p for p in checkov_problems(reports))


def hadolint_findings(dockerfile: Path) -> list[str]:
    result = run([tool("hadolint"), "--format", "json", "--no-color", str(dockerfile)])
    return [f"{f['code']} line {f['line']}: {f['message']}" for f in json.loads(result.stdout or "[]")]


DOCKERFILE_MUTATIONS = [
    ("latest-base", "FROM tensorflow/tensorflow:2.21.0-gpu", "FROM tensorflow/tensorflow:latest",
     "DL3007"),
    ("pip-cache", "pip install --no-cache-dir .", "pip install .", "DL3042"),
    ("root-user", "USER 10001", "USER root", "DL3002"),
    ("untagged-base", "FROM tensorflow/tensorflow:2.21.0-gpu", "FROM tensorflow/tensorflow", "DL3006"),
]


def test_hadolint_passes_dockerfile():
    assert hadolint_findings(DOCKERFILE) == []
    for line in DOCKERFILE.read_text().splitlines():
        if "hadolint ignore=" in line:  # every ignored rule says why, after the rule list
            assert re.search(r"ignore=[\w,]+\s+\S", line), f"hadolint ignore without a reason: {line}"


@pytest.mark.parametrize("old,new,rule", [m[1:] for m in DOCKERFILE_MUTATIONS],
                         ids=[m[0] for m in DOCKERFILE_MUTATIONS])
def test_hadolint_rejects_mutated_dockerfile(tmp_path, old, new, rule):
    text = DOCKERFILE.read_text()
    assert old in text
    mutated = tmp_path / "Dockerfile"
    mutated.write_text(text.replace(old, new))
    assert any(f.startswith(rule) for f in hadolint_findings(mutated))


# ---------------------------------------------------------------------------------------------
# The Dockerfile's own facts
# ---------------------------------------------------------------------------------------------

def setup_tensorflow_range() -> tuple[str, str]:
    match = re.search(r'"tensorflow>=([\d.]+),<([\d.]+)"', (REPO / "setup.py").read_text())
    assert match, "setup.py must pin tensorflow as >=X.Y,<X.Z"
    return match.group(1), match.group(2)


def test_base_image_is_the_tensorflow_that_setup_py_allows():
    (base,) = instruction_args(DOCKERFILE.read_text(), "FROM")
    image, _, tag = base.partition(":")
    low, _high = setup_tensorflow_range()
    assert image == "tensorflow/tensorflow" and re.fullmatch(r"\d+\.\d+\.\d+-gpu", tag), base
    assert tag.startswith(low + "."), f"base {tag} is not TensorFlow {low}.x that setup.py allows"


def test_image_runs_as_the_manifests_non_root_user():
    (user,) = instruction_args(DOCKERFILE.read_text(), "USER")
    assert user.isdigit() and int(user) >= 10000, f"USER must be a numeric non-root UID, got {user}"
    for manifest in MANIFESTS:
        for job in of_kind(load_docs(K8S / manifest), "Job"):
            assert pod_spec(job)["securityContext"]["runAsUser"] == int(user), manifest


def test_configs_travel_in_the_image():
    text = DOCKERFILE.read_text()
    workdirs = instruction_args(text, "WORKDIR")
    copies = [args.split() for args in instruction_args(text, "COPY")]
    config_copy = [c for c in copies if c[0].rstrip("/") == "configs"]
    assert config_copy, "the Dockerfile must COPY configs/"
    destination = Path(workdirs[0], config_copy[0][-1])
    assert dockerfile_env(text)["CXR_CONFIG_DIR"] == str(destination)


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """(.dockerignore) patterns as (include?, regex); the last match wins, as in Docker."""
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        include, line = line.startswith("!"), line.lstrip("!")
        regex = re.escape(line).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*") \
            .replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        patterns.append((include, re.compile(regex + "(/.*)?")))
    return patterns


def in_build_context(relative: str) -> bool:
    keep = True
    for include, pattern in dockerignore_patterns():
        if pattern.fullmatch(relative):
            keep = include
    return keep


@pytest.mark.parametrize("path,kept", [
    ("setup.py", True), ("README.md", True), ("configs/inception.yaml", True),
    ("trainer/task.py", True), ("tests/test_k8s.py", False), ("runs/x/metrics.json", False),
    ("covid/COVID-19/1.png", False), (".git/config", False), ("k8s/train-inception.yaml", False),
    ("trainer/__pycache__/task.cpython-311.pyc", False), ("key.json", False)])
def test_dockerignore_keeps_only_what_the_image_needs(path, kept):
    assert in_build_context(path) is kept


# ---------------------------------------------------------------------------------------------
# Cross-checks: flags, configs and the entry point
# ---------------------------------------------------------------------------------------------

def trainer_flags():
    """The trainer's real absl FlagValues, with every flag its entry point defines."""
    import trainer.task  # noqa: F401  (defines the flags)
    from trainer import flags as trainer_flags_module
    return trainer_flags_module.FLAGS


def expand_env(value: str, env: dict[str, dict]) -> str:
    """Kubernetes' $(VAR) expansion in args; values from fieldRefs become a stand-in."""
    def lookup(match: re.Match) -> str:
        item = env.get(match.group(1))
        if item is None:
            return match.group(0)
        return expand_env(item["value"], env) if "value" in item else "from-field"
    return re.sub(r"\$\((\w+)\)", lookup, value)


def parse_trainer_args(args: list[str]) -> dict:
    """Parses args as the trainer would, flag by flag; raises ValueError naming a bad one."""
    flag_values, parsed = trainer_flags(), {}
    for arg in args:
        if not arg.startswith("--"):
            raise ValueError(f"{arg!r}: the trainer takes no positional arguments")
        name, has_value, value = arg[2:].partition("=")
        if name not in flag_values and name.startswith("no") and \
                name[2:] in flag_values and flag_values[name[2:]].boolean:
            parsed[name[2:]] = False
            continue
        if name not in flag_values:
            raise ValueError(f"--{name} is not a trainer flag")
        flag = flag_values[name]
        if flag.boolean and not has_value:
            parsed[name] = True
            continue
        try:
            parsed[name] = flag.parser.parse(value)
        except (ValueError, TypeError) as err:
            raise ValueError(f"--{name}={value}: {err}") from None
    return parsed


def check_trainer_args(args: list[str]) -> None:
    """Flags parse, the named config exists, and the resulting config passes validation."""
    from trainer import config as config_lib, models
    parsed = parse_trainer_args(args)
    overrides = {k: v for k, v in parsed.items() if k in config_lib.leaf_fields()}
    config = config_lib.load(parsed.get("model"), parsed.get("config"), overrides)
    config_lib.validate(config, models.min_image_sizes())


def manifest_trainer_args() -> list[tuple[str, list[str]]]:
    cases = []
    for manifest in MANIFESTS:
        for job in of_kind(load_docs(K8S / manifest), "Job"):
            for container in containers(job):
                env = env_of(container)
                args = [expand_env(a, env) for a in container.get("command", []) + container.get("args", [])]
                cases.append((f"{manifest}:{container['name']}", args))
    return cases


@pytest.mark.parametrize("where,args", manifest_trainer_args(), ids=lambda x: x if isinstance(x, str) else "")
def test_manifest_flags_are_real_trainer_flags_with_valid_values(where, args):
    assert any(a.startswith(("--model=", "--config=")) for a in args), f"{where}: names no config"
    check_trainer_args(args)


BAD_ARGS = [
    ("unknown-flag", "--modle=inception", "not a trainer flag"),
    ("bad-choice", "--strategy=parameter_server", "strategy"),
    ("bad-type", "--batch_size=fifteen", "--batch_size"),
    ("missing-config", "--model=resnet", "unknown model 'resnet'"),
    ("positional", "inception", "positional"),
]


@pytest.mark.parametrize("bad,expected", [c[1:] for c in BAD_ARGS], ids=[c[0] for c in BAD_ARGS])
def test_cross_check_rejects_bad_manifest_args(bad, expected):
    from trainer.errors import ConfigError
    _, args = manifest_trainer_args()[0]
    name = bad.partition("=")[0]
    args = [a for a in args if not a.startswith(name + "=")] + [bad]
    with pytest.raises((ValueError, ConfigError), match=re.escape(expected)):
        check_trainer_args(args)


def test_dockerfile_entrypoint_module_imports_and_its_flags_are_real():
    import importlib
    text = DOCKERFILE.read_text()
    (entrypoint,) = instruction_args(text, "ENTRYPOINT")
    argv = json.loads(entrypoint)
    assert argv[:2] == ["python", "-m"], f"ENTRYPOINT must be exec form python -m MODULE: {argv}"
    importlib.import_module(argv[2])
    flags_in_dockerfile = [a for args in instruction_args(text, "CMD") + [entrypoint]
                           for a in json.loads(args) if a.startswith("--")]
    parse_trainer_args(flags_in_dockerfile)


# ---------------------------------------------------------------------------------------------
# The image's install step, in a fresh virtual environment
# ---------------------------------------------------------------------------------------------

def lay_out_build(root: Path) -> Path:
    """Copies what the Dockerfile COPYs (through .dockerignore) under ROOT; returns the WORKDIR
    in which its pip install line runs."""
    workdir = Path("/")
    for word, args in dockerfile_instructions(DOCKERFILE.read_text()):
        if word == "WORKDIR":
            workdir = workdir / args
        elif word == "COPY":
            *sources, destination = args.split()
            for source in sources:
                copy_source(source, root / (workdir / destination).relative_to("/"))
        elif word == "RUN" and re.search(r"\bpip\b.*\binstall\b", args):
            return root / workdir.relative_to("/")
    raise AssertionError("the Dockerfile has no RUN pip install line")


def copy_source(source: str, destination: Path) -> None:
    source_path = REPO / source
    files = [source_path] if source_path.is_file() else sorted(p for p in source_path.rglob("*") if p.is_file())
    for path in files:
        relative = path.relative_to(REPO).as_posix()
        if not in_build_context(relative):
            continue
        target = destination / path.name if source_path.is_file() else \
            destination / path.relative_to(source_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


def test_dockerfile_pip_install_line_installs_a_working_entry_point(tmp_path):
    build_dir = lay_out_build(tmp_path / "image")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("CXR_CONFIG_DIR", "PYTHONPATH")}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    install = run(["bash", "-c", pip_install_line(DOCKERFILE.read_text())], cwd=build_dir, env=env)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    home = tmp_path / "home"
    home.mkdir()
    python = str(venv / "bin" / "python")
    where = run([python, "-c", "import trainer, trainer.config as c; print(trainer.__file__); "
                               "print(c.config_dir())"], cwd=home, env=env)
    installed_file, config_dir = where.stdout.split()
    assert installed_file.startswith(str(venv)), f"imported {installed_file}, not the venv's copy"
    assert config_dir.startswith(str(venv)), f"configs found at {config_dir}, not the installed ones"

    helpfull = run([python, "-m", "trainer.task", "--helpfull"], cwd=home, env=env)
    assert "--model" in helpfull.stdout and "--data_dir" in helpfull.stdout, helpfull.stderr
    check = run([python, "-m", "trainer.task", "--model=inception", f"--data_dir={home}/missing"],
                cwd=home, env=env)
    assert check.returncode == 2 and "no such directory" in check.stderr, check.stderr
