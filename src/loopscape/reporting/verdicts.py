"""Every verdict's statistics, stated before any outcome: the tests, the words they give, their
false-positive rates.

A claim of the paper is judged on per-seed values (one number per seed: a difference between
paired runs, a log ratio, a fraction), by one of three tests at ``ALPHA = 0.05``:

* :func:`directional`: "X is larger" (Observation 1, Corollaries 1-2, Conjectures 1-2, ...). A
  one-sided one-sample t-test of the per-seed values, their mean with a 90% t-interval (the two-sided
  interval that matches a one-sided 5% test), and a **bar**: the smallest mean that counts as the
  paper's effect (half the paper's number where it gives one, the claim's own threshold such as 10x
  for ">>", else 0). Words:

  - **reproduced**: the mean significantly above the bar (the one-sided test against the bar itself,
    so "at least the bar" is tested, not read off a point estimate);
  - **direction only**: significantly above 0 but not above the bar, with the interval reaching it;
    or the claim's sign without significance;
  - **not reproduced**: no effect (a mean of the wrong sign or zero, not significant), or a
    significant effect whose whole interval lies below the bar (far below the paper's);
  - **contradicted**: significant in the opposite direction (the mirrored one-sided test);
  - **not tested**: fewer than two usable values (the reason is given). Values that are missing
    (None, NaN) are dropped and counted (``n_dropped``). Values without spread fall back to the
    exact sign test (``p = 2^-n`` when all have the claim's sign), so two identical seeds are not
    significant.

* :func:`non_inferiority`: "no loss", "minimal" (SHIFT, E.2.2 (b)). The lower half of TOST: the
  mean above ``-margin`` by a one-sided t-test. **reproduced** if the 90% interval's lower end is above
  ``-margin``; **contradicted** if its upper end is below ``-margin`` (a loss beyond the margin);
  **inconclusive** otherwise, with the interval. A gain never fails it.

* :func:`in_range`: "at 100-150 epochs" (SCP's shift point). Two one-sided tests (TOST) against the
  range's ends: **reproduced** if the 90% interval of the mean lies inside the range; **not
  reproduced** if it lies wholly outside; **inconclusive** otherwise.

Claims made of several parts (every test length; a speed-up and no loss) combine their parts by
:func:`all_of` (an intersection-union test: reproduced only if every part is, so its false-positive
rate is at most the largest of its parts'); claims the paper leaves open to a reading combine the
readings by :func:`over_readings` (**reading-dependent** when the sign changes with the reading).

**Null rate.** Beside each verdict, the rate at which the same rule gives its positive word
("reproduced") when the claim is false at its boundary: Gaussian data of the run's seed count and
the run's standard deviation with the true mean at the bar (a direction), at ``-margin`` (no loss),
or at a range's end, computed exactly by quadrature over the sample spread (no simulation noise).
A one-sided t rule sits at exactly ``ALPHA`` there and below it for any smaller true effect.
**Minimum detectable effect**: the smallest true mean for which the rule says "reproduced" with
80% power (the bar plus the noncentral-t distance).

The per-seed values and how each claim forms them live with the claim (reporting/summary.py,
hessian.py, shift.py, theory.py, length.py); this module never changes with an outcome. The report
prints its last commit (:func:`rules_version`) so a reader can see that.
"""

from __future__ import annotations

import hashlib
import math
import subprocess
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import integrate, optimize, stats

ALPHA = 0.05
POWER = 0.8

REPRODUCED = "reproduced"
DIRECTION_ONLY = "direction only"
NOT_REPRODUCED = "not reproduced"
CONTRADICTED = "contradicted"
READING_DEPENDENT = "reading-dependent"
INCONCLUSIVE = "inconclusive"
NOT_TESTED = "not tested"
WORDS = (REPRODUCED, DIRECTION_ONLY, NOT_REPRODUCED, CONTRADICTED, READING_DEPENDENT, INCONCLUSIVE, NOT_TESTED)
POSITIVE = (REPRODUCED,)

