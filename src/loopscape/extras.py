"""One line naming the extra to install when an optional package (a framework, TensorBoard) is missing."""

from __future__ import annotations

import importlib


def require_extra(module: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"loopscape's {extra} integration needs the '{module}' package: pip install 'loopscape[{extra}]'"
        ) from None
