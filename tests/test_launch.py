"""Launch scripts: shellcheck-clean, and their --dry-run prints the commands a cluster needs.

Each printed line is parsed back with shlex (the scripts print with `printf %q`), so the tests
check the exact argv, and feed the environment the scripts set to `phi_jax.distributed` to check
that every process would join the same job with its own id.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

import pytest

from phi_jax import distributed

from train_helpers import ROOT

LAUNCH = ROOT / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))


def _run(script, *args, env=None, check=True):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PHI_JAX_"))}
    full_env.update(env or {})
    result = subprocess.run([str(LAUNCH / script), *args], capture_output=True, text=True,
                            env=full_env, timeout=60, cwd=ROOT)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def _commands(stdout: str) -> list[list[str]]:
    """The printed commands as argv lists (comments dropped; a trailing redirection kept apart)."""
    return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def _env_of(argv: list[str]) -> dict[str, str]:
    """VAR=value words after `env` (until the program name)."""
    start = argv.index("env") + 1
    env = {}
    for word in argv[start:]:
        if "=" not in word or word.startswith("-"):
            break
        key, value = word.split("=", 1)
        env[key] = value
    return env


def test_scripts_exist_and_are_executable():
    assert {p.name for p in SCRIPTS} >= {"local.sh", "tpu.sh", "slurm.sh"}
    for path in SCRIPTS:
        assert os.access(path, os.X_OK), f"{path} is not executable"


def test_shellcheck_passes():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck); CI installs it")
    result = subprocess.run(["shellcheck", "--severity=style", *map(str, SCRIPTS)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------ local.sh
def test_local_dry_run_starts_one_process_per_rank_with_its_id():
    out = _run("local.sh", "--dry-run", "--processes", "3", "--cpu-devices", "4", "--port", "23456",
               "--logdir", "my logs", "--", "train", "--config=configs/tiny.py",
               "--workdir=/tmp/a run").stdout
    mkdir, *procs = _commands(out)
    assert mkdir == ["mkdir", "-p", "my logs"]
    assert len(procs) == 3
    for rank, argv in enumerate(procs):
        assert argv[-4:] == [">", f"my logs/process_{rank}.log", "2>&1", "&"]
        env = _env_of(argv)
        assert env["JAX_PLATFORMS"] == "cpu"
        assert env["XLA_FLAGS"].endswith("--xla_force_host_platform_device_count=4")
        program = argv[argv.index("-m") - 1:-4]
        assert program == ["python3", "-m", "phi_jax.cli", "train", "--config=configs/tiny.py",
                           "--workdir=/tmp/a run"]
        assert distributed.initialize_arguments(env=env) == {
            "coordinator_address": "127.0.0.1:23456", "num_processes": 3, "process_id": rank}


def test_local_dry_run_splits_gpus_between_processes():
    out = _run("local.sh", "--dry-run", "--processes", "2", "--gpus-per-process", "4",
               "--python", "/opt/py/bin/python", "--", "train", "--config=c.py").stdout
    procs = _commands(out)[1:]
    assert [_env_of(p)["CUDA_VISIBLE_DEVICES"] for p in procs] == ["0,1,2,3", "4,5,6,7"]
    assert all("JAX_PLATFORMS" not in _env_of(p) for p in procs)
    assert all("/opt/py/bin/python" in p for p in procs)


def test_local_reports_a_failing_process_and_its_status(tmp_path):
    # A real (not dry) launch whose "python" fails at once: the script must exit non-zero.
    result = _run("local.sh", "--processes", "2", "--python", "false", "--logdir", str(tmp_path),
                  "--", "train", check=False)
    assert result.returncode == 1
    assert "process 0 exited with status 1" in result.stderr


def test_local_usage_errors():
    result = _run("local.sh", "--dry-run", check=False)
    assert result.returncode == 2 and "no phi-jax command" in result.stderr
    result = _run("local.sh", "--processes", "zero", "--", "train", check=False)
    assert result.returncode == 2 and "positive integer" in result.stderr


# -------------------------------------------------------------------------------------- tpu.sh
def test_tpu_dry_run_creates_installs_starts_on_all_workers_and_streams_logs():
    out = _run("tpu.sh", "--dry-run", "--name", "phi2", "--zone", "us-west4-a", "--type",
               "v5litepod-16", "--project", "my-proj", "run", "--", "train",
               "--config=configs/phi-2.py", "--workdir=/mnt/runs/phi 2").stdout
    cmds = _commands(out)
    gcloud = [c for c in cmds if c[0] == "gcloud"]
    describe, create, scp, install, start, logs = gcloud
    assert describe[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"]
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "phi2"]
    assert {"--zone=us-west4-a", "--project=my-proj", "--accelerator-type=v5litepod-16",
            "--version=v2-alpha-tpuv5-lite"} <= set(create)
    assert scp[4] == "scp" and "--worker=all" in scp
    assert "--worker=all" in install and "jax[tpu]" in _remote(install)
    assert "--worker=all" in start
    remote = shlex.split(_remote(start))
    assert "PHI_JAX_DISTRIBUTED=1" in remote
    cli = remote.index("phi_jax.cli")
    assert remote[cli + 1:cli + 4] == ["train", "--config=configs/phi-2.py", "--workdir=/mnt/runs/phi 2"]
    assert distributed.initialize_arguments(env={"PHI_JAX_DISTRIBUTED": "1"}) == {}
    assert "--worker=0" in logs and "tail" in _remote(logs)
    assert "git ls-files -z | tar --null -czf" in out  # the working tree's source, for install


def _remote(argv: list[str]) -> str:
    return next(a.split("=", 1)[1] for a in argv if a.startswith("--command="))


def test_tpu_dry_run_queued_resource_and_delete():
    out = _run("tpu.sh", "--dry-run", "--name", "big", "--zone", "us-east5-a", "--type", "v5p-128",
               "--queued", "--spot", "create").stdout
    create = next(c for c in _commands(out) if "create" in c)
    assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert {"--node-id=big", "--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5",
            "--spot"} <= set(create)
    out = _run("tpu.sh", "--dry-run", "--name", "big", "--zone", "us-east5-a", "--queued",
               "delete").stdout
    assert _commands(out) == [["gcloud", "compute", "tpus", "queued-resources", "delete", "big",
                               "--zone=us-east5-a", "--force", "--quiet"]]
    out = _run("tpu.sh", "--dry-run", "--name", "vm", "--zone", "z", "delete").stdout
    assert _commands(out) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "vm", "--zone=z",
                               "--quiet"]]
    out = _run("tpu.sh", "--dry-run", "--name", "vm", "--zone", "z", "stop").stdout
    assert "kill -TERM" in _remote(_commands(out)[0])


def test_tpu_train_workdir_defaults_to_the_bucket_and_preemption_restarts_resume_there():
    out = _run("tpu.sh", "--dry-run", "--name", "phi2", "--zone", "z", "--type", "v5litepod-16",
               "--bucket", "gs://my-bucket/team", "--spot", "--max-restarts", "3", "run", "--", "train",
               "--config=configs/phi-2.py").stdout
    gcloud = [c for c in _commands(out) if c[0] == "gcloud"]
    start = next(c for c in gcloud if "phi_jax.cli" in " ".join(c))
    remote = shlex.split(_remote(start))
    assert "--workdir=gs://my-bucket/team/runs/phi2" in remote  # a recreated VM finds the checkpoints
    assert "[gcs]" in _remote(next(c for c in gcloud if "pip install" in " ".join(c)))
    assert gcloud[-1][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"]  # preempted?
    assert "--format=value(state)" in gcloud[-1]
    result = _run("tpu.sh", "--dry-run", "--name", "n", "--zone", "z", "run", "--", "train",
                  "--config=c.py", check=False, env={"PHI_JAX_BUCKET": ""})
    assert result.returncode == 2 and "--bucket gs://BUCKET" in result.stderr
    result = _run("tpu.sh", "--dry-run", "--name", "n", "--zone", "z", "--bucket", "/mnt/x", "logs",
                  check=False)
    assert result.returncode == 2 and "gs:// URL" in result.stderr


def test_tpu_usage_errors():
    result = _run("tpu.sh", "--dry-run", "--zone", "z", "run", "--", "train", check=False)
    assert result.returncode == 2 and "--name and --zone" in result.stderr
    result = _run("tpu.sh", "--dry-run", "--name", "n", "--zone", "z", "run", check=False)
    assert result.returncode == 2 and "no phi-jax command" in result.stderr


# ------------------------------------------------------------------------------------ slurm.sh
def test_slurm_dry_run_one_task_per_node_coordinator_on_the_first():
    out = _run("slurm.sh", "--dry-run", "--", "train", "--config=configs/phi-2.py",
               "--workdir=/shared/run", env={"SLURM_JOB_NODELIST": "gpu7,gpu8,gpu9",
                                             "SLURM_JOB_ID": "4242"}).stdout
    (argv,) = _commands(out)
    assert argv[:5] == ["srun", "--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    env = _env_of(argv)
    assert env == {"PHI_JAX_COORDINATOR": "gpu7:16242", "PHI_JAX_NUM_PROCESSES": "3"}
    assert argv[argv.index("-m") - 1] == "python3"
    assert argv[argv.index("-m") + 1:] == ["phi_jax.cli", "train", "--config=configs/phi-2.py",
                                           "--workdir=/shared/run"]
    # srun gives each task SLURM_PROCID; phi_jax.distributed takes the rank from it
    for rank in range(3):
        task_env = {**env, "SLURM_PROCID": str(rank), "SLURM_NTASKS": "3", "SLURM_JOB_ID": "4242"}
        assert distributed.initialize_arguments(env=task_env) == {
            "coordinator_address": "gpu7:16242", "num_processes": 3, "process_id": rank}


def test_slurm_outside_an_allocation_says_how_to_submit():
    result = _run("slurm.sh", "--dry-run", "--", "train", check=False)
    assert result.returncode == 2 and "sbatch" in result.stderr


# ------------------------------------------------------------------------- who initializes
@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}, None),  # a single-task job: one process
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}, {}),  # srun with 4 tasks: JAX's SLURM detection
    ({"TPU_WORKER_HOSTNAMES": "t0,t1"}, {}),  # GKE multi-host TPU slice
    ({"PHI_JAX_DISTRIBUTED": "1"}, {}),  # launch/tpu.sh
    ({"PHI_JAX_DISTRIBUTED": "0", "SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}, None),  # forced off
    ({"PHI_JAX_COORDINATOR": "h:1", "PHI_JAX_NUM_PROCESSES": "2", "PHI_JAX_PROCESS_ID": "1"},
     {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}),
])
def test_initialize_arguments_follow_the_environment(env, expected):
    assert distributed.initialize_arguments(env=env) == expected


def test_initialize_arguments_reject_incomplete_or_inconsistent_flags():
    with pytest.raises(ValueError, match="--num_processes and --process_id"):
        distributed.initialize_arguments("h:1", env={})
    with pytest.raises(ValueError, match=r"process_id=2 is not in \[0, num_processes=2\)"):
        distributed.initialize_arguments("h:1", 2, 2, env={})
    with pytest.raises(ValueError, match="need --coordinator_address"):
        distributed.initialize_arguments(None, 2, 0, env={})
    # explicit flags win over the environment
    assert distributed.initialize_arguments("a:9", 4, 3, env={"PHI_JAX_COORDINATOR": "b:1"}) == {
        "coordinator_address": "a:9", "num_processes": 4, "process_id": 3}
