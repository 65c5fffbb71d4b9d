"""The GAN recipe: metrics on hand-made samples, exact growth (widen and fade-in), end-to-end runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import adaptnet as an
from adaptnet.cli.main import main
from adaptnet.recipes import RecipeError, run_recipe
from adaptnet.recipes._progan import ProDiscriminator, ProGenerator, digits_data
from adaptnet.recipes.gan import (
    GanSettings,
    _ring_nets,
    _widen_both,
    digit_scores,
    gan_step,
    ring_centers,
    ring_metrics,
    sample_ring,
)

SIGMA, SHARE = 0.02, 0.008


# -- metrics -------------------------------------------------------------------------------------
def test_ring_metrics_count_modes_and_quality():
    centers = ring_centers()
    assert centers.shape == (8, 2)
    assert torch.allclose(centers.norm(dim=1), torch.full((8,), 2.0))
    at_three = centers[[0, 3, 5]].repeat_interleave(100, dim=0)  # 300 samples exactly on 3 modes
    assert ring_metrics(at_three, SIGMA, SHARE) == {"modes": 3.0, "quality": 1.0}
    nowhere = torch.zeros(300, 2)  # the ring's centre: far from every mode
    assert ring_metrics(torch.cat([at_three, nowhere]), SIGMA, SHARE) == {"modes": 3.0, "quality": 0.5}
    # 3 sigma is the edge of a high-quality sample
    inside = centers[[1]] + torch.tensor([[2.9 * SIGMA, 0.0]])
    outside = centers[[1]] + torch.tensor([[0.0, 3.1 * SIGMA]])
    assert ring_metrics(inside, SIGMA, SHARE)["quality"] == 1.0
    assert ring_metrics(outside, SIGMA, SHARE)["quality"] == 0.0
    # a mode with fewer than mode_share of the samples is not covered: 4 of 1000 < 0.8%
    sparse = torch.cat([centers[[2]].repeat(996, 1), centers[[6]].repeat(4, 1)])
    assert ring_metrics(sparse, SIGMA, SHARE)["modes"] == 1.0
    # the real mixture covers every mode; in 2-D, P(|x| <= 3 sigma) = 1 - exp(-9/2) = 0.989
    real = ring_metrics(sample_ring(2500, SIGMA, torch.Generator().manual_seed(0)), SIGMA, SHARE)
    assert real["modes"] == 8 and real["quality"] == pytest.approx(1 - math.exp(-4.5), abs=0.01)


class _FixedClassifier:
    """Stands in for the digits classifier: returns the probabilities it was given."""

    def __init__(self, probs: torch.Tensor):
        self.probs = probs

    def predict_proba(self, x):
        assert x.shape == (len(self.probs), 64)  # 8x8 images, flattened (4x4 ones upsampled first)
        return self.probs.numpy()


def test_digit_scores_confidence_and_balance():
    even = F.one_hot(torch.arange(100) % 10, 10).double()  # every class 10 times, fully confident
    assert digit_scores(_FixedClassifier(even), torch.zeros(100, 1, 8, 8)) == {"confident": 1.0,
                                                                               "balance": pytest.approx(1.0)}
    one_class = torch.full((50, 10), 0.05, dtype=torch.float64)
    one_class[:, 7] = 0.55  # always class 7, never confident
    assert digit_scores(_FixedClassifier(one_class), torch.zeros(50, 1, 4, 4)) == {"confident": 0.0, "balance": 0.0}
    two = F.one_hot(torch.arange(40) % 2, 10).double() * 0.95 + 0.005  # classes 0 and 1 only, p = 0.955
    scores = digit_scores(_FixedClassifier(two), torch.zeros(40, 1, 8, 8))
    assert scores["confident"] == 1.0 and scores["balance"] == pytest.approx(math.log(2) / math.log(10))


# -- exact growth --------------------------------------------------------------------------------
def _adam_with_state(model):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(8, 16) if isinstance(model, ProGenerator) else torch.randn(8, 1, 4, 4)).square().mean().backward()
    opt.step()
    return opt


def test_fade_in_at_alpha_zero_equals_the_output_before_growth():
    torch.manual_seed(1)
    g, d = ProGenerator(16, 12), ProDiscriminator(16, 12)
    opt_g, opt_d = _adam_with_state(g), _adam_with_state(d)
    z, x8 = torch.randn(32, 16), torch.rand(32, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        g_before, d_before = g(z), d(F.avg_pool2d(x8, 2))  # (32, 1, 4, 4), (32, 1)
    moments = {p: opt_g.state[p]["exp_avg"].clone() for p in g.parameters()}
    old_params = list(g.parameters())
    new_g, new_d = g.grow(opt_g), d.grow(opt_d)
    assert g.resolution == d.resolution == 8 and g.alpha == d.alpha == 0.0
    with torch.no_grad():
        # exactly: nearest upsampling of the old image, and the old score of the pooled image
        assert torch.equal(g(z), F.interpolate(g_before, scale_factor=2, mode="nearest"))
        assert torch.equal(d(x8), d_before)
        g.alpha = d.alpha = 0.5
        assert not torch.equal(g(z), F.interpolate(g_before, scale_factor=2, mode="nearest"))
    # the optimizer kept the old parameters (same objects, same moments) and holds the new ones
    assert all(p is q for p, q in zip(old_params, list(g.parameters())[: len(old_params)], strict=False))
    assert all(torch.equal(opt_g.state[p]["exp_avg"], m) for p, m in moments.items())
    in_opt = {id(p) for group in opt_g.param_groups for p in group["params"]}
    assert new_g and {id(p) for p in new_g} <= in_opt
    assert new_d and {id(p) for p in new_d} <= {id(p) for grp in opt_d.param_groups for p in grp["params"]}
    g(z).square().mean().backward()
    opt_g.step()
    assert all(opt_g.state[p]["exp_avg"].shape == p.shape for p in new_g)
    with pytest.raises(ValueError, match="already at 8x8"):
        g.grow(opt_g)


def test_widen_during_ring_training_preserves_both_networks():
    torch.manual_seed(2)
    g, d = _ring_nets(latent=8, width=8)
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=1e-3, betas=(0.5, 0.999)) for m in (g, d))
    data = torch.Generator().manual_seed(0)
    for _ in range(5):
        gan_step(g, d, opt_g, opt_d, sample_ring(64, SIGMA, data), torch.randn(64, 8))
    z, real = torch.randn(256, 8), sample_ring(256, SIGMA, data)
    with torch.no_grad():
        g_before, d_before = g(z), d(real)
    record = _widen_both(g, d, opt_g, opt_d, 4, z, real, torch.Generator().manual_seed(0), step=5)
    assert g.widths == d.widths == [12, 12] and record["widths_after"] == [12, 12]
    with torch.no_grad():
        assert (g(z) - g_before).abs().max() < 1e-5 and (d(real) - d_before).abs().max() < 1e-5
    assert record["change_g"] < 1e-5 and record["change_d"] < 1e-5
    for model, opt in ((g, opt_g), (d, opt_d)):
        for p in model.parameters():  # state for every unit, the new ones included, on the same objects
            assert opt.state[p]["exp_avg"].shape == p.shape and opt.state[p]["exp_avg_sq"].shape == p.shape
    gan_step(g, d, opt_g, opt_d, real, z)  # training goes on with the grown networks


# -- end to end ----------------------------------------------------------------------------------
def test_quick_ring_run_grows_and_compares(tmp_path):
    out = tmp_path / "ring"
    results = run_recipe("gan", {"steps": 600}, out=out, quick=True)
    adaptive, static = results["runs"]["adaptive"], results["runs"]["static"]
    assert adaptive["edits"], "the quick settings widen at least once (plateau after 2 evaluations)"
    for e in adaptive["edits"]:
        assert e["change_g"] < 1e-4 and e["change_d"] < 1e-4
    assert adaptive["widths"] == static["widths"] == adaptive["edits"][-1]["widths_after"]
    assert adaptive["params_g"] == static["params_g"]
    assert adaptive["curve"]["params"][0] < adaptive["curve"]["params"][-1]
    assert 0 <= adaptive["final"]["modes"] <= 8 and 0 <= static["final"]["quality"] <= 1
    for name in ("ring_samples.png", "ring_curves.png", "results.json", "settings.yaml"):
        assert (out / name).stat().st_size > 0
    g, state = an.load(out / "generator_adaptive")
    assert g.widths == adaptive["widths"] and state["optimizer"] is not None


def test_quick_digits_run_from_the_cli(tmp_path, capsys):
    out = tmp_path / "digits"
    assert main(["recipe", "gan", "--quick", "task=digits", "steps=300", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "grow G and D to 8x8" in printed and "static" in printed
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert runs["adaptive"]["grow_step"] == 120 and runs["static"]["grow_step"] is None
    assert runs["adaptive"]["params_g"] == runs["static"]["params_g"]
    assert results["classifier"]["accuracy"] > 0.9  # the scorer itself is trustworthy on real digits
    assert 0 <= runs["adaptive"]["final"]["confident"] <= 1
    for name in ("digits.png", "digits_curves.png"):
        assert (out / name).stat().st_size > 0
    g, _ = an.load(out / "generator_adaptive")  # a registered model: rebuilt from its spec
    assert isinstance(g, ProGenerator) and g.resolution == 8 and g.alpha == 1.0
    assert g(torch.randn(5, g.latent)).shape == (5, 1, 8, 8)


def test_digits_data_are_scaled_and_pooled():
    x8, y = digits_data(8)
    x4, _ = digits_data(4)
    assert x8.shape == (1797, 1, 8, 8) and x4.shape == (1797, 1, 4, 4) and y.max() == 9
    assert x8.min() == -1.0 and x8.max() == 1.0
    assert torch.allclose(x4, F.avg_pool2d(x8, 2))


@pytest.mark.parametrize(("argv", "message"), [
    (["task=faces"], "setting task: expected one of 'ring', 'digits'"),
    (["grow_at=0.9", "fade=0.3"], "grow_at + fade <= 1"),
    (["start_width=32", "max_width=16"], "max_width (16) must be >= start_width (32)"),
    (["mode_share=0.5"], "mode_share must be in (0, 0.125]"),
    (["steps=1"], "steps must be at least 2"),
])
def test_bad_settings_exit_2_with_one_line(argv, message, tmp_path, capsys):
    assert main(["recipe", "gan", *argv, "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adaptnet: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "never").exists()  # rejected before anything was written


def test_bad_settings_from_python_raise_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match=r"lr_g must be > 0, got -1\.0"):
        run_recipe("gan", {"lr_g": -1.0}, out=tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_settings_defaults_per_task():
    assert GanSettings().total_steps == 6000 and GanSettings(task="digits").total_steps == 3000
    assert GanSettings(steps=10).total_steps == 10
