"""Training-library edge cases (each test failed before its fix): MTP off, MTP loss under
accumulation on masked rows, stratified batches under accumulation, metrics after a restart, loaders, temp
checkpoint files, the memory check with micro-batches, and clear errors for bad settings."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config

from glm5.model.transformer import GLM5ForCausalLM
from glm5.train.config import TrainConfig
from glm5.train.data import IGNORE_INDEX, PackedRows, load_documents
from glm5.train.trainer import Trainer


def rows_of(n=8, seq=16, vocab=256, seed=0):
    ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))
    return PackedRows(ids, ids.clone())


def model_of(seed=0):
    torch.manual_seed(seed)
    return GLM5ForCausalLM(tiny_config(index_topk=8, num_hidden_layers=2))


def quick(**kw):
    return TrainConfig(**{"steps": 2, "batch_size": 2, "warmup": 0, "progress": False, **kw})


def test_mtp_weight_zero_trains_and_a_later_stage_ignores_old_routing(tmp_path):
    model = model_of()
    # the MTP layer is an MoE: with mtp_weight 0 it does not run, and its load is zero, not a crash
    record = Trainer(model, rows_of(), quick(mtp_weight=0.0), out_dir=tmp_path / "a").train_step()
    assert torch.isfinite(torch.tensor(record["loss"])) and sum(record["expert_load"][-1]) == 0
    # pretraining with MTP leaves routing in the MTP layer's MoE; SFT without MTP must not read it
    Trainer(model, rows_of(seed=1), quick(), out_dir=tmp_path / "b").train_step()
    sft = Trainer(model, rows_of(seed=2), quick(stage="sft", mtp_weight=0.0), out_dir=tmp_path / "b")
    for _ in range(2):
        assert sum(sft.train_step()["expert_load"][-1]) == 0


def _masked_rows(n=8, seq=16):
    ids = torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i in range(n):  # assistant spans of very different lengths: micro-batches with unequal target counts
        start = 2 if i % 2 else seq - 5
        labels[i, start:] = ids[i, start:]
    return PackedRows(ids, labels)


def _step_grads(rows, micro, tmp_path):
    trainer = Trainer(model_of(), rows, quick(steps=1, batch_size=8, micro_batch_size=micro, grad_clip=0),
                      out_dir=tmp_path / f"m{micro}")
    grads = {}
    trainer.optimizer.step = lambda: grads.update(
        {n: p.grad.clone() for n, p in trainer.inner.named_parameters() if p.grad is not None})
    return grads, trainer.train_step()


def test_accumulation_matches_one_batch_on_masked_rows_mtp_included(tmp_path):
    rows = _masked_rows()
    ref, ref_record = _step_grads(rows, 8, tmp_path)
    assert any(n.startswith("mtp.") for n in ref)
    for micro in (4, 2):
        grads, record = _step_grads(rows, micro, tmp_path)
        worst = max(((grads[n] - ref[n]).norm() / (ref[n].norm() + 1e-30)).item() for n in ref)
        assert worst < 1e-5, (micro, worst)
        assert abs(record["mtp_loss"] - ref_record["mtp_loss"]) < 1e-5
        assert record["mtp_acc"] == pytest.approx(ref_record["mtp_acc"])


def test_stratified_batches_do_not_depend_on_the_micro_batch(tmp_path):
    rows = PackedRows.concat([rows_of(90, 16, seed=1), rows_of(10, 16, seed=2)])
    shares = []
    for micro in (8, 4, 2):
        trainer = Trainer(model_of(), rows, quick(steps=4, batch_size=8, micro_batch_size=micro), out_dir=tmp_path)
        seen, real_next = [], trainer.batches.next

        def recording_next(trainer=trainer, seen=seen, real_next=real_next):
            seen.extend(trainer.batches.indices(trainer.batches.position))
            return real_next()

        trainer.batches.next = recording_next
        for _ in range(3):
            trainer.train_step()
        assert len(seen) == 24
        shares.append(sum(int(rows.groups[i]) for i in seen))
    assert shares[0] == shares[1] == shares[2] == 3, shares  # one small-group row per step of 8, whatever the micro


def test_a_restart_does_not_log_steps_twice_and_survives_a_cut_line(tmp_path):
    cfg = dict(steps=4, batch_size=2, warmup=0, progress=False)
    trainer = Trainer(model_of(), rows_of(), TrainConfig(**cfg), out_dir=tmp_path)
    real_step, done = trainer.train_step, [0]

    def killed_after_three():
        if done[0] == 3:
            raise KeyboardInterrupt
        done[0] += 1
        return real_step()

    trainer.train_step = killed_after_three
    with pytest.raises(KeyboardInterrupt):
        trainer.run()  # no checkpoint yet (save_every 0), three metrics lines
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"stage": "pretrain", "step": 4, "lo')  # killed mid-write
    Trainer(model_of(), rows_of(), TrainConfig(**cfg), out_dir=tmp_path).run(resume=True)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]


def test_json_files_and_dataset_dict_folders_load(tmp_path):
    (tmp_path / "data.json").write_text(json.dumps([{"text": "alpha"}, {"text": "beta"}]))
    assert load_documents(tmp_path / "data.json") == ["alpha", "beta"]
    (tmp_path / "bad.json").write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match="jsonl"):
        load_documents(tmp_path / "bad.json")
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["gamma", "delta"]})}).save_to_disk(
        str(tmp_path / "dd"))
    assert load_documents(tmp_path / "dd") == ["gamma", "delta"]


def test_a_failed_checkpoint_write_leaves_no_temp_file(tmp_path, monkeypatch):
    from glm5.train import checkpoints

    def disk_full(obj, f):
        open(f, "wb").write(b"x" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", disk_full)
    with pytest.raises(OSError):
        checkpoints.save_checkpoint(tmp_path, 1, {"step": 1})
    assert os.listdir(tmp_path) == []


def test_the_memory_check_sizes_a_micro_batch(tmp_path, monkeypatch, capsys):
    from glm5.cli import main
    from glm5.train import resources

    monkeypatch.setattr(resources, "available_memory_bytes", lambda device=None: 2**30)  # 1 GiB
    (tmp_path / "d.txt").write_text("some words to train on. " * 200)
    argv = ["train", "pretrain", "--data", str(tmp_path / "d.txt"), "--preset", "nano", "--steps", "1",
            "--seq-len", "64", "--no-progress", "--batch-size", "256"]
    assert main([*argv, "--out", str(tmp_path / "a")]) != 0  # 256 rows of activations at once: not in 1 GiB
    assert "cannot fit in memory" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "b"), "--micro-batch-size", "2"]) == 0  # 2 rows at a time do


@pytest.mark.parametrize("change, rows, world, match", [
    (dict(log_every=0), rows_of(), 1, "log_every"),
    (dict(micro_batch_size=-2), rows_of(), 1, "micro_batch_size"),
    (dict(batch_size=1), rows_of(), 2, "processes"),
    ({}, rows_of(seq=1), 1, "at least 2 tokens"),
])
def test_bad_settings_are_clear_errors(tmp_path, change, rows, world, match):
    with pytest.raises(ValueError, match=match):
        Trainer(model_of(), rows, quick(**change), out_dir=tmp_path, world_size=world)


def test_train_cli_device_choice(tmp_path, capsys):
    from glm5.cli import main
    from glm5.train.parallel import training_device

    assert training_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert training_device("auto") == torch.device("cpu")
    (tmp_path / "d.txt").write_text("some words to train on. " * 100)
    assert main(["train", "pretrain", "--data", str(tmp_path / "d.txt"), "--preset", "nano", "--steps", "1",
                 "--batch-size", "2", "--seq-len", "32", "--no-progress", "--device", "cpu",
                 "--out", str(tmp_path / "run")]) == 0
    assert "process(es) on cpu" in capsys.readouterr().out


def test_a_data_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8"):
        load_documents(tmp_path / "latin1.txt")


def test_padding_is_neither_throughput_nor_expert_load(tmp_path):
    """Padded SFT rows: tokens/s and the per-layer expert load (which moves the router bias) count only each
    row's tokens up to its last target."""
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 4:10] = ids[0, 4:10]  # row 0: 10 real tokens, then 6 of padding
    labels[1, 2:16] = ids[1, 2:16]  # row 1: all 16 real
    model = model_of()
    trainer = Trainer(model, PackedRows(ids, labels), quick(stage="sft", steps=1), out_dir=tmp_path)
    record = trainer.train_step()
    assert record["step_tokens"] == 26
    k = model.config.num_experts_per_tok
    main_layers = [load for load, moe in zip(record["expert_load"], trainer.moes) if moe is not trainer.moes[-1]]
    assert all(sum(load) == 26 * k for load in main_layers)
    assert sum(record["expert_load"][-1]) == (10 + 15) * k  # the MTP layer routes the first T - 1 positions


