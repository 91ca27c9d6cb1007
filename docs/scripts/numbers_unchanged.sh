#!/usr/bin/env bash
# Do the numbers of the current tree equal those of an earlier commit, on this machine?
#   bash docs/scripts/numbers_unchanged.sh REV      (e.g. the commit before a refactor)
# Runs `loopscape markov --epochs 40 --seeds 0,1 --set hessian.enabled=false`,
# `loopscape reproduce --quick` and a short algorithmic Parity run (Single-Attn, Looped-Attn, SHIFT with SCP)
# on REV (a temporary worktree) and on this tree, with the same Python, then compares every
# number (docs/scripts/compare_runs.py). Parity's SCP is set by its older name, train.scp, which both sides read.
set -euo pipefail
rev=${1:?usage: numbers_unchanged.sh REV}
here=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
work=$(mktemp -d)
trap 'git -C "$here" worktree remove --force "$work/before" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git -C "$here" worktree add --detach "$work/before" "$rev" >/dev/null 2>&1
for side in before after; do
  src=$([ "$side" = before ] && echo "$work/before/src" || echo "$here/src")
  PYTHONPATH=$src "$python" -m loopscape.cli markov --epochs 40 --seeds 0,1 --set hessian.enabled=false \
    -o "$work/$side-markov" -q >/dev/null
  PYTHONPATH=$src "$python" -m loopscape.cli reproduce --quick -o "$work/$side-reproduce" -q >/dev/null
  PYTHONPATH=$src "$python" -m loopscape.cli algorithmic --task parity --set train.steps=400 \
    --set train.eval_every=50 --set 'train.scp={patience: 2, wait: 2, max_wait: 4}' -o "$work/$side-parity" -q >/dev/null
done
status=0
"$python" "$here/docs/scripts/compare_runs.py" "$work/before-markov" "$work/after-markov" || status=1
"$python" "$here/docs/scripts/compare_runs.py" "$work/before-reproduce" "$work/after-reproduce" || status=1
"$python" "$here/docs/scripts/compare_runs.py" "$work/before-parity" "$work/after-parity" || status=1
exit $status
