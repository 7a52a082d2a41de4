"""`glm5 train` end to end in subprocesses: SIGKILL part-way then --resume gives the uninterrupted run's
losses bitwise (fp32, CPU); torchrun with 2 processes (DDP, FSDP2 on gloo) follows one process within 1e-5;
bad input fails before anything is written."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import train_cli_setup

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return train_cli_setup(tmp_path_factory.mktemp("train_cli"))


def train_cmd(setup, out, *extra, steps=12, stage="pretrain"):
    return [sys.executable, "-m", "glm5.cli", "train", stage, "--data", str(setup / "data.jsonl"),
            "--config", str(setup / "cfg" / "config.json"), "--tokenizer", str(setup / "tok"), "--out", str(out),
            "--steps", str(steps), "--batch-size", "4", "--seq-len", "32", "--warmup", "2", "--no-progress",
            "--threads", "1", *extra]


def run(cmd, timeout=300):
    """Run to completion; on timeout kill the whole process group (torchrun's workers too)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def losses_of(out):
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"]) for r in records]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run_bitwise(setup, tmp_path):
    steps = 24
    run(train_cmd(setup, tmp_path / "straight", "--save-every", "4", steps=steps))
    expected = losses_of(tmp_path / "straight")
    assert len(expected) == steps

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(train_cmd(setup, out, "--save-every", "4", steps=steps), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = out / "checkpoints" / "pretrain"
    deadline = time.time() + 240
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        done = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
        if ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir()) and done >= 6:
            proc.send_signal(signal.SIGKILL)
            killed_at = done
            break
        time.sleep(0.02)
    proc.wait()
    assert killed_at is not None and killed_at < steps, "the run finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL

    result = run(train_cmd(setup, out, "--save-every", "4", "--resume", steps=steps))
    got = losses_of(out)
    assert got == expected, f"resumed losses differ from the uninterrupted run (killed after {killed_at} steps)\n{result.stdout[-500:]}"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_process(setup, tmp_path, mode):
    steps = 6
    run(train_cmd(setup, tmp_path / "single", steps=steps))
    single = losses_of(tmp_path / "single")
    with socket.socket() as sock:  # a free port for the rendezvous (port 0 hangs torchrun's c10d store)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    cmd = train_cmd(setup, tmp_path / mode, "--parallel", mode, steps=steps)
    run(torchrun + cmd[1:])
    double = losses_of(tmp_path / mode)
    assert len(double) == len(single) == steps
    worst = max(abs(a[2] - b[2]) for a, b in zip(single, double))
    assert worst < 1e-5, f"{mode}: losses differ from one process by up to {worst:.2e}"
    # the model each writes loads back
    from glm5.model.transformer import GLM5ForCausalLM

    GLM5ForCausalLM.from_pretrained(tmp_path / mode / "model")


def test_bad_input_fails_before_writing(setup, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def fails(cmd, message):
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and message in result.stderr, result.stderr[-1500:]

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cmd = train_cmd(setup, tmp_path / "a", steps=1)
    cmd[cmd.index("--data") + 1] = str(empty)
    fails(cmd, "empty dataset")
    fails(train_cmd(setup, tmp_path / "b", "--seq-len", "128", steps=1), "longer than the model's 64 positions")
    cmd = train_cmd(setup, tmp_path / "c", steps=1)
    cmd[cmd.index("--data") + 1] = str(tmp_path / "missing.jsonl")
    fails(cmd, "no such data file")
    # a corrupt checkpoint: clear error on --resume, and the file is left as it was
    ckpt_dir = tmp_path / "d" / "checkpoints" / "pretrain"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "step_000004.pt").write_bytes(b"not a checkpoint")
    fails(train_cmd(setup, tmp_path / "d", "--resume", steps=1), "corrupt checkpoint")
    assert (ckpt_dir / "step_000004.pt").read_bytes() == b"not a checkpoint"
    # an existing run is not overwritten without --resume
    fails(train_cmd(setup, tmp_path / "d", steps=1), "pass --resume")
    for name in "abc":
        assert not (tmp_path / name).exists(), f"a failed run wrote {tmp_path / name}"
