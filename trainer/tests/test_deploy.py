"""deploy/: every Kubernetes manifest against the Kubernetes API schemas, offline and strict (kubernetes-validate
bundles them), the references between the manifests, the ConfigMap's serve.toml through `tclseg config check`, and
the Slurm array script run as three array tasks on a small folder, merged with `tclseg merge-reports`."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
# The oldest Kubernetes the manifests are meant for (Indexed Jobs with backoffLimitPerIndex) and the newest the
# package knows.
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


def documents(path: Path) -> list[dict]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def resources() -> dict[tuple[str, str], dict]:
    """Every resource of deploy/kubernetes by (kind, name)."""
    out = {}
    for path in MANIFESTS:
        for doc in documents(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in out, f"{key} defined twice"
            out[key] = doc
    return out


def test_there_are_manifests() -> None:
    kinds = {kind for kind, _ in resources()}
    assert {"Job", "StatefulSet", "Service", "ConfigMap", "Secret", "PersistentVolumeClaim", "Pod"} <= kinds


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_kubernetes(path: Path, version: str) -> None:
    docs = documents(path)
    assert docs, f"{path} holds no resource"
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_validation_catches_a_misspelt_field() -> None:
    """The check above can fail: a probe under a wrong name and a GPU count as text are refused."""
    sts = copy.deepcopy(resources()[("StatefulSet", "tclseg")])
    container = sts["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, VERSIONS[-1], strict=True)
    job = copy.deepcopy(resources()[("Job", "tclseg-segment")])
    job["spec"]["completions"] = "eight"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, VERSIONS[-1], strict=True)


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def test_statefulset_is_wired_to_its_config_secret_and_probes() -> None:
    res = resources()
    sts = res[("StatefulSet", "tclseg")]
    service = res[("Service", "tclseg")]
    pod = sts["spec"]["template"]
    container = pod["spec"]["containers"][0]
    env = env_of(container)
    # Each pod's shard: the ordinal of its name, out of as many shards as replicas.
    assert env["TCLSEG_SHARD"] == "auto"
    assert int(env["TCLSEG_SHARDS"]) == sts["spec"]["replicas"]
    assert service["spec"]["clusterIP"] == "None"
    assert sts["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    port = container["ports"][0]["containerPort"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
    assert annotations["prometheus.io/path"] == "/metrics"

    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config_map = res[("ConfigMap", volumes["config"]["configMap"]["name"])]
    secret = res[("Secret", volumes["secrets"]["secret"]["secretName"])]
    config_path = container["args"][container["args"].index("--config") + 1]
    assert config_path == f"{mounts['config']}/serve.toml"
    config = tomllib.loads(config_map["data"]["serve.toml"])
    assert config["http"]["listen"].endswith(f":{port}")
    # Every credential file the config names is a key of the mounted Secret.
    named = [config["http"]["token_file"]]
    for p in config["pipeline"]:
        named += [p[k] for k in ("source_file", "password_file") if k in p]
        userinfo = p["source"].split("://", 1)[-1].split("@", 1)[0] if "@" in p.get("source", "") else ""
        assert ":" not in userinfo, f"{p['name']}: a password in the ConfigMap"
    assert len(named) >= 3
    for file in named:
        folder, key = file.rsplit("/", 1)
        assert folder == mounts["secrets"], file
        assert key in secret["stringData"], f"{key} is not in the Secret"
    # Each camera writes under the shared output volume.
    for p in config["pipeline"]:
        assert p["output"]["dir"].startswith(mounts["outputs"] + "/"), p["name"]


def test_indexed_job_shards_match_its_completions() -> None:
    res = resources()
    job = res[("Job", "tclseg-segment")]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    container = spec["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[0] == "segment"
    assert args[args.index("--shard") + 1] == "auto"
    # Kubernetes does not tell a pod its Job's completions: --shards must say it.
    assert int(args[args.index("--shards") + 1]) == spec["completions"] == spec["parallelism"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    merge = res[("Pod", "tclseg-merge-reports")]
    merge_args = merge["spec"]["containers"][0]["args"]
    assert merge_args[:2] == ["merge-reports", args[args.index("--out") + 1]]
    assert int(merge_args[merge_args.index("--shards") + 1]) == spec["completions"]
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for d in (job["spec"]["template"], merge)
        for v in d["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"tclseg-data"}
    assert ("PersistentVolumeClaim", "tclseg-data") in res
    queries = res[("ConfigMap", "tclseg-segment-queries")]
    assert tomllib.loads(queries["data"]["queries.toml"])["query"]


def test_config_map_passes_config_check(tmp_path: Path, tclseg_binary: Path) -> None:
    """The ConfigMap's serve.toml, with the Secret's files where the pod mounts them (moved under tmp_path)."""
    binary = tclseg_binary
    res = resources()
    text = res[("ConfigMap", "tclseg-config")]["data"]["serve.toml"]
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for key, value in res[("Secret", "tclseg-secrets")]["stringData"].items():
        (secrets / key).write_text(value)
        (secrets / key).chmod(0o440)
    text = text.replace("/etc/tclseg/secrets", str(secrets)).replace("/data/out", str(tmp_path / "out"))
    assert "/etc/tclseg" not in text
    config = tmp_path / "serve.toml"
    config.write_text(text)
    out = subprocess.run([binary, "config", "check", config], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    # The Secret's values stay out of what config check prints.
    for value in ("replace-me", "replace-with-a-random-token"):
        assert value not in out.stdout + out.stderr


def test_slurm_array_script_runs_as_array_tasks(tmp_path: Path, tclseg_binary: Path) -> None:
    binary = tclseg_binary
    script = DEPLOY / "slurm" / "segment-array.sbatch"
    text = script.read_text()
    assert re.search(r"^#SBATCH --gres=gpu:1$", text, re.M)
    assert re.search(r"^#SBATCH --array=0-\d+$", text, re.M)
    images = tmp_path / "in"
    images.mkdir()
    for i in range(7):
        img = Image.new("RGB", (64, 48), (120, 120, 120))
        img.paste((220, 30, 30), (10 + i, 10, 30 + i, 30))
        img.save(images / f"frame{i}.png")
    out_dir = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TCLSEG", "SLURM_", "JOB_COMPLETION"))}
    env.update(
        TCLSEG=str(binary),
        TCLSEG_DEVICE="cpu",
        XDG_CACHE_HOME=str(tmp_path / "cache"),
        SLURM_ARRAY_TASK_MIN="1",
        SLURM_ARRAY_TASK_COUNT="3",
    )
    # An array submitted as --array=1-3: task ids 1, 2, 3 are shards 0, 1, 2.
    for task in (1, 2, 3):
        run = subprocess.run(
            ["bash", script, images, out_dir, "-q", "red square", "--threads", "1"],
            env={**env, "SLURM_ARRAY_TASK_ID": str(task)},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert (out_dir / f"segment-report.{task - 1}-of-3.json").is_file()
    merged = subprocess.run([binary, "merge-reports", out_dir], capture_output=True, text=True, timeout=60)
    assert merged.returncode == 0, merged.stdout + merged.stderr
    assert "3 of 3 shards finished: done 7, skipped 0" in merged.stdout
    assert len(list(out_dir.glob("*.json"))) == 7 + 3  # a sidecar per image, a report per shard
    usage = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "usage:" in usage.stderr
