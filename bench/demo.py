"""The `make demo` figures the README quotes: run `glm5 demo` as a user would (a subprocess, its defaults) and
store its wall time, per-stage probe losses and evaluation in bench/results/demo.json, with the CPU.

    .venv/bin/python bench/demo.py                         # the default demo (minutes); nothing else should run
    .venv/bin/python bench/demo.py -- --pretrain-steps 20  # arguments after -- go to `glm5 demo` (a quick look)

README.md's demo duration is this file's `wall_minutes` (tests/test_readme.py checks they agree), so rerun
this after a change that moves the demo's time and commit the JSON with it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from results_io import write_results  # bench/ is on sys.path when a bench runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs", help="folder for the run (default runs)")
    p.add_argument("--results", default="bench/results/demo.json", help="where to write the figures")
    p.add_argument("demo_args", nargs="*", help="arguments for `glm5 demo` (after --)")
    args = p.parse_args()
    name = time.strftime("bench-demo-%Y%m%d-%H%M%S")
    cmd = [sys.executable, "-m", "glm5.cli", "demo", "--out", args.out, "--name", name, *args.demo_args]
    print("[bench] " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    summary = json.loads((Path(args.out) / name / "summary.json").read_text())
    rl_metrics = Path(args.out) / name / "rl" / "metrics.jsonl"
    rl_steps = [json.loads(line) for line in rl_metrics.read_text().splitlines()] if rl_metrics.is_file() else []
    write_results(args.results, {
        "command": "glm5 demo " + " ".join(args.demo_args),
        "defaults": not args.demo_args,
        "wall_minutes": summary["wall_minutes"],
        "stages": {row["stage"]: {"probe_start": row["probe_start"], "probe_end": row["probe_end"]} for row in summary["stages"]},
        "final": summary["final"],
        "rl": summary.get("rl"),
        # how often an RL group held an exact call (what there is to reinforce)
        "rl_groups_with_success": sum(r.get("groups_with_success", 0) for r in rl_steps),
        "rl_exact_share_per_step": [r.get("exact_share") for r in rl_steps],
        "run": str(Path(args.out) / name),
        "date": time.strftime("%Y-%m-%d"),
    })


if __name__ == "__main__":
    main()
