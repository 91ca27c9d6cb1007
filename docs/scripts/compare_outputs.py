"""Compare two files of docs/scripts/loop_outputs.py bit for bit: python docs/scripts/compare_outputs.py A B"""

import sys

import torch

a, b = (torch.load(path, weights_only=True) for path in sys.argv[1:3])
bad = [k for k in a if k not in b or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
print(f"{len(a)} outputs compared, {len(bad)} differ: {bad}")
sys.exit(1 if bad else 0)
