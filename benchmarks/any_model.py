"""Any model: what adaptnet's tracing finds and what its edits do on a zoo of small models.

For every model of ``_zoo.py`` (plain containers, ResNet/MobileNet/ConvNeXt/ViT-style nets,
``nn.TransformerEncoder``, Hugging Face GPT-2, Llama with grouped-query attention, BERT, OPT
from small configs):

- the unit groups ``adaptnet.unit_groups`` finds, and the time one trace takes (median of 3);
- the groups Torch-Pruning's ``DependencyGraph`` finds (``len(DG.get_all_groups())``, default
  root types Conv and Linear), built in a forked process with a time limit;
- for every adaptnet group, on its own copy of the model:
  widen by 2 units in float64 with ``init="net2net"`` (else ``"zero"``), ``exact=True``: exact
  when the relative output change is <= 1e-8; a group whose exact inits are refused
  (``EditError``) is counted as refused and then widened with ``exact=False`` (change reported);
  prune 25% (float32) and take one AdamW step: the loss is finite and the optimizer's state has
  the parameters' shapes after every edit;
- deepen after the first block of its stack (float64, exact or refused);
- save -> load into a freshly built instance (another seed) after widening every group, pruning
  one and deepening: identical outputs, and identical outputs again after one more AdamW step
  of each with the restored optimizer state.

Last, one traced edit against the same edit on adaptnet's own ``AdaptiveMLP``:
``an.widen(seq, "0", ...)`` on an ``nn.Sequential`` vs ``an.widen(mlp, 0, ...)`` with the same
widths, interleaved repeats, median of the per-repeat ratios (target <= 1.2).

Run: ``python benchmarks/any_model.py`` (``--quick``: fewer repeats; ``--only NAME`` for some
models; ``--out`` for the JSON path).
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import adaptnet as an
from _teacher_student import finish, machine_info, render
from _timing import timed
from _zoo import ZOO, Entry
from adaptnet.groups import output_tensors

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "any_model.json"
BY, AMOUNT, EXACT_TOL, TP_LIMIT_S, TIMING_TARGET = 2, 0.25, 1e-8, 60.0, 1.2
Opt = torch.optim.Optimizer


# -- helpers -------------------------------------------------------------------------------
def outputs(model: nn.Module, x: tuple[Any, ...]) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        out = [t.clone() for t in output_tensors(model(*x))]
    model.train()
    return out


def rel_change(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    if len(before) != len(after) or any(a.shape != b.shape for a, b in zip(before, after, strict=True)):
        return math.inf
    return max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
               for a, b in zip(after, before, strict=True))


def step(model: nn.Module, opt: Opt, x: tuple[Any, ...]) -> float:
    """One AdamW step on the mean square of the model's first output (train mode)."""
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = output_tensors(model(*x))[0].pow(2).mean()
    loss.backward()
    opt.step()
    return float(loss)


