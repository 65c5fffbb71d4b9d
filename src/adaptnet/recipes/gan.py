"""``adaptnet recipe gan``: GANs that grow while they train, against the same GAN built at its final size.

Two tasks (``task=``):

* ``ring``: eight 2-D Gaussians on a circle of radius 2, standard deviation 0.02 (the mixture
  of the unrolled-GAN and PacGAN papers). Generator and discriminator are ``AdaptiveMLP``s that
  start narrow; every ``eval_every`` steps the recipe scores the generator (modes covered plus
  the share of high-quality samples), and when that score has not improved for ``patience``
  evaluations it widens every hidden layer of both networks with ``adaptnet.widen``
  (``net2net`` with exact symmetry-breaking noise: both functions are preserved, and the Adam
  moments follow the new units). A sample is high quality when it lies within 3 sigma of a
  mode; a mode is covered when at least ``mode_share`` of the samples are high quality near it
  (PacGAN's 20 of 2500 by default).
* ``digits``: progressive growing with ProGAN's fade-in on scikit-learn's 8x8 digits (see
  ``_progan``): both networks train at 4x4 (the digits average-pooled), then grow to 8x8 with
  the new block blended in while alpha goes 0 -> 1. Samples are scored by a logistic
  regression trained here on the real digits: the share classified with confidence > 0.9, and
  the class balance (entropy of the predicted-class histogram / log 10; 1 is perfectly even).

``arch=static`` trains the final-size network alone; ``arch=adaptive`` (the default) trains the
growing one and then, with ``compare=true``, the static network of its final size with the same
steps, data order and optimizer settings. Writes ``results.json``, the plots and the generators
(``adaptnet.save`` checkpoints) into the output folder.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

import adaptnet as an
from adaptnet.recipes import Recipe, say
from adaptnet.recipes._gan_plots import plot_curves, plot_digit_grid, plot_ring
from adaptnet.recipes._progan import ProDiscriminator, ProGenerator, digits_data

RING_MODES, RING_RADIUS = 8, 2.0
DEFAULT_STEPS = {"ring": 6000, "digits": 3000}


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class GanSettings:
    task: Literal["ring", "digits"] = field(default="ring", metadata=_help("ring (8 Gaussians) or digits (8x8)"))
    arch: Literal["adaptive", "static"] = field(default="adaptive", metadata=_help(
        "adaptive: grow while training (ring: widen; digits: 4x4 -> 8x8); static: the final size throughout"))
    compare: bool = field(default=True, metadata=_help("with arch=adaptive, also train the static final size"))
    seed: int = field(default=0, metadata=_help("seeds weights, data order, noise and edits"))
    steps: int | None = field(default=None, metadata=_help("steps of each network (null: ring 6000, digits 3000)"))
    batch: int = field(default=128, metadata=_help("real and fake samples per step"))
    lr_g: float = field(default=1e-3, metadata=_help("generator Adam learning rate (betas 0.5, 0.999)"))
    lr_d: float = field(default=1e-3, metadata=_help("discriminator Adam learning rate"))
    latent: int = field(default=16, metadata=_help("size of the generator's Gaussian noise"))
    eval_every: int = field(default=200, metadata=_help("steps between evaluations (and plateau checks)"))
    eval_samples: int = field(default=2500, metadata=_help("generated samples per evaluation"))
    sigma: float = field(default=0.02, metadata=_help("ring: standard deviation of each mode"))
    mode_share: float = field(default=0.008, metadata=_help("ring: share of samples that makes a mode covered"))
    start_width: int = field(default=16, metadata=_help("ring: hidden width the adaptive networks start at"))
    grow_by: int = field(default=16, metadata=_help("ring: units added to every hidden layer per growth"))
    max_width: int = field(default=64, metadata=_help("ring: width at which growth stops (the static size)"))
    patience: int = field(default=3, metadata=_help("ring: evaluations without improvement before growing"))
    min_delta: float = field(default=0.02, metadata=_help("ring: smallest score gain that counts"))
    grow_until: float = field(default=0.75, metadata=_help("ring: no growth after this share of the steps"))
    hidden: int = field(default=128, metadata=_help("digits: units of every block"))
    grow_at: float = field(default=0.4, metadata=_help("digits: share of the steps trained at 4x4"))
    fade: float = field(default=0.2, metadata=_help("digits: share of the steps over which alpha goes 0 -> 1"))

    def __post_init__(self) -> None:
        positive = ("batch", "latent", "eval_every", "eval_samples", "start_width", "grow_by", "max_width",
                    "patience", "hidden")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 2:
            raise ValueError(f"steps must be at least 2 (or null for the task's default), got {self.steps}")
        for name in ("lr_g", "lr_d", "sigma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.mode_share <= 1 / RING_MODES:
            raise ValueError(f"mode_share must be in (0, {1 / RING_MODES}], got {self.mode_share}")
        if self.max_width < self.start_width:
            raise ValueError(f"max_width ({self.max_width}) must be >= start_width ({self.start_width})")
        if self.min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {self.min_delta}")
        if not 0 < self.grow_until <= 1:
            raise ValueError(f"grow_until must be in (0, 1], got {self.grow_until}")
        if not (0 < self.grow_at < 1 and 0 <= self.fade < 1 and self.grow_at + self.fade <= 1):
            raise ValueError(f"grow_at must be in (0, 1) and fade in [0, 1) with grow_at + fade <= 1; "
                             f"got grow_at={self.grow_at}, fade={self.fade}")

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else DEFAULT_STEPS[self.task]


def _adam(model: nn.Module, lr: float) -> torch.optim.Adam:
    # beta1 = 0.5: the usual GAN choice (DCGAN); the default 0.9 makes the two players oscillate more.
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.999))


def gan_step(g: nn.Module, d: nn.Module, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
             real: torch.Tensor, z: torch.Tensor) -> tuple[float, float]:
    """One discriminator and one generator step of the non-saturating GAN; returns (d_loss, g_loss)."""
    fake = g(z)
    real_logits, fake_logits = d(real), d(fake.detach())
    d_loss = (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
              + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    logits = d(fake)
    g_loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()  # also fills D's .grad, which opt_d.zero_grad clears before D's next step
    opt_g.step()
    return d_loss.item(), g_loss.item()


# -- ring ----------------------------------------------------------------------------------------
def ring_centers() -> torch.Tensor:
    """The eight modes, ``(8, 2)``, at angles 0, 45, ... 315 degrees on the circle of radius 2."""
    angle = torch.arange(RING_MODES, dtype=torch.float32) * (2 * math.pi / RING_MODES)
    return RING_RADIUS * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)


def sample_ring(n: int, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """``(n, 2)`` samples of the mixture (modes equally likely)."""
    modes = torch.randint(RING_MODES, (n,), generator=generator)
    return ring_centers()[modes] + sigma * torch.randn(n, 2, generator=generator)


def ring_metrics(samples: torch.Tensor, sigma: float, mode_share: float) -> dict[str, float]:
    """``modes`` covered (of 8) and ``quality``, the share of samples within 3 sigma of a mode.

    A mode is covered when at least ``mode_share`` of all the samples are high quality and
    nearest to it (PacGAN: 20 of 2500, ``mode_share = 0.008``).
    """
    dist = torch.cdist(samples.double(), ring_centers().double())  # (n, 8)
    nearest, mode = dist.min(dim=1)
    good = nearest <= 3 * sigma
    counts = torch.bincount(mode[good], minlength=RING_MODES)
    covered = int((counts >= mode_share * samples.shape[0]).sum())
    return {"modes": float(covered), "quality": float(good.double().mean())}


def _ring_nets(latent: int, width: int) -> tuple[an.AdaptiveMLP, an.AdaptiveMLP]:
    g = an.AdaptiveMLP(latent, [width, width], 2)
    # leaky ReLU in D: a dead-ReLU discriminator gives the generator no gradient at all.
    d = an.AdaptiveMLP(2, [width, width], 1, activation="leaky_relu")
    return g, d


def train_ring(s: GanSettings, width: int, grow: bool, log: Any = say) -> dict[str, Any]:
    """Train the ring GAN from hidden width ``width`` (growing when ``grow``); the run's record.

    The data, noise and edit generators are seeded from ``s.seed`` alone, so the adaptive and
    the static run see the same real batches and evaluation noise.
    """
    torch.manual_seed(s.seed)
    g, d = _ring_nets(s.latent, width)
    opt_g, opt_d = _adam(g, s.lr_g), _adam(d, s.lr_d)
    data = torch.Generator().manual_seed(s.seed)
    noise = torch.Generator().manual_seed(s.seed + 1)
    edits_rng = torch.Generator().manual_seed(s.seed + 2)
    z_eval = torch.randn(s.eval_samples, s.latent, generator=torch.Generator().manual_seed(s.seed + 3))
    curve: dict[str, list[float]] = {"step": [], "modes": [], "quality": [], "params": []}
    edits: list[dict[str, Any]] = []
    before_growth: torch.Tensor | None = None
    best, wait = -math.inf, 0
    began, cpu = time.perf_counter(), time.process_time()
    for step in range(1, s.total_steps + 1):
        real = sample_ring(s.batch, s.sigma, data)
        gan_step(g, d, opt_g, opt_d, real, torch.randn(s.batch, s.latent, generator=noise))
        if step % s.eval_every and step != s.total_steps:
            continue
        with torch.no_grad():
            samples = g(z_eval)
        score = ring_metrics(samples, s.sigma, s.mode_share)
        params = sum(p.numel() for p in (*g.parameters(), *d.parameters()))
        for key, value in (("step", step), ("params", params), *score.items()):
            curve[key].append(float(value))
        # Plateau rule on modes + quality (higher is better): a gain of min_delta resets the wait.
        value = score["modes"] + score["quality"]
        best, wait = (value, 0) if value > best + s.min_delta else (best, wait + 1)
        # No growth late in the run: new units need steps to learn something.
        late = step > s.grow_until * s.total_steps
        if grow and wait >= s.patience and g.widths[0] < s.max_width and not late and step < s.total_steps:
            if before_growth is None:
                before_growth = samples
            by = min(s.grow_by, s.max_width - g.widths[0])
            edits.append(_widen_both(g, d, opt_g, opt_d, by, z_eval[:512], real, edits_rng, step))
            log(f"  step {step:5d}  >> widen G and D by {by}: widths {edits[-1]['widths_before']} -> "
                f"{edits[-1]['widths_after']}, output change G {edits[-1]['change_g']:.1e} "
                f"D {edits[-1]['change_d']:.1e}")
            best, wait = -math.inf, 0  # the grown networks get a fresh plateau window
        if step % (s.eval_every * 5) == 0 or step == s.total_steps:
            log(f"  step {step:5d}  modes {score['modes']:.0f}/8  high quality {score['quality']:.3f}  "
                f"widths {g.widths}  params {params}")
    with torch.no_grad():
        final = g(z_eval)
    tail = max(1, len(curve["modes"]) // 4)  # GAN metrics oscillate: also report the last quarter's mean
    return {"g": g, "d": d, "opt_g": opt_g, "curve": curve, "edits": edits, "samples": final,
            "before_growth": before_growth, "widths": list(g.widths),
            "params_g": sum(p.numel() for p in g.parameters()), "params_d": sum(p.numel() for p in d.parameters()),
            "final": ring_metrics(final, s.sigma, s.mode_share),
            "last_quarter": {k: sum(curve[k][-tail:]) / tail for k in ("modes", "quality")},
            "train_s": round(time.perf_counter() - began, 2),
            "cpu_s": round(time.process_time() - cpu, 2)}


def _widen_both(g: an.AdaptiveMLP, d: an.AdaptiveMLP, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
                by: int, z_probe: torch.Tensor, real: torch.Tensor, rng: torch.Generator, step: int) -> dict[str, Any]:
    """Widen every hidden layer of G and D by ``by``; the edits report the largest output change."""
    widths = list(g.widths)
    change_g = change_d = 0.0
    for layer in range(len(widths)):
        # noise: exact symmetry breaking, so that a split unit and its copy can part (see adaptnet.widen)
        eg = an.widen(g, layer, by, init="net2net", optimizer=opt_g, batch=z_probe, noise=0.1, generator=rng)
        ed = an.widen(d, layer, by, init="net2net", optimizer=opt_d, batch=real, noise=0.1, generator=rng)
        change_g = max(change_g, eg.max_output_change or 0.0)
        change_d = max(change_d, ed.max_output_change or 0.0)
    return {"step": step, "widths_before": widths, "widths_after": list(g.widths),
            "change_g": change_g, "change_d": change_d}


def _ring_summary(run: dict[str, Any]) -> dict[str, Any]:
    keep = ("widths", "params_g", "params_d", "final", "last_quarter", "edits", "curve", "train_s", "cpu_s")
    return {k: run[k] for k in keep}


def run_ring(s: GanSettings, out: Path) -> dict[str, Any]:
    runs: dict[str, dict[str, Any]] = {}
    if s.arch == "adaptive":
        say(f"== ring, adaptive: G and D {s.latent}->[{s.start_width},{s.start_width}], widen by {s.grow_by} "
              f"after {s.patience} evaluations without gain, up to {s.max_width} ==")
        runs["adaptive"] = train_ring(s, s.start_width, grow=True)
    if s.arch == "static" or s.compare:
        width = runs["adaptive"]["widths"][0] if "adaptive" in runs else s.max_width
        say(f"== ring, static: G and D at the final width {width} throughout ==")
        runs["static"] = train_ring(s, width, grow=False)
    for name, r in runs.items():
        an.save(out / f"generator_{name}", r["g"], optimizer=r["opt_g"])
    plot_ring({n: r["samples"] for n, r in runs.items()}, runs.get("adaptive", {}).get("before_growth"),
              ring_centers(), s.sigma, out / "ring_samples.png")
    plot_curves({n: r["curve"] for n, r in runs.items()}, ("modes", "quality"),
                [e["step"] for e in runs.get("adaptive", {}).get("edits", [])], out / "ring_curves.png")
    _print_table(runs, ("modes", "quality"))
    return {"task": "ring", "runs": {n: _ring_summary(r) for n, r in runs.items()}}


# -- digits --------------------------------------------------------------------------------------
def digit_classifier(seed: int) -> tuple[Any, dict[str, float]]:
    """Logistic regression on 80% of the real digits; its held-out accuracy and confidence for reference."""
    from sklearn.linear_model import LogisticRegression

    x, y = digits_data(8)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, test = order[: int(0.8 * len(y))], order[int(0.8 * len(y)):]
    clf = LogisticRegression(max_iter=3000).fit(x[train].flatten(1).numpy(), y[train].numpy())
    held_out = digit_scores(clf, x[test])
    held_out["accuracy"] = float(clf.score(x[test].flatten(1).numpy(), y[test].numpy()))
    return clf, held_out


def digit_scores(clf: Any, images: torch.Tensor) -> dict[str, float]:
    """``confident``: share classified with probability > 0.9; ``balance``: predicted-class entropy / log 10.

    ``images`` are ``(N, 1, r, r)``; 4x4 ones are upsampled (nearest) to the classifier's 8x8.
    """
    if images.shape[-1] != 8:
        images = F.interpolate(images, size=8, mode="nearest")
    probs = torch.tensor(clf.predict_proba(images.flatten(1).double().numpy()))  # (N, 10)
    counts = torch.bincount(probs.argmax(dim=1), minlength=10).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"confident": float((probs.max(dim=1).values > 0.9).double().mean()),
            "balance": float(entropy / math.log(10))}


def train_digits(s: GanSettings, clf: Any, progressive: bool, log: Any = say) -> dict[str, Any]:
    """Train the digits GAN progressively (4x4, fade, 8x8) or statically at 8x8; the run's record."""
    torch.manual_seed(s.seed)
    start = 4 if progressive else 8
    g = ProGenerator(s.latent, s.hidden, start)
    d = ProDiscriminator(s.latent, s.hidden, start)
    opt_g, opt_d = _adam(g, s.lr_g), _adam(d, s.lr_d)
    x8, _ = digits_data(8)
    data = torch.Generator().manual_seed(s.seed)
    noise = torch.Generator().manual_seed(s.seed + 1)
    z_eval = torch.randn(s.eval_samples, s.latent, generator=torch.Generator().manual_seed(s.seed + 3))
    grow_step = round(s.grow_at * s.total_steps) if progressive else 0
    fade_steps = round(s.fade * s.total_steps)
    curve: dict[str, list[float]] = {"step": [], "confident": [], "balance": [], "params": []}
    began, cpu = time.perf_counter(), time.process_time()
    for step in range(1, s.total_steps + 1):
        if progressive and step == grow_step + 1:
            new = g.grow(opt_g) + d.grow(opt_d)
            log(f"  step {step - 1:5d}  >> grow G and D to 8x8 (+{sum(p.numel() for p in new)} parameters), "
                f"fade-in over {fade_steps} steps")
        if g.resolution == 8 and g.alpha < 1.0:
            g.alpha = d.alpha = min(1.0, (step - grow_step) / max(1, fade_steps))
        real = x8[torch.randint(len(x8), (s.batch,), generator=data)]  # (B, 1, 8, 8)
        low = F.interpolate(F.avg_pool2d(real, 2), scale_factor=2, mode="nearest")
        # Real images go through the same blend as the generator's: 4x4, faded into 8x8.
        real = F.avg_pool2d(real, 2) if g.resolution == 4 else (1 - g.alpha) * low + g.alpha * real
        gan_step(g, d, opt_g, opt_d, real, torch.randn(s.batch, s.latent, generator=noise))
        if step % s.eval_every == 0 or step == s.total_steps:
            with torch.no_grad():
                score = digit_scores(clf, g(z_eval))
            params = sum(p.numel() for p in (*g.parameters(), *d.parameters()))
            for key, value in (("step", step), ("params", params), *score.items()):
                curve[key].append(float(value))
            if step % (s.eval_every * 5) == 0 or step == s.total_steps:
                fading = f" alpha {g.alpha:.2f}" if progressive and g.resolution == 8 else ""
                log(f"  step {step:5d}  {g.resolution}x{g.resolution}{fading}  confident "
                    f"{score['confident']:.3f}  balance {score['balance']:.3f}  params {params}")
    with torch.no_grad():
        final = g(z_eval)
    tail = max(1, len(curve["confident"]) // 4)
    return {"g": g, "opt_g": opt_g, "curve": curve, "samples": final, "final": digit_scores(clf, final),
            "last_quarter": {k: sum(curve[k][-tail:]) / tail for k in ("confident", "balance")},
            "params_g": sum(p.numel() for p in g.parameters()), "params_d": sum(p.numel() for p in d.parameters()),
            "grow_step": grow_step if progressive else None, "train_s": round(time.perf_counter() - began, 2),
            "cpu_s": round(time.process_time() - cpu, 2)}


def run_digits(s: GanSettings, out: Path) -> dict[str, Any]:
    clf, reference = digit_classifier(s.seed)
    say(f"== digits: logistic regression on 80% of the real digits: held-out accuracy {reference['accuracy']:.3f}, "
          f"confident {reference['confident']:.3f}, balance {reference['balance']:.3f} ==")
    runs: dict[str, dict[str, Any]] = {}
    if s.arch == "adaptive":
        say(f"== digits, progressive: 4x4 for {s.grow_at:.0%} of {s.total_steps} steps, then 8x8 faded in "
              f"over {s.fade:.0%} ==")
        runs["adaptive"] = train_digits(s, clf, progressive=True)
    if s.arch == "static" or s.compare:
        say("== digits, static: the same networks at 8x8 throughout ==")
        runs["static"] = train_digits(s, clf, progressive=False)
    for name, r in runs.items():
        an.save(out / f"generator_{name}", r["g"], optimizer=r["opt_g"])
    real, _ = digits_data(8)
    plot_digit_grid({"real": real[:100], **{n: r["samples"][:100] for n, r in runs.items()}}, out / "digits.png")
    grow = runs["adaptive"]["grow_step"] if "adaptive" in runs else None
    plot_curves({n: r["curve"] for n, r in runs.items()}, ("confident", "balance"),
                [grow] if grow else [], out / "digits_curves.png")
    _print_table(runs, ("confident", "balance"))
    keep = ("params_g", "params_d", "final", "last_quarter", "curve", "grow_step", "train_s", "cpu_s")
    return {"task": "digits", "classifier": reference,
            "runs": {n: {k: r[k] for k in keep} for n, r in runs.items()}}


def _print_table(runs: dict[str, dict[str, Any]], metrics: tuple[str, str]) -> None:
    a, b = metrics
    say(f"\n  {'network':<10}{'params G+D':>11}{'final ' + a:>16}{'final ' + b:>16}"
          f"{'last-1/4 ' + a:>20}{'last-1/4 ' + b:>20}{'CPU s':>8}")
    for name, r in runs.items():
        f, q = r["final"], r["last_quarter"]
        say(f"  {name:<10}{r['params_g'] + r['params_d']:>11}{f[a]:>16.3f}{f[b]:>16.3f}{q[a]:>20.3f}"
              f"{q[b]:>20.3f}{r['cpu_s']:>8.1f}")


def run(s: GanSettings, out: Path) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small networks: one thread is fastest, and fair on a shared machine
    try:
        return run_ring(s, out) if s.task == "ring" else run_digits(s, out)
    finally:
        torch.set_num_threads(threads)


RECIPE = Recipe(
    name="gan",
    summary="GANs that grow: a widening GAN on 8 Gaussians, progressive growing (fade-in) on 8x8 digits",
    settings=GanSettings,
    run=run,
    quick={"steps": 2000, "eval_every": 100, "eval_samples": 1000, "patience": 2, "start_width": 16,
           "grow_by": 16, "max_width": 48, "hidden": 64},
)
