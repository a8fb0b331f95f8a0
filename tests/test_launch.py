"""Launchers: the sbatch script `python -m launch.slurm` renders (layout checks, environment,
quoting that survives bash byte for byte), SIGUSR1 reaching the trainer through torchrun, and a
real one-node Slurm (slurmctld + slurmd + munged started here) running the tiny model with two
processes, then preempting one with SIGUSR1."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, free_port
from launch import slurm

TINY = ["train.iters=4", "train.log_interval=1", "logger.wandb.mode=disabled"]

# Overrides that break naive quoting: spaces, both quote kinds, $, $(...), backticks, brackets.
NASTY = [
    "data.prefixes=[/data/a b,/data/c]",
    'data.tokenizer="/tok/it\'s here.json"',
    """logger.wandb.name='run "q" $HOME $(touch pwned) `touch pwned2` [x]'""",
    "+cluster.env.MY_VAR=a b",
]


def _render(capsys, *overrides: str) -> tuple[int, str, str]:
    code = slurm.main(["cluster.dry_run=true", *overrides])
    out, err = capsys.readouterr()
    return code, out, err


def _sbatch_options(script: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_multinode_script(capsys):
    code, script, err = _render(
        capsys, "model=m2_230b", "cluster.nodes=16", "cluster.gpus_per_node=8", "parallel.tp=4",
        "parallel.ep=32", "parallel.etp=1", "parallel.pp=2", "train.global_batch_size=1024", "train.micro_batch_size=1",
        "cluster.partition=batch", "cluster.account=m2", "cluster.time=2-00:00:00",
        "cluster.container_image='nvcr.io#nvidia/pytorch:25.01-py3'", "cluster.container_mounts=[/data:/data]",
        "cluster.signal_seconds=600",
    )
    assert code == 0, err
    options = _sbatch_options(script)
    for want in ("--nodes=16", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=batch",
                 "--account=m2", "--time=2-00:00:00", "--signal=USR1@600", "--exclusive",
                 "--output=outputs/slurm/%x-%j.out", "--error=outputs/slurm/%x-%j.err"):
        assert want in options, (want, options)
    assert "head_node=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1)" in script
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in script  # tp=4 runs sequence parallel
    assert "export NCCL_IB_TIMEOUT=22" in script
    (srun,) = [line for line in script.splitlines() if line.startswith("srun ")]
    assert "--container-image=nvcr.io#nvidia/pytorch:25.01-py3" in srun
    assert f"--container-mounts=/data:/data,{REPO}:{REPO}" in srun
    assert '--rdzv-backend=c10d --rdzv-id="$SLURM_JOB_ID" --rdzv-endpoint="$head_node:29500"' in script
    assert "python -m launch.torchrun --nnodes=16 --nproc-per-node=8" in script
    assert "tp=4 pp=2 cp=1 ep=32 etp=1 dp=16" in script


def test_layout_dependent_environment(capsys):
    _, script, _ = _render(capsys, "cluster.gpus_per_node=8", "parallel.ep=8", "train.micro_batch_size=1")
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in script  # no TP/SP, no CP: keep the default queues
    _, script, _ = _render(capsys, "cluster.gpus_per_node=8", "parallel.tp=2", "+cluster.env.NCCL_DEBUG=INFO")
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in script
    assert "export NCCL_DEBUG=INFO" in script and "NCCL_DEBUG=WARN" not in script  # cluster.env wins
    _, script, _ = _render(capsys, "parallel.tp=2", "cluster.gpu=cpu", "cluster.gpus_per_node=2")
    assert "--gpus-per-node" not in script and "CUDA_DEVICE_MAX_CONNECTIONS" not in script


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["parallel.tp=3"], "parallel.tp"),
        (["parallel.ep=3"], "parallel.ep"),
        (["parallel.pp=3"], "parallel.pp"),
        (["model=m3_msa_230b", "parallel.cp=2", "train.seq_length=1536"], "parallel.cp"),  # MSA blocks split
        (["cluster.nodes=0"], "cluster.nodes"),
        (["cluster.time=4 hours"], "cluster.time"),
        (["cluster.signal_seconds=99999"], "cluster.signal_seconds"),
        (["train.iterz=3"], "iterz"),
    ],
)
def test_impossible_layout_fails_locally_naming_the_key(capsys, overrides, key):
    code, out, err = _render(capsys, *overrides)
    assert code == 2 and out == ""
    assert key in err and "Traceback" not in err


def test_batch_size_that_cannot_split_warns_on_dry_run_and_refuses_submission(capsys):
    code, out, err = _render(capsys, "cluster.nodes=2", "cluster.gpus_per_node=8")  # dp = 16 > 8 sequences
    assert code == 0 and out.startswith("#!/bin/bash") and "train.global_batch_size" in err
    code = slurm.main(["cluster.nodes=2", "cluster.gpus_per_node=8"])
    assert code == 2 and "train.global_batch_size" in capsys.readouterr().err


def _stub(path: Path, body: str) -> None:
    path.write_text(body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_overrides_reach_python_byte_identical(capsys, tmp_path, monkeypatch):
    """The rendered script run by bash (srun and scontrol stubbed): the argv python gets after
    `-m pretrain` is exactly what launch.slurm was given, and nothing in it was executed."""
    monkeypatch.chdir(tmp_path)  # the job's working directory, where $(touch ...) would write
    code, script, err = _render(capsys, *NASTY, "cluster.nodes=2", "cluster.gpus_per_node=4")
    assert code == 0, err
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "scontrol", "#!/bin/sh\nprintf 'node-a\\nnode-b\\n'\n")
    argv_file = tmp_path / "argv.json"
    # srun's stand-in: python itself records what it receives, and the variables it sees.
    _stub(bin_dir / "srun", f"#!/bin/sh\nexec {sys.executable} -c 'import json, os, sys; "
          f"json.dump([sys.argv[1:], os.environ[\"MY_VAR\"]], open(\"{argv_file}\", \"w\"))' \"$@\"\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_CPUS_ON_NODE": "64"}
    result = subprocess.run(["bash", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    argv, my_var = json.loads(argv_file.read_text())
    tail = argv[argv.index("pretrain") + 1:]
    assert tail == ["cluster.dry_run=true", *NASTY, "cluster.nodes=2", "cluster.gpus_per_node=4"]
    assert "--rdzv-id=4242" in argv and "--rdzv-endpoint=node-a:29500" in argv
    assert "--cpus-per-task=64" in argv and "--nnodes=2" in argv
    assert my_var == "a b"
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()


@pytest.mark.multiproc
def test_torchrun_forwards_sigusr1_and_exits_zero(tmp_path):
    """launch.torchrun (what every Slurm node runs): SIGUSR1 to the agent reaches the trainer
    processes, which save and exit 0, and so does torchrun."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.torchrun", "--standalone", "--nproc-per-node=2", "-m", "pretrain",
         f"hydra.run.dir={run_dir}", "train.iters=500", "train.log_interval=1", "train.eval_interval=0",
         "logger.wandb.mode=disabled"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        _wait_for_records(run_dir / "metrics.jsonl", lambda: proc.poll() is None, 1)
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    saved = re.search(r"received SIGUSR1: saved iteration (\d+)", out)
    assert saved, out[-3000:]
    assert (run_dir / "checkpoints" / f"iter_{int(saved.group(1)):07d}").is_dir()