WORD_MEANINGS = {
    REPRODUCED: "the claim's test passes at alpha 0.05 over seeds: above the stated bar (half the paper's effect "
    "where it gives one) for a direction, within the margin for 'no loss', inside the range for a range, no "
    "violation for a proven bound",
    DIRECTION_ONLY: "the claim's sign, but not significant, or significant and not above the bar",
    NOT_REPRODUCED: "no effect, an effect whose whole 90% interval lies below the bar, or outside a range",
    CONTRADICTED: "significant in the opposite direction (or a loss beyond the margin, or a violated bound)",
    READING_DEPENDENT: "the sign changes with a reading the paper leaves open (the readings are listed)",
    INCONCLUSIVE: "a 'no loss' or range test whose 90% interval straddles the margin",
    NOT_TESTED: "missing or too short evidence (the reason is given)",
}


def _values(values) -> np.ndarray:
    a = np.asarray([v for v in values if v is not None], dtype=float)
    return a[np.isfinite(a)]


def _dropped(values) -> int:
    """How many of ``values`` are missing (None or not finite): dropped from the test, and said so."""
    return len(list(values)) - _values(values).size


def _summary(a: np.ndarray) -> tuple[float, float, float]:
    """Mean, sample standard deviation, standard error."""
    sd = float(a.std(ddof=1))
    return float(a.mean()), sd, sd / np.sqrt(a.size)


def _interval(mean: float, se: float, n: int) -> list[float]:
    half = float(stats.t.ppf(1 - ALPHA, n - 1)) * se
    return [float(mean - half), float(mean + half)]


def _p_greater(mean: float, se: float, n: int, null: float = 0.0) -> float:
    """One-sided p of ``mean > null``; without spread, the exact sign test (every value above ``null``)."""
    if se == 0:
        return 0.5**n if mean > null else 1.0
    return float(stats.t.sf((mean - null) / se, n - 1))


def test_fields(
    name: str,
    statistic: str,
    n_seeds: int,
    p_value: float | None = None,
    interval: list[float] | None = None,
    null_rate: float | None = None,
    min_detectable: float | None = None,
    **extra,
) -> dict:
    """A verdict row's ``test``: what was tested, how, on how many seeds, and how often it errs."""
    return {
        "name": name,
        "statistic": statistic,
        "p_value": p_value,
        "interval": interval,
        "n_seeds": n_seeds,
        "null_rate": None if null_rate is None else round(null_rate, 6),  # exact rates at alpha sit on 0.05 +- 1e-12
        "min_detectable": min_detectable,
        **extra,
    }


def not_tested(name: str, statistic: str, reason: str, n_seeds: int = 0) -> dict:
    """An outcome that tested nothing, and why."""
    return {"verdict": NOT_TESTED, "reason": reason, "test": test_fields(name, statistic, n_seeds)}


# -- the directional test ----------------------------------------------------------------------------------


def directional_word(values, bar: float = 0.0) -> str:
    """The word :func:`directional` gives ``values`` (at least two), without its error rates: what the
    simulations in the tests apply many times."""
    a = _values(values)
    mean, _, se = _summary(a)
    return _directional_word(mean, se, a.size, bar)


def _directional_word(mean: float, se: float, n: int, bar: float) -> str:
    lo, hi = _interval(mean, se, n)
    if _p_greater(mean, se, n, bar) < ALPHA:
        return REPRODUCED
    if _p_greater(mean, se, n) < ALPHA:
        return NOT_REPRODUCED if hi < bar else DIRECTION_ONLY
    if _p_greater(-mean, se, n) < ALPHA:
        return CONTRADICTED
    return DIRECTION_ONLY if mean > 0 else NOT_REPRODUCED


def _over_spread(n: int, sd: float, prob) -> float:
    """``E[prob(s)]`` over the sample standard deviation ``s`` of ``n`` Gaussian draws with deviation ``sd``
    (``(n - 1) s^2 / sd^2`` is chi-square with ``n - 1`` degrees of freedom), by quadrature: the exact rate of
    a rule whose outcome given ``s`` is a normal probability of the mean (no Monte-Carlo noise)."""
    df = n - 1
    value, _ = integrate.quad(lambda u: stats.chi2.pdf(u, df) * prob(sd * np.sqrt(u / df)), 0, np.inf, limit=200)
    return float(value)


def directional_null_rate(n: int, sd: float, bar: float = 0.0) -> float:
    """How often :func:`directional` says "reproduced" when the true mean is the bar (the boundary of "no
    effect of the paper's size"; Gaussian, the run's noise), exactly: ``P((mean - bar) / se > t_crit)``."""
    if sd == 0:
        return 0.5**n if 0.5**n < ALPHA else 0.0  # the sign test's own rate
    t_crit, se_true = stats.t.ppf(1 - ALPHA, n - 1), sd / np.sqrt(n)
    return _over_spread(n, sd, lambda s: stats.norm.sf(t_crit * s / np.sqrt(n) / se_true))


