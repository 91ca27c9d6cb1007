"""Thin adapters of loopscape's framework-free objects to the frameworks researchers train and evaluate in.

* ``loopscape.integrations.hf`` (extra ``[hf]``): the Hugging Face Trainer callbacks (SHIFT, curvature).
* ``loopscape.integrations.lightning`` (extra ``[lightning]``): the Lightning callbacks (SHIFT, curvature).
* ``loopscape.integrations.lmeval`` (extra ``[eval]``): the ``loopscape`` model type of lm-evaluation-harness.

What they adapt lives in the core: the loop protocol and ``loopify`` in :mod:`loopscape.looped`, SHIFT's one
controller in :mod:`loopscape.shift.controller`, the curvature probe in :mod:`loopscape.landscape`.
"""
