"""What every benchmark does last: write its results as JSON (creating the folder) and say where."""

from __future__ import annotations

import json
import os


def write_results(path: str | os.PathLike, results: dict) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2)
        fh.write("\n")
    print(f"[bench] wrote {path}")
    return path