def min_detectable(n: int, sd: float, bar: float = 0.0) -> float:
    """The smallest true mean for which the one-sided t-test against ``bar`` at ``ALPHA`` has power ``POWER``
    (noncentral t): the bar plus the detectable distance."""
    if sd == 0:
        return bar
    t_crit = stats.t.ppf(1 - ALPHA, n - 1)

    def power_gap(delta: float) -> float:
        return float(stats.nct.sf(t_crit, n - 1, delta * np.sqrt(n) / sd)) - POWER

    return bar + float(optimize.brentq(power_gap, 0.0, 100 * sd + 1e-12))


def directional(values, *, name: str, statistic: str, bar: float = 0.0, units: str = "") -> dict:
    """The one-sided test of "the per-seed ``values`` are above 0", with the words of the module docstring.
    ``bar``: the smallest mean that counts as the paper's effect (>= 0)."""
    a, dropped = _values(values), _dropped(values)
    test = f"one-sided one-sample t-test over seeds against the bar {bar:g}{units}, alpha {ALPHA}"
    if a.size < 2:
        why = _too_few(a.size, dropped)
        return not_tested(name, statistic, why, int(a.size)) | {"values": a.tolist()}
    mean, sd, se = _summary(a)
    n = int(a.size)
    return {
        "verdict": _directional_word(mean, se, n, bar),
        "values": a.tolist(),
        "test": test_fields(
            name,
            statistic,
            n,
            p_value=_p_greater(mean, se, n, bar),
            interval=_interval(mean, se, n),
            null_rate=directional_null_rate(n, sd, bar),
            min_detectable=min_detectable(n, sd, bar),
            estimate=mean,
            bar=bar,
            n_dropped=dropped,
            method=test,
        ),
    }


def _too_few(n: int, dropped: int) -> str:
    why = "one seed: no spread to test against" if n == 1 else "no values"
    return why + (f" ({dropped} missing)" if dropped else "")


# -- no loss and ranges (TOST) -----------------------------------------------------------------------------


def _tost_null_rate(n: int, sd: float, lo: float, hi: float) -> float:
    """How often the 90% interval lies inside ``(lo, hi)`` when the true mean sits on an edge of it (both edges
    give the same rate), exactly."""
    if sd == 0:
        return 0.0
    t_crit, se_true = stats.t.ppf(1 - ALPHA, n - 1), sd / np.sqrt(n)

    def inside(s: float) -> float:  # the mean at lo: P(lo + h < mean < hi - h), h = t_crit s / sqrt(n)
        h = t_crit * s / np.sqrt(n)
        return max(0.0, stats.norm.cdf((hi - lo - h) / se_true) - stats.norm.cdf(h / se_true))

    return _over_spread(n, sd, inside)


def tost_word(values, lo: float, hi: float, below: str = CONTRADICTED, above: str = NOT_REPRODUCED) -> str:
    """The word of a TOST of ``values`` against ``(lo, hi)``: reproduced if the 90% interval lies inside, ``below``
    or ``above`` if it lies wholly beyond an end, inconclusive otherwise."""
    a = _values(values)
    mean, _, se = _summary(a)
    ci = _interval(mean, se, a.size)
    if se == 0 and 0.5**a.size >= ALPHA:  # no spread and too few values for a sign test: nothing is shown
        return INCONCLUSIVE
    if ci[0] > lo and ci[1] < hi:
        return REPRODUCED
    if ci[1] < lo:
        return below
    if ci[0] > hi:
        return above
    return INCONCLUSIVE


def _tost(values, lo: float, hi: float, name: str, statistic: str, below: str, above: str, method: str) -> dict:
    a, dropped = _values(values), _dropped(values)
    if a.size < 2:
        return not_tested(name, statistic, _too_few(a.size, dropped), int(a.size)) | {"values": a.tolist()}
    mean, sd, se = _summary(a)
    n = int(a.size)
    ci = _interval(mean, se, n)
    word = tost_word(a, lo, hi, below, above)
    p = max(_p_greater(mean, se, n, lo), _p_greater(-mean, se, n, -hi))  # TOST's p: the larger one-sided p
    return {
        "verdict": word,
        "values": a.tolist(),
        "test": test_fields(
            name,
            statistic,
            n,
            p_value=p,
            interval=ci,
            null_rate=_tost_null_rate(n, sd, lo, hi),
            min_detectable=None,
            estimate=mean,
            bounds=[lo, None if math.isinf(hi) else hi],
            n_dropped=dropped,
            method=method,
        ),
    }


