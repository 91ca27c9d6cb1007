"""Looped models, said once: the :class:`Looped` protocol that every looped model implements, the one scan
that finds it (:func:`find_looped`), and ``loopify``, which makes a range of any Hugging Face decoder's
layers a looped model. This package imports nothing else of loopscape: the models implement the protocol,
and SHIFT, the sweeps, the curvature and the FLOP counts read it.

Nothing here imports ``transformers``: ``from_pretrained`` does, when called.
"""

from loopscape.looped.decoder import loopify, set_exit
from loopscape.looped.io import from_pretrained
from loopscape.looped.protocol import (
    Looped,
    check_n_loops,
    find_looped,
    get_n_loops,
    loop_settings,
    set_backprop_loops,
    set_n_loops,
    truncation,
    weights_inside,
)

__all__ = [
    "Looped",
    "check_n_loops",
    "find_looped",
    "from_pretrained",
    "get_n_loops",
    "loop_settings",
    "loopify",
    "set_exit",
    "set_backprop_loops",
    "set_n_loops",
    "truncation",
    "weights_inside",
]
