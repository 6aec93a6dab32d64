"""spell_core.resampled alone (no ComfyUI): the weights that make the model's own images follow the target, their
correction between rounds, the stable denoising target, the loss, and a trainer that resumes exactly."""
import math

import pytest
import torch
import torch.nn as nn

from spell_core.finetune import FairLoRAConfig, FairLoRATask, LoRA, attention_linears
from spell_core.resampled import (ResampledTrainer, corrected_weights, denoising_loss, draw_images,
                                  resampling_weights, stable_targets, start_resampled, weighted_shares)
from spell_core.storage import StorageError


def test_weights_make_the_confident_images_follow_the_target_and_leave_the_rest_out():
    probs = torch.tensor([[0.9, 0.1, 0.0]] * 6 + [[0.1, 0.85, 0.05]] * 2 + [[0.5, 0.4, 0.1]] * 3
                         + [[0.0, 0.1, 0.9]] * 1)
    target = torch.tensor([0.2, 0.3, 0.5])
    w, y = resampling_weights(probs, target, 0.8)
    assert y.tolist() == [0] * 6 + [1] * 2 + [0] * 3 + [2]
    assert torch.all(w[8:11] == 0) and torch.all(w[:8] > 0) and w[11] > 0  # below 0.8: left out
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-6)
    assert torch.allclose(weighted_shares(w, y, 3), target, atol=1e-6)
    assert torch.allclose(w[:6], torch.full((6,), 0.2 / 6)) and torch.allclose(w[6:8], torch.full((2,), 0.15))
    # a class the target asks for that no image is confidently read as: refused, with the fix
    with pytest.raises(ValueError, match=r"no image is read as class \[1\] with confidence ≥ 0.88: draw more"):
        resampling_weights(probs, target, 0.88)
    w0, _ = resampling_weights(probs, torch.tensor([0.5, 0.0, 0.5]), 0.88)  # a class asked 0 may be missing
    assert torch.allclose(weighted_shares(w0, y, 3), torch.tensor([0.5, 0.0, 0.5]), atol=1e-6)


def test_a_correction_asks_more_of_what_the_lora_under_draws_within_its_limit():
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    w = torch.full((6,), 1 / 6)
    target = torch.tensor([1 / 3, 1 / 3, 1 / 3])
    share = torch.tensor([0.5, 1 / 3, 1 / 6])  # the LoRA draws too many 0s and too few 2s
    c = corrected_weights(w, y, share, target, limit=4.0)
    s = weighted_shares(c, y, 3)
    # factors 2/3, 1, 2 before renormalising
    assert torch.allclose(s, torch.tensor([2 / 3, 1.0, 2.0]) / (11 / 3), atol=1e-6)
    capped = weighted_shares(corrected_weights(w, y, torch.tensor([0.9, 0.09, 0.01]), target, limit=2.0), y, 3)
    assert torch.allclose(capped, torch.tensor([0.5, 2.0, 2.0]) / 4.5, atol=1e-6)  # each factor within [1/2, 2]
    same = corrected_weights(w, y, target, target)
    assert torch.allclose(same, w)  # a LoRA on target: nothing changes
    unused = corrected_weights(w, y, share, torch.tensor([0.5, 0.5, 0.0]), limit=4.0)
    assert torch.allclose(unused[4:] / w[4:], unused[4:4 + 1] / w[4]), "a class asked 0 keeps its factor 1"


def brute_stable(x, sigma, data, w):
    out = []
    for xi, si in zip(x.double(), sigma.double()):
        d2 = ((data.double() - xi) ** 2).flatten(1).sum(1)
        a = w.double() * torch.exp(-(d2 - d2.min()) / (2 * si**2))
        out.append((a[:, None] * data.double().flatten(1)).sum(0) / a.sum())
    return torch.stack(out).view_as(x).float()


def test_the_stable_target_is_the_weighted_sets_posterior_mean():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(37, 2, 3, 3, generator=g)
    w = torch.rand(37, generator=g)
    w[5] = 0
    x = torch.randn(6, 2, 3, 3, generator=g) * 2
    sigma = torch.tensor([0.05, 0.3, 1.0, 3.0, 10.0, 80.0])
    logw = w.log()
    got = stable_targets(x, sigma, data, logw, chunk=8)  # chunks smaller than the set: the log-sum-exp carries over
    assert torch.allclose(got, brute_stable(x, sigma, data, w), atol=1e-5)
    assert torch.allclose(got, stable_targets(x, sigma, data, logw), atol=1e-6)
    # at low noise a noisy image's target is the image it was made from; at high noise the weighted mean of all
    near = data[[3, 9]] + 1e-3 * torch.randn(2, 2, 3, 3, generator=g)
    assert torch.allclose(stable_targets(near, torch.tensor([1e-3, 1e-3]), data, logw), data[[3, 9]], atol=1e-5)
    mean = (w[:, None] * data.flatten(1)).sum(0) / w.sum()
    far = stable_targets(torch.zeros(1, 2, 3, 3), torch.tensor([1e4]), data, logw)
    assert torch.allclose(far.flatten(), mean, atol=1e-5)
    # an image of weight 0 is never a target, even where it is the nearest
    at_zero = stable_targets(data[[5]], torch.tensor([1e-3]), data, logw)
    assert not torch.allclose(at_zero, data[[5]], atol=1e-3)


def test_denoising_loss_is_the_eps_plus_x0_error():
    x0, t, s = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), torch.tensor([0.5, 2.0])
    assert math.isclose(float(denoising_loss(x0, t, s)), ((1 / 0.25 + 1) + (1 / 4 + 1)) / 2, rel_tol=1e-6)


class ToyUNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.to_q = nn.Linear(16, 16)
        self.to_v = nn.Linear(16, 16)

    def forward(self, x, s, prompt):
        s = torch.as_tensor(s, dtype=x.dtype).reshape(-1, 1)
        h = x.flatten(1) + prompt.reshape(-1, 16)
        return (x.flatten(1) / (1 + s**2) + self.to_v(torch.tanh(self.to_q(h))) * s / (1 + s)).view_as(x)


def toy_task(unet, lora, target=(0.5, 0.5)):
    prompts = [torch.zeros(1, 16), torch.ones(1, 16) * 0.1]

    def denoiser(prompt, on):
        def d(x, s):
            lora.enabled = on
            return unet(x, s, prompt)
        return d
    classify = lambda z: torch.stack([z.flatten(1).mean(1), -z.flatten(1).mean(1)], 1) * 20  # noqa: E731
    return FairLoRATask(denoiser=denoiser, sigmas=lambda n: torch.cat([torch.linspace(8, 0.2, n), torch.zeros(1)]),
                        schedule_sigmas=torch.linspace(0.01, 10, 1000), shape=(1, 4, 4), classify=classify,
                        target=torch.tensor(target), prompts=prompts[:1], keep=prompts[1:])


def test_draw_images_is_seeded_and_reports_progress():
    unet = ToyUNet()
    lora = LoRA(attention_linears(unet, ("to_q", "to_v")), rank=2).attach()
    task = toy_task(unet, lora)
    seen = []
    a = draw_images(task.denoiser(task.prompts[0], False), 7, (1, 4, 4), task.sigmas(3), torch.Generator().manual_seed(1),
                    batch=3, progress=lambda done, n: seen.append((done, n)))
    b = draw_images(task.denoiser(task.prompts[0], False), 7, (1, 4, 4), task.sigmas(3), torch.Generator().manual_seed(1),
                    batch=3)
    assert a.shape == (7, 1, 4, 4) and torch.equal(a, b) and seen == [(3, 7), (6, 7), (7, 7)]


def test_the_resampled_trainer_corrects_its_rounds_and_resumes_exactly(tmp_path):
    config = FairLoRAConfig(iterations=6, batch=4, rank=2, method="resampled", own_images=40, rounds=3, lr=0.05,
                            keep_weight=1.0, ema_warmup=True)

    def fresh():
        unet = ToyUNet()
        lora = LoRA(attention_linears(unet, ("to_q", "to_v")), rank=2).attach()
        return start_resampled(toy_task(unet, lora), lora, config, steps=3, kept_images=5)

    def run(trainer, until):
        while trainer.iteration < until:
            trainer.step()
            if trainer.round_due():
                trainer.correct(trainer.probe(16, 3, seed=5))

    straight = fresh()
    assert straight.data.shape == (40, 1, 4, 4) and straight.kept.shape == (1, 5, 1, 4, 4)
    assert torch.allclose(weighted_shares(straight.weights, straight.labels, 2), torch.tensor([0.5, 0.5]))
    run(straight, 6)
    assert [r["iteration"] for r in straight.rounds] == [2, 4]  # rounds − 1 corrections, none at the end
    assert any(r["grad_norm"] > 0 for r in straight.log) and all(r["keep"] >= 0 for r in straight.log)
    first = fresh()
    run(first, 3)
    first.save_checkpoint(tmp_path / "ck.safetensors", {"validation_seeds": 64})
    unet = ToyUNet()
    lora = LoRA(attention_linears(unet, ("to_q", "to_v")), rank=2).attach()
    second = ResampledTrainer(toy_task(unet, lora), lora, config, torch.zeros(1, 1, 4, 4), torch.zeros(1), torch.ones(1),
                              torch.zeros(1, 1, 1, 4, 4))
    assert second.load_checkpoint(tmp_path / "ck.safetensors") == {"validation_seeds": 64}
    assert torch.equal(second.data, first.data) and torch.equal(second.weights, first.weights)
    assert second.rounds == first.rounds and second.iteration == 3
    run(second, 6)
    assert all(torch.equal(a, b) for a, b in zip(straight.params, second.params))
    assert all(torch.equal(a, b) for a, b in zip(straight.ema, second.ema))
    assert torch.equal(straight.weights, second.weights) and straight.rounds == second.rounds
    # a checkpoint of the alignment trainer (no drawn images) is refused, not half-read
    from spell_core.finetune import FairTrainer
    plain = FairTrainer(toy_task(ToyUNet(), lora), lora, FairLoRAConfig(iterations=6, batch=4, rank=2, method="resampled",
                                                                          own_images=40, rounds=3, lr=0.05,
                                                                          keep_weight=1.0, ema_warmup=True))
    plain.save_checkpoint(tmp_path / "plain.safetensors")
    with pytest.raises(StorageError, match="not written by the resampled trainer"):
        second.load_checkpoint(tmp_path / "plain.safetensors")


def test_one_prompt_and_sane_settings_only():
    unet = ToyUNet()
    lora = LoRA(attention_linears(unet, ("to_q", "to_v")), rank=2)
    task = toy_task(unet, lora)
    task.prompts = task.prompts * 2
    with pytest.raises(ValueError, match="trains one prompt at a time, got 2"):
        start_resampled(task, lora, FairLoRAConfig(method="resampled", own_images=20), steps=2)
    for bad in (dict(method="other"), dict(own_images=5), dict(rounds=0)):
        with pytest.raises(ValueError):
            FairLoRAConfig(**bad).check()
