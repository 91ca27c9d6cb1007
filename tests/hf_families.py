"""Tiny causal LMs of nine Hugging Face families, built offline from configs (nothing is downloaded)."""

import torch
import transformers

V = 40
SIZE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_attention_heads=4, max_position_embeddings=64)
GQA = dict(SIZE, num_key_value_heads=2)
TOKENS = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)


def family_config(model_type: str, n_layer: int):
    """The tiny configuration of one family (built offline)."""
    if model_type == "gpt2":
        return transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=n_layer, n_head=4, **TOKENS)
    if model_type == "gpt_neox":
        return transformers.GPTNeoXConfig(**SIZE, num_hidden_layers=n_layer, **TOKENS)
    if model_type in ("gemma", "qwen3"):
        return transformers.AutoConfig.for_model(model_type, **GQA, head_dim=8, num_hidden_layers=n_layer, **TOKENS)
    return transformers.AutoConfig.for_model(model_type, **GQA, num_hidden_layers=n_layer, **TOKENS)


FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "gemma", "phi3", "olmo", "gpt_neox", "qwen3")


def build(model_type: str, n_layer: int = 4, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(family_config(model_type, n_layer))
    return model.to(dtype).eval()


def tiny_llama(vocab_size: int = 256, hidden_size: int = 32, **overrides) -> transformers.LlamaConfig:
    """A 4-layer Llama configuration with untied embeddings (256 tokens: text read as UTF-8 bytes)."""
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return transformers.LlamaConfig(**{**settings, **overrides})