def non_inferiority(values, margin: float, *, name: str, statistic: str) -> dict:
    """ "No loss": the per-seed differences' mean above ``-margin`` (the lower half of TOST) at ``ALPHA``; a gain
    never fails it."""
    method = f"non-inferiority, one-sided t-test (the lower half of TOST) at alpha {ALPHA}, margin {margin:g}"
    return _tost(values, -margin, math.inf, name, statistic, CONTRADICTED, NOT_REPRODUCED, method)


def in_range(values, lo: float, hi: float, *, name: str, statistic: str) -> dict:
    """ "Between lo and hi": the per-seed values' mean inside ``(lo, hi)`` by TOST at ``ALPHA``."""
    method = f"inside [{lo:g}, {hi:g}] by two one-sided t-tests (TOST) at alpha {ALPHA}"
    return _tost(values, lo, hi, name, statistic, NOT_REPRODUCED, NOT_REPRODUCED, method)


# -- composite claims --------------------------------------------------------------------------------------

_ORDER = (CONTRADICTED, NOT_REPRODUCED, INCONCLUSIVE, DIRECTION_ONLY, READING_DEPENDENT, REPRODUCED)


def all_of(parts: dict[str, dict], *, name: str, statistic: str) -> dict:
    """A claim made of several parts (each an outcome of this module): "reproduced" only if every part is, so its
    null rate is at most the largest part's (intersection-union). Otherwise a tested part that fails decides
    (contradicted before not reproduced), then a part not tested makes the whole not tested, then the weakest
    of the rest (inconclusive < direction only < reading-dependent)."""
    words = [p["verdict"] for p in parts.values()]
    failed = [w for w in words if w in (CONTRADICTED, NOT_REPRODUCED)]
    if failed:
        word = min(failed, key=_ORDER.index)
    elif NOT_TESTED in words or not words:
        word = NOT_TESTED
    else:
        word = min(words, key=_ORDER.index)
    rates = [p["test"]["null_rate"] for p in parts.values() if p["test"].get("null_rate") is not None]
    seeds = [p["test"]["n_seeds"] for p in parts.values()]
    test = test_fields(
        name,
        statistic,
        min(seeds) if seeds else 0,
        p_value=max((p["test"]["p_value"] for p in parts.values() if p["test"]["p_value"] is not None), default=None),
        interval=None,
        null_rate=max(rates) if rates and word != NOT_TESTED else None,
        min_detectable=None,
        method="every part must hold (intersection-union test): the largest part p and null rate bound the whole",
        parts={k: p["test"] | {"verdict": p["verdict"]} for k, p in parts.items()},
    )
    out = {"verdict": word, "test": test, "parts": {k: p["verdict"] for k, p in parts.items()}}
    reasons = [f"{k}: {p['reason']}" for k, p in parts.items() if p["verdict"] == NOT_TESTED and p.get("reason")]
    if word == NOT_TESTED:
        out["reason"] = "; ".join(reasons) or "no part was tested"
    return out


def over_readings(readings: dict[str, dict], headline: str, *, name: str, statistic: str) -> dict:
    """A claim under readings the paper leaves open (``readings``: reading -> outcome; ``headline``: the
    reading the report leads with). **reading-dependent** when one reading reproduces the claim's direction
    (reproduced or direction only) and another contradicts it; otherwise the headline reading's word."""
    words = {k: r["verdict"] for k, r in readings.items()}
    positive = [k for k, w in words.items() if w in (REPRODUCED, DIRECTION_ONLY)]
    negative = [k for k, w in words.items() if w == CONTRADICTED]
    head = readings[headline]
    word = READING_DEPENDENT if positive and negative else head["verdict"]
    rates = [r["test"]["null_rate"] for r in readings.values() if r["test"].get("null_rate") is not None]
    test = test_fields(
        name,
        statistic,
        head["test"]["n_seeds"],
        p_value=head["test"]["p_value"],
        interval=head["test"]["interval"],
        null_rate=max(rates) if rates else None,
        min_detectable=head["test"]["min_detectable"],
        method=f"per reading; the headline reading is {headline!r}; reading-dependent when readings disagree in "
        "sign (one reproduces the direction, another contradicts it)",
        readings={k: r["test"] | {"verdict": r["verdict"]} for k, r in readings.items()},
        positive_readings=positive,
        contradicting_readings=negative,
    )
    out = {"verdict": word, "test": test, "readings": words, "values": head.get("values", [])}
    if word == NOT_TESTED:
        out["reason"] = head.get("reason", "the headline reading was not tested")
    return out


