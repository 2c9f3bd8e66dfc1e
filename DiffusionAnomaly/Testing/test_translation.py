"""The guided DDIM translation against closed forms (Gaussian data, Bayes classifier)."""

from __future__ import annotations

import pytest
import torch

from DiffusionAnomalyLib.translation import TranslationCancelled, ddim_timesteps, healthy_log_prob_gradient, translate

from conftest import AnalyticGaussians


def diseased_batch(models: AnalyticGaussians, shape=(4, 1, 8, 8), seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return models.means[1] + models.stds[1] * torch.randn(shape, generator=generator)


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).mean().sqrt().item()


def test_timestep_grid_is_shared_by_encoding_and_decoding():
    grid = ddim_timesteps(noise_level=0.5, steps=25, num_train_timesteps=1000)
    assert grid[0] == 0 and grid[-1] == 500 and len(grid) == 26
    assert all(b > a for a, b in zip(grid, grid[1:]))
    assert ddim_timesteps(0.5, 10_000) == list(range(501)), "steps are capped at L (every step)"

    calls = []
    models = AnalyticGaussians(-0.5, 0.3, 0.5, 0.3)

    def spy(x, t):
        calls.append(int(t[0]))
        return models.eps(x, t)

    translate(torch.zeros(1, 1, 4, 4), spy, None, noise_level=0.5, steps=25, guidance_scale=0)
    encoding, decoding = calls[:25], calls[25:]
    assert encoding == grid[:-1], "encoding evaluates t_0 .. t_{N-1} and ends at t_N = L"
    assert decoding == grid[:0:-1], "decoding starts at exactly t_N = L (no off-by-one or -two)"


@pytest.mark.parametrize("steps, tolerance", [(50, 0.03), (500, 0.005)])
def test_unguided_round_trip_reproduces_the_input(steps, tolerance):
    models = AnalyticGaussians(-0.5, 0.3, 0.5, 0.3)
    x0 = models.means[0] + models.stds[0] * torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    out = translate(x0, models.eps, models.classifier, noise_level=0.5, steps=steps, guidance_scale=0)
    assert rms(out, x0) < tolerance


def test_guidance_moves_a_diseased_sample_toward_the_healthy_mean_more_for_larger_scale():
    models = AnalyticGaussians(-0.5, 0.3, 0.5, 0.3)
    x0 = diseased_batch(models)
    distances = []
    for scale in (0.0, 0.5, 2.0, 8.0):
        out = translate(x0, models.eps, models.classifier, noise_level=0.5, steps=25, guidance_scale=scale)
        distances.append(abs(out.mean().item() - models.means[0]))
    assert distances == sorted(distances, reverse=True), distances
    assert distances[-1] < 0.5 * distances[0]


def test_guidance_gradient_is_nonzero_and_matches_the_closed_form():
    models = AnalyticGaussians(-0.5, 0.3, 0.5, 0.3)
    x_t = diseased_batch(models)
    t = torch.full((x_t.shape[0],), 300, dtype=torch.long)
    gradient = healthy_log_prob_gradient(models.classifier, x_t, t, target_class=0)
    assert gradient.abs().min() > 0
    # Equal variances: ∇ log p(h | x) = (1 − p(h | x)) · √ᾱ (μ_h − μ_d) / v_t, the same for every pixel.
    alpha = models.alpha_bar[300]
    variance = alpha * 0.3**2 + 1 - alpha
    p_healthy = torch.softmax(models.classifier(x_t, t), dim=1)[:, 0].view(-1, 1, 1, 1)
    expected = (1 - p_healthy) * alpha.sqrt() * (models.means[0] - models.means[1]) / variance
    torch.testing.assert_close(gradient, expected.expand_as(gradient), rtol=1e-4, atol=1e-6)


def test_guidance_still_works_under_inference_mode():
    models = AnalyticGaussians(-0.5, 0.3, 0.5, 0.3)
    x0 = diseased_batch(models)
    with torch.inference_mode():
        guided = translate(x0, models.eps, models.classifier, noise_level=0.5, steps=10, guidance_scale=4)
        plain = translate(x0, models.eps, models.classifier, noise_level=0.5, steps=10, guidance_scale=0)
    assert guided.mean() < plain.mean() - 0.1


