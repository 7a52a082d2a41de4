"""The `glm5` command's face: every subcommand's parser is built (and `--help` answers) without loading torch,
and `glm5 train`'s flags become a TrainConfig by field name, with nothing copied by hand."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SUBCOMMANDS = ["params", "demo", "train", "tokenizer", "quantize", "plan", "serve", "rl"]

# in one fresh interpreter: `glm5 --help`, then each `glm5 SUB --help`; after each, the heavy packages loaded so far
PROBE = """
import contextlib, io, sys
from glm5.cli import main
HEAVY = ("torch", "numpy", "tokenizers", "transformers")
for argv in [["--help"]] + [[name, "--help"] for name in sys.argv[1:]]:
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        try:
            main(argv)
        except SystemExit:
            pass
    loaded = ",".join(m for m in HEAVY if m in sys.modules)
    print(" ".join(argv) + "|" + loaded + "|" + str("usage: glm5" in text.getvalue()) + "|" + text.getvalue().replace(chr(10), " "))
"""


def test_help_does_not_import_torch():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PROBE, *SUBCOMMANDS], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [line.split("|", 3) for line in out.stdout.splitlines()]
    assert [r[0] for r in rows] == ["--help"] + [f"{name} --help" for name in SUBCOMMANDS]
    for argv, loaded, usage, _ in rows:
        assert loaded == "", f"`glm5 {argv}` imported {loaded}"
        assert usage == "True", f"`glm5 {argv}` printed no usage"
    top = rows[0][3]
    missing = [name for name in SUBCOMMANDS if name not in top]
    assert not missing, f"{missing} missing from `glm5 --help`"


def test_train_flags_become_train_config_fields():
    from glm5.cli import build_parser
    from glm5.train.config import TrainConfig

    args = build_parser().parse_args([
        "train", "sft", "--data", "x.jsonl", "--out", "o", "--steps", "7", "--batch-size", "3", "--lr", "0.5",
        "--optimizer", "muon", "--schedule", "wsd", "--dtype", "bfloat16", "--max-minutes", "2.5", "--no-progress",
        "--micro-batch-size", "1", "--keep-last", "5", "--seed", "9"])
    config = TrainConfig.from_args(args)
    assert (config.stage, config.steps, config.batch_size, config.lr) == ("sft", 7, 3, 0.5)
    assert (config.optimizer, config.schedule, config.dtype, config.max_minutes) == ("muon", "wsd", "bfloat16", 2.5)
    assert (config.progress, config.micro_batch_size, config.keep_last, config.seed) == (False, 1, 5, 9)
    # every flag's default is the field's default, so `glm5 train` and `TrainConfig()` agree when nothing is given
    defaults = TrainConfig.from_args(build_parser().parse_args(["train", "pretrain", "--data", "x", "--out", "o"]))
    differs = {f.name for f in dataclasses.fields(TrainConfig) if getattr(defaults, f.name) != getattr(TrainConfig(), f.name)}
    assert differs == set(), f"flag defaults differ from TrainConfig's: {differs}"
    assert TrainConfig.from_args(args, steps=1).steps == 1  # overrides win


def test_train_config_refuses_unknown_names():
    from glm5.train.config import TrainConfig

    for field, value in (("optimizer", "sgd"), ("schedule", "linear"), ("parallel", "tp"), ("dtype", "float16")):
        with pytest.raises(ValueError, match=field):
            TrainConfig(**{field: value}).validate()