# -- deterministic checks ----------------------------------------------------------------------------------


def bound_check(held: int, n: int, *, name: str, statistic: str) -> dict:
    """A proven bound checked on ``n`` random instances meeting its assumptions, ``held`` of which obey it.
    Reproduced if every instance does; ``upper_bound`` is the violation rate's exact one-sided 95% bound
    (Clopper-Pearson), and the null rate the chance of no violation in ``n`` instances were the true rate
    at that bound (so at most 5%)."""
    if n == 0:
        return not_tested(name, statistic, "no instance met the theorem's assumptions")
    violations = n - held
    upper = float(stats.beta.ppf(1 - ALPHA, violations + 1, n - violations)) if violations < n else 1.0
    word = REPRODUCED if violations == 0 else CONTRADICTED
    null_rate = float((1 - upper) ** n) if violations == 0 else None
    test = test_fields(
        name,
        statistic,
        n,
        p_value=None,
        interval=None,
        null_rate=null_rate,
        min_detectable=None,
        method="a proof checked on random instances: any violation contradicts it; the violation rate's one-sided "
        "95% upper bound (Clopper-Pearson) is upper_bound",
        violations=violations,
        upper_bound=upper,
    )
    return {"verdict": word, "test": test}


def exact_check(ok: bool, *, name: str, statistic: str, n: int = 1) -> dict:
    """A deterministic computation (no sampling), e.g. a constructed instance: its own answer, no error rate."""
    test = test_fields(
        name, statistic, n, null_rate=0.0, method="exact computation on constructed instances, no sampling"
    )
    return {"verdict": REPRODUCED if ok else NOT_REPRODUCED, "test": test}


# -- where the rules stand -----------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def rules_version() -> dict:
    """This module's last commit (where the source is a git checkout) and the SHA-256 of its text, so a
    report shows which rules judged it."""
    path = Path(__file__)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    commit = None
    try:
        done = subprocess.run(
            ["git", "log", "-1", "--format=%h %cs", "--", path.name],
            cwd=path.parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        commit = done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"module": "loopscape.reporting.verdicts", "last_commit": commit, "sha256": digest}


def evidence(outcome: dict, what: str, digits: int = 2) -> str:
    """A verdict row's ``ours`` cell: why it was not tested, or ``what`` and the per-seed values tested."""
    if outcome["verdict"] == NOT_TESTED:
        return outcome["reason"]
    return f"{what}: " + ", ".join(f"{v:+.{digits}f}" for v in outcome.get("values", []))


def describe(test: dict) -> str:
    """One line of a test for Markdown: statistic, estimate and interval, p, seeds, null rate, detectable."""
    if test.get("interval") is None and test.get("p_value") is None:
        return f"{test['name']}: {test['statistic']} ({test['n_seeds']} seeds)"
    parts = [f"{test['name']}: {test['statistic']}"]
    if test.get("estimate") is not None:
        parts.append(f"mean {test['estimate']:.3g}")
    if test.get("interval") is not None:
        lo, hi = test["interval"]
        parts.append(f"90% interval [{lo:.3g}, {hi:.3g}]")
    if test.get("p_value") is not None:
        parts.append(f"p = {test['p_value']:.3g}")
    parts.append(f"{test['n_seeds']} seeds" + (f" ({test['n_dropped']} missing)" if test.get("n_dropped") else ""))
    if test.get("null_rate") is not None:
        parts.append(f"null rate {test['null_rate']:.3f}")
    if test.get("min_detectable") is not None:
        parts.append(f"detectable at 80% power: {test['min_detectable']:.3g}")
    return "; ".join(parts)
