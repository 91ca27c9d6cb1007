"""Check that two run folders hold the same numbers (a refactor must not move them).

    python docs/scripts/compare_runs.py OLD_RUN NEW_RUN

Compares every ``*.jsonl`` metrics log and every ``*.json`` result file present
in OLD_RUN with its namesake in NEW_RUN, value by value and exactly, and every
``model.safetensors`` tensor by tensor. Wall-clock times (keys containing
``time``, ``wall`` or ``timings``, and a verdict's "<ratio>x wall time"), the
machine's load, the package versions and the resolved configuration (whose
layout may change) are skipped: the configuration is listed separately, key by
key, as what was added or removed. A ``final.json``'s file digests are skipped
too: its logs hold wall times and are compared row by row, its weights tensor
by tensor (a file's bytes also hold the order of its metadata).
Exits 1 on the first differing number of each file, listing them.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

SKIP = ("time", "wall", "timings", "versions", "machine_load")
DIGESTS = ("logs", "model")  # the file digests a final.json records
RENAMED = {"chosen_steps": "chosen_loops"}  # keys renamed since (loop counts are n_loops / loops everywhere)
WALL = re.compile(r"[\d.]+x wall time")  # a measured speed-up inside a verdict's text


def skipped(key: str) -> bool:
    return any(s in key for s in SKIP)


def diff(a, b, path: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a:
            if skipped(k) or (k == "config" and path == ""):
                continue
            new = k if k in b else RENAMED.get(k, k)
            if new not in b:
                out.append(f"{path}/{k}: missing in the new run")
            else:
                diff(a[k], b[new], f"{path}/{k}", out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: {len(a)} items, now {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            diff(x, y, f"{path}[{i}]", out)
    elif isinstance(a, str) and isinstance(b, str):
        if WALL.sub("(wall)", a) != WALL.sub("(wall)", b):
            out.append(f"{path}: {a!r} -> {b!r}")
    elif a != b and not (a != a and b != b):  # NaN equals NaN here
        out.append(f"{path}: {a!r} -> {b!r}")


def flat_keys(d, prefix=""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from flat_keys(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1]


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and (x[k] == y[k]).all() for k in x)


def main(old: Path, new: Path) -> int:
    files = sorted(
        p.relative_to(old) for p in old.rglob("*") if p.suffix in (".json", ".jsonl") and "checkpoints" not in p.parts
    )
    bad, compared = 0, 0
    for rel in files:
        a_path, b_path = old / rel, new / rel
        if not b_path.exists():
            print(f"MISSING {rel}")
            bad += 1
            continue
        if rel.suffix == ".jsonl":
            a = [json.loads(line) for line in a_path.read_text().splitlines()]
            b = [json.loads(line) for line in b_path.read_text().splitlines()]
        else:
            a, b = json.loads(a_path.read_text()), json.loads(b_path.read_text())
            if rel.name == "final.json":
                a = {k: v for k, v in a.items() if k not in DIGESTS}
        out: list[str] = []
        diff(a, b, "", out)
        compared += 1
        if out:
            bad += 1
            print(f"DIFFER {rel}: {len(out)} values, first: " + "; ".join(out[:5]))
        if rel.name == "report.json" and isinstance(a, dict) and "config" in a:
            ka, kb = set(flat_keys(a["config"])), set(flat_keys(b["config"]))
            print(f"config keys of {rel}: removed {sorted(ka - kb)}, added {sorted(kb - ka)}")
    for rel in sorted(p.relative_to(old) for p in old.rglob("model.safetensors") if "checkpoints" not in p.parts):
        compared += 1
        if not (new / rel).exists() or not same_tensors(old / rel, new / rel):
            bad += 1
            print(f"DIFFER {rel}: its tensors")
    print(f"{compared} files compared, {bad} differ or are missing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
