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

# after the CLI ran, print the heavy packages it imported (none may be there)
PROBE = """
import runpy, sys
sys.argv = ["glm5", *sys.argv[1:]]
try:
    runpy.run_module("glm5.cli", run_name="__main__")
except SystemExit:
    pass
print("HEAVY:" + ",".join(sorted(m for m in ("torch", "numpy", "tokenizers", "transformers") if m in sys.modules)))
"""

SUBCOMMANDS = ["params", "demo", "train", "tokenizer", "quantize", "plan", "serve"]


def _heavy_imports(*argv: str) -> tuple[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    line = [x for x in out.stdout.splitlines() if x.startswith("HEAVY:")][-1]
    return line[len("HEAVY:"):], out.stdout


@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name in SUBCOMMANDS], ids=lambda a: " ".join(a))
def test_help_does_not_import_torch(argv):
    heavy, text = _heavy_imports(*argv)
    assert heavy == "", f"`glm5 {' '.join(argv)}` imported {heavy}"
    assert "usage: glm5" in text


def test_every_subcommand_is_listed_in_the_top_help():
    _, text = _heavy_imports("--help")
    for name in SUBCOMMANDS:
        assert name in text, f"{name} missing from `glm5 --help`"


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
