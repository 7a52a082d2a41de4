"""Every benchmark's JSON names the machine it came from: CPU model, the CPU kernels' ISA path, GPU."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

from results_io import machine, write_results  # noqa: E402

from glm5.kernels import build  # noqa: E402


def test_results_carry_the_cpu_model_and_isa(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(build.ISA_ENV, "portable")
    path = write_results(tmp_path / "sub" / "out.json", {"rows": [1, 2]})
    data = json.loads(open(path).read())
    assert data["rows"] == [1, 2]
    info = data["machine"]
    assert info["cpu_model"] == build.cpu_model() and info["cpu_isa"] == "portable"
    assert info["cpu_isas_available"] == build.available_isas()
    printed = capsys.readouterr().out
    assert f"CPU {info['cpu_model']} (kernels: portable" in printed and str(path) in printed
    assert not [p for p in os.listdir(tmp_path / "sub") if p.endswith(".tmp")]
    # a caller's own machine entry is kept
    assert json.loads(open(write_results(tmp_path / "b.json", {"machine": machine() | {"gpu": "x"}})).read())[
        "machine"]["gpu"] == "x"
