"""`loopscape theory`: Theorems 1-3 and Corollaries 1-2, run and checked.

* Theorem 1 on random Setting 1 instances: ``max_K ||C_K|| <= C``. Instances
  that break its assumptions (a valley eigenvalue <= 0, or ``eta lambda > 1``)
  are reported apart, neither for nor against it.
* Corollaries 1-2: U valley against V valleys of growing condition number
  (same d_V, eigenbasis, coupling, drive and start); C, the measured force,
  river progress and loss under the proofs' dynamics (valley without river
  feedback; the fully coupled quadratic has no river curvature and diverges).
* Theorem 2 on random Setting 2 (quartic valley) instances, bound from ``H^B``.
* Theorem 3 on the toy models: gradient inner products w.r.t. ``W_K`` and
  ``W_Q``, Single-Attn vs Looped-Attn at shared parameters, at random
  initialisations and along Single-Attn's training trajectory.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from loopscape.config import require, require_seeds
from loopscape.data.markov import build_task
from loopscape.experiments.markov import MarkovStudyConfig
from loopscape.io import atomic_write_text, read_json_file, write_json
from loopscape.landscape.alignment import gradient_alignment, meets_assumption4
from loopscape.landscape.quadratic import (
    QuarticValley,
    RiverValley,
    decoupled_run,
    random_orthogonal,
    u_and_v_valleys,
    valley_force,
    valley_path,
)
from loopscape.reporting import theory as theory_report
from loopscape.reporting.html import Section, StudyReport
from loopscape.training.markov import MarkovTrainConfig, train_markov
from loopscape.training.run import seeded

TOL = 1e-9  # relative slack for floating-point comparisons with a bound


@dataclass
class TheoryStudyConfig:
    instances: int = 200
    steps: int = 1000
    seed: int = 0
    kappas: list[float] = field(default_factory=lambda: [10.0, 100.0, 1000.0])
    alignment_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    alignment_epochs: int = 150
    alignment_every: int = 10

    def validate(self, p: str = "") -> None:
        require(self.instances >= 1, f"{p}instances", "an integer >= 1", self.instances)
        require_seeds(self.alignment_seeds, f"{p}alignment_seeds")
        require(self.steps >= 1, f"{p}steps", "an integer >= 1", self.steps)
        require(
            bool(self.kappas) and all(k > 1 for k in self.kappas),
            f"{p}kappas",
            "a non-empty list of numbers > 1",
            self.kappas,
        )
        require(self.alignment_epochs >= 1, f"{p}alignment_epochs", "an integer >= 1", self.alignment_epochs)
        require(self.alignment_every >= 1, f"{p}alignment_every", "an integer >= 1", self.alignment_every)


def random_instance(g: torch.Generator, quartic: bool) -> tuple[RiverValley, torch.Tensor, float, dict]:
    """A random Setting 1 (or, ``quartic``, Setting 2) instance: landscape, valley start, step size, its parameters."""
    d_V = int(torch.randint(2, 31, (1,), generator=g))
    d_R = int(torch.randint(1, 9, (1,), generator=g))
    lam = torch.exp(torch.empty(d_V, dtype=torch.float64).uniform_(math.log(1e-3), 0.0, generator=g))
    if not quartic and torch.rand(1, generator=g) < 0.1:  # some instances with a non-positive valley eigenvalue
        lam[0] = -lam[0]
    Q = random_orthogonal(d_V, g)
    H_RV = torch.randn(d_R, d_V, generator=g, dtype=torch.float64)
    h_R = torch.randn(d_R, generator=g, dtype=torch.float64)
    theta_V0 = torch.randn(d_V, generator=g, dtype=torch.float64)
    eta_lam = float(
        torch.empty(1).uniform_(0.05, 1.6, generator=g)
    )  # eta * largest |eigenvalue|: > 1 breaks the theorem
    beta = float(torch.empty(1).uniform_(0.01, 1.0, generator=g))
    H_V = (Q * lam) @ Q.T
    land = QuarticValley(H_V, H_RV, h_R, beta=beta) if quartic else RiverValley(H_V, H_RV, h_R)
    # the quartic valley's Hessian is largest at the start (|u| only shrinks), so scale eta to it there
    top = land.valley_hessian_eigenvalues(theta_V0) if quartic else lam
    eta = eta_lam / top.abs().max().item()
    params = {"d_V": d_V, "d_R": d_R, "eta_lambda_max": round(eta_lam, 4), "min_eigenvalue": float(lam.min())}
    if quartic:
        params["beta"] = round(beta, 4)
    return land, theta_V0, eta, params


def check_bound(quartic: bool, cfg: TheoryStudyConfig) -> dict:
    """Theorem 1 (Setting 1) or Theorem 2 (Setting 2) on ``cfg.instances`` random instances."""
    g = torch.Generator().manual_seed(cfg.seed + (1 if quartic else 0))
    held, failed, outside = 0, [], {"n": 0, "held_anyway": 0}
    ratios = []
    for i in range(cfg.instances):
        land, theta0, eta, params = random_instance(g, quartic)
        forces = valley_force(land, theta0, eta, cfg.steps)
        measured = forces.norm(dim=1).max().item()
        bound = land.force_bound(theta0)  # for Setting 2, H_V is H^B: the bound uses its spectrum
        if quartic:  # Assumption 3 with the proof's step condition: eta * lambda_max(H_V(theta_k)) <= 1 along the path
            meets = _quartic_path_ok(land, theta0, eta, cfg.steps)
        else:
            meets = land.meets_theorem1(eta)
        ok = measured <= bound * (1 + TOL)
        if not meets:
            outside["n"] += 1
            outside["held_anyway"] += ok
            continue
        ratios.append(measured / bound)
        if ok:
            held += 1
        else:
            failed.append({"instance": i, **params, "measured": measured, "bound": bound})
    n = cfg.instances - outside["n"]
    return {
        "theorem": "Theorem 2 (Setting 2)" if quartic else "Theorem 1 (Setting 1)",
        "instances": cfg.instances,
        "meeting_assumptions": n,
        "held": held,
        "fraction_held": held / n if n else None,
        "counterexamples": failed,
        "outside_assumptions": outside,
        "tightness_median": float(np.median(ratios)) if ratios else None,
        "tightness_max": float(np.max(ratios)) if ratios else None,
    }


def _quartic_path_ok(land: QuarticValley, theta0: torch.Tensor, eta: float, steps: int) -> bool:
    if (land.valley_eigenvalues <= 0).any():
        return False
    path = valley_path(land, theta0, eta, steps)
    return eta * land.largest_eigenvalue_along(path) <= 1


def corollaries(cfg: TheoryStudyConfig, quartic_beta: float | None = None) -> dict:
    """U valley vs V valleys of growing kappa; C, measured force, river progress and loss.

    With ``quartic_beta`` the same comparison in Setting 2: each valley becomes a
    :class:`QuarticValley` with ``H^B`` = its Hessian (Theorem 2, part (b)).
    """
    runs = {}
    for kappa in cfg.kappas:
        u, v, theta0 = u_and_v_valleys(kappa_v=kappa, seed=cfg.seed)
        if quartic_beta is not None:
            u, v = (QuarticValley(x.H_V, x.H_RV, x.h_R, beta=quartic_beta) for x in (u, v))
            top = max(x.valley_hessian_eigenvalues(theta0).max().item() for x in (u, v))
        else:
            top = v.valley_eigenvalues.max().item()
        eta = 1.0 / top  # same step for both; eta * lambda <= 1 in both (along the path: |u| only shrinks)
        for name, land in (("U", u), (f"V (kappa={kappa:g})", v)):
            if name in runs:
                continue
            tr = decoupled_run(land, theta0, eta, cfg.steps)
            unit = land.h_R / land.h_R.norm()
            runs[name] = {
                "kappa": land.kappa,
                "C": land.force_bound(theta0),
                "measured_force": tr.river_force.norm(dim=1).max().item(),
                "river_progress": (tr.theta_R @ unit).tolist(),
                "loss": tr.loss.tolist(),
            }
    u_c = runs["U"]["C"]
    checks = {
        name: {
            "C_ratio_to_U": r["C"] / u_c,
            "force_ratio_to_U": r["measured_force"] / runs["U"]["measured_force"],
            "final_loss_below_U": r["loss"][-1] < runs["U"]["loss"][-1],
            "river_progress_beyond_U": r["river_progress"][-1] > runs["U"]["river_progress"][-1],
        }
        for name, r in runs.items()
        if name != "U"
    }
    return {"runs": runs, "checks": checks}


def approximate_psd(model, x: torch.Tensor) -> dict:
    """Assumption 5 (Appendix G) measured: ``M = W_Q W_V P W_K`` with ``P = E_0 E_0^T`` averaged over the
    inputs ``x`` (the composite transformation the proof needs approximately PSD). Returns the smallest over
    the largest eigenvalue of its symmetric part (>= 0 iff that part is PSD) and its asymmetry
    ``||M - M^T|| / ||M||`` (Frobenius), the two deviations Remark 7 names."""
    with torch.no_grad():
        E = model.embed(x).double()
        P = (E.mT @ E).mean(0)
        M = model.W_Q.double() @ model.W_V.double() @ P @ model.W_K.double()
        eig = torch.linalg.eigvalsh((M + M.T) / 2)
        return {
            "min_over_max_eigenvalue": float(eig[0] / eig[-1].abs().clamp_min(1e-300)),
            "asymmetry": float(torch.linalg.matrix_norm(M - M.T) / torch.linalg.matrix_norm(M)),
        }


def _alignment_rows(single, looped, x, y, seed: int, epoch: int, where: str) -> list[dict]:
    """Theorem 3's inner products at Single-Attn's current parameters, shared with Looped-Attn."""
    params = dict(single.named_parameters())
    meets = all(meets_assumption4(params[n].detach()) for n in ("W_K", "W_Q", "W_V"))
    return [
        {"seed": seed, "epoch": epoch, "where": where, "param": name, "meets_assumption4": meets, **r}
        for name, r in gradient_alignment(single, looped, params, x, y).items()
    ]


class _AlongTrajectory:
    """A trainer tracker that records ``measure(epoch, model)`` every ``every`` epochs."""

    def __init__(self, measure, every: int):
        self.measure, self.every, self.rows = measure, every, []

    def open(self, run_dir, start):
        pass

    def update(self, epoch, model):
        if epoch and epoch % self.every == 0:
            self.rows += self.measure(epoch, model)

    def close(self):
        pass


def theorem3(cfg: TheoryStudyConfig, study: MarkovStudyConfig | None = None) -> dict:
    """Gradient alignment W_K / W_Q, Single-Attn vs Looped-Attn on ``study``'s language and model (default: the
    Markov study's defaults; ``loopscape reproduce`` passes its own, so every language is measured on itself)."""
    study = MarkovStudyConfig() if study is None else study
    _, task = build_task(study.data)
    x, y = task.train.inputs, task.train.targets
    rows, assumption5 = [], []
    for seed in cfg.alignment_seeds:
        with seeded(seed):
            single = study.build_model(1)
        looped = study.build_model(study.model.n_loops)
        # an initialisation built to meet Assumption 4: positive diagonal, small dense perturbation
        g = torch.Generator().manual_seed(1000 + seed)
        with torch.no_grad():
            for n in ("W_K", "W_Q", "W_V"):
                W = getattr(single, n)
                d = W.shape[0]
                W.copy_(torch.diag(torch.rand(d, generator=g) + 0.5) + 0.05 * torch.randn(d, d, generator=g) / d**0.5)
        rows += _alignment_rows(single, looped, x, y, seed, 0, "assumption-4 initialisation")
        assumption5.append({"seed": seed, **approximate_psd(single, x)})
        with seeded(seed):
            single = study.build_model(1)
        rows += _alignment_rows(single, looped, x, y, seed, 0, "initialisation")
        along = _AlongTrajectory(
            lambda epoch, model, seed=seed, looped=looped: _alignment_rows(
                model, looped, x, y, seed, epoch, "trajectory"
            ),
            cfg.alignment_every,
        )
        with tempfile.TemporaryDirectory() as d:
            config = MarkovTrainConfig(epochs=cfg.alignment_epochs, checkpoint_every=10**9)
            train_markov(single, task, config, d, seed=seed, trackers=[along])
        rows += along.rows
    summary = {}
    for where in ("assumption-4 initialisation", "initialisation", "trajectory"):
        for name in ("W_K", "W_Q"):
            sel = [r for r in rows if r["where"] == where and r["param"] == name]
            if sel:
                cos = np.array([r["cosine"] for r in sel])
                summary[f"{where}/{name}"] = {
                    "n": len(sel),
                    "meeting_assumption4": sum(r["meets_assumption4"] for r in sel),
                    "fraction_nonnegative": float((np.array([r["inner"] for r in sel]) >= 0).mean()),
                    "cosine_min": float(cos.min()),
                    "cosine_median": float(np.median(cos)),
                    "cosine_max": float(cos.max()),
                }
    return {"rows": rows, "summary": summary, "assumption5": assumption5}


