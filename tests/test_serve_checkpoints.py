"""`glm5 serve --model DIR` on real checkpoints: its own tokenizer (or a refusal), its own chat template, FP8
weights, and a one-line memory error for a model the machine cannot hold."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch
from conftest import tiny_config
from serve_helpers import running_server

from glm5.cli import build_parser, main

CUSTOM_TEMPLATE = ("{%- for m in messages -%}[{{ m.role | upper }}]{{ m.content }}{%- endfor -%}"
                   "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small model with the default tokenizer's 4,096 ids, saved with that tokenizer."""
    from glm5 import GLM5ForCausalLM
    from glm5.tokenizer import default_tokenizer

    directory = tmp_path_factory.mktemp("serve_ckpt") / "model"
    torch.manual_seed(0)
    GLM5ForCausalLM(tiny_config(vocab_size=4096, hidden_size=128, moe_intermediate_size=128)).save_pretrained(directory)
    default_tokenizer().save(directory)
    return directory


def copy_with(checkpoint, tmp_path, name, template=None, drop_tokenizer=False):
    directory = tmp_path / name
    shutil.copytree(checkpoint, directory)
    if template is not None:
        config = json.loads((directory / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if drop_tokenizer:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (directory / f).unlink()
    return directory


def served_prompt(argv, messages, reply: list | None = None) -> str:
    """The prompt text the server built for a chat request (the engine is scripted to answer 'ok'); the reply's
    message is appended to `reply`."""
    prompts: list[list[int]] = []
    with running_server(argv, script=["ok"], prompts=prompts) as (base, app):
        r = httpx.post(base + "/v1/chat/completions", json={"model": app.state.config.model_name, "messages": messages},
                       timeout=60)
        assert r.status_code == 200, r.text
        if reply is not None:
            reply.append(r.json()["choices"][0]["message"])
        return app.state.tokenizer.decode(prompts[0])


def test_a_checkpoint_without_a_tokenizer_is_refused_unless_one_is_given(checkpoint, tmp_path, capsys):
    bare = copy_with(checkpoint, tmp_path, "bare", drop_tokenizer=True)
    assert main(["serve", "--model", str(bare), "--port", "0"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no tokenizer.json" in err and "--tokenizer" in err, err
    text = served_prompt(["--model", str(bare), "--tokenizer", str(checkpoint / "tokenizer.json")],
                         [{"role": "user", "content": "hi"}])
    assert text.startswith("[gMASK]<sop>") and text.endswith("<|assistant|><think>"), text


def test_a_tokenizer_with_more_ids_than_the_model_is_refused(checkpoint, tmp_path, capsys):
    from glm5 import GLM5ForCausalLM

    small = tmp_path / "small"
    GLM5ForCausalLM(tiny_config(vocab_size=1000)).save_pretrained(small)
    assert main(["serve", "--model", str(small), "--tokenizer", str(checkpoint), "--port", "0"]) != 0
    err = capsys.readouterr().err.strip()
    assert "4096 ids" in err and "1000" in err and err.count("\n") == 0, err


def test_the_checkpoint_s_own_chat_template_renders_the_prompt_and_chat_template_overrides_it(checkpoint, tmp_path):
    own = copy_with(checkpoint, tmp_path, "own", template=CUSTOM_TEMPLATE)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    reply: list = []
    assert served_prompt(["--model", str(own)], messages, reply) == "[SYSTEM]Be brief.[USER]hi<|assistant|>"
    # this template opens no <think> block: the reply is content, not reasoning
    assert reply[0]["content"] == "ok" and reply[0].get("reasoning_content") is None, reply
    override = tmp_path / "override.jinja"
    override.write_text("{%- for m in messages -%}<{{ m.role }}>{{ m.content }}{%- endfor -%}<|assistant|>")
    assert served_prompt(["--model", str(own), "--chat-template", str(override)], messages) == \
        "<system>Be brief.<user>hi<|assistant|>"
    # the GLM-5 template itself (what Tokenizer.save writes) is rendered by glm5.chat, the same text
    assert served_prompt(["--model", str(checkpoint)], messages, reply) == \
        "[gMASK]<sop><|system|>Be brief.<|user|>hi<|assistant|><think>"
    assert reply[1]["reasoning_content"] == "ok", reply  # GLM-5's prompt opens the think block


def test_a_chat_template_that_cannot_render_is_refused_at_start(checkpoint, tmp_path, capsys):
    broken = copy_with(checkpoint, tmp_path, "broken", template="{% for m in messages %}{{ m.content ")
    assert main(["serve", "--model", str(broken), "--port", "0"]) != 0
    err = capsys.readouterr().err.strip()
    assert "chat_template" in err and "cannot render" in err and err.count("\n") == 0, err
    assert main(["serve", "--model", str(checkpoint), "--chat-template", str(tmp_path / "missing.jinja"),
                 "--port", "0"]) != 0
    assert "missing.jinja" in capsys.readouterr().err


def test_an_fp8_checkpoint_is_served_with_the_weights_load_fp8_model_reads(checkpoint, tmp_path):
    from glm5.quant.fp8 import load_fp8_model
    from glm5.serve.cli import build_server

    fp8 = tmp_path / "fp8"
    assert main(["quantize", "fp8", str(checkpoint), str(fp8)]) == 0
    shutil.copy(checkpoint / "tokenizer.json", fp8 / "tokenizer.json")
    engine, tokenizer, _ = build_server(build_parser().parse_args(
        ["serve", "--model", str(fp8), "--dtype", "float32", "--kv-cache-tokens", "256"]))
    try:
        served = engine.engine.model
        reference = load_fp8_model(str(fp8), dtype=torch.float32)  # FP8Linear / FP8Experts, dequantized per matmul
        ids = torch.tensor([tokenizer.encode("def add(a, b): return a + b")])
        with torch.no_grad():
            got, want = served(ids).logits, reference(ids).logits
        # the same dequantized weights; only the float order of the matmuls differs
        assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item(), (got - want).abs().max()
    finally:
        engine.shutdown()
    with running_server(["--model", str(fp8), "--kv-cache-tokens", "256"]) as (base, _):
        r = httpx.post(base + "/v1/chat/completions", json={"model": "fp8", "max_tokens": 3,
                                                            "messages": [{"role": "user", "content": "hi"}]}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text


def test_a_model_too_big_for_the_machine_is_one_line_like_glm5_train(capsys):
    code = main(["serve", "--preset", "glm5-744b", "--port", "0", "--dtype", "bfloat16"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.count("\n") == 0, err
    assert err.startswith("glm5 serve: error: this config cannot fit in memory: serving needs about"), err
    assert "Traceback" not in err
