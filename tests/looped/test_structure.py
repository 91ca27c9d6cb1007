"""Structure discovery refuses what it cannot read unambiguously, in one line."""

import pytest
from torch import nn

transformers = pytest.importorskip("transformers")

from loopscape.looped.decoder import loopify  # noqa: E402


def test_an_encoder_decoder_is_refused_in_one_line():
    config = transformers.T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=3, num_heads=4)
    model = transformers.T5ForConditionalGeneration(config)
    with pytest.raises(ValueError, match=r"^model must be a decoder-only causal LM; T5ForConditionalGeneration is an "):
        loopify(model, layers=(0, 2), n_loops=3)
    assert getattr(model.config, "loopscape", None) is None  # nothing was hooked


def test_two_layer_lists_of_one_length_are_refused_in_one_line():
    class TwoStacks(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
            self.b = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
            self.norm, self.head = nn.LayerNorm(4), nn.Linear(4, 4)

        def get_output_embeddings(self):
            return self.head

    with pytest.raises(ValueError, match=r"^model must hold one list of decoder layers; TwoStacks has 2 of 3 layers"):
        loopify(TwoStacks(), layers=(0, 2), n_loops=2)
