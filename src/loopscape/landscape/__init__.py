"""Curvature of any model: the Hessian as a linear operator (:mod:`.hessian`), algorithms
written against it (:mod:`.linalg`), the paper's metrics (:mod:`.spectrum`, :mod:`.river_valley`),
and one call for the common questions (:mod:`.api`)."""

from loopscape.landscape.api import hessian, hessian_trace, spectral_density, top_eigenvalues

__all__ = ["hessian", "hessian_trace", "spectral_density", "top_eigenvalues"]
