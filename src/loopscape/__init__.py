"""loopscape: looped transformers, their loss landscapes (River-U/V-Valley), and SHIFT.

``loopscape.loopify`` loops a range of a Hugging Face decoder's layers
(:mod:`loopscape.integrations.loopify`); it is imported on first use, so
``import loopscape`` stays light.
"""


def __getattr__(name: str):
    if name == "loopify":
        from loopscape.integrations.loopify import loopify

        return loopify
    raise AttributeError(f"module 'loopscape' has no attribute {name!r}")
