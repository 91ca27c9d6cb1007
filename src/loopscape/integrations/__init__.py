"""Loopscape on models and trainers we did not write (Appendix B).

* :func:`~loopscape.integrations.loopify.loopify`: loop a range of decoder
  layers of a Hugging Face causal LM (GPT-2 and Llama families), with input
  injection; needs no import of ``transformers`` itself.
* :class:`~loopscape.shift.controller.ShiftController` (in the core, not here):
  SHIFT's one schedule applied to a model and an optimiser, framework-free: a
  plain PyTorch loop calls it directly, and the callbacks below wrap it.
* ``loopscape.integrations.hf.ShiftCallback`` (extra ``[hf]``) and
  ``loopscape.integrations.lightning.ShiftCallback`` (extra ``[lightning]``):
  thin adapters of the controller to each framework's callback API.
"""
