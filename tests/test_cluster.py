"""Cluster life: a SIGTERM / SIGUSR1 or the wall-clock budget stops a run at a step boundary with a
checkpoint, and the same command resumes it bit for bit; the sbatch script under a fake two-node
Slurm requeues itself; background checkpoint writes leave the previous checkpoint newest when
killed; metrics hold each step once after a restart; each node tokenises once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmpo_megatron.config import CheckpointConfig, ConfigError, TrainerConfig
from mmpo_megatron.parallel.local_ranks import run_on_ranks

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
QUIET = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# The README demo (TP=2 on two CPU processes), shortened; saving every 100 steps, so a stop's save
# is the only one before the end.
DEMO = [
    "--config-name",
    "train_demo",
    "train.max_steps=12",
    "train.eval_interval=6",
    "train.overwrite_output_dir=false",
    "logging.progress_bar=false",
    "checkpoint.save_interval=100",
    # Cheaper launches, the same life cycle: no precompute of all 4000 pairs' reference
    # scores (the reference scores each step instead), evaluations on 64 pairs, TensorBoard
    # (tested on its own below) off.
    "reference.mode=resident",
    "train.eval_max_pairs=64",
    "logging.tensorboard=false",
]
COMPARED = ("loss", "grad_norm", "lr", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")



def metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_same_run(run: Path, reference: list[dict]) -> None:
    """``run``'s metrics.jsonl holds each (step, split) once, the reference's, with equal figures."""
    rows = metric_rows(run)
    keys = [(r["step"], r["split"]) for r in rows]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
    expected = {(r["step"], r["split"]): r for r in reference}
    assert sorted(keys) == sorted(expected)
    for row in rows:
        for key in COMPARED:
            if key in expected[(row["step"], row["split"])]:
                assert row[key] == expected[(row["step"], row["split"])][key], (row["step"], row["split"], key)


def launch(argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """A command in its own session (so that a test can signal or kill all of it), output to ``log``."""
    return subprocess.Popen(argv, cwd=REPO, env=env or QUIET, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def signal_tree(process: subprocess.Popen, sig: int) -> None:
    """Signal a launched command and every process below it, as Slurm signals a job's cgroup
    (torchrun starts each rank in a session of its own: the launcher's process group misses them)."""
    import psutil

    root = psutil.Process(process.pid)
    for member in [root, *root.children(recursive=True)]:
        try:
            member.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a launched command and everything below it; wait for the command."""
    signal_tree(process, signal.SIGKILL)
    process.wait(timeout=30)


def wait_until(condition, process: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    started = time.monotonic()
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (code {process.returncode}) first:\n{log.read_text()[-3000:]}")
        if time.monotonic() - started > timeout:
            kill_tree(process)
            raise AssertionError(f"timed out waiting:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def logged_step(run: Path, step: int):
    def seen() -> bool:
        path = run / "metrics.jsonl"
        return path.exists() and any(r["step"] >= step and r["split"] == "train" for r in metric_rows(run))
    return seen


def train_command(run: Path, *extra: str, script: str = "examples/train_mmpo.py") -> list[str]:
    return [TORCHRUN, "--nproc-per-node", "2", script, *DEMO, f"train.output_dir={run}", *extra]


@pytest.mark.start_early(1)
def test_a_kill_mid_write_then_a_preemption_lose_nothing_and_the_requeued_job_matches(tmp_path):
    """One run's life on a cluster, saving every 4 steps in the background (checkpoint.async_save).

    1. torchrun; SIGKILL while step 8's checkpoint is written (training went on to its last step,
       12, whose save waits for step 8's): step 4 stays the newest intact checkpoint, step 8 an
       unmarked .tmp. What it logged is an uninterrupted run's metrics.
    2. examples/slurm/train_mmpo.sbatch on two fake nodes (one torchrun each, c10d rendezvous, TP=2
       across them) in the same run folder: the job's time left becomes train.max_wall_minutes; it
       resumes from step 4 and drops the rows logged after it; a preemption (SIGTERM to every
       process of the job: the batch shell, srun, torchrun, the ranks and dist_checkpointing's
       helper processes) stops the ranks after a completed step with its checkpoint inside
       torchrun's 30 s; the script requeues the job. (Slurm's early warning, USR1 to the batch
       shell alone, is forwarded: test_the_sbatch_script_forwards_the_warning_...)
    3. The requeued script resumes, finishes, does not requeue again, and the run is bit-exact with
       the uninterrupted one, each step logged once.
    """
    from mmpo_megatron.model.checkpoint import TRAINER_STATE, latest_intact_checkpoint
    from mmpo_megatron.parallel.runtime import free_port

    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    background = ["checkpoint.async_save=true", "checkpoint.save_interval=4"]
    log = tmp_path / "killed.log"
    process = launch(train_command(run, *background, script="tests/slow_checkpoint_writes.py"), log,
                     {**QUIET, "SLOW_WRITES_AFTER": str(checkpoints / "step_0000004")})
    wait_until(lambda: (checkpoints / "step_0000008.tmp").exists() and logged_step(run, 12)()
               and "[eval step 12]" in log.read_text(), process, log)
    kill_tree(process)
    uninterrupted = metric_rows(run)
    assert latest_intact_checkpoint(checkpoints).name == "step_0000004"
    assert not (checkpoints / "step_0000008").exists()
    assert not (checkpoints / "step_0000008.tmp" / TRAINER_STATE).exists()

    slurm_log = tmp_path / "slurm.log"
    status = tmp_path / ".mmpo_status" / "4242.json"
    env = {**QUIET, "PATH": f"{REPO / 'tests/fake_slurm'}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "localhost", "SLURM_GPUS_PER_NODE": "1",
           "SLURM_SUBMIT_DIR": str(tmp_path), "MASTER_PORT": str(free_port()), "FAKE_SLURM_LOG": str(slurm_log),
           "FAKE_TIME_LEFT": "1-02:03:00"}
    sbatch = ["bash", "examples/slurm/train_mmpo.sbatch", *DEMO, *background, f"train.output_dir={run}"]
    log = tmp_path / "warned.log"
    process = launch(sbatch, log, env)
    # After step 8's background save (the killed run logged step 9 already): dist_checkpointing's
    # helper processes are running when the signal comes.
    wait_until(lambda: "[train step 9]" in log.read_text(), process, log)
    signalled = time.monotonic()
    signal_tree(process, signal.SIGTERM)  # a preemption: every process of the job, megatron's helpers too
    assert process.wait(timeout=90) == 0, log.read_text()[-3000:]
    assert time.monotonic() - signalled < 30, log.read_text()[-3000:]
    text = log.read_text()
    assert "(step 4)" in text and "10 rows past step 4" in text, text[-3000:]  # steps 5-12, the evaluations at 6 and 12
    assert "stopped after step" in text and "signal SIGTERM" in text, text[-3000:]
    last = max(r["step"] for r in metric_rows(run) if r["split"] == "train")
    assert 9 <= last < 12 and latest_intact_checkpoint(checkpoints).name == f"step_{last:07d}"
    assert json.loads(status.read_text()) == {"status": "stopped", "step": last, "reason": "signal SIGTERM",
                                              "checkpoint": str(checkpoints / f"step_{last:07d}")}
    assert slurm_log.read_text() == "requeue 4242\n"
    assert "max_wall_minutes: 1558.0" in (run / "config.yaml").read_text()  # 26 h 3 min less the 5 min margin

    env["MASTER_PORT"] = str(free_port())
    done = subprocess.run(sbatch, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"(step {last})" in done.stdout
    assert json.loads(status.read_text())["status"] == "finished"
    assert slurm_log.read_text() == "requeue 4242\n"
    assert_same_run(run, uninterrupted)


FAKE_TORCHRUN = """#!/bin/bash
# torchrun for test_the_sbatch_script_forwards_the_warning_reads_the_time_left_and_requeues_only_a_stop
printf '%s\\n' "$@" > "$FAKE_TORCHRUN_ARGS"
status() { mkdir -p "$(dirname "$MMPO_RUN_STATUS")"; printf '{"status": "%s"}' "$1" > "$MMPO_RUN_STATUS"; }
case $FAKE_OUTCOME in
    stopped_on_usr1)
        trap 'status stopped; exit 1' TERM   # torchrun reports its ranks' exit 75 as a failure
        touch "$FAKE_TORCHRUN_ARGS.ready"
        for _ in $(seq 200); do sleep 0.1; done
        exit 9 ;;
    finished) status finished ;;
    crashed) exit 3 ;;
