"""Every CLI that loads a checkpoint or a tokenizer refuses a broken one with one line and a non-zero exit.

`glm5 serve --model`, `glm5 quantize fp8` and `glm5 train --init` each meet: a tokenizer.json that is not
one, safetensors cut short, a config.json that is not JSON, and one whose fields are wrong.
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import tiny_config

from glm5.cli import main


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    from glm5 import GLM5ForCausalLM
    from glm5.tokenizer import train_tokenizer

    directory = tmp_path_factory.mktemp("ckpt") / "model"
    GLM5ForCausalLM(tiny_config(vocab_size=320)).save_pretrained(directory)
    train_tokenizer(iter(["hello world, hello tokens " * 20]), vocab_size=300).save(directory)
    return directory


def corrupt(kind: str, source, tmp_path):
    directory = tmp_path / kind
    shutil.copytree(source, directory)
    if kind == "tokenizer":
        (directory / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": 5}')
    elif kind == "truncated_safetensors":
        for path in directory.glob("*.safetensors"):
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
    elif kind == "config_not_json":
        (directory / "config.json").write_text("{ this is not json")
    elif kind == "config_bad_field":
        config = json.loads((directory / "config.json").read_text())
        config["hidden_size"] = "wide"
        (directory / "config.json").write_text(json.dumps(config))
    elif kind == "no_tokenizer":
        (directory / "tokenizer.json").unlink()
    return directory


def argv_for(cli: str, directory, tmp_path) -> list[str]:
    if cli == "serve":
        return ["serve", "--model", str(directory), "--port", "0", "--kv-cache-tokens", "256"]
    if cli == "quantize":
        return ["quantize", "fp8", str(directory), str(tmp_path / "fp8")]
    data = tmp_path / "data.txt"
    data.write_text("hello world\n" * 50)
    return ["train", "pretrain", "--init", str(directory), "--data", str(data), "--out", str(tmp_path / "run"),
            "--steps", "1", "--seq-len", "16", "--batch-size", "2"]


KINDS = {
    "serve": ["tokenizer", "truncated_safetensors", "config_not_json", "config_bad_field", "no_tokenizer"],
    "quantize": ["truncated_safetensors", "config_not_json", "config_bad_field"],
    "train": ["tokenizer", "truncated_safetensors", "config_not_json", "config_bad_field"],
}


@pytest.mark.parametrize("cli, kind", [(cli, kind) for cli, kinds in KINDS.items() for kind in kinds])
def test_a_broken_checkpoint_or_tokenizer_is_one_line_and_a_failed_exit(cli, kind, good_checkpoint, tmp_path, capsys):
    directory = corrupt(kind, good_checkpoint, tmp_path)
    code = main(argv_for(cli, directory, tmp_path))
    err = capsys.readouterr().err.strip()
    assert code != 0, f"glm5 {cli} accepted a {kind}"
    lines = [line for line in err.splitlines() if "warn" not in line.lower()]
    assert len(lines) == 1 and lines[0].startswith(f"glm5 {cli}") and "error" in lines[0], err
    assert "Traceback" not in err
    assert str(directory.name) in lines[0] or kind == "config_bad_field", lines[0]  # it says which file
