"""Training on CUDA: the Trainer moves its batches to the model's GPU, and two steps follow the CPU run.
Skipped without CUDA (conftest); run by dev/gpu_check.sh on a lent GPU."""

import pytest
import torch
from conftest import tiny_config

from glm5 import GLM5ForCausalLM
from glm5.train.config import TrainConfig
from glm5.train.data import PackedRows
from glm5.train.trainer import Trainer

pytestmark = pytest.mark.gpu


def test_two_cuda_steps_follow_the_cpu_steps(tmp_path):
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    rows = PackedRows(ids, ids.clone())
    losses = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = GLM5ForCausalLM(tiny_config(index_topk=8)).to(device)
        config = TrainConfig(steps=2, batch_size=4, warmup=0, progress=False)
        trainer = Trainer(model, rows, config, out_dir=tmp_path / device)
        losses[device] = [trainer.train_step()["loss"] for _ in range(2)]
        assert next(trainer.inner.parameters()).device.type == device
    assert losses["cuda"] == pytest.approx(losses["cpu"], abs=1e-4), losses


def test_the_train_cli_trains_on_cuda(tmp_path, capsys):
    from glm5.cli import main

    (tmp_path / "d.txt").write_text("some words to train on, again and again. " * 200)
    assert main(["train", "pretrain", "--data", str(tmp_path / "d.txt"), "--preset", "nano", "--steps", "2",
                 "--batch-size", "2", "--seq-len", "64", "--no-progress", "--device", "cuda",
                 "--out", str(tmp_path / "run")]) == 0
    assert "on cuda" in capsys.readouterr().out
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