FIGURES = [
    ("river_u_v_valleys.png", "River-U-Valley and River-V-Valley (illustration)"),
    ("corollaries_river_progress.png", "Corollaries 1-2: river progress and loss, U against V valleys"),
    ("theorem2_river_progress.png", "Theorem 2 (b): the same in Setting 2"),
    ("theorem3_cosines.png", "Theorem 3: gradient cosines"),
]


def run_theory(
    cfg: TheoryStudyConfig,
    out: str | Path,
    show_progress: bool = True,
    resume: bool = False,
    study: MarkovStudyConfig | None = None,
) -> StudyReport:
    """Run every check, draw the figures, write ``theory.md`` and ``theory.json``; Theorem 3 on ``study``'s
    language and model (:func:`theorem3`). With ``resume``, finished results (``theory.json``) are read back
    instead of rerun."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figs = out / "figures"
    if resume and (out / "theory.json").exists():
        results = read_json_file(out / "theory.json")
    else:
        steps = [
            ("Theorem 1", lambda: check_bound(False, cfg)),
            ("Theorem 2", lambda: check_bound(True, cfg)),
            ("Corollaries 1-2", lambda: corollaries(cfg)),
            ("Theorem 2 (b)", lambda: corollaries(cfg, quartic_beta=0.5)),
            ("Theorem 3", lambda: theorem3(cfg, study)),
        ]
        results = {}
        for name, fn in steps:
            if show_progress:
                print(f"[theory] {name}")
            results[name] = fn()
        theory_report.plot_corollaries(results["Corollaries 1-2"], figs / "corollaries_river_progress.png")
        theory_report.plot_corollaries(results["Theorem 2 (b)"], figs / "theorem2_river_progress.png")
        theory_report.plot_valley_pictures(figs / "river_u_v_valleys.png")
        theory_report.plot_alignment(results["Theorem 3"], figs / "theorem3_cosines.png")
        write_json(out / "theory.json", results)
    md = theory_report.theory_markdown(results, cfg)
    atomic_write_text(out / "theory.md", md)
    section = Section("theory", "Theory", md, [(figs / name, caption) for name, caption in FIGURES])
    return StudyReport(results, theory_report.verdict_rows(results), section)


def add_to_markov_summary(run: Path, study: StudyReport, cfg: TheoryStudyConfig) -> None:
    """Append the theory section to a `loopscape markov` run's ``summary.md`` (``loopscape theory --report``)."""
    title = "## Theory (`loopscape theory`, figures in theory/figures)"
    section = theory_report.theory_markdown(study.results, cfg, title=title)
    summary = (run / "summary.md").read_text(encoding="utf-8")
    atomic_write_text(run / "summary.md", summary.rstrip() + "\n\n" + section)