def optimizer_ok(model: nn.Module, opt: Opt) -> bool:
    """Every parameter held, no stale reference, every state tensor shaped like its parameter."""
    held = [p for g in opt.param_groups for p in g["params"]]
    params = list(model.parameters())
    if {id(p) for p in held} != {id(p) for p in params}:
        return False
    return all(v.shape == p.shape for p in params for v in opt.state.get(p, {}).values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


def copy_of(base: nn.Module, x: tuple[Any, ...]) -> tuple[nn.Module, Opt]:
    """A copy (the cached trace comes along) with an AdamW that has taken one step."""
    m = copy.deepcopy(base)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    step(m, opt, x)
    return m, opt


def short(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def as_double(x: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in x)


# -- per group -----------------------------------------------------------------------------
def widen_group(base: nn.Module, x: tuple[Any, ...], name: str) -> dict[str, Any]:
    m, opt = copy_of(base, x)
    before = outputs(m, x)
    group = an.unit_groups(m)[name]  # before an edit: one that finds a size in the code withdraws the group
    refusals: list[str] = []
    for init in ("net2net", "zero"):
        try:
            an.widen(m, name, BY, init=init, optimizer=opt)
        except an.EditError as err:
            refusals.append(str(err))
            continue
        change = rel_change(before, outputs(m, x))
        return {"status": "exact" if change <= EXACT_TOL else "NOT exact", "init": init, "rel_change": change,
                "optimizer_ok": optimizer_ok(m, opt), "step_finite": math.isfinite(step(m, opt, x))}
    if group.tied:
        why = f"tied: {', '.join(group.tied)}"
    elif group.mixed:
        why = f"mixed by {', '.join(sorted(group.mixed))}"
    else:  # refused after the edit: the model's code writes the group's size down
        why = "a size written into the model's code" if "write a size down" in refusals[0] else refusals[0][:60]
    out: dict[str, Any] = {"status": f"refused ({why})", "refusal": refusals[0]}
    try:
        an.widen(m, name, BY, init="net2net", optimizer=opt, exact=False)
        out.update(rel_change=rel_change(before, outputs(m, x)), optimizer_ok=optimizer_ok(m, opt),
                   step_finite=math.isfinite(step(m, opt, x)))
    except Exception as err:
        out["error"] = short(err)
    if group.mixed and not group.tied:  # the refusal's hint: net2net by a multiple of the group's size
        m, opt = copy_of(base, x)
        before = outputs(m, x)
        try:
            an.widen(m, name, group.size, init="net2net", optimizer=opt)
            out["by_multiple_rel_change"] = rel_change(before, outputs(m, x))
        except Exception as err:
            out["by_multiple_error"] = short(err)
    return out


def prune_group(base: nn.Module, x: tuple[Any, ...], name: str, size: int) -> dict[str, Any]:
    m, opt = copy_of(base, x)
    how = {"amount": AMOUNT} if round(AMOUNT * size) > 0 else {"keep": size - 1}
    try:
        an.prune(m, name, optimizer=opt, **how)
        ok = optimizer_ok(m, opt)
        loss = step(m, opt, x)
        ok = ok and optimizer_ok(m, opt)
    except an.EditError as err:  # refused with the reason (one head left, a size in the model's code)
        return {"status": "refused", "refusal": short(err)}
    except Exception as err:
        return {"status": "error", "error": short(err)}
    after = an.unit_groups(m)[name].size
    fine = ok and math.isfinite(loss)
    return {"status": "ok" if fine else "FAILED", "size_after": after, "loss": loss, "optimizer_ok": ok, **how}


def deepen_block(base: nn.Module, x: tuple[Any, ...], block: str) -> dict[str, Any]:
    m, opt = copy_of(base, x)
    before = outputs(m, x)
    try:
        edit = an.deepen(m, after=block, optimizer=opt)
    except an.EditError as err:
        return {"status": "refused", "block": block, "refusal": str(err)}
    except Exception as err:
        return {"status": "error", "block": block, "error": short(err)}
    change = rel_change(before, outputs(m, x))
    ok = optimizer_ok(m, opt) and math.isfinite(step(m, opt, x)) and optimizer_ok(m, opt)
    return {"status": "exact" if change <= EXACT_TOL and ok else "NOT exact", "block": block, "new": edit.group,
            "rel_change": change, "optimizer_ok": ok}


def save_load(entry: Entry, base: nn.Module, x: tuple[Any, ...], names: list[str],
              deepen_ok: bool) -> dict[str, Any]:
    """Widen the groups ``names``, prune the first, deepen; save; load into a fresh instance; compare."""
    m, opt = copy_of(base, x)
    try:
        for name in names:
            an.widen(m, name, BY, init="net2net", optimizer=opt, exact=False)
        if names and an.unit_groups(m)[names[0]].size >= 4:
            an.prune(m, names[0], amount=AMOUNT, optimizer=opt)
        if deepen_ok and entry.block:
            an.deepen(m, after=entry.block, optimizer=opt)
        step(m, opt, x)
        with tempfile.TemporaryDirectory() as tmp:
            an.save(Path(tmp) / "ckpt", m, optimizer=opt)
            m2, state = an.load(Path(tmp) / "ckpt", model=entry.build(seed=1))
        same = all(torch.equal(a, b) for a, b in zip(outputs(m, x), outputs(m2, x), strict=True))
        opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
        an.restore_optimizer(opt2, m2, state["optimizer"])
        step(m, opt, x)
        step(m2, opt2, x)
        same_after = all(torch.equal(a, b) for a, b in zip(outputs(m, x), outputs(m2, x), strict=True))
    except Exception as err:
        return {"status": "error", "error": short(err)}
    sizes = {n: g.size for n, g in an.unit_groups(m).items()}
    return {"status": "identical" if same and same_after else "DIFFERENT", "outputs_equal": same,
            "equal_after_one_more_step": same_after, "groups_saved": sizes}


# -- Torch-Pruning, in a forked process with a time limit -----------------------------------
def _tp_child(index: int, no_cache: bool, conn: Any) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    try:
        import torch_pruning as tp
        entry = ZOO[index]
        model, x = entry.build(), entry.inputs()
        if no_cache:
            model.config.use_cache = False
        start = time.perf_counter()
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=x[0] if len(x) == 1 else x)
        groups = list(dg.get_all_groups())
        roots = [dg._module2name.get(g[0].dep.target.module, "?") for g in groups]
        conn.send({"status": "ok", "groups": len(groups), "roots": roots, "seconds": time.perf_counter() - start})
    except Exception as err:
        conn.send({"status": "error", "error": short(err)})


def _tp_run(index: int, no_cache: bool, limit: float) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_tp_child, args=(index, no_cache, child))
    proc.start()
    result = parent.recv() if parent.poll(limit) else {"status": "timeout", "limit_s": limit}
    if proc.is_alive():
        proc.terminate()
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    return result


