"""Check that two run folders hold the same numbers (a refactor must not move them).

    python docs/scripts/compare_runs.py OLD_RUN NEW_RUN

Compares every ``*.jsonl`` metrics log and every ``*.json`` result file present
in OLD_RUN with its namesake in NEW_RUN, value by value and exactly. Wall-clock
times (keys containing ``time``, ``wall`` or ``timings``, and a verdict's
"<ratio>x wall time"), the package versions
and the resolved configuration (whose layout may change) are skipped: the
configuration is listed separately, key by key, as what was added or removed.
Exits 1 on the first differing number of each file, listing them.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

SKIP = ("time", "wall", "timings", "versions")
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
        out: list[str] = []
        diff(a, b, "", out)
        compared += 1
        if out:
            bad += 1
            print(f"DIFFER {rel}: {len(out)} values, first: " + "; ".join(out[:5]))
        if rel.name == "report.json" and isinstance(a, dict) and "config" in a:
            ka, kb = set(flat_keys(a["config"])), set(flat_keys(b["config"]))
            print(f"config keys of {rel}: removed {sorted(ka - kb)}, added {sorted(kb - ka)}")
    print(f"{compared} files compared, {bad} differ or are missing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
