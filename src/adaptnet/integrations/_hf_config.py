"""A grown Hugging Face model's sizes written back into its config, so that ``from_pretrained`` rebuilds it.

The config can say only what every layer shares: one MLP width (``n_inner`` /
``intermediate_size``), one head count, one residual width. GPT-2 and BERT also derive the
head size as ``hidden_size // num_attention_heads``, so they cannot say "more heads of the same
size" either; Llama-style configs can (``head_dim`` is a field). What a config cannot say is
returned as reasons (and the config is left as it was for those fields); the model is then
loaded with ``adaptnet.integrations.transformers.from_pretrained``, which replays the edits.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def _blocks(model: nn.Module) -> tuple[str, Any]:
    """(family, the list of transformer blocks) of the architectures adaptnet knows."""
    base = getattr(model, "base_model", model)
    if hasattr(base, "h"):
        return "gpt2", base.h
    if hasattr(base, "layers"):
        return "llama", base.layers
    if hasattr(base, "encoder") and hasattr(base.encoder, "layer"):
        return "bert", base.encoder.layer
    raise ValueError(f"adaptnet does not know where {type(model).__name__} keeps its widths")


def _same(values: list[int], what: str, reasons: list[str]) -> int | None:
    if len(set(values)) == 1:
        return values[0]
    reasons.append(f"{what} differ between layers ({values}); a config holds one value")
    return None


def sync_config(model: nn.Module) -> list[str]:
    """Update ``model.config`` to the module's current sizes; return what it cannot express."""
    config = getattr(model, "config", None)
    if config is None:
        return [f"{type(model).__name__} has no .config"]
    reasons: list[str] = []
    try:
        family, blocks = _blocks(model)
    except ValueError as err:
        return [str(err)]
    hidden = int(model.get_input_embeddings().weight.shape[1])  # type: ignore[operator]
    config.num_hidden_layers = len(blocks)
    if family == "gpt2":
        head_dim = blocks[0].attn.head_dim
        inner = _same([b.mlp.c_fc.weight.shape[1] for b in blocks], "MLP widths (n_inner)", reasons)
        heads = _same([b.attn.c_attn.weight.shape[1] // 3 // head_dim for b in blocks], "head counts", reasons)
        fields = {"n_inner": inner}
    elif family == "llama":
        head_dim = blocks[0].self_attn.head_dim
        inner = _same([b.mlp.gate_proj.out_features for b in blocks], "MLP widths (intermediate_size)", reasons)
        heads = _same([b.self_attn.q_proj.out_features // head_dim for b in blocks], "query head counts", reasons)
        kv = _same([b.self_attn.k_proj.out_features // head_dim for b in blocks], "key/value head counts", reasons)
        fields = {"intermediate_size": inner, "num_key_value_heads": kv, "head_dim": head_dim}
    else:
        head_dim = blocks[0].attention.self.attention_head_size
        inner = _same([b.intermediate.dense.out_features for b in blocks], "MLP widths (intermediate_size)", reasons)
        heads = _same([b.attention.self.query.out_features // head_dim for b in blocks], "head counts", reasons)
        fields = {"intermediate_size": inner}
    if family != "llama" and heads is not None and heads * head_dim != hidden:
        reasons.append(f"{heads} heads of size {head_dim} next to a residual width of {hidden}: "
                       f"{type(config).__name__} derives the head size as hidden_size // num_attention_heads")
        heads = None
    fields.update(hidden_size=hidden, num_attention_heads=heads)
    for key, value in fields.items():
        if value is not None:
            setattr(config, key, int(value))
    return reasons