def test_samples_of_a_batch_are_translated_independently():
    models = AnalyticGaussians(-0.5, 0.3, 0.5, 0.3)
    x0 = diseased_batch(models)
    together = translate(x0, models.eps, models.classifier, noise_level=0.4, steps=8, guidance_scale=2)
    alone = translate(x0[:1], models.eps, models.classifier, noise_level=0.4, steps=8, guidance_scale=2)
    torch.testing.assert_close(together[:1], alone, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_stays_close_to_fp32():
    models = AnalyticGaussians(-0.5, 0.3, 0.5, 0.3)
    x0 = diseased_batch(models)
    full = translate(x0, models.eps, models.classifier, noise_level=0.5, steps=10, guidance_scale=2)
    half = translate(x0, models.eps, models.classifier, noise_level=0.5, steps=10, guidance_scale=2, precision="bf16")
    assert rms(full, half) < 0.05


def test_progress_is_reported_per_step_and_cancel_stops_the_run():
    models = AnalyticGaussians(-0.5, 0.3, 0.5, 0.3)
    seen = []
    translate(torch.zeros(1, 1, 4, 4), models.eps, models.classifier, noise_level=0.3, steps=5, guidance_scale=1, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(i, 10) for i in range(1, 11)]

    polls = []

    def cancel_after_three() -> bool:
        polls.append(1)
        return len(polls) > 3

    with pytest.raises(TranslationCancelled):
        translate(torch.zeros(1, 1, 4, 4), models.eps, models.classifier, noise_level=0.3, steps=5, guidance_scale=1, cancel=cancel_after_three)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"noise_level": 0.0}, "noise_level"),
        ({"noise_level": 1.5}, "noise_level"),
        ({"steps": 0}, "steps"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"precision": "fp8"}, "precision"),
    ],
)
def test_invalid_settings_are_refused_with_a_clear_message(options, message):
    models = AnalyticGaussians(-0.5, 0.3, 0.5, 0.3)
    settings = {"noise_level": 0.5, "steps": 5, "guidance_scale": 1.0, **options}
    with pytest.raises(ValueError, match=message):
        translate(torch.zeros(1, 1, 4, 4), models.eps, models.classifier, **settings)


def test_guidance_without_a_classifier_is_refused():
    models = AnalyticGaussians(-0.5, 0.3, 0.5, 0.3)
    with pytest.raises(ValueError, match="classifier"):
        translate(torch.zeros(1, 1, 4, 4), models.eps, None, noise_level=0.5, steps=5, guidance_scale=1.0)


def test_a_linear_guidance_schedule_pulls_less_than_constant_guidance_and_more_than_none():
    models = AnalyticGaussians(-0.5, 0.3, 0.5, 0.3)
    x0 = diseased_batch(models)
    means = {schedule: translate(x0, models.eps, models.classifier, noise_level=0.5, steps=25, guidance_scale=4.0,
                                 guidance_schedule=schedule).mean().item() for schedule in ("constant", "linear")}
    plain = translate(x0, models.eps, models.classifier, noise_level=0.5, steps=25, guidance_scale=0).mean().item()
    assert means["constant"] < means["linear"] < plain
    with pytest.raises(ValueError, match="guidance_schedule must be one of constant, linear"):
        translate(x0, models.eps, models.classifier, noise_level=0.5, steps=5, guidance_scale=1.0, guidance_schedule="cosine")


def test_a_redraw_region_heals_inside_and_keeps_the_rest_of_the_input_exactly():
    models = AnalyticGaussians(-0.5, 0.3, 0.5, 0.3)
    x0 = diseased_batch(models)
    region = torch.zeros(4, 1, 8, 8)
    region[..., :4] = 1.0
    settings = dict(noise_level=0.5, steps=25, guidance_scale=2.0)
    redrawn = translate(x0, models.eps, models.classifier, redraw=region, **settings)
    assert torch.equal(redrawn[..., 4:], x0[..., 4:]), "outside the region the input comes back unchanged"
    inside_before = abs(x0[..., :4].mean().item() - models.means[0])
    assert abs(redrawn[..., :4].mean().item() - models.means[0]) < 0.5 * inside_before, "inside, it is translated toward healthy"
    everywhere = translate(x0, models.eps, models.classifier, **settings)
    assert torch.equal(translate(x0, models.eps, models.classifier, redraw=torch.ones_like(region), **settings), everywhere)
    assert torch.equal(translate(x0, models.eps, models.classifier, redraw=torch.zeros_like(region), **settings), x0)
    with pytest.raises(ValueError, match=r"redraw must be \(B, 1, H, W\)"):
        translate(x0, models.eps, models.classifier, redraw=region[:2], **settings)


def test_the_reconstruction_is_the_same_encoding_decoded_without_guidance():
    models = AnalyticGaussians(-0.5, 0.3, 0.5, 0.3)
    x0 = diseased_batch(models)
    settings = dict(noise_level=0.4, steps=8)
    seen = []
    healthy, reconstruction = translate(x0, models.eps, models.classifier, guidance_scale=2.0, return_reconstruction=True,
                                        progress=lambda done, total: seen.append((done, total)), **settings)
    assert torch.equal(healthy, translate(x0, models.eps, models.classifier, guidance_scale=2.0, **settings))
    assert torch.equal(reconstruction, translate(x0, models.eps, models.classifier, guidance_scale=0.0, **settings))
    assert seen == [(done, 24) for done in range(1, 25)], "one encoding and two decodings of 8 steps each"