def torch_pruning_groups(index: int, limit: float) -> dict[str, Any]:
    """DependencyGraph on the model as built; a Hugging Face model that fails is tried again with
    ``config.use_cache = False`` (its output then holds no key/value cache object)."""
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return {"status": "error", "error": "torch-pruning is not installed"}
    result = _tp_run(index, False, limit)
    model = ZOO[index].build()
    if result["status"] != "ok" and getattr(getattr(model, "config", None), "use_cache", False):
        result["without_cache"] = _tp_run(index, True, limit)
    return result


# -- one model -----------------------------------------------------------------------------
def trace_seconds(model: nn.Module, x: tuple[Any, ...], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        m = copy.deepcopy(model)
        m.__dict__.pop("_adaptnet_trace", None)
        times.append(timed(lambda m=m: an.unit_groups(m, example_inputs=x)))
    return statistics.median(times)


def bench_model(index: int, entry: Entry, trace_repeats: int, tp_limit: float) -> dict[str, Any]:
    started = time.perf_counter()
    base, x = entry.build(), entry.inputs()
    row: dict[str, Any] = {"model": entry.name, "patterns": entry.patterns,
                           "params": sum(p.numel() for p in base.parameters())}
    try:
        row["trace_ms"] = 1e3 * trace_seconds(base, x, trace_repeats)
        groups = an.unit_groups(base, example_inputs=x)
    except Exception as err:
        row.update(trace_error=short(err), groups=None)
        return row
    base64, x64 = copy.deepcopy(base).double(), as_double(x)
    an.unit_groups(base64, example_inputs=x64)  # its own trace: float64 example inputs for re-traces
    row["groups"] = {}
    for name, g in groups.items():
        row["groups"][name] = {
            "size": g.size, "slices": len(g.slices), "mixed": sorted(g.mixed), "tied": list(g.tied),
            "widen": widen_group(base64, x64, name), "prune": prune_group(base, x, name, g.size)}
    row["deepen"] = deepen_block(base64, x64, entry.block) if entry.block else None
    deepen_ok = row["deepen"] is not None and row["deepen"]["status"] == "exact"
    # groups whose widen went wrong above are left out here, so that this tests save/load itself
    good = [n for n, g in row["groups"].items() if g["widen"]["status"] == "exact" or (
        g["widen"]["status"].startswith("refused") and "error" not in g["widen"])]
    row["save_load"] = save_load(entry, base, x, good, deepen_ok)
    row["save_load"]["groups_left_out"] = [n for n in row["groups"] if n not in good]
    row["torch_pruning"] = torch_pruning_groups(index, tp_limit)
    row["seconds"] = round(time.perf_counter() - started, 2)
    return row


# -- traced edit vs adaptnet's own model ---------------------------------------------------
class Wrapped(nn.Module):
    """A user's class with a forward of its own around the same layers."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def bench_edit_timing(sizes: tuple[int, int, int], by: int, repeats: int) -> dict[str, Any]:
    """``an.widen(mlp, 0, ...)`` vs ``an.widen(seq, "0", ...)``: same widths, weights, AdamW state."""
    n_in, hidden, n_out = sizes
    torch.manual_seed(0)
    mlp = an.AdaptiveMLP(n_in, [hidden, hidden], n_out)
    seq = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                        nn.Linear(hidden, n_out))
    with torch.no_grad():
        for p, q in zip(mlp.parameters(), seq.parameters(), strict=True):
            q.copy_(p)
    x = (torch.randn(64, n_in, generator=torch.Generator().manual_seed(1)),)
    custom = Wrapped(copy.deepcopy(seq))
    an.unit_groups(seq, example_inputs=x)  # each traced once, untimed: the trace is cached on the model
    an.unit_groups(custom, example_inputs=x)
    an.unit_groups(mlp)  # AdaptiveMLP is traced too (from its example_inputs()), on its first edit
    models = {"own": copy_of(mlp, x), "traced": copy_of(seq, x), "custom": copy_of(custom, x)}
    layer: dict[str, Any] = {"own": 0, "traced": "0", "custom": "net.0"}

    def one(which: str) -> float:
        m, o = copy.deepcopy(models[which])  # the copied optimizer holds the copied parameters
        return timed(lambda: an.widen(m, layer[which], by, init="net2net", optimizer=o))

    for which in ("own", "traced", "own", "traced"):  # warm-up
        one(which)
    times: dict[str, list[float]] = {"own": [], "traced": []}
    for r in range(repeats):
        for which in (("own", "traced") if r % 2 == 0 else ("traced", "own")):
            times[which].append(one(which))
    ratios = [t / o for t, o in zip(times["traced"], times["own"], strict=True)]
    median = statistics.median(ratios)
    # A class with its own forward: the first edit of each group is checked by tracing it again.
    first = [one("custom") for _ in range(max(3, repeats // 4))]
    return {"sizes": [n_in, hidden, hidden, n_out], "by": by, "repeats": repeats,
            "own_ms": 1e3 * statistics.median(times["own"]), "traced_ms": 1e3 * statistics.median(times["traced"]),
            "ratio_median": median, "target": TIMING_TARGET, "met": median <= TIMING_TARGET,
            "custom_first_edit_ms": 1e3 * statistics.median(first)}


# -- report --------------------------------------------------------------------------------
def _counts(row: dict[str, Any]) -> dict[str, str]:
    groups = row["groups"] or {}
    n = len(groups)
    exact = sum(g["widen"]["status"] == "exact" for g in groups.values())
    wrong = sum(g["widen"]["status"] == "NOT exact" for g in groups.values())  # accepted, output changed
    refused = [g["widen"]["status"].removeprefix("refused ") for g in groups.values()
               if g["widen"]["status"].startswith("refused")]
    pruned = sum(g["prune"]["status"] == "ok" for g in groups.values())
    prune_refused = sum(g["prune"]["status"] == "refused" for g in groups.values())
    tp = row.get("torch_pruning") or {}
    tp_cell = str(tp.get("groups")) if tp.get("status") == "ok" else tp.get("status", "-")
    if "without_cache" in tp:
        retry = tp["without_cache"]
        tp_cell += f"; {retry['groups'] if retry['status'] == 'ok' else retry['status']} without cache"
    deepen = row.get("deepen")
    sl = row.get("save_load") or {}
    return {"groups": str(n), "tp": tp_cell, "trace": f"{row.get('trace_ms', 0):.0f}",
            "exact": f"{exact}/{n}" + (f" ({wrong} NOT exact)" if wrong else ""),
            "refused": "; ".join(sorted(set(refused))) or "-",
            "prune": f"{pruned}/{n}" + (f" ({prune_refused} refused)" if prune_refused else ""),
            "deepen": "-" if deepen is None else deepen["status"],
            "save": sl.get("status", "-")}


def table(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [f"any_model: torch {m['torch']}, transformers {m['transformers']}, torch-pruning {m['torch_pruning']}, "
             f"threads {m['threads']}, {m['cpu']}, load average {results['load_average']['start']} -> "
             f"{results['load_average']['end']}", ""]
    rows = [("model", "groups", "TP groups", "trace ms", "widen exact", "refused (why)", "prune 25%+step",
             "deepen", "save->load")]
    for row in results["models"]:
        if row.get("trace_error"):
            rows.append((row["model"], "trace error", "", "", "", row["trace_error"][:60], "", "", ""))
            continue
        c = _counts(row)
        rows.append((row["model"], c["groups"], c["tp"], c["trace"], c["exact"], c["refused"], c["prune"],
                     c["deepen"], c["save"]))
    lines += render(rows)
    lines.append("")
    for row in results["models"]:
        lines.append(f"{row['model']}: {len(row['groups'] or {})} groups")
        for name, g in (row["groups"] or {}).items():
            w, p = g["widen"], g["prune"]
            change = "" if w.get("rel_change") is None else f" (change {w['rel_change']:.1e})"
            extra = "" if "by_multiple_rel_change" not in w else \
                f"; net2net by {g['size']}: change {w['by_multiple_rel_change']:.1e}"
            lines.append(f"  {name} [{g['size']}]: widen {w['status']}{change}{extra}; prune {p['status']}"
                         + (f" -> {p['size_after']}" if "size_after" in p
                            else f" {p.get('error', p.get('refusal', ''))}"))
        tp = row.get("torch_pruning") or {}
        for key, v in (("deepen", row.get("deepen")), ("save_load", row.get("save_load")),
                       ("Torch-Pruning", tp), ("Torch-Pruning, use_cache=False", tp.get("without_cache"))):
            if v and v.get("status") not in ("exact", "identical", "ok"):
                why = v.get("refusal") or v.get("error") or f"not done in {v.get('limit_s')} s"
                lines.append(f"  {key}: {v['status']}: {why}")
            elif key.startswith("Torch-Pruning") and v:
                lines.append(f"  {key}: {v['groups']} groups ({', '.join(v['roots'][:6])}"
                             f"{', ...' if len(v['roots']) > 6 else ''})")
    t = results["edit_timing"]
    lines.append("")
    lines.append("one traced edit vs adaptnet's own model (widen layer 0 net2net, AdamW state, "
                 "median of per-repeat ratios):")
    for r in t:
        lines.append(f"  {r['sizes']} by {r['by']}: AdaptiveMLP {r['own_ms']:.2f} ms, "
                     f"nn.Sequential (traced) {r['traced_ms']:.2f} ms, ratio {r['ratio_median']:.2f} "
                     f"(target <= {r['target']}: {'met' if r['met'] else 'NOT met'}); a class with its own "
                     f"forward, first edit of a group (traced again once): {r['custom_first_edit_ms']:.2f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--only", nargs="*", default=None, help="model names (substrings) to run")
    parser.add_argument("--quick", action="store_true", help="1 trace, 5 timing repeats")
    parser.add_argument("--tp-limit", type=float, default=TP_LIMIT_S, help="seconds for Torch-Pruning per model")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)  # a failed trace's dump
    import transformers
    transformers.logging.set_verbosity_error()
    try:
        import torch_pruning as tp
        tp_version = tp.__version__
    except ImportError:
        tp_version = None
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    an.unit_groups(copy.deepcopy(ZOO[0].build()), example_inputs=ZOO[0].inputs())  # the first export's imports
    models = []
    for i, entry in enumerate(ZOO):
        if args.only and not any(s.lower() in entry.name.lower() for s in args.only):
            continue
        row = bench_model(i, entry, 1 if args.quick else 3, args.tp_limit)
        print(f"  {entry.name}: {row.get('seconds', '?')} s", flush=True)
        models.append(row)
    repeats = 5 if args.quick else 21
    timing = [bench_edit_timing((64, 64, 10), 16, repeats), bench_edit_timing((784, 1024, 10), 256, repeats)]
    results: dict[str, Any] = {
        "benchmark": "any_model",
        "command": " ".join(["python", "benchmarks/any_model.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {**machine_info(torch.get_num_threads()), "transformers": transformers.__version__,
                    "torch_pruning": tp_version},
        "config": {"widen_by": BY, "prune_amount": AMOUNT, "exact_tolerance_relative": EXACT_TOL,
                   "optimizer": "AdamW lr 1e-3", "torch_pruning_limit_s": args.tp_limit, "quick": args.quick},
        "models": models,
        "edit_timing": timing,
        "load_average": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
        "date": time.strftime("%Y-%m-%d"),
    }
    return finish(results, started, args.out, table)


if __name__ == "__main__":
    sys.exit(main())
