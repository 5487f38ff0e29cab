"""End to end through the CLI: training, exact resume (stop, SIGTERM, kill -9), multi-host."""

from __future__ import annotations

import random
import signal
import subprocess

import numpy as np
import pytest

import train_cli as cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The reference: 20 steps in one go."""
    workdir = tmp_path_factory.mktemp("straight") / "run"
    result = cli.run_train(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_training_writes_metrics_checkpoints_and_loss_falls(straight_run):
    rows = cli.metrics(straight_run)
    assert [r["step"] for r in rows] == list(range(1, 21))
    for key in ("step", "loss", "text_loss", "image_loss", "lr", "grad_norm", "tokens_per_sec",
                "mfu", "bad_records"):
        assert key in rows[-1], key
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert last < first - 0.5, (first, last)
    assert 0 < rows[-1]["mfu"] < 1.5 and rows[-1]["tokens_per_sec"] > 0
    assert cli.checkpoint_steps(straight_run)[-1] == 20
    assert list((straight_run / "tensorboard").glob("events.out.tfevents.*"))
    assert (straight_run / "vocab.json").exists() and (straight_run / "config.json").exists()


def test_rerun_of_a_finished_run_does_nothing(straight_run):
    metrics_before = (straight_run / "metrics.jsonl").read_text()
    result = cli.run_train(straight_run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already trained to step 20" in result.stderr and "resuming" not in result.stderr
    assert (straight_run / "metrics.jsonl").read_text() == metrics_before
    assert cli.checkpoint_steps(straight_run)[-1] == 20


def test_stop_and_rerun_resumes_bit_for_bit(straight_run, tmp_path):
    workdir = tmp_path / "run"
    first = cli.run_train(workdir, "--config.total_steps=10")
    assert first.returncode == 0, first.stderr[-3000:]
    second = cli.run_train(workdir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from checkpoint step 10" in second.stderr
    assert cli.losses(workdir) == cli.losses(straight_run)


def test_sigterm_saves_exits_zero_and_resumes_exactly(straight_run, tmp_path):
    workdir = tmp_path / "run"
    process = cli.start_train(workdir)
    cli.wait_for_step(process, workdir, 3)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0, (tmp_path / "run.log").read_text()[-3000:]
    stopped_at = cli.metrics(workdir)[-1]["step"]
    if stopped_at < 20:  # SIGTERM landed before the end: a checkpoint of that exact step exists
        assert cli.checkpoint_steps(workdir)[-1] == stopped_at
    result = cli.run_train(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert cli.losses(workdir) == cli.losses(straight_run)


def test_kill_9_at_a_random_moment_resumes_exactly(straight_run, tmp_path):
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    workdir = tmp_path / "run"
    process = cli.start_train(workdir)
    cli.wait_for_step(process, workdir, rng.randrange(1, 16))
    subprocess.run(["sleep", f"{rng.uniform(0, 0.5):.3f}"])
    process.kill()
    process.wait()
    result = cli.run_train(workdir)
    assert result.returncode == 0, f"seed {seed}: {result.stderr[-3000:]}"
    assert cli.losses(workdir) == cli.losses(straight_run), f"seed {seed}"


def test_two_processes_match_one_process(straight_run, tmp_path):
    workdir = tmp_path / "run"
    result = subprocess.run(
        [str(cli.REPO / "launch" / "multiprocess_cpu.sh"), "2", *cli.BASE_FLAGS, f"--workdir={workdir}"],
        env=cli.cpu_env(), capture_output=True, text=True, timeout=300, cwd=cli.REPO,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "process 0 of 2 joined (4 local / 8 global devices)" in result.stdout
    multi, single = cli.losses(workdir), cli.losses(straight_run)
    assert multi.keys() == single.keys()
    np.testing.assert_allclose(list(multi.values()), list(single.values()), rtol=1e-5)


def test_half_written_checkpoint_is_ignored(straight_run, tmp_path):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(straight_run, workdir)
    # What a kill mid-save leaves: a temporary step directory, partly written.
    partial = workdir / "checkpoints" / "25.orbax-checkpoint-tmp"
    shutil.copytree(workdir / "checkpoints" / "20", partial)
    shutil.rmtree(partial / "state")
    result = cli.run_train(workdir, "--config.total_steps=22")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from checkpoint step 20" in result.stderr
    assert cli.checkpoint_steps(workdir)[-1] == 22


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    # A huge learning rate once warmup reaches it blows the weights up within a few steps.
    result = cli.run_train(workdir, "--config.optim.learning_rate=1e12",
                           "--config.optim.warmup_steps=5", "--config.total_steps=40")
    assert result.returncode == 2, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and " at step " in error and "last good checkpoint" in error
    bad_step = int(error.split(" at step ")[1].split(";")[0])
    assert all(step < bad_step for step in cli.checkpoint_steps(workdir))


def test_resume_with_another_vocab_is_refused(straight_run, tmp_path):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(straight_run, workdir)
    result = cli.run_train(workdir, "--config.total_steps=30", "--config.vocab.text_size=300")
    assert result.returncode == 2
    assert "text_size: 200 in checkpoint" in result.stderr and "Traceback" not in result.stderr
