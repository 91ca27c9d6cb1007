"""Where a Hugging Face causal LM keeps what ``loopify`` needs, found by structure (not by ``model_type``)."""

from __future__ import annotations

from torch import nn


class Structure:
    """The decoder stack, its ``nn.ModuleList`` of decoder layers, the norm applied before the LM head, and
    the LM head of a causal LM. A model it cannot read unambiguously (no LM head, an encoder-decoder, two
    candidate layer lists, no final norm) is refused in one line."""

    def __init__(self, model: nn.Module):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise ValueError(
                f"model must be a causal LM with its LM head (e.g. GPT2LMHeadModel, LlamaForCausalLM); "
                f"{type(model).__name__} has no output embeddings (a base model?)"
            )
        config = getattr(model, "config", None)
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(
                f"model must be a decoder-only causal LM; {type(model).__name__} is an encoder-decoder, whose "
                "layers loopify cannot tell apart (encoder or decoder) and whose layers need cross-attention inputs"
            )
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        expected = getattr(text, "num_hidden_layers", None)
        lists = [
            (name, m)
            for name, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(x) for x in m}) == 1
        ]
        if expected is not None:
            lists = [(n, m) for n, m in lists if len(m) == expected] or lists
        if not lists:
            raise ValueError(
                f"model must hold its decoder layers in an nn.ModuleList of one layer class "
                f"(looked in {type(model).__name__} and found none)"
            )
        longest = max(len(m) for _, m in lists)
        candidates = [(n, m) for n, m in lists if len(m) == longest]
        if len(candidates) > 1:
            raise ValueError(
                f"model must hold one list of decoder layers; {type(model).__name__} has "
                f"{len(candidates)} of {longest} layers ({', '.join(n for n, _ in candidates)}), which loopify "
                "cannot tell apart"
            )
        name, self.layers = candidates[0]
        parent_name, _, self.layers_name = name.rpartition(".")
        self.stack = model.get_submodule(parent_name) if parent_name else model
        children = list(self.stack.named_children())
        after = [m for n, m in children[[n for n, _ in children].index(self.layers_name) + 1 :] if _is_norm(m)]
        if not after:
            raise ValueError(
                f"model must apply a final norm after its decoder layers (looked in {type(self.stack).__name__} "
                f"after .{self.layers_name} for a LayerNorm/RMSNorm module and found none)"
            )
        self.norm, self.head = after[0], head
        self.hidden_size = getattr(text, "hidden_size", None) or model.get_input_embeddings().embedding_dim


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))) or type(module).__name__.endswith(
        ("Norm", "LayerNorm", "RMSNorm")
    )


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of an ``nn.Linear`` or of GPT-2's ``Conv1D`` (weight stored as in x out); None otherwise."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.shape[0], module.nf
    return None
