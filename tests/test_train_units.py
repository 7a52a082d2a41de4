"""Training library, piece by piece: schedules, Muon, SFT masking, packing and sharding, MoE balancing,
the DSA stages' gradients, and the clear errors for bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import randomize_, tiny_config

from glm5.model.transformer import GLM5ForCausalLM
from glm5.train import losses
from glm5.train.checkpoints import load_checkpoint, save_checkpoint
from glm5.train.config import TrainConfig
from glm5.train.data import IGNORE_INDEX, Batches, PackedRows, load_documents, pack_conversations, pack_documents
from glm5.train.moe_balance import imbalance, update_router_bias
from glm5.train.optim import Muon, build_optimizer, lr_factor, newton_schulz
from glm5.train.resources import check_fits_memory
from glm5.train.trainer import Trainer, configure_stage


def rows_of(n=16, seq=32, vocab=256, seed=0):
    ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))
    return PackedRows(ids, ids.clone())


# ---- schedules and optimizers ------------------------------------------------------------------------
def test_cosine_schedule_warms_up_then_decays_to_min_ratio():
    f = [lr_factor(s, 100, "cosine", warmup=10, min_ratio=0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])), "cosine must not rise after warm-up"
    assert f[-1] == pytest.approx(0.1)


def test_wsd_schedule_is_flat_then_decays_linearly():
    f = [lr_factor(s, 100, "wsd", warmup=10, min_ratio=0.0, decay_fraction=0.2) for s in range(100)]
    assert all(x == 1.0 for x in f[10:80]), "stable phase must hold the peak"
    assert f[-1] == pytest.approx(0.0) and f[90] < f[85] < 1.0


def test_newton_schulz_orthogonalizes():
    g = torch.randn(3, 32, 16, generator=torch.Generator().manual_seed(0))
    x = newton_schulz(g, steps=10)
    s = torch.linalg.svdvals(x)
    # Muon's quintic iteration drives singular values into roughly [0.7, 1.2], not exactly 1
    assert s.min() > 0.5 and s.max() < 1.3, f"singular values {s.min():.3f}..{s.max():.3f}"


def test_muon_reduces_a_matrix_regression_loss():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(8, 16))
    target = torch.randn(8, 16)
    opt = Muon([w], lr=0.3)
    first = None
    for step in range(50):
        opt.param_groups[0]["lr"] = 0.3 * (1 - step / 50)  # an orthogonal step has a fixed size: decay it
        loss = ((w - target) ** 2).mean()
        first = first or float(loss.detach())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert float(loss.detach()) < 0.1 * first, f"loss {first:.3f} -> {float(loss.detach()):.3f}"


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    model = GLM5ForCausalLM(tiny_config())
    opt = build_optimizer(model, "muon")
    muon, adamw = opt.optimizers
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for g in muon.param_groups for p in g["params"])
    assert not any("embed_tokens" in names[i] or "lm_head" in names[i] or "gate.weight" in names[i] for i in muon_ids)
    assert id(model.model.layers[0].self_attn.q_a_proj.weight) in muon_ids
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_adamw_is_fused_on_cpu_and_matches_the_per_parameter_loop():
    torch.manual_seed(0)
    model = GLM5ForCausalLM(tiny_config())
    twin = GLM5ForCausalLM(tiny_config())
    twin.load_state_dict(model.state_dict())
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, "adamw", lr=1e-2, weight_decay=0.1)
    (adamw,) = opt.optimizers
    assert all(g["fused"] for g in adamw.param_groups)
    # the reference: torch's per-parameter loop, same groups and hyper-parameters
    named = [(n, p) for n, p in twin.named_parameters()]
    ref = torch.optim.AdamW([{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    for m, o in ((model, opt), (twin, ref)):
        for _ in range(3):
            m(ids).logits.float().logsumexp(-1).mean().backward()
            o.step()
            o.zero_grad()
    moved = max((p - q).abs().max().item() for p, q in zip(model.parameters(), twin.parameters()))
    assert moved < 1e-5, moved
    w = "model.layers.0.self_attn.q_a_proj.weight"
    assert (dict(model.named_parameters())[w] - start[w]).abs().max() > 1e-3  # and the update was not a no-op


# ---- data ---------------------------------------------------------------------------------------------
def test_pack_documents_joins_with_eos_and_cuts_rows():
    rows = pack_documents([[1, 2, 3], [4, 5]], seq_len=3, eos_id=0)
    assert rows.ids.tolist() == [[1, 2, 3], [0, 4, 5]]
    assert torch.equal(rows.ids, rows.labels)


def test_sft_labels_only_on_assistant_tokens():
    from glm5.chat import render_messages_with_mask
    from glm5.tokenizer import default_tokenizer

    tok = default_tokenizer()
    conv = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello you"}]
    ids, mask = render_messages_with_mask(conv, tok)
    rows = pack_conversations([(ids, mask)], seq_len=64, pad_id=tok.pad_token_id)
    labels = rows.labels[0, : len(ids)].tolist()
    learned = tok.decode([i for i in labels if i != IGNORE_INDEX])
    assert "hello you" in learned and "hi there" not in learned, learned
    assert learned.endswith("<|endoftext|>")
    assert (rows.labels[0, len(ids):] == IGNORE_INDEX).all(), "padding must not be a target"
    # the model's loss then covers exactly the masked-in positions
    assert sum(mask) == sum(1 for i in labels if i != IGNORE_INDEX)


def test_batches_shard_deterministically_and_resume():
    rows = rows_of(10)
    single = Batches(rows, batch_size=4, seed=3)
    ranks = [Batches(rows, batch_size=4, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(6):  # crosses an epoch boundary
        ids, _ = single.next()
        assert torch.equal(ids, torch.cat([b.next()[0] for b in ranks]))
    resumed = Batches(rows, batch_size=4, seed=3)
    resumed.load_state_dict(single.state_dict())
    assert torch.equal(resumed.next()[0], single.next()[0])


def test_stratified_batches_keep_the_group_mix_shard_and_resume():
    a, b = rows_of(30, seed=1), rows_of(10, seed=2)
    rows = PackedRows.concat([a, b])
    single = Batches(rows, batch_size=4, seed=5)
    assert single.counts == [3, 1]
    ranks = [Batches(rows, batch_size=4, seed=5, rank=r, world_size=2) for r in range(2)]
    seen = []
    for _ in range(25):  # crosses both groups' epoch boundaries
        index = single.indices(single.position)
        assert [int(rows.groups[i]) for i in index] == [0, 0, 0, 1], "every batch holds 3 rows of group 0, 1 of group 1"
        seen += index
        ids, _ = single.next()
        assert torch.equal(ids, torch.cat([r.next()[0] for r in ranks]))
    assert sorted(i for i in seen[:40] if i >= 30) == sorted(set(i for i in seen[:40] if i >= 30)), "group 1 epoch repeats no row"
    assert set(seen) == set(range(40))
    resumed = Batches(rows, batch_size=4, seed=5)
    resumed.load_state_dict(single.state_dict())
    assert torch.equal(resumed.next()[0], single.next()[0])
    # rows without groups: the stream is the plain shuffled one
    plain, grouped = Batches(a, batch_size=4, seed=5), Batches(PackedRows.concat([a]), batch_size=4, seed=5)
    for _ in range(9):
        assert torch.equal(plain.next()[0], grouped.next()[0])


def test_loaders_read_jsonl_and_text(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    (tmp_path / "b.txt").write_text("three")
    assert load_documents(tmp_path) == ["one", "two", "three"]


def test_parquet_loader(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha", "beta"]}), tmp_path / "d.parquet")
    assert load_documents(tmp_path / "d.parquet") == ["alpha", "beta"]


def test_hugging_face_dataset_saved_to_disk_loads(tmp_path):
    datasets = pytest.importorskip("datasets")

    datasets.Dataset.from_dict({"text": ["gamma", "delta", "epsilon"]}).save_to_disk(str(tmp_path / "hf"))
    assert load_documents(tmp_path / "hf") == ["gamma", "delta", "epsilon"]


# ---- MoE balancing --------------------------------------------------------------------------------------
def test_router_bias_moves_toward_underloaded_experts():
    model = GLM5ForCausalLM(tiny_config())
    moes = losses.moe_modules(model)
    load = torch.tensor([10.0, 0.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0])  # mean 4
    update_router_bias(moes[:1], [load], speed=0.01)
    bias = moes[0].gate.e_score_correction_bias
    assert bias[0] < 0 and bias[1] > 0 and bias[2] > 0 and bias[3] == 0, bias
    assert imbalance(load) == pytest.approx(2.5)


def test_sequence_balance_loss_is_lower_when_balanced():
    model = GLM5ForCausalLM(tiny_config())
    moe = losses.moe_modules(model)[0]
    E = 8
    balanced_scores = torch.full((16, E), 0.5)
    balanced_idx = torch.arange(32).view(16, 2) % E
    moe.last_routing = (balanced_scores, balanced_idx)
    balanced = float(losses.sequence_balance_loss([moe], 2))
    skewed_scores = torch.full((16, E), 0.01)
    skewed_scores[:, :2] = 0.99
    moe.last_routing = (skewed_scores, torch.tensor([[0, 1]] * 16))
    skewed = float(losses.sequence_balance_loss([moe], 2))
    assert balanced == pytest.approx(1.0, rel=1e-5) and skewed > 3 * balanced


# ---- DSA stages ---------------------------------------------------------------------------------------
def _grads_after(model, stage, seq=48):
    configure_stage(model, stage)
    ids = torch.randint(0, 256, (2, seq), generator=torch.Generator().manual_seed(1))
    out = model(ids, return_mtp=True)
    lm, n = losses.lm_loss_sum(out.logits, ids)
    kl = losses.indexer_kl(model)
    return out, lm / n, kl


def test_warmup_trains_only_the_indexer():
    torch.manual_seed(0)
    model = GLM5ForCausalLM(tiny_config(index_topk=8))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, rows_of(8, 48), TrainConfig(stage="dsa-warmup", steps=3, batch_size=2, warmup=0,
                                                         progress=False, lr=1e-2), out_dir="/tmp/unused-warmup")
    trainer.train_step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".indexer." in n for n in changed), sorted(changed)[:5]
    assert any("mtp.0.self_attn.indexer" in n for n in changed), "the MTP layer's indexer trains too"


def test_warmup_kl_is_against_dense_attention_and_falls():
    torch.manual_seed(0)
    model = GLM5ForCausalLM(tiny_config(index_topk=8, initializer_range=0.2))
    trainer = Trainer(model, rows_of(8, 48), TrainConfig(stage="dsa-warmup", steps=30, batch_size=4, warmup=0,
                                                         progress=False, lr=1e-2), out_dir="/tmp/unused-warmup2")
    kls = [trainer.train_step()["loss"] for _ in range(30)]
    assert kls[-1] < 0.7 * kls[0], f"indexer KL {kls[0]:.4f} -> {kls[-1]:.4f}"
    assert all(attn.dense_attention for attn in losses.attention_modules(model))


def test_sparse_stage_detaches_the_indexer_input():
    torch.manual_seed(0)
    model = GLM5ForCausalLM(tiny_config(index_topk=8))
    _, lm, kl = _grads_after(model, "dsa-sparse")
    # the LM loss reaches no indexer weight (selection is not differentiable)
    lm.backward(retain_graph=True)
    for name, p in model.named_parameters():
        if ".indexer." in name:
            assert p.grad is None or p.grad.abs().sum() == 0, name
    model.zero_grad(set_to_none=True)
    # the KL reaches only indexer weights: its input is detached from the model below it
    kl.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(".indexer." in n for n in with_grad), sorted(with_grad)[:5]


def test_sparse_stage_kl_is_over_the_selected_keys_only():
    torch.manual_seed(0)
    model = GLM5ForCausalLM(tiny_config(index_topk=8))
    out, _, kl_sparse = _grads_after(model, "dsa-sparse")
    assert out.topk_indices[0] is not None and out.topk_indices[0].shape[-1] == 8
    _, _, kl_dense = _grads_after(model, "dsa-warmup")
    assert math.isfinite(float(kl_sparse)) and float(kl_sparse) != pytest.approx(float(kl_dense))


def test_normal_forward_unchanged_after_training_switches_are_released():
    from glm5.train.trainer import release_stage

    torch.manual_seed(0)
    model = GLM5ForCausalLM(tiny_config(index_topk=8)).eval()
    ids = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        before = model(ids).logits
        configure_stage(model, "dsa-sparse")
        release_stage(model)
        after = model(ids).logits
    assert torch.equal(before, after)


def test_every_stage_reduces_its_loss_on_repeated_data():
    torch.manual_seed(0)
    model = GLM5ForCausalLM(tiny_config(index_topk=8))
    rows = rows_of(4, 48)
    for stage, lr in (("pretrain", 1e-2), ("dsa-sparse", 3e-3), ("sft", 3e-3)):
        trainer = Trainer(model, rows, TrainConfig(stage=stage, steps=15, batch_size=4, warmup=0, progress=False, lr=lr),
                          out_dir="/tmp/unused-stages")
        losses_seen = [trainer.train_step()["loss"] for _ in range(15)]
        assert losses_seen[-1] < losses_seen[0] - 0.3, f"{stage}: {losses_seen[0]:.3f} -> {losses_seen[-1]:.3f}"


def test_probe_rows_are_scored_at_the_stage_start_and_end_under_its_attention(tmp_path):
    from glm5.train.report import stage_table

    torch.manual_seed(0)
    model = GLM5ForCausalLM(tiny_config(index_topk=8))
    rows = rows_of(4, 48)
    probe = rows.take(slice(0, 2))
    dense_end = None  # the probe's LM loss at the end of the last dense stage
    for stage in ("pretrain", "dsa-warmup", "dsa-sparse"):
        config = TrainConfig(stage=stage, steps=12, batch_size=4, warmup=0, progress=False, lr=1e-2 if stage != "dsa-warmup" else 5e-3)
        trainer = Trainer(model, rows, config, out_dir=tmp_path, probe=probe)
        if stage == "dsa-sparse":  # the start is scored under the stage's own (sparse) attention
            assert trainer.score(probe)["lm_loss"] != pytest.approx(dense_end, abs=1e-6)
        summary = trainer.run()
        start, end = summary["probe_start"], summary["probe_end"]
        assert start["rows"] == end["rows"] == 2 and start["targets"] == end["targets"]
        assert end["loss"] < start["loss"], f"{stage}: {start['loss']:.3f} -> {end['loss']:.3f}"
        if stage == "dsa-warmup":
            assert start["loss"] == start["indexer_kl"] and end["lm_loss"] == pytest.approx(start["lm_loss"], abs=1e-5)
        else:
            assert start["loss"] == start["lm_loss"]
        if stage == "pretrain":
            assert start["indexer_kl"] is None
        dense_end = end["lm_loss"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    table = stage_table(records, {"dsa-sparse": {"start": start, "end": end}})
    assert table[-1]["probe_start"] == start["loss"] and table[-1]["probe_end"] == end["loss"]
    assert "probe_start" not in table[0]


def test_mtp_loss_targets_token_t_plus_two():
    labels = torch.tensor([[5, 6, 7, 8]])
    logits = torch.full((1, 3, 10), -1e4)  # depth 1: positions 0..2 predict labels 2..4 (only 0, 1 usable)
    logits[0, 0, 7] = logits[0, 1, 8] = 1e4
    loss, acc = losses.mtp_loss([logits], labels)
    assert float(loss) < 1e-3 and acc == 1.0


# ---- bad input ----------------------------------------------------------------------------------------
def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"model": {}, "optimizer": {}, "step": 1, "stage": "pretrain", "data": {}, "rng": {}})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt checkpoint"):
        load_checkpoint(path)


def test_empty_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty dataset"):
        load_documents(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="empty dataset"):
        pack_documents([[1, 2]], seq_len=64, eos_id=0)


def test_sequence_longer_than_positions_is_a_clear_error():
    model = GLM5ForCausalLM(tiny_config(max_position_embeddings=32))
    with pytest.raises(ValueError, match="longer than the model's 32 positions"):
        Trainer(model, rows_of(4, 64), TrainConfig(steps=1, batch_size=2, progress=False), out_dir="/tmp/unused")


def test_config_that_cannot_fit_is_a_clear_error():
    from glm5.config import GLM5Config

    with pytest.raises(ValueError, match="cannot fit in memory"):
        check_fits_memory(GLM5Config.from_preset("glm5-744b"), 1, 1024, available=64 << 30)
    check_fits_memory(GLM5Config.from_preset("nano"), 8, 256, available=8 << 30)


def test_sparse_as_mask_matches_the_gathered_sparse_path():
    torch.manual_seed(0)
    model = GLM5ForCausalLM(tiny_config(index_topk=8)).eval()
    ids = torch.randint(0, 256, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad():
        gathered = model(ids, attention_mask=mask).logits
        for attn in losses.attention_modules(model):
            attn.sparse_as_mask = True
        masked = model(ids, attention_mask=mask).logits
    diff = (gathered - masked)[mask.bool()].abs().max().item()
    assert diff < 1e-5, f"max |masked - gathered| = {diff:.2e}"


def test_eval_scores_tool_calls_and_heldout_loss():
    from glm5.tokenizer import default_tokenizer
    from glm5.train.conversations import make_task
    from glm5.train.evaluate import heldout_loss, tool_call_eval

    tok = default_tokenizer()
    torch.manual_seed(0)
    model = GLM5ForCausalLM(tiny_config(vocab_size=tok.vocab_size, index_topk=16))
    import random

    tasks = [make_task(random.Random(i)) for i in range(2)]
    result = tool_call_eval(model, tok, tasks, max_new_tokens=3)
    assert 0 <= result["accuracy"] <= result["tool_accuracy"] <= result["validity"] <= 1
    assert len(result["samples"]) == 2
    rows = rows_of(4, 40, vocab=tok.vocab_size)
    assert abs(heldout_loss(model, rows) - heldout_loss(model, rows.take([0, 1, 2, 3]))) < 1e-6
    loss = heldout_loss(model, rows)
    assert abs(loss - math.log(tok.vocab_size)) < 0.5, f"an untrained model's loss {loss:.3f} should be near ln(V)"


def test_tool_call_eval_scores_each_kind_of_answer(monkeypatch):
    """The scoring itself, on fixed answers: exact, right tool with a wrong argument, malformed, wrong tool."""
    import random

    from glm5.tokenizer import default_tokenizer
    from glm5.train import evaluate
    from glm5.train.conversations import make_task

    rng = random.Random(0)
    tasks = []
    while len(tasks) < 4:  # four weather requests (one tool, one string argument)
        task = make_task(rng)
        if task["expected"]["name"] == "get_weather":
            tasks.append(task)
    city = [t["expected"]["arguments"]["city"] for t in tasks]
    answers = [
        f"<tool_call>get_weather<arg_key>city</arg_key><arg_value>{city[0]}</arg_value></tool_call>",
        f"<tool_call>get_weather<arg_key>city</arg_key><arg_value>{city[1]}x</arg_value></tool_call>",
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>",
        "<tool_call>add<arg_key>a</arg_key><arg_value>1</arg_value><arg_key>b</arg_key><arg_value>2</arg_value></tool_call>",
    ]
    monkeypatch.setattr(evaluate, "generate", lambda model, tok, prompts, max_new_tokens: answers[: len(prompts)])
    result = evaluate.tool_call_eval(None, default_tokenizer(), tasks)
    assert [(s["valid"], s["right_tool"], s["correct"]) for s in result["samples"]] == [
        (True, True, True), (True, True, False), (False, False, False), (True, False, False)]
    assert (result["validity"], result["tool_accuracy"], result["accuracy"]) == (0.75, 0.5, 0.25)


def test_keep_freed_memory_on_glibc():
    import platform

    from glm5.common import keep_freed_memory

    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is expected


@pytest.mark.parametrize("sparse", [False, True])
def test_indexer_kl_matches_a_per_query_reference(sparse):
    """MLAttention._indexer_kl = mean over queries of KL(p || softmax(I)), p = per-head attention probabilities
    summed and renormalized, computed here one query and one head at a time; its gradient reaches the indexer."""
    torch.manual_seed(0)
    cfg = tiny_config(index_topk=6)
    attn = GLM5ForCausalLM(cfg).model.layers[0].self_attn
    B, T, H = 2, 12, cfg.num_attention_heads
    x = torch.randn(B, T, cfg.hidden_size)
    cos, sin = GLM5ForCausalLM(cfg).model.rotary_emb(torch.arange(T).unsqueeze(0), x.dtype)
    positions = torch.arange(T).unsqueeze(0)
    key_mask = torch.ones(B, T, dtype=torch.bool)
    key_mask[1, :3] = False  # left padding: row 1's first 3 queries see nothing
    q_nope, q_rope, q_resid = attn.project_q(x, cos, sin)
    kv = attn.project_latent(x, cos, sin)
    q_idx, w_idx = attn.indexer.queries(x, q_resid, cos, sin)
    k_idx = attn.indexer.keys(x, cos, sin)
    topk = torch.stack([torch.stack([torch.randperm(T)[:6] for _ in range(T)]) for _ in range(B)]) if sparse else None
    kl = attn._indexer_kl(q_idx, w_idx, k_idx, q_nope, q_rope, kv, topk, positions, key_mask)

    w_uk, _ = attn.absorbed_weights()
    index_scores = attn.indexer.scores(q_idx, w_idx, k_idx)
    total, count = 0.0, 0
    for b in range(B):
        for s in range(T):
            keys = [t for t in range(T) if t <= s and key_mask[b, t] and (topk is None or t in topk[b, s].tolist())]
            if not keys:
                continue
            keys = torch.tensor(keys)
            p = torch.zeros(len(keys))
            for h in range(H):
                qh = torch.cat([q_nope[b, s, h] @ w_uk[h], q_rope[b, s, h]])
                p += torch.softmax((kv[b, keys] @ qh) * attn.scale, dim=0).detach()
            p = p / p.sum()
            log_q = torch.log_softmax(index_scores[b, s, keys], dim=0)
            total = total + (p * (p.log() - log_q)).sum()
            count += 1
    reference = total / count
    assert torch.allclose(kl, reference, atol=1e-5), (float(kl), float(reference))
    (grad,) = torch.autograd.grad(kl, attn.indexer.wk.weight, retain_graph=True)
    (ref_grad,) = torch.autograd.grad(reference, attn.indexer.wk.weight)
    assert torch.allclose(grad, ref_grad, atol=1e-6) and grad.abs().sum() > 0

def test_training_chats_draw_wide_values_and_eval_requests_stay_held_out():
    import random

    from glm5.train.conversations import CAPITALS, CITIES, capital_of, make_conversation, make_task, split_of
    from glm5.train.corpus import build_demo_corpus

    rng = random.Random(0)
    chats = [make_conversation(rng, "train", wide=True) for _ in range(300)]
    calls = [m["tool_calls"][0]["function"] for c in chats for m in c["messages"] if m.get("tool_calls")]
    cities = [f["arguments"]["city"] for f in calls if f["name"] == "get_weather"]
    countries = [f["arguments"]["country"] for f in calls if f["name"] == "get_capital"]
    numbers = [v for f in calls if f["name"] == "add" for v in f["arguments"].values()]
    assert 0.3 < sum(c not in CITIES for c in cities) / len(cities) < 0.7, "about half the cities are made up"
    assert len(set(cities)) > 60 and max(numbers) > 99 and any(c not in CAPITALS for c in countries)
    made_up = next(c for c in countries if c not in CAPITALS)
    assert capital_of(made_up) == capital_of(made_up) and capital_of("France") == "Paris"
    requests = {m["content"] for c in chats for m in c["messages"] if m["role"] == "user"}
    assert all(split_of(r) == "train" for r in requests)
    tasks = [make_task(random.Random(i)) for i in range(40)]
    for t in tasks:  # eval: real names, requests of the eval split only
        assert split_of(t["messages"][0]["content"]) == "eval"
        args = t["expected"]["arguments"]
        assert args.get("city", "Oslo") in CITIES and args.get("country", "France") in CAPITALS
        assert all(v <= 99 for k, v in args.items() if k in ("a", "b"))
    corpus = build_demo_corpus(stdlib_bytes=100_000, conversations=30, sft_conversations=20, tasks=5)
    assert sorted(corpus.train_texts) == sorted(corpus.train_code + corpus.train_chats)
    rendered_train = "".join(corpus.train_texts)
    assert not any(t["messages"][0]["content"] in rendered_train for t in corpus.tasks)


def test_copy_drills_repeat_their_list():
    import random

    from glm5.train.corpus import build_demo_corpus, copy_drill

    listed, again = copy_drill(random.Random(3)).splitlines()
    assert listed.startswith("list: ") and again == "again: " + listed[len("list: "):]
    base = build_demo_corpus(stdlib_bytes=100_000, conversations=10, sft_conversations=8, tasks=3)
    drilled = build_demo_corpus(stdlib_bytes=100_000, conversations=10, sft_conversations=8, tasks=3, copy_drills=7)
    assert len(drilled.train_chats) == len(base.train_chats) + 7
    assert sum(t.startswith("list: ") for t in drilled.train_texts) == 7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_with_targets_gives_the_logits_losses_and_gradients(dtype):
    """model(ids, targets=labels) (the trainer's step: fused chunked CE, no logits tensor in fp32) equals
    lm_loss_sum / mtp_loss_sums over the logits, value and every gradient; -100 targets count nothing."""
    from glm5 import GLM5ForCausalLM

    torch.manual_seed(0)
    model = randomize_(GLM5ForCausalLM(tiny_config(index_topk=8))).to(dtype)
    ids = torch.randint(0, 256, (3, 30), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :5] = -100
    labels[2, -3:] = -100
    out = model(ids, return_mtp=True)
    lm, n = losses.lm_loss_sum(out.logits, labels)
    mtp, correct, counted = losses.mtp_loss_sums(out.mtp_logits, labels)
    (lm + sum(mtp)).backward()
    want = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    fused = model(ids, return_mtp=True, targets=labels)
    assert fused.logits is None and fused.mtp_logits is None
    (fused.lm_loss_sum + sum(fused.mtp_loss_sums)).backward()
    got = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(fused.lm_loss_sum, lm, rtol=tol) and len(fused.mtp_loss_sums) == len(mtp)
    assert all(torch.allclose(a, b, rtol=tol) for a, b in zip(fused.mtp_loss_sums, mtp))
    assert (fused.mtp_correct, fused.mtp_counted) == (correct, counted)
    assert got.keys() == want.keys()
    for k in want:
        assert (got[k].float() - want[k].float()).abs().max() <= tol * max(1.0, want[k].float().abs().max()), k
    with pytest.raises(ValueError, match="not both"):
        model(ids, labels=ids, targets=labels)
    with pytest.raises(ValueError, match="targets must match"):
        model(ids, targets=labels[:, :-1])


def test_linear_cross_entropy_chunks_and_no_grad_path():
    from glm5.model.loss import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(37, 16, generator=g), torch.randn(50, 16, generator=g)
    targets = torch.randint(0, 50, (37,), generator=g)
    targets[[3, 20]] = -100
    logits = hidden @ weight.t()
    want = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    want_correct = int(((logits.argmax(-1) == targets) & (targets != -100)).sum())
    for chunk in (1, 5, 37, 64):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        total, correct = linear_cross_entropy(h, w, targets, count_correct=True, chunk=chunk)
        assert torch.allclose(total, want) and correct == want_correct
        (2 * total).backward()
        h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        (2 * torch.nn.functional.cross_entropy(h2 @ w2.t(), targets, ignore_index=-100, reduction="sum")).backward()
        assert torch.allclose(h.grad, h2.grad, atol=1e-5) and torch.allclose(w.grad, w2.grad, atol=1e-5)
        with torch.no_grad():
            assert torch.allclose(linear_cross_entropy(hidden, weight, targets, chunk=chunk)[0], want)