@pytest.mark.multiproc
def test_two_node_torchrun_shares_one_run_dir(tmp_path):
    """Two torchrun agents standing in for two nodes (c10d rendezvous, one process each): both
    ranks resolve the same run directory, outputs/torchrun-<rdzv id>, from the rendezvous id."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    port = free_port()
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "launch.torchrun", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
             f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=job42", "-m", "pretrain", *TINY,
             "parallel.tp=2", "checkpoint.save=false"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for _ in range(2)
    ]
    outputs = [a.communicate(timeout=600)[0] for a in agents]
    for agent, out in zip(agents, outputs):
        assert agent.returncode == 0, out[-3000:]
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["torchrun-job42"]
    run_dir = tmp_path / "outputs" / "torchrun-job42"
    assert (run_dir / "pretrain.log").is_file() and (run_dir / "pretrain-rank1.log").is_file()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 4


def _wait_for_records(metrics: Path, alive, n: int, timeout: float = 300) -> None:
    """Until `metrics` has n records; fails when alive() turns False first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not alive():
            raise AssertionError(f"exited before {metrics} had {n} records")
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"{metrics} did not get {n} records in {timeout} s")


# ---- a real Slurm -------------------------------------------------------------------------

SLURM_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])


def _which(name: str) -> str | None:
    return shutil.which(name, path=SBIN_PATH)


