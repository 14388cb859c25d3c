"""scripts/slurm/*.sbatch under a real SLURM on this machine (Debian's slurm-wlm + munge, one node, 2 CPUs).

The session installs the packages when they are missing, starts munged, slurmctld and slurmd from a generated
minimal configuration in a temporary directory (``SLURM_CONF``; nothing in /etc is written), and submits the real
scripts with ``sbatch --wait``. Only the resources change on the command line (2 tasks, no GPUs); the experiment,
output directory and overrides come from the environment, as docs/slurm.md describes. Jobs run the repo's venv
python (its bin/ first on PATH).

Proved here: cache.sbatch builds every shard over 2 tasks and a rerun builds nothing; train.sbatch trains the tiny
experiment with Lightning's SLURM environment (DDP over the 2 srun tasks), logs plain progress lines into the job's
output file and exports an adapter that loads; a job requeued with ``scontrol requeue`` in the middle of training
checkpoints the step it was on (SIGTERM), starts again, resumes from that checkpoint and loses no finished step; the
same job, sent the time-limit warning (SIGUSR1), checkpoints after the step in flight, requeues itself
(``kangaroo_train/requeue.py``) and again loses no step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, metrics, train_rows

pytestmark = [pytest.mark.slow, pytest.mark.slurm]  # minutes, and root to install slurm-wlm

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
# The scripts' GPU resources, replaced for a CPU node: sbatch options given on the command line win over #SBATCH
# lines. --gpus-per-node=0 is accepted and requests no GPU (without it the job is refused: no gres "gpu" here).
CPU_RESOURCES = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=00:20:00"]
JOB_TIMEOUT = 420  # seconds one sbatch --wait may take before the test gives up (and cancels the job)
PROGRESS = re.compile(r"train: step (\d+)/(\d+) ")


def _which(name: str) -> str | None:
    return shutil.which(name, path=SBIN_PATH)


@pytest.fixture(scope="session")
def slurm_packages() -> None:
    """Debian's slurm-wlm and munge, installed with apt-get when missing (CI runs as root). Without root, apt-get or a
    reachable package registry the SLURM tests skip, naming what is missing: a missing system package is not a
    failure of this repository."""
    missing = [name for name in DAEMONS + CLIENTS if not _which(name)]
    if not missing:
        return
    what = f"SLURM programs {missing} are missing (Debian packages slurm-wlm and munge)"
    if os.geteuid() != 0:
        pytest.skip(f"{what}, and installing them needs root (uid {os.geteuid()}): apt-get install slurm-wlm munge")
    if not _which("apt-get"):
        pytest.skip(f"{what}, and there is no apt-get to install them with")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm", "munge"],
    ):
        out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        if out.returncode != 0:
            pytest.skip(
                f"{what}, and `{' '.join(command)}` failed with exit code {out.returncode} (is Debian's package "
                f"registry reachable?): {out.stderr.strip()[-500:]}"
            )
    missing = [name for name in DAEMONS + CLIENTS if not _which(name)]
    assert not missing, f"slurm-wlm and munge are installed but {missing} are not on PATH ({SBIN_PATH})"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} does not exist)"


def _etc_snapshot() -> dict[str, float]:
    """mtime of every file under /etc/slurm and /etc/munge (what apt installed), to show the test adds nothing."""
    found = {}
    for top in ("/etc/slurm", "/etc/munge"):
        for path in Path(top).rglob("*") if Path(top).exists() else ():
            found[str(path)] = path.lstat().st_mtime
    return found


@dataclass
class Cluster:
    """A one-node SLURM cluster whose daemons this test started; ``env`` reaches it (SLURM_CONF) and runs jobs with
    the venv's python."""

    root: Path
    node: str
    env: dict[str, str]
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)
    etc_before: dict[str, float] = field(default_factory=dict)

    def command(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        out = subprocess.run(args, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check:
            assert out.returncode == 0, f"{' '.join(args)}: exit {out.returncode}\n{out.stdout}\n{out.stderr}"
        return out

    def logs(self) -> str:
        return "\n".join(f"--- {name}.log:\n{_tail(self.root / 'log' / f'{name}.log', 1500)}" for name in DAEMONS)

    def submit(self, script: str, job_env: dict[str, str]) -> Job:
        """``sbatch --wait`` of scripts/slurm/``script`` with CPU resources; returns at once with the job id."""
        out_dir = self.root / "jobs"
        out_dir.mkdir(exist_ok=True)
        command = ["sbatch", "--parsable", "--wait", *CPU_RESOURCES, f"--output={out_dir}/%x-%j.out"]
        proc = subprocess.Popen(
            [*command, f"scripts/slurm/{script}"],
            cwd=REPO,
            env={**self.env, **job_env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        first = proc.stdout.readline().strip()  # --parsable: the job id, printed before waiting
        if not first.split(";")[0].isdigit():
            proc.wait(timeout=30)
            pytest.fail(f"sbatch {script} was refused: {first}\n{proc.stderr.read()}")
        job_id = first.split(";")[0]
        name = "kangaroo-train" if script == "train.sbatch" else "kangaroo-cache"
        return Job(self, job_id, proc, out_dir / f"{name}-{job_id}.out")

    def stop(self) -> None:
        """Cancel our jobs, stop the daemons we started, and end any job process they left (by pid)."""
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            self.command("scancel", "--full", "--user", "root", check=False)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self.command("squeue", "-h", check=False).stdout.strip():
                time.sleep(1)
        for name in ("slurmd", "slurmctld", "munged"):  # slurmd first: it talks to slurmctld when it stops
            proc = self.daemons.get(name)
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for pid in self.leftover_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # ended meanwhile
                pass

    def leftover_processes(self) -> list[int]:
        """Processes started under this cluster (slurmstepd and job steps carry its SLURM_CONF), except ourselves."""
        marker = f"SLURM_CONF={self.env['SLURM_CONF']}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found


@dataclass
class Job:
    cluster: Cluster
    job_id: str
    proc: subprocess.Popen
    log: Path

    def wait(self, timeout: float = JOB_TIMEOUT) -> str:
        """Wait for the job's end (through requeues); its output file's text. Fails with the log on error."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.cluster.command("scancel", self.job_id, check=False)
            self.proc.kill()
            pytest.fail(f"job {self.job_id} still running after {timeout} s:\n{_tail(self.log)}\n{self.cluster.logs()}")
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        assert self.proc.returncode == 0, (
            f"job {self.job_id} failed (sbatch --wait exit {self.proc.returncode}: {self.proc.stderr.read()}):\n"
            f"{text[-6000:]}\n{self.cluster.logs()}"
        )
        return text


SLURM_CONF = """\
ClusterName=kangaroo-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
# no cgroups: processes tracked through /proc, no task binding, no accounting
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=30
# sbatch --wait polls every 2 s only while that is under MinJobAge / 2 (then 8 s, then 32 s)
MinJobAge=5
NodeName={node} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="session")
def slurm_cluster(slurm_packages, tmp_path_factory) -> Cluster:
    """munged + slurmctld + slurmd of a one-node cluster, configured in a temporary directory and stopped at the end
    (also when a test fails)."""
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir(mode=0o700)
    key = root / "munge" / "munge.key"  # a fresh key of our own (the one apt made in /etc/munge is left alone)
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    node = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(node=node, root=root, ctld_port=_free_port(), slurmd_port=_free_port()))
    venv_bin = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "SLURM_CONF": str(conf),
        "PATH": os.pathsep.join([venv_bin, SBIN_PATH]),  # `python` in the scripts is this venv's
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cluster = Cluster(root, node, env, etc_before=_etc_snapshot())

    def start(name: str, *args: str) -> None:
        with open(root / "log" / f"{name}.out", "w") as out:
            cluster.daemons[name] = subprocess.Popen(
                [_which(name), *args], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    try:
        munge = root / "munge"
        start(
            "munged",
            "--foreground",
            "--force",  # a socket directory under /tmp is fine for a test
            f"--socket={munge / 'munge.socket'}",
            f"--key-file={key}",
            f"--pid-file={munge / 'munged.pid'}",
            f"--seed-file={munge / 'munged.seed'}",
            f"--log-file={root / 'log' / 'munged.log'}",
        )
        deadline = time.monotonic() + 30
        while not (munge / "munge.socket").exists():
            assert cluster.daemons["munged"].poll() is None, f"munged exited:\n{_tail(root / 'log' / 'munged.out')}"
            assert time.monotonic() < deadline, f"munged made no socket in 30 s:\n{cluster.logs()}"
            time.sleep(0.2)
        start("slurmctld", "-D", "-i", "-f", str(conf))
        start("slurmd", "-D", "-f", str(conf), "-N", node)
        deadline = time.monotonic() + 90
        while True:
            for name, proc in cluster.daemons.items():
                assert proc.poll() is None, (
                    f"{name} exited ({proc.returncode}):\n{_tail(root / 'log' / f'{name}.out')}\n{cluster.logs()}"
                )
            state = cluster.command("sinfo", "-h", "-n", node, "-o", "%T", check=False)
            if state.stdout.strip() == "idle":
                break
            assert time.monotonic() < deadline, (
                f"node {node} not idle after 90 s (sinfo: {state.stdout.strip()!r} {state.stderr.strip()!r}):\n"
                f"{cluster.logs()}"
            )
            time.sleep(1)
        yield cluster
    finally:
        cluster.stop()


def job_env(output_dir: Path, *overrides: str) -> dict[str, str]:
    """The scripts' settings, from the environment: the tiny experiment on 2 CPU processes."""
    return {
        "EXPERIMENT": "tiny",
        "GPUS_PER_NODE": "2",  # processes per node: trainer.devices
        "OUTPUT_DIR": str(output_dir),
        "KANGAROO_OVERRIDES": " ".join(["strategy=ddp", "trainer.val_check_interval=100", *overrides]),
    }


def progress_steps(text: str) -> list[tuple[int, int]]:
    return [(int(m[1]), int(m[2])) for m in PROGRESS.finditer(text)]


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory) -> Path:
    """Tokenized data and features, made by the cache job and reused by the training jobs."""
    return tmp_path_factory.mktemp("slurm_run")


@pytest.fixture(scope="module")
def cache_logs(slurm_cluster, shared_dir) -> tuple[str, str, dict[str, float]]:
    first = slurm_cluster.submit("cache.sbatch", job_env(shared_dir)).wait()
    shards = {str(p): p.stat().st_mtime for p in (shared_dir / "features").rglob("shard-*.safetensors")}
    again = slurm_cluster.submit("cache.sbatch", job_env(shared_dir)).wait()
    return first, again, shards


def test_cache_job_builds_every_shard_over_two_tasks_and_a_rerun_builds_nothing(cache_logs, shared_dir):
    first, again, shards = cache_logs
    for split in ("train", "val"):
        manifest = json.loads((shared_dir / "features" / split / "manifest.json").read_text())
        assert manifest["complete"], split
        assert all((shared_dir / "features" / split / s["file"]).is_file() for s in manifest["shards"])
        assert sum(s["num_samples"] for s in manifest["shards"]) == manifest["num_samples"] > 0
    assert len(json.loads((shared_dir / "features" / "train" / "manifest.json").read_text())["shards"]) >= 2
    assert "Feature cache (rank 0" in first and "Feature cache (rank 1" in first, first[-4000:]  # both tasks built
    assert "building" not in again and again.count("train features complete") == 2, again[-4000:]
    assert {str(p): p.stat().st_mtime for p in (shared_dir / "features").rglob("shard-*.safetensors")} == shards


@pytest.fixture(scope="module")
def train_log(slurm_cluster, shared_dir, cache_logs) -> str:
    return slurm_cluster.submit("train.sbatch", job_env(shared_dir, "callbacks.progress_lines.every_n_steps=4")).wait()


def test_train_job_trains_with_two_slurm_tasks_and_exports_a_loadable_adapter(train_log, shared_dir):
    from kangaroo_infer import KangarooModel

    assert "building" not in train_log  # data and features from the cache job
    assert "slurm requeue: on SIGUSR1" in train_log  # Lightning took the job for a SLURM job ...
    assert "MEMBER: 2/2" in train_log  # ... with 2 processes, one per srun task
    assert progress_steps(train_log) == [(4, 12), (8, 12), (12, 12)]  # plain lines in the job's output file, rank 0
    ckpt = torch.load(shared_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 12
    km = KangarooModel.from_pretrained(None, adapter=shared_dir / "adapter")
    assert km.exit_layer == 2
    assert json.loads((shared_dir / "adapter" / "training.json").read_text())["global_step"] == 12


def runs_of(job: Job) -> list[str]:
    """The job's log cut into its starts (the script prints ``job JOBID start N`` first; the log is appended to)."""
    text = job.log.read_text(errors="replace") if job.log.exists() else ""  # made when the job starts
    return text.split(f"kangaroo-train: job {job.job_id} start ")[1:]


def interrupt(cluster: Cluster, job: Job, run: int, after: int, *signal_command: str) -> None:
    """Once start ``run`` of the job logged training step ``after``, run ``signal_command`` (which must requeue the
    job) and release the requeued job: SLURM holds it about 2 minutes (reason BeginTime) before it may start again."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while True:
        runs = runs_of(job)
        if len(runs) > run and any(step >= after for step, _ in progress_steps(runs[run])):
            break
        assert job.proc.poll() is None, f"job ended before it could be interrupted:\n{_tail(job.log)}"
        assert time.monotonic() < deadline, f"start {run} reached no step {after} in {JOB_TIMEOUT} s:\n{_tail(job.log)}"
        time.sleep(0.1)
    cluster.command(*signal_command)
    while job.proc.poll() is None:
        show = cluster.command("scontrol", "show", "job", job.job_id, check=False).stdout
        if "JobState=PENDING" in show and "Reason=BeginTime" in show:
            cluster.command("scontrol", "update", f"jobid={job.job_id}", "StartTime=now")
        elif f"Restarts={run + 1}" in show and "JobState=RUNNING" in show:
            return
        assert time.monotonic() < deadline, f"`{' '.join(signal_command)}` did not restart the job:\n{show}"
        time.sleep(0.5)


def test_requeued_train_job_resumes_from_its_checkpoint_without_losing_steps(slurm_cluster, shared_dir, tmp_path):
    """Start 0 is requeued from outside (``scontrol requeue``: SIGTERM); start 1 gets the time-limit warning
    (SIGUSR1, as ``#SBATCH --signal=SIGUSR1@90`` sends it), on which the job checkpoints and requeues itself; start 2
    finishes. Every start continues at the step after the previous one's last."""
    total = 60
    env = job_env(
        tmp_path,
        f"paths.data_dir={shared_dir / 'data'}",  # the cache job's data and features
        f"cache.dir={shared_dir / 'features'}",
        f"trainer.max_steps={total}",
        "callbacks.checkpoint.every_n_train_steps=1000",  # no periodic checkpoints: only those the interruptions make
        "callbacks.checkpoint.save_top_k=10",
        "callbacks.progress_lines.every_n_steps=1",
    )
    job = slurm_cluster.submit("train.sbatch", env)
    interrupt(slurm_cluster, job, 0, 3, "scontrol", "requeue", job.job_id)
    first_stop = progress_steps(runs_of(job)[0])[-1][0]
    interrupt(slurm_cluster, job, 1, first_stop + 3, "scancel", "--signal=USR1", job.job_id)
    log = job.wait()

    runs = runs_of(job)
    assert [run.split(" ", 1)[0] for run in runs] == ["0", "1", "2"], log[-4000:]  # started 3 times
    steps = [[step for step, _ in progress_steps(run)] for run in runs]
    stops = [run_steps[-1] for run_steps in steps]
    assert stops[0] < stops[1] < stops[2] == total, f"training ended before an interruption landed: {steps}"
    # no step lost, none repeated: each start logs every step from the one after the previous start's last
    starts = [1, stops[0] + 1, stops[1] + 1]
    assert steps == [list(range(a, b + 1)) for a, b in zip(starts, stops, strict=True)], steps
    # each interruption left a checkpoint at exactly its last step (SIGTERM: Lightning finished the step, Checkpoints
    # saved it); the USR1 one first saved after the step in flight and ran `scontrol requeue` itself
    pattern = rf"slurm requeue: saved \S+step-(\d+)\.ckpt at step (\d+); requeued SLURM job {job.job_id}"
    requeued = re.search(pattern, runs[1])
    assert requeued is not None, runs[1][-4000:]
    usr1_step = int(requeued[2])
    assert stops[0] < usr1_step <= stops[1] and int(requeued[1]) == usr1_step
    saved = {
        torch.load(path, map_location="cpu", weights_only=False)["global_step"]
        for path in (tmp_path / "checkpoints").glob("step-*.ckpt")
    }
    assert {stops[0], usr1_step, stops[1]} <= saved, (stops, usr1_step, sorted(saved))
    assert not list(tmp_path.glob("hpc_ckpt_*")), "Lightning's in-handler requeue checkpoint should be off"
    assert "resume=true but there is no checkpoint" in runs[0] and "resuming from" in runs[1] + runs[2]
    for version, (a, b) in enumerate(zip(starts, stops, strict=True)):  # the csv metrics join up too
        assert [int(r["step"]) for r in train_rows(metrics(tmp_path, version=version))] == list(range(a - 1, b))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == total
    assert json.loads((tmp_path / "adapter" / "training.json").read_text())["global_step"] == total


def test_nothing_written_to_etc(slurm_cluster, cache_logs):
    assert _etc_snapshot() == slurm_cluster.etc_before
