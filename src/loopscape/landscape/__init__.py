"""Curvature of any model: the Hessian as a linear operator (:mod:`.hessian`), algorithms
written against it (:mod:`.linalg`), the paper's metrics (:mod:`.spectrum`, :mod:`.river_valley`),
and one call for the common questions (:mod:`.api`)."""

# the operator's one-call form is hessian_operator: a function named `hessian` here would shadow the module
# loopscape.landscape.hessian (``import loopscape.landscape.hessian`` would give the function)
from loopscape.landscape.api import hessian_operator, hessian_trace, spectral_density, top_eigenvalues
from loopscape.landscape.loops import loop_hessian

__all__ = ["hessian_operator", "hessian_trace", "loop_hessian", "spectral_density", "top_eigenvalues"]