def test_mtp_accuracy_is_none_when_nothing_was_measured(tmp_path):
    record = Trainer(model_of(), rows_of(), quick(mtp_weight=0.0), out_dir=tmp_path).train_step()
    assert record["mtp_acc"] is None and record["mtp_loss"] == 0


def test_sft_reports_the_conversations_longer_than_a_row_and_truncate_keeps_them(tmp_path, capsys):
    from glm5.cli import main

    chats = tmp_path / "chats.jsonl"
    with open(chats, "w") as fh:
        fh.write(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
        for i in range(4):  # a long question: the answer lies past --seq-len
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"question {i} " + "word " * 80},
                                              {"role": "assistant", "content": "answer"}]}) + "\n")
    common = ["--data", str(chats), "--preset", "nano", "--steps", "1", "--batch-size", "1", "--seq-len", "64",
              "--no-progress", "--device", "cpu", "--threads", "1"]
    assert main(["train", "sft", *common, "--out", str(tmp_path / "drop")]) == 0
    out = capsys.readouterr().out
    assert "5 conversations, 1 kept; 4 longer than 64 tokens: 4 dropped (--truncate cuts them instead)" in out, out
    data = json.loads((tmp_path / "drop" / "data.json").read_text())
    assert (data["conversations"], data["kept"], data["dropped_longer"], data["rows"]) == (5, 1, 4, 1)
    assert main(["train", "sft", *common, "--truncate", "--out", str(tmp_path / "cut")]) == 0
    out = capsys.readouterr().out
    # cut to their first 64 tokens, the long ones keep no assistant token (the answer was past the cut)
    assert "4 longer than 64 tokens: 4 cut to 64; 4 dropped with no assistant token left after the cut" in out, out
    assert json.loads((tmp_path / "cut" / "data.json").read_text())["truncated"] == 4


def test_bf16_refused_on_a_cpu_without_native_bf16(monkeypatch):
    from glm5.train import resources

    monkeypatch.setattr(resources, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(ValueError, match="no native bf16"):
        resources.check_dtype_speed("bfloat16", "cpu")
    resources.check_dtype_speed("float32", "cpu")  # fp32 always runs
    resources.check_dtype_speed("bfloat16", "meta")  # only the CPU is judged here
    monkeypatch.setattr(resources, "cpu_has_native_bf16", lambda: True)
    resources.check_dtype_speed("bfloat16", "cpu")


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="ONEDNN_MAX_CPU_ISA=AVX2 is an x86 cap")
def test_native_bf16_reads_onednn_isa_cap():
    """An AVX2 cap (oneDNN's own switch) reads as a CPU without native bf16, in a fresh interpreter."""
    code = "from glm5.train.resources import cpu_has_native_bf16 as f; print(f())"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
