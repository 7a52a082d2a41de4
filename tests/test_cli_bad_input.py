"""Command-line bad input (each test failed before its fix): a one-line error and exit
status 2 (argparse's usage errors too), nothing deleted or overwritten, and checks that run before heavy work."""

from __future__ import annotations

import hashlib
import socket

import pytest
import torch
from conftest import tiny_config

from glm5 import GLM5ForCausalLM
from glm5.cli import build_parser, main


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(capsys, code) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.strip(), err
    return err


def test_quantize_refuses_an_out_dir_that_holds_the_input(tmp_path, capsys):
    torch.manual_seed(0)
    GLM5ForCausalLM(tiny_config(index_topk=8)).save_pretrained(tmp_path / "nest" / "ckpt")
    before = digest(tmp_path / "nest" / "ckpt" / "model.safetensors")
    code = main(["quantize", "fp8", str(tmp_path / "nest" / "ckpt"), str(tmp_path / "nest"), "--overwrite"])
    assert "would delete the input" in one_line_error(capsys, code)
    assert digest(tmp_path / "nest" / "ckpt" / "model.safetensors") == before


@pytest.mark.parametrize("flag, value", [
    ("--max-num-seqs", "0"), ("--max-num-batched-tokens", "0"), ("--kv-cache-tokens", "0"), ("--block-size", "0"),
    ("--max-model-len", "-5"), ("--speculative-tokens", "-1"), ("--threads", "-1"), ("--port", "70000"),
    ("--log-level", "foo"), ("--default-max-tokens", "0"),
])
def test_serve_refuses_bad_numbers_before_loading(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--preset", "nano", flag, value])
    assert exit_.value.code == 2 and flag in capsys.readouterr().err


def test_serve_reports_a_busy_port_at_once(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        err = one_line_error(capsys, main(["serve", "--preset", "nano", "--port", str(port)]))
    assert "cannot listen" in err and str(port) in err


@pytest.mark.parametrize("device", ["foo", "cuda:0"])
def test_a_bad_or_missing_device_is_one_line(device, tmp_path, capsys):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is here")
    (tmp_path / "d.txt").write_text("words " * 200)
    code = main(["train", "pretrain", "--data", str(tmp_path / "d.txt"), "--preset", "nano", "--steps", "1",
                 "--seq-len", "32", "--device", device, "--out", str(tmp_path / "run"), "--no-progress"])
    assert "--device" in one_line_error(capsys, code)


def test_train_does_not_replace_another_stages_model(tmp_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text("some words to train on. " * 200)
    common = ["--data", str(data), "--preset", "nano", "--steps", "1", "--batch-size", "2", "--seq-len", "32",
              "--no-progress", "--device", "cpu", "--out", str(tmp_path / "run")]
    assert main(["train", "pretrain", *common]) == 0
    model = tmp_path / "run" / "model" / "model.safetensors"
    before = digest(model)
    for extra in ([], ["--resume"]):
        code = main(["train", "sft", *common, "--init", str(tmp_path / "run" / "model"), *extra])
        assert "already holds a model" in one_line_error(capsys, code)
    assert digest(model) == before
    (tmp_path / "file").write_text("x")
    code = main(["train", "pretrain", *common[:-1], str(tmp_path / "file")])
    assert "not a folder" in one_line_error(capsys, code)


def test_train_checks_memory_before_building_the_model(tmp_path, capsys):
    (tmp_path / "d.txt").write_text("words " * 200)
    code = main(["train", "pretrain", "--data", str(tmp_path / "d.txt"), "--preset", "glm5-744b", "--steps", "1",
                 "--seq-len", "32", "--device", "cpu", "--out", str(tmp_path / "run"), "--no-progress"])
    assert "cannot fit in memory" in one_line_error(capsys, code)


@pytest.mark.parametrize("flag, value, needle", [
    ("--min-lr-ratio", "-2", "min_lr_ratio"), ("--mtp-weight", "-1", "mtp_weight"), ("--seq-len", "0", "--seq-len"),
])
def test_train_refuses_values_that_would_train_nonsense(flag, value, needle, tmp_path, capsys):
    (tmp_path / "d.txt").write_text("words " * 200)
    argv = ["train", "pretrain", "--data", str(tmp_path / "d.txt"), "--preset", "nano", "--steps", "1",
            "--seq-len", "32", "--device", "cpu", "--out", str(tmp_path / "run"), "--no-progress", flag, value]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own usage error
        code = exit_.code
    assert needle in one_line_error(capsys, code)


def test_a_config_json_with_wrong_types_names_the_field(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "glm_moe_dsa", "num_hidden_layers": "4"}')
    code = main(["params", "--config", str(tmp_path / "config.json")])
    assert "num_hidden_layers" in one_line_error(capsys, code)


def test_tokenizer_train_does_not_overwrite_and_refuses_empty_text(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello world, hello tokenizer. " * 300)
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(text), "--vocab-size", "300", "--out", str(out)]) == 0
    before = digest(out / "tokenizer.json")
    code = main(["tokenizer", "train", "--input", str(text), "--vocab-size", "400", "--out", str(out)])
    assert "--overwrite" in one_line_error(capsys, code)
    assert digest(out / "tokenizer.json") == before
    (tmp_path / "empty.txt").write_text("")
    code = main(["tokenizer", "train", "--input", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "t2")])
    assert "no text" in one_line_error(capsys, code)


def test_ctrl_c_is_one_line_and_130(monkeypatch, capsys):
    import glm5.params as params

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(params, "run", interrupted)  # register() reads it when main() builds the parser
    assert main(["params", "nano"]) == 130
    assert capsys.readouterr().err.strip() == "glm5 params: interrupted"


def test_quantize_output_has_a_plain_folder_mode(tmp_path):
    import os

    torch.manual_seed(0)
    GLM5ForCausalLM(tiny_config(index_topk=8)).save_pretrained(tmp_path / "ckpt")
    assert main(["quantize", "fp8", str(tmp_path / "ckpt"), str(tmp_path / "fp8")]) == 0
    (tmp_path / "plain").mkdir()
    assert os.stat(tmp_path / "fp8").st_mode == os.stat(tmp_path / "plain").st_mode


def test_the_server_socket_sends_small_chunks_at_once():
    """TCP_NODELAY on what the listening socket accepts: streamed chunks must not wait for a delayed ACK."""
    from glm5.serve.cli import listen

    with listen("127.0.0.1", 0) as server, socket.create_connection(server.getsockname()) as client:
        accepted, _ = server.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            accepted.sendall(b"chunk")  # the accepted socket is the one that serves: it carries bytes
            assert client.recv(5) == b"chunk"


@pytest.mark.parametrize("flags, expected", [([], None), (["--enforce-eager"], False)])
def test_serve_enforce_eager_turns_cuda_graphs_off(flags, expected):
    from glm5.serve.cli import build_server

    args = build_parser().parse_args(["serve", "--preset", "nano", "--kv-cache-tokens", "256", "--threads", "1", *flags])
    engine, _, _ = build_server(args)
    try:
        assert engine.engine.engine_config.cuda_graphs is expected  # None: on where the model is on CUDA
        assert engine.engine.engine_config.kv_cache_tokens == 256 and engine.engine.engine_config.threads == 1
    finally:
        engine.shutdown()