def _install_slurm() -> None:
    """Debian's packages, when absent (CI has apt and root)."""
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if _which(b) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing) and installing it needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *SLURM_PACKAGES]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        assert result.returncode == 0, f"{' '.join(cmd)}: {result.stdout[-2000:]}{result.stderr[-2000:]}"


def _slurm_conf(root: Path, host: str) -> str:
    meminfo = Path("/proc/meminfo").read_text()
    total_mib = int(re.search(r"MemTotal:\s+(\d+) kB", meminfo).group(1)) // 1024
    real_memory = total_mib - max(512, total_mib // 10)  # slurmd drains a node that reports less
    return f"""\
ClusterName=launchtest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SlurmdTimeout=60
NodeName={host} CPUs={os.cpu_count()} RealMemory={real_memory} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A one-node Slurm of our own: its munged (own key and socket), slurmctld and slurmd, all
    configured under a temp dir, so nothing of a system Slurm or munge is touched. Yields the
    environment for its clients (SLURM_CONF); stops every daemon it started, by pid."""
    _install_slurm()
    if os.geteuid() != 0:
        pytest.skip("the test Slurm runs its daemons as root (SlurmUser=root)")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log", "munge"):
        (root / sub).mkdir()
    (root / "munge").chmod(0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, host))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons: list[subprocess.Popen] = []

    def start(*cmd: str) -> None:
        log = open(root / "log" / f"{Path(cmd[0]).name}.out", "w")
        daemons.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))

    try:
        start(_which("munged"), "--foreground", "--force", f"--key-file={key}",
              f"--socket={root}/munge/munge.socket", f"--pid-file={root}/munge/munged.pid",
              f"--log-file={root}/munge/munged.log", f"--seed-file={root}/munge/munged.seed")
        _wait(lambda: (root / "munge" / "munge.socket").exists(), 30, "munged's socket")
        start(_which("slurmctld"), "-D", "-f", str(conf))
        start(_which("slurmd"), "-D", "-f", str(conf))

        def idle() -> bool:
            for d in daemons:
                if d.poll() is not None:
                    logs = "".join(p.read_text()[-1500:] for p in sorted((root / "log").iterdir()))
                    raise AssertionError(f"{d.args[0]} exited ({d.returncode}):\n{logs}")
            r = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
            return r.stdout.strip() == "idle"

        _wait(idle, 60, "the node to be idle (sinfo)")
        yield env
    finally:
        if daemons:
            jobs = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True)
            for job in jobs.stdout.split():
                subprocess.run(["scancel", job], env=env, capture_output=True)
        for d in reversed(daemons):  # slurmd, slurmctld, then munged
            d.terminate()
            try:
                d.wait(timeout=15)
            except subprocess.TimeoutExpired:
                d.kill()
                d.wait()


def _wait(ready, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not ready():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.5)


