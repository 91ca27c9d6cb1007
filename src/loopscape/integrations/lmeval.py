"""A ``loopscape`` model type for EleutherAI's lm-evaluation-harness (``pip install 'loopscape[eval]'``).

Importing this module registers ``loopscape``: lm-eval's own Hugging Face model (``HFLM``, so batching,
devices, dtypes and accelerate work as with ``--model hf``) loaded through :func:`loopscape.from_pretrained`,
with the loop settings as model args::

    loopscape lm-eval --model loopscape \\
        --model_args pretrained=runs/looped-llama,n_loops=8,exit=state,exit_threshold=0.3 --tasks hellaswag

    import lm_eval, loopscape.integrations.lmeval
    lm_eval.simple_evaluate(model="loopscape", model_args={"pretrained": path, "n_loops": 8}, tasks=[...])

Model args beyond ``hf``'s: ``n_loops``, ``exit`` (``none``, ``kl``, ``entropy``, ``state``),
``exit_threshold``, ``min_loops`` override what the checkpoint's ``config.loopscape`` holds; a checkpoint
saved without loop settings (a plain decoder) is looped by ``layers=a:b`` (and ``injection``) here.
``loopscape lm-eval`` is lm-eval's own command line with this model type registered (lm-eval finds model
types only in modules it has imported).
"""

from __future__ import annotations

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as error:  # one line, not a traceback from deep inside an optional extra
    raise ImportError("loopscape's lm-eval model needs lm-eval: pip install 'loopscape[eval]'") from error

from functools import partial

from loopscape.looped import find_looped
from loopscape.looped.decoder import looped_layers, loopify
from loopscape.looped.exit import EXITS
from loopscape.looped.io import NotLoopedError, from_pretrained, load_loop_weights
from loopscape.looped.range import INJECTIONS

__all__ = ["LoopscapeLM", "parse_layers"]


def parse_layers(layers) -> tuple[int, int] | None:
    """``"a:b"`` (lm-eval's model args are ``key=value`` strings) or a pair, as loopify's ``layers``."""
    if layers is None or isinstance(layers, (tuple, list)):
        return None if layers is None else tuple(layers)
    start, sep, stop = str(layers).partition(":")
    if not sep or not start.strip().isdigit() or not stop.strip().isdigit():
        raise ValueError(f"layers must be 'start:stop' decoder layer indices, e.g. layers=2:4 (got {layers!r})")
    return int(start), int(stop)


@register_model("loopscape")
class LoopscapeLM(HFLM):
    """lm-eval's ``hf`` model, looped by loopscape (module docstring)."""

    def __init__(
        self,
        pretrained,
        n_loops: int | None = None,
        exit: str | None = "saved",
        exit_threshold: float | None = None,
        min_loops: int | None = None,
        layers=None,
        injection: str | None = None,
        **kwargs,
    ) -> None:
        if isinstance(exit, str) and exit.lower() == "none":  # lm-eval's model args: "none" or "None"
            exit = None
        if exit != "saved" and exit not in EXITS:
            raise ValueError(f"exit must be one of none, kl, entropy, state (got {exit!r})")
        if injection is not None and injection not in INJECTIONS:
            raise ValueError(f"injection must be one of {INJECTIONS} (got {injection!r})")
        self._loop_args = dict(
            n_loops=n_loops,
            exit=exit,
            exit_threshold=exit_threshold,
            min_loops=min_loops,
            layers=parse_layers(layers),
            injection=injection,
        )
        super().__init__(pretrained=pretrained, **kwargs)
        if not isinstance(pretrained, str):  # a model object: HFLM does not call _create_model
            self._loop(self._model)

    def _create_model(self, pretrained: str, **kwargs) -> None:
        """lm-eval's own argument handling (dtype, devices, revision), with loopscape's one loader of a
        looped checkpoint (:func:`loopscape.looped.io.from_pretrained`) for the model itself: the loader is
        swapped in for HFLM's first ``from_pretrained`` call only (a ``delta=`` checkpoint loads as lm-eval's)."""
        a = self._loop_args
        _Loader.swap_once(self, partial(from_pretrained, layers=a["layers"], injection=a["injection"]))
        try:
            super()._create_model(pretrained=pretrained, **kwargs)
        except NotLoopedError:
            raise ValueError(NO_LAYERS) from None
        finally:
            _Loader.restore(self)
        self._loop(self._model, pretrained, kwargs.get("subfolder") or "")

    def _loop(self, model, path: str | None = None, subfolder: str = "") -> None:
        """The loop settings given as model args, over what the model holds (a model object passed in, or
        one loaded by another of HFLM's paths, e.g. AutoGPTQ, is looped here)."""
        a = self._loop_args
        if looped_layers(model) is None:
            if getattr(model.config, "loopscape", None) is not None:
                loopify(model)  # the settings the checkpoint holds, with the loop's own weights
                if path is not None:
                    load_loop_weights(model, path, subfolder)
            elif a["layers"] is None:
                raise ValueError(NO_LAYERS)
            else:
                loopify(model, layers=a["layers"], n_loops=1, injection=a["injection"] or "add")
        looped = find_looped(model)
        if a["n_loops"] is not None:
            looped.n_loops = a["n_loops"]
        if a["exit"] != "saved" or a["exit_threshold"] is not None or a["min_loops"] is not None:
            s = looped.settings()
            looped.set_exit(
                s["exit"] if a["exit"] == "saved" else a["exit"],
                s["exit_threshold"] if a["exit_threshold"] is None else a["exit_threshold"],
                s["min_loops"] if a["min_loops"] is None else a["min_loops"],
            )


NO_LAYERS = "layers must be given as 'start:stop' (e.g. layers=2:4): the model holds no loopscape settings"


class _Loader:
    """What HFLM calls as ``AUTO_MODEL_CLASS.from_pretrained(...)``: loopscape's loader for the first call,
    the class HFLM chose afterwards."""

    def __init__(self, lm, load):
        self.lm, self.load, self.auto = lm, load, lm.AUTO_MODEL_CLASS

    @classmethod
    def swap_once(cls, lm, load) -> None:
        lm.AUTO_MODEL_CLASS = cls(lm, load)

    @staticmethod
    def restore(lm) -> None:
        if isinstance(lm.AUTO_MODEL_CLASS, _Loader):
            lm.AUTO_MODEL_CLASS = lm.AUTO_MODEL_CLASS.auto

    def from_pretrained(self, *args, **kwargs):
        _Loader.restore(self.lm)  # a second call (a delta checkpoint) is HFLM's own
        return self.load(*args, **kwargs)


def main() -> None:
    """lm-eval's command line, with the ``loopscape`` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