esac
"""


@pytest.mark.parametrize("time_left, extra, budget", [
    ("1-02:03:00", [], "train.max_wall_minutes=1558"),
    ("2:03:59", [], "train.max_wall_minutes=118"),  # seconds rounded down, less the 5 min margin
    ("04:00", [], None),  # less than the margin: no budget
    ("UNLIMITED", [], None),
    ("NOT_SET", [], None),
    ("2:00:00", ["+train.max_wall_minutes=30"], "+train.max_wall_minutes=30"),  # the user's own is kept
])
def test_the_sbatch_script_reads_the_time_left(tmp_path, time_left, extra, budget):
    args = run_sbatch_with_a_fake_torchrun(tmp_path, "finished", time_left, extra)[1]
    assert [a for a in args if "max_wall_minutes" in a] == ([budget] if budget else [])


def test_the_sbatch_script_forwards_the_warning_and_requeues_only_a_stop(tmp_path):
    """USR1 to the batch shell (Slurm's --signal=B:USR1) reaches torchrun through srun as SIGTERM
    (which every torchrun forwards to its ranks); a stopped run is requeued and the script exits 0;
    a finished run is not requeued; a crash's exit code is kept."""
    rc, _, requeues = run_sbatch_with_a_fake_torchrun(tmp_path / "stop", "stopped_on_usr1", "1:00:00", [], warn=True)
    assert (rc, requeues) == (0, "requeue 4242\n")
    rc, _, requeues = run_sbatch_with_a_fake_torchrun(tmp_path / "finish", "finished", "1:00:00", [])
    assert (rc, requeues) == (0, "")
    rc, _, requeues = run_sbatch_with_a_fake_torchrun(tmp_path / "crash", "crashed", "1:00:00", [])
    assert (rc, requeues) == (3, "")


def run_sbatch_with_a_fake_torchrun(root: Path, outcome: str, time_left: str, extra: list[str], warn: bool = False):
    """examples/slurm/train_mmpo.sbatch on one fake node with a scripted torchrun: (exit code,
    torchrun's arguments, the requeues recorded)."""
    fake_bin = root / "bin"
    fake_bin.mkdir(parents=True)
    (fake_bin / "torchrun").write_text(FAKE_TORCHRUN)
    (fake_bin / "torchrun").chmod(0o755)
    args_file, slurm_log = root / "torchrun_args", root / "slurm.log"
    slurm_log.touch()
    env = {**QUIET, "PATH": f"{fake_bin}:{REPO / 'tests/fake_slurm'}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost", "SLURM_SUBMIT_DIR": str(root),
           "FAKE_SLURM_LOG": str(slurm_log), "FAKE_TIME_LEFT": time_left, "FAKE_OUTCOME": outcome,
           "FAKE_TORCHRUN_ARGS": str(args_file)}
    log = root / "sbatch.log"
    process = launch(["bash", "examples/slurm/train_mmpo.sbatch", "--config-name", "train_demo", *extra], log, env)
    if warn:
        wait_until(lambda: Path(f"{args_file}.ready").exists(), process, log, timeout=30)
        process.send_signal(signal.SIGUSR1)
    rc = process.wait(timeout=60)
    return rc, args_file.read_text().splitlines(), slurm_log.read_text()


# ------------------------------------------------------------------------------------------ on pooled ranks


def async_and_sync_runs(root):
    """The same 6 steps at DP=2 (distributed optimizer) saving every 3 steps in the background and
    in the foreground; then a resume from the background run's step 3."""
    from run_folders import seed_run_folder
    from test_trainer import make_config, train_records

    root = Path(root)

    def config(name, async_save):
        return make_config(
            root / name,
            steps=6,
            checkpoint=CheckpointConfig(save_interval=3, keep_last=5, async_save=async_save),
            train=TrainerConfig(
                global_batch_size=8, micro_batch_size=2, max_steps=6, eval_interval=0, output_dir=str(root / name)
            ),
        )

    out = {"sync": train_records(config("sync", False)), "async": train_records(config("async", True))}
    seed_run_folder(root / "async", root / "resumed", 3)
    out["resumed"] = train_records(config("resumed", True))
    out["stopped"], out["after_stop"] = sigterm_one_rank_then_resume(config("signalled", False))
    return out


def sigterm_one_rank_then_resume(cfg):
    """SIGTERM to DP rank 1 alone, during step 2; then the same config again (a resume)."""
    import torch.distributed as dist

    from mmpo_megatron.model.preference_model import MegatronPreferenceModel
    from mmpo_megatron.train.stopping import TrainingStopped
    from test_trainer import train_records

    train_step = MegatronPreferenceModel.train_step
    calls = []

    def signalled_step(self, micro_batches):
        calls.append(1)
        if len(calls) == 2 and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # mid-step: the step completes, the run stops after it
        return train_step(self, micro_batches)

    MegatronPreferenceModel.train_step = signalled_step
    try:
        train_records(cfg)
        stopped = None
    except TrainingStopped as exc:
        stopped = {"step": exc.step, "reason": exc.reason, "checkpoint": exc.checkpoint}
    finally:
        MegatronPreferenceModel.train_step = train_step
    return stopped, train_records(cfg)


def test_background_checkpoints_and_a_sigterm_on_one_rank_resume_exactly(tmp_path):
    """Writing in the background does not change training; its step-3 checkpoint holds step 3's
    weights (not a later step's, though training went on) bit for bit as the foreground save does,
    and a resume from it reproduces steps 4-6 exactly. A SIGTERM that only one rank receives stops
    every rank after the same step (the step-boundary all-reduce)."""
    from test_trainer import final_weights

    results = run_on_ranks(async_and_sync_runs, 2, str(tmp_path))
    result = results[0]
    train = {name: {r["step"]: r for r in records if r["split"] == "train"}
             for name, records in result.items() if name != "stopped"}
    for step in range(1, 7):
        assert train["async"][step]["loss"] == train["sync"][step]["loss"]
    for step in (4, 5, 6):
        for key in ("loss", "grad_norm", "lr", "logps/chosen"):
            assert train["resumed"][step][key] == train["sync"][step][key], (step, key)
    names = ["sync/checkpoints/step_0000003", "async/checkpoints/step_0000003", "async/checkpoints/step_0000006"]
    weights = run_on_ranks(final_weights, 1, str(tmp_path), names)[0]
    for name, value in weights[names[0]].items():
        assert torch.equal(value, weights[names[1]][name]), name
    assert any(not torch.equal(v, weights[names[2]][k]) for k, v in weights[names[1]].items())
    # SIGTERM on rank 1 alone, during step 2: both ranks stop after step 2 with its checkpoint,
    # the run's signal handlers are restored, and the resume continues exactly.
    expected = {
        "step": 2,
        "reason": "signal SIGTERM",
        "checkpoint": str(tmp_path / "signalled/checkpoints/step_0000002"),
    }
    assert [r["stopped"] for r in results] == [expected, expected]
    assert sorted(train["after_stop"]) == [3, 4, 5, 6]
    for step in (3, 4, 5, 6):
        for key in ("loss", "grad_norm", "lr", "logps/chosen"):
            assert train["after_stop"][step][key] == train["sync"][step][key], (step, key)


def a_failing_step_during_a_background_write(root):
    """Step 3 raises while step 2's checkpoint is being written (a writer that takes ten minutes):
    the error, the writer processes still alive a moment later, and the checkpoints complete."""
    import psutil
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from mmpo_megatron.model.checkpoint import complete_checkpoints
    from mmpo_megatron.model.preference_model import MegatronPreferenceModel
    from test_trainer import make_config, train_records

    # megatron-core 0.16 writes from processes, 0.19 from threads (of the forked writer)
    name = next(n for n in ("write_preloaded_data_multiproc", "write_preloaded_data_multithread")
                if hasattr(FileSystemWriterAsync, n))
    write, train_step = getattr(FileSystemWriterAsync, name), MegatronPreferenceModel.train_step
    calls = []

    def slow_write(*args, **kwargs):
        time.sleep(600)
        return write(*args, **kwargs)

    def failing_step(self, micro_batches):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom at step 3")
        return train_step(self, micro_batches)

    root = Path(root)
    cfg = make_config(root, steps=6, checkpoint=CheckpointConfig(save_interval=2, async_save=True),
                      train=TrainerConfig(global_batch_size=8, micro_batch_size=2, max_steps=6, eval_interval=0,
                                          output_dir=str(root)))
    rank_process = psutil.Process()
    setattr(FileSystemWriterAsync, name, staticmethod(slow_write))
    MegatronPreferenceModel.train_step = failing_step
    try:
        train_records(cfg)
        error = None
    except RuntimeError as exc:
        error = str(exc)
    finally:
        setattr(FileSystemWriterAsync, name, staticmethod(write))
        MegatronPreferenceModel.train_step = train_step
    time.sleep(1.0)
    # The writers are forks of this process (the same command line); megatron's results queue is
    # a spawned helper that stays for the process's life.
    writers = [
        child.pid
        for child in rank_process.children(recursive=True)
        if child.is_running() and child.status() != psutil.STATUS_ZOMBIE and child.cmdline() == rank_process.cmdline()
    ]
    return error, writers, [p.name for p in complete_checkpoints(root / "checkpoints")]


def test_an_error_during_a_background_write_kills_the_writer_and_leaves_the_folder_unmarked(tmp_path):
    error, writers, complete = run_on_ranks(a_failing_step_during_a_background_write, 1, str(tmp_path))[0]
    assert error == "boom at step 3"
    assert writers == []  # not left writing (or, at exit, joined for ten minutes)
    assert complete == [] and (tmp_path / "checkpoints" / "step_0000002.tmp").exists()


def stop_on_budget(root, budget_minutes):
    """A long run under a wall-clock budget counted from the task's start (a pooled rank's process
    started long before)."""
    from mmpo_megatron.train import stopping
    from test_trainer import make_config, train_records

    started = time.time()
    stopping.process_started_at = lambda: started
    cfg = make_config(
        Path(root) / "run",
        steps=2000,
        train=TrainerConfig(
            global_batch_size=8,
            micro_batch_size=2,
            max_steps=2000,
            eval_interval=0,
            output_dir=str(Path(root) / "run"),
            max_wall_minutes=budget_minutes,
        ),
    )
    try:
        train_records(cfg)
    except stopping.TrainingStopped as exc:
        return {"step": exc.step, "reason": exc.reason, "checkpoint": exc.checkpoint, "elapsed": time.time() - started}
    except ConfigError as exc:
        return {"error": str(exc)}
    return None


def test_the_wall_clock_budget_stops_with_a_checkpoint_before_it_runs_out(tmp_path):
    """train.max_wall_minutes=0.25 on a run of 2000 steps: it stops on its own before 15 s are up
    (the estimate of a step and a save included), after a completed step, with its checkpoint."""
    from mmpo_megatron.model.checkpoint import latest_intact_checkpoint

    stopped = run_on_ranks(stop_on_budget, 1, str(tmp_path), 0.25)[0]
    assert stopped is not None and "max_wall_minutes=0.25" in stopped["reason"]
    assert 0 < stopped["step"] < 2000 and stopped["elapsed"] < 15
    assert latest_intact_checkpoint(tmp_path / "run" / "checkpoints").name == f"step_{stopped['step']:07d}"
    assert stopped["checkpoint"].endswith(f"step_{stopped['step']:07d}")
    # A budget that no step fits (a requeued job would stop at the same step forever) is an error.
    too_short = run_on_ranks(stop_on_budget, 1, str(tmp_path / "short"), 0.01)[0]
    assert "max_wall_minutes=0.01" in too_short["error"] and "before this attempt's first step" in too_short["error"]


def test_the_budget_estimate_counts_the_next_step_its_evaluation_a_background_write_and_a_save():
    from mmpo_megatron.train.stopping import StopConditions

    now = time.time()
    stops = StopConditions(1.0, torch.device("cpu"), started_at=now - 50)
    assert stops.save_estimate_s() == 5.0 and not stops.budget_short()  # 50 s + 0 + 5 s (first estimate)
    stops.record_step(2.0)
    stops.record_save(4.0)
    stops.record_step(3.0)
    assert not stops.budget_short()  # 50 + 3 + 4 = 57 s of 60
    stops.record_eval(3.5)
    assert stops.budget_short(next_step_evaluates=True) and not stops.budget_short()  # 50 + 3 + 3.5 + 4 = 60.5 s
    stops.record_background_save()
    assert stops.budget_short()  # 50 + 3 + (4 s of writing left) + 4 = 61 s
    stops.record_save(3.0)  # the background write finished
    assert not stops.budget_short()
    stops.record_step(7.0)
    assert stops.budget_short()  # 50 + 7 + 4 = 61 s
    assert StopConditions(None, torch.device("cpu"), started_at=now - 1e6).budget_short() is False
    big = StopConditions(60.0, torch.device("cpu"), started_at=now)
    big.expect_save_bytes(int(100e9))
    assert big.save_estimate_s() == pytest.approx(505.0)  # 100 GB at the assumed 200 MB/s, and 5 s


def test_a_resumed_run_drops_the_rows_and_events_logged_after_its_checkpoint(tmp_path):
    """metrics.jsonl and TensorBoard after a crash between saves: a resume at step 3 keeps steps
    1-3 of the first attempt and the second attempt's 4-5, each once (TensorBoard's purge step);
    a restart before any checkpoint keeps nothing of the earlier attempts."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mmpo_megatron.config import LoggingConfig
    from mmpo_megatron.train.logger import MetricsLogger

    config = LoggingConfig(tensorboard=True, progress_bar=False)
    first = MetricsLogger(tmp_path, config, 10, enabled=True)
    for step in range(1, 6):
        first.log(step, "train", {"loss": float(step)})
    first.close()
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 6, "split": "tr')  # cut off mid-line by the crash
    second = MetricsLogger(tmp_path, config, 10, enabled=True, resume_step=3)
    for step in (4, 5):
        second.log(step, "train", {"loss": 10.0 * step})
    second.close()
    rows = metric_rows(tmp_path)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
        (5, 50.0),
    ]
    # A restart with no checkpoint to resume from (resume_step -1) starts both logs afresh.
    third = MetricsLogger(tmp_path, config, 10, enabled=True, resume_step=-1)
    third.log(0, "eval", {"loss": 0.5})
    third.log(1, "train", {"loss": 7.0})
    third.close()
    assert [(r["step"], r["split"], r["loss"]) for r in metric_rows(tmp_path)] == [(0, "eval", 0.5), (1, "train", 7.0)]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 7.0)]


def tokenise_on_two_nodes(root, shared_cache):
    """Four ranks as two nodes of two (LOCAL_RANK 0, 1, 0, 1), each node with its own datasets
    cache (or one cache for all): how many rows each rank tokenised."""
    import datasets
    import torch.distributed as dist

    from mmpo_megatron.data import pipeline
    from mmpo_megatron.parallel import destroy_parallel, initialize_parallel
    from mmpo_megatron.train.setup import load_data
    from test_trainer import make_config

    initialize_parallel(device="cpu")
    rank = dist.get_rank()
    os.environ["LOCAL_RANK"] = str(rank % 2)
    node = 0 if shared_cache else rank // 2
    datasets.config.HF_DATASETS_CACHE = Path(root) / f"cache_node{node}"
    calls = []
    tokenise = pipeline.PairTokeniser.__call__

    def counting(self, row, index):
        calls.append(index)
        return tokenise(self, row, index)

    pipeline.PairTokeniser.__call__ = counting
    try:
        cfg = make_config(Path(root) / "run")
        _, train_pairs, _ = load_data(cfg, Path(root) / "run", rank == 0)
    finally:
        pipeline.PairTokeniser.__call__ = tokenise
        destroy_parallel()
    return len(calls), len(train_pairs)


@pytest.mark.xdist_group("many_ranks")  # one pytest worker: see Makefile
@pytest.mark.parametrize("shared_cache", [False, True])
def test_each_node_tokenises_once(tmp_path, shared_cache):
    """Two nodes with their own caches: the first rank of each tokenises, the others load its
    result. One cache on shared storage: global rank 0 alone tokenises."""
    (tmp_path / "run").mkdir()
    results = run_on_ranks(tokenise_on_two_nodes, 4, str(tmp_path), shared_cache)
    counts = [calls for calls, _ in results]
    assert len({pairs for _, pairs in results}) == 1
    tokenised = [rank for rank, calls in enumerate(counts) if calls]
    assert tokenised == ([0] if shared_cache else [0, 2]), counts
