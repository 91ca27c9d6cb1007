"""Summary statistics over seeds and their formatting, shared by every report."""

from __future__ import annotations

import numpy as np


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for one value; ``None`` for none)."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "n": int(a.size)}


def mean_sd_se(values: list[float]) -> dict:
    """Mean, sample standard deviation and standard error of the mean (``None`` below two values)."""
    n = len(values)
    sd = float(np.std(values, ddof=1)) if n > 1 else None
    return {"mean": float(np.mean(values)), "sd": sd, "se": None if sd is None else sd / n**0.5, "n": n}


def fmt_number(x, digits: int = 2) -> str:
    """``x`` to ``digits`` decimals; ``n/a`` for None or NaN."""
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def fmt_mean_std(s: dict | None, digits: int = 2) -> str:
    """``mean ± std`` of a :func:`mean_std` dict (the mean alone for one value)."""
    if not s or s.get("mean") is None:
        return "n/a"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" if s["n"] > 1 else f"{s['mean']:.{digits}f}"
