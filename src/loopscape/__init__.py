"""loopscape: looped transformers, their loss landscapes (River-U/V-Valley), and SHIFT.

``loopscape.loopify`` loops a range of a Hugging Face decoder's layers and ``loopscape.from_pretrained``
loads a looped one back; ``set_n_loops`` and ``set_exit`` change them (:mod:`loopscape.looped`, where the
loop protocol every looped model implements lives); ``generate_speculative`` drafts with fewer loops and
verifies at full depth, and ``draft_model`` gives Hugging Face's assisted generation such a draft
(:mod:`loopscape.looped.speculative`). They are imported on first use, so ``import loopscape``
stays light.
"""

_LAZY = {"loopify", "from_pretrained", "set_n_loops", "set_exit"}


def __getattr__(name: str):
    if name in ("generate_speculative", "draft_model"):
        import loopscape.looped.speculative

        return getattr(loopscape.looped.speculative, name)
    if name in _LAZY:
        import loopscape.looped

        return getattr(loopscape.looped, name)
    raise AttributeError(f"module 'loopscape' has no attribute {name!r}")