def _job(env: dict, job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def _wait_job(env: dict, job_id: str, timeout: float = 300) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = _job(env, job_id)
        if job.get("JobState") not in (None, "PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return job
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {_job(env, job_id)}")


def _submit(env: dict, workdir: Path, *overrides: str) -> str:
    clean = {k: v for k, v in env.items()
             if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
             and not k.startswith("TORCHELASTIC")}
    clean.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "launch.slurm", "cluster.gpu=cpu", "cluster.nodes=1",
         "cluster.gpus_per_node=2", f"cluster.rdzv_port={free_port()}", *overrides],
        cwd=workdir, env=clean, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    job_id = result.stdout.strip()
    assert job_id.isdigit(), result.stdout
    return job_id


@pytest.mark.slurm
@pytest.mark.timeout(1800)  # slow-ish: installs Slurm when absent (apt), then one short job
def test_real_slurm_trains_and_preempts(slurm_cluster, tmp_path):
    """One job through sbatch, srun and torchrun (two ranks) with a name that breaks naive
    quoting; SIGUSR1 to the job step, as --signal=USR1@<s> sends it before the time limit, saves
    a checkpoint and ends the job cleanly."""
    env = slurm_cluster
    name = """tiny run $USER [x] "q\""""
    job_id = _submit(env, tmp_path, "train.iters=2000", "train.log_interval=1", "train.eval_interval=0",
                     "logger.wandb.mode=disabled", f"logger.wandb.name='{name}'")
    run_dir = tmp_path / "outputs" / f"torchrun-{job_id}"
    running = ("PENDING", "CONFIGURING", "RUNNING")
    _wait_for_records(run_dir / "metrics.jsonl", lambda: _job(env, job_id).get("JobState") in running, 2)
    subprocess.run(["scancel", "--signal=USR1", job_id], env=env, check=True)
    job = _wait_job(env, job_id)
    logs = "".join((tmp_path / "outputs" / "slurm" / f"tiny-{job_id}.{ext}").read_text() for ext in ("out", "err"))
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", logs[-4000:]
    # Both ranks agreed on one run directory, keyed by the job id.
    runs = sorted(p.name for p in (tmp_path / "outputs").iterdir() if p.name != "slurm")
    assert runs == [f"torchrun-{job_id}"], runs
    saved = re.search(r"received SIGUSR1: saved iteration (\d+)", logs)
    assert saved, logs[-4000:]
    stopped = int(saved.group(1))
    assert 2 <= stopped < 2000
    assert (run_dir / "checkpoints" / f"iter_{stopped:07d}").is_dir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(1, stopped + 1))
    assert all(r["lm_loss"] > 0 for r in records)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["logger"]["wandb"]["name"] == name  # quoting survived sbatch, srun and torchrun
    assert config["cluster"]["gpus_per_node"] == 2


def test_forward_to_workers_signals_only_the_trainer_children(tmp_path):
    """launch.torchrun's SIGUSR1 handler: the children with LOCAL_RANK (torchrun's workers) get
    the signal, other children (checkpoint writers, helpers) do not. Run from a fresh process,
    whose only children are the two made here."""
    script = tmp_path / "agent.py"
    script.write_text(
        "import os, signal, subprocess, sys, time\n"
        "from launch.torchrun import forward_to_workers\n"
        "code = 'import signal, sys, time; signal.signal(signal.SIGUSR1, lambda *a: sys.exit(7)); time.sleep(30)'\n"
        "env = {k: v for k, v in os.environ.items() if k != 'LOCAL_RANK'}\n"
        "worker = subprocess.Popen([sys.executable, '-c', code], env={**env, 'LOCAL_RANK': '0'})\n"
        "helper = subprocess.Popen([sys.executable, '-c', code], env=env)\n"
        "time.sleep(1.0)\n"
        "sent = forward_to_workers(signal.SIGUSR1)\n"
        "print(sent == [worker.pid], worker.wait(timeout=10), helper.poll())\n"
        "helper.kill()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
    result = subprocess.run([sys.executable, str(script)], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["True", "7", "None"], result.stdout + result.stderr
