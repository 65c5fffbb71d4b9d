"""Transformer growth: is every growth step exact, and what does one cost against a training step?

Hugging Face GPT-2, Llama (RMSNorm, SwiGLU, rotary, grouped-query attention) and BERT (post-norm),
built from configs with 4 layers and d_model = 128 (4 heads of 32, MLP 512, vocabulary 256), no
download. For each, on its own copy of a model trained 3 AdamW steps:

- every growth edit, one at a time: MLP hidden (+64, ``zero`` and ``net2net``), attention heads
  (+1 head, or one key/value head with its query heads for Llama), the residual stream (+32 with
  ``zero``, which carries it; and x2 with ``net2net``) and depth (a block inserted in the middle of
  the stack, ``identity`` and ``fresh``); the relative output change (max-abs change over the
  largest logit) in float64 and in float32, or the refusal (``EditError``) and its first words;
- the wall-clock time of each edit on the float32 model, AdamW carried, against one training step
  (forward, backward and AdamW step on a batch of 8 x 128 tokens, median of 5), side by side in one
  run, each edit over the median of 3 steps timed right before it on the same copy: the first edit of
  its kind on a fresh copy (a Hugging Face model's code is not adaptnet's, so the first edit of each
  kind of group traces the model again to check that no size is written into its code) and the same
  edit again on that copy (median of 2). The model is traced before, once
  (its trace time is printed apart: a model is traced once and the trace is kept; a depth edit
  traces the new structure).

Targets (issue: grow transformers): relative change <= 1e-8 in float64 and <= 1e-6 in float32;
one growth step costs less than one training step.

Run: ``python benchmarks/transformer_growth.py`` (``--out`` for the JSON path).
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import adaptnet as an
from _teacher_student import finish, machine_info, render
from _timing import timed

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "transformer_growth.json"
VOCAB, SEQ, BATCH, LAYERS, D, HEADS, MLP = 256, 128, 8, 4, 128, 4, 512


def families() -> dict[str, tuple[Callable[[], nn.Module], dict[str, str]]]:
    """name -> (factory, group names: mlp, heads, stream, block)."""
    import transformers

    transformers.logging.set_verbosity_error()

    def gpt2() -> nn.Module:
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=D, n_layer=LAYERS, n_head=HEADS, n_inner=MLP, vocab_size=VOCAB, n_positions=SEQ,
            bos_token_id=0, eos_token_id=0))

    def llama() -> nn.Module:
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=D, intermediate_size=MLP, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=SEQ, bos_token_id=0,
            eos_token_id=0, pad_token_id=0))

    def bert() -> nn.Module:
        return transformers.BertForMaskedLM(transformers.BertConfig(
            hidden_size=D, intermediate_size=MLP, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            vocab_size=VOCAB, max_position_embeddings=SEQ))

    return {
        "GPT-2": (gpt2, {"mlp": "transformer.h.1.mlp.c_fc", "heads": "transformer.h.1.attn.c_attn",
                         "stream": "transformer.wte", "block": "transformer.h.1"}),
        "Llama (GQA)": (llama, {"mlp": "model.layers.1.mlp.gate_proj", "heads": "model.layers.1.self_attn.q_proj",
                                "stream": "model.embed_tokens", "block": "model.layers.1"}),
        "BERT (post-norm)": (bert, {"mlp": "bert.encoder.layer.1.intermediate.dense",
                                    "heads": "bert.encoder.layer.1.attention.self.query",
                                    "stream": "bert.embeddings.word_embeddings", "block": "bert.encoder.layer.1"}),
    }


EDITS: list[tuple[str, Callable[[nn.Module, dict[str, str], Any], Any]]] = [
    ("MLP +64 zero", lambda m, g, o: an.widen(m, g["mlp"], 64, init="zero", optimizer=o)),
    ("MLP +64 net2net", lambda m, g, o: an.widen(m, g["mlp"], 64, init="net2net", optimizer=o)),
    ("heads +1 zero", lambda m, g, o: an.widen(m, g["heads"], 1, init="zero", optimizer=o)),
    ("heads +1 net2net", lambda m, g, o: an.widen(m, g["heads"], 1, init="net2net", optimizer=o)),
    ("d_model +32 zero (carry)", lambda m, g, o: an.widen(m, g["stream"], 32, init="zero", optimizer=o)),
    ("d_model x2 net2net", lambda m, g, o: an.widen(m, g["stream"], D, init="net2net", optimizer=o)),
    ("depth +1 identity", lambda m, g, o: an.deepen(m, g["block"], init="identity", optimizer=o)),
    ("depth +1 fresh", lambda m, g, o: an.deepen(m, g["block"], init="fresh", optimizer=o)),
]


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def train_step(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    model.train()
    out = model(ids).logits
    loss = nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def trained(factory: Callable[[], nn.Module], dtype: torch.dtype, ids: torch.Tensor) -> tuple[nn.Module, Any, float]:
    """A model of ``dtype`` after 3 AdamW steps, traced; and the seconds its trace took."""
    torch.manual_seed(0)
    model = factory().to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        train_step(model, opt, ids)
    start = time.perf_counter()
    an.unit_groups(model, (ids[:2, :16],))
    return model, opt, time.perf_counter() - start


def exactness(factory: Callable[[], nn.Module], groups: dict[str, str], dtype: torch.dtype,
              ids: torch.Tensor) -> dict[str, float | str]:
    base, base_opt, _ = trained(factory, dtype, ids)
    out: dict[str, float | str] = {}
    for name, edit in EDITS:
        model, opt = copy.deepcopy((base, base_opt))
        before = logits(model, ids)
        try:
            edit(model, groups, opt)
        except an.EditError as err:
            out[name] = "refused: " + " ".join(str(err).split()[:9])
            continue
        out[name] = float((logits(model, ids) - before).abs().max() / before.abs().max())
    return out


def timing(factory: Callable[[], nn.Module], groups: dict[str, str], ids: torch.Tensor) -> dict[str, Any]:
    """Each edit's seconds over the median of 3 training steps timed right before it, on the same
    copy (interleaved, so that a change in the machine's load moves both)."""
    base, base_opt, trace_s = trained(factory, torch.float32, ids)
    first: dict[str, float | None] = {}
    again: dict[str, float | None] = {}
    steps = []
    for name, edit in EDITS:
        model, opt = copy.deepcopy((base, base_opt))

        def step(m: nn.Module = model, o: Any = opt) -> float:
            return statistics.median(timed(lambda: train_step(m, o, ids)) for _ in range(3))

        def run(m: nn.Module = model, o: Any = opt, e: Any = edit) -> None:
            e(m, groups, o)
        try:
            seconds = step()
            first[name] = timed(run) / seconds
            ratios = []
            for _ in range(2):
                seconds = step()
                ratios.append(timed(run) / seconds)
            again[name] = statistics.median(ratios)
            steps.append(seconds)
        except an.EditError:
            first[name] = again[name] = None
    return {"train_step_ms": statistics.median(steps) * 1e3, "trace_ms": trace_s * 1e3, "first_over_step": first,
            "again_over_step": again}


def table(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [f"Transformer growth, {LAYERS} layers x d_model {D} ({HEADS} heads, MLP {MLP}); torch {m['torch']}, "
             f"threads {m['threads']}, {m['cpu']}", ""]
    for family, row in results["families"].items():
        t = row["timing"]
        lines.append(f"{family}: training step {t['train_step_ms']:.0f} ms (batch {BATCH} x {SEQ} tokens, "
                     f"AdamW), trace {t['trace_ms']:.0f} ms once")
        rows = [("edit", "change f64", "change f32", "first / step", "again / step")]
        for name, _ in EDITS:
            f64, f32 = row["float64"][name], row["float32"][name]
            first, again = t["first_over_step"][name], t["again_over_step"][name]
            rows.append((name, f64 if isinstance(f64, str) else f"{f64:.1e}",
                         "" if isinstance(f32, str) else f"{f32:.1e}",
                         "" if first is None else f"{first:.2f}", "" if again is None else f"{again:.2f}"))
        lines += [*render(rows), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    logging.getLogger("adaptnet").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    results: dict[str, Any] = {"machine": machine_info(torch.get_num_threads()), "families": {}}
    for family, (factory, groups) in families().items():
        results["families"][family] = {
            "float64": exactness(factory, groups, torch.float64, ids),
            "float32": exactness(factory, groups, torch.float32, ids),
            "timing": timing(factory, groups, ids),
        }
        print(f"{family} done ({time.perf_counter() - started:.0f} s)", flush=True)
    return finish(results, started, args.out, table)


if __name__ == "__main__":
    raise SystemExit(main())
