"""spell_core.finetune alone (no ComfyUI): distributional alignment targets, the confidence rule, adjusted DFT
through the sampler, LoRA maths and key names, the training classifier, exact resume from a checkpoint."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from spell_core.fairness import assign
from spell_core.finetune import (ClassifierEnsemble, FairLoRAConfig, FairLoRATask, FairTrainer, LatentClassifier,
                                 LoRA, adversarial_inputs, alignment_loss, alignment_targets, attention_linears,
                                 class_references, confident_labels, cosine_distance, dft_scales, sample_chain,
                                 scale_grad, train_classifier)


def monte_carlo(p, target, draws, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.zeros(p.shape, dtype=torch.float64)
    for _ in range(draws):
        labels = torch.multinomial(target, p.shape[0], replacement=True, generator=g)
        q[torch.arange(p.shape[0]), assign(p, labels)] += 1
    return q / draws


def test_two_class_targets_are_the_exact_expectation_of_iid_draws():
    g = torch.Generator().manual_seed(1)
    p = torch.rand(12, generator=g)
    p = torch.stack([1 - p, p], 1)
    target = torch.tensor([0.3, 0.7], dtype=torch.float64)
    q = alignment_targets(p, target, "iid")
    assert torch.allclose(q.sum(1), torch.ones(12))
    assert (q.double() - monte_carlo(p, target, 20000)).abs().max() < 0.015
    order = torch.argsort(p[:, 1], descending=True)
    assert torch.all(q[order, 1][:-1] >= q[order, 1][1:])  # the likelier class 1, the likelier its label
    assert math.isclose(float(q[:, 1].sum()), 12 * 0.7, rel_tol=1e-5)  # the expected count of class-1 labels


def test_many_class_targets_exact_enumeration_matches_monte_carlo():
    g = torch.Generator().manual_seed(2)
    p = torch.rand(5, 3, generator=g).softmax(1)
    target = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    exact = alignment_targets(p, target, "iid")  # C(7, 2) = 21 label-count vectors: enumerated
    assert (exact.double() - monte_carlo(p, target, 20000)).abs().max() < 0.015
    sampled = alignment_targets(p, target, "iid", exact_limit=1, samples=20000, generator=g)
    assert (exact - sampled).abs().max() < 0.015


def test_stratified_targets_give_whole_seats_and_full_confidence():
    p = torch.eye(4)[torch.tensor([0, 0, 0, 0, 1, 1, 2, 3])].float() * 0.9 + 0.025
    q = alignment_targets(p, torch.full((4,), 0.25), "stratified")
    y, keep = confident_labels(q)
    assert keep.all() and torch.bincount(y, minlength=4).tolist() == [2, 2, 2, 2]
    assert (y[4:] == torch.tensor([1, 1, 2, 3])).all()  # images already of a class with room keep it
    # an inexact share (8 x 0.3) gets the remaining seat by the fractional parts: not every image is sure
    q2 = alignment_targets(p, torch.tensor([0.3, 0.3, 0.2, 0.2]), "stratified", samples=200,
                           generator=torch.Generator().manual_seed(0))
    assert torch.allclose(q2.sum(0), torch.tensor([2.4, 2.4, 1.6, 1.6]), atol=0.25)
    assert not confident_labels(q2)[1].all()
    # carried seats: the same inexact share gives every image a certain label, and batch by batch the seats
    # follow the share (2.4 per batch: three batches of 2 seats and two of 3 in every five)
    counts = []
    for n in range(5):
        q3 = alignment_targets(p, torch.tensor([0.3, 0.3, 0.2, 0.2]), "carried", iteration=n)
        y3, keep3 = confident_labels(q3)
        assert keep3.all() and torch.equal(q3.sum(1), torch.ones(8))
        counts.append(torch.bincount(y3, minlength=4))
    assert torch.stack(counts).sum(0).tolist() == [12, 12, 8, 8]


def test_confidence_rule_and_alignment_loss():
    q = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    y, keep = confident_labels(q, 0.8)
    assert y.tolist() == [0, 0, 1] and keep.tolist() == [True, False, True]
    logits = torch.tensor([[2.0, 0.0], [0.0, 5.0], [0.0, 1.0]])
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    assert torch.isclose(alignment_loss(logits, y, keep), (ce[0] + ce[2]) / 3)


def test_scale_grad_scales_only_the_gradient():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = scale_grad(x * 3, 0.5)
    assert torch.equal(y, torch.tensor([3.0, 6.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.5, 1.5]))


def ddpm_sigmas():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # SD's scaled linear
    abar = torch.cumprod(1 - betas, 0)
    return ((1 - abar) / abar).sqrt(), abar, 1 - betas


def test_dft_scales_follow_the_formula_normalised_by_their_geometric_mean():
    sig, abar, alpha = ddpm_sigmas()
    t = torch.tensor([999, 700, 400, 100, 10])
    g = dft_scales(sig, sig[t])
    raw = abar[t].sqrt() * (1 - abar[t]).sqrt() / (1 - alpha[t])
    assert torch.allclose(g.double(), raw / raw.log().mean().exp(), rtol=1e-4)
    assert math.isclose(float(g.double().log().mean()), 0.0, abs_tol=1e-5)


class Toy(nn.Module):
    """A denoiser x̂0 = lin(x)/(1 + σ) + b: enough to tell the gradients apart."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 6)
        self.b = nn.Parameter(torch.zeros(6))

    def forward(self, x, s):
        return self.lin(x.flatten(1)).view_as(x) / (1 + s) + self.b.view(1, 6)


def test_adjusted_and_naive_chains_give_the_same_images_and_different_gradients():
    toy = Toy()
    noise = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([5.0, 2.0, 0.7, 0.0])
    outs, grads = {}, {}
    for mode in ("adjusted", "naive", None):
        toy.zero_grad()
        x = sample_chain(toy, noise, sigmas, mode, torch.ones(3) if mode == "adjusted" else None)
        outs[mode] = x.detach()
        if mode is not None:
            x.pow(2).sum().backward()
            grads[mode] = toy.lin.weight.grad.clone()
        else:
            assert not x.requires_grad
    assert torch.equal(outs["adjusted"], outs["naive"]) and torch.equal(outs["naive"], outs[None])
    assert not torch.allclose(grads["adjusted"], grads["naive"])
    # the adjusted gradient by hand: sum over steps of the step's direct-path factor times ∂x̂0/∂W with x fixed
    xs, x = [], noise * sigmas[0]
    with torch.no_grad():
        for i in range(3):
            xs.append(x.clone())
            x0 = toy(x, float(sigmas[i]))
            x = x0 + float(sigmas[i + 1] / sigmas[i]) * (x - x0)
    final = x
    w = toy.lin.weight.detach().clone().requires_grad_(True)
    total = 0
    for i in range(3):
        tail = math.prod(float(sigmas[j + 1] / sigmas[j]) for j in range(i + 1, 3))  # x_{i+1} -> final
        x0 = (xs[i] @ w.T + toy.lin.bias.detach()) / (1 + float(sigmas[i])) + toy.b.detach()
        total = total + (2 * final * (1 - float(sigmas[i + 1] / sigmas[i])) * tail * x0).sum()
    total.backward()
    assert torch.allclose(grads["adjusted"], w.grad, atol=1e-5)


def test_lora_changes_nothing_untrained_and_merges_as_comfyui_does():
    net = nn.Sequential()
    net.add_module("attn", nn.Module())
    net.attn.to_q = nn.Linear(8, 8)
    net.attn.to_out = nn.Sequential(nn.Linear(8, 8))
    net.attn.other = nn.Linear(8, 8)
    layers = attention_linears(net)
    assert sorted(layers) == ["attn.to_out.0", "attn.to_q"]
    lora = LoRA(layers, rank=3, alpha=6.0).attach()
    x = torch.randn(2, 8)
    assert torch.equal(net.attn.to_q(x), x @ net.attn.to_q.weight.T + net.attn.to_q.bias)
    with torch.no_grad():
        lora.up[1].normal_()
    sd = lora.comfy_state_dict()
    assert sorted(sd) == sorted(f"lora_unet_attn_{n}.{k}" for n in ("to_q", "to_out_0")
                                for k in ("lora_up.weight", "lora_down.weight", "alpha"))
    merged = net.attn.to_q.weight + float(sd["lora_unet_attn_to_q.alpha"]) / 3 * (
        sd["lora_unet_attn_to_q.lora_up.weight"] @ sd["lora_unet_attn_to_q.lora_down.weight"])
    assert torch.allclose(net.attn.to_q(x), x @ merged.T + net.attn.to_q.bias, atol=1e-6)
    lora.enabled = False
    assert torch.equal(net.attn.to_q(x), x @ net.attn.to_q.weight.T + net.attn.to_q.bias)
    lora.detach_hooks()
    lora.enabled = True
    assert torch.equal(net.attn.to_q(x), x @ net.attn.to_q.weight.T + net.attn.to_q.bias)


def separable(n=240, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    z = torch.randn(n, 4, 4, 4, generator=g) * 0.5
    z[:, 0] += (y.float() - 1)[:, None, None] * 2
    return z, y


def test_classifier_learns_saves_and_loads(tmp_path):
    z, y = separable()
    net = train_classifier(z, y, ["a", "b", "c"], epochs=15)
    assert net.meta["held_out_accuracy"] >= 0.95
    net.save(tmp_path / "c.safetensors")
    back = LatentClassifier.load(tmp_path / "c.safetensors")
    assert back.classes == ["a", "b", "c"] and torch.equal(back(z), net(z))


def test_ensemble_reads_the_members_mean_probability_and_round_trips(tmp_path):
    z, y = separable()
    ens = train_classifier(z, y, ["a", "b", "c"], epochs=5, seed=3, members=3)
    assert isinstance(ens, ClassifierEnsemble) and len(ens.nets) == 3
    assert [m["seed"] for m in ens.meta["members"]] == [3, 4, 5]
    assert ens.meta["held_out_accuracy"] == pytest.approx(sum(m["held_out_accuracy"] for m in ens.meta["members"]) / 3)
    with torch.no_grad():
        mean = torch.stack([net(z).softmax(1) for net in ens.nets]).mean(0)
        logits = ens(z)
        assert not torch.allclose(ens.nets[0](z).softmax(1), mean, atol=1e-3)  # the members differ
        assert torch.allclose(logits.softmax(1), mean, atol=1e-6)
        assert torch.allclose(logits.exp().sum(1), torch.ones(len(z)), atol=1e-5)  # the log of a distribution
        # the alignment loss's cross-entropy toward a label is -log of the members' mean probability of it
        assert F.cross_entropy(logits, y, reduction="none") == pytest.approx(-mean.gather(1, y[:, None])[:, 0].log(),
                                                                              abs=1e-5)
    ens.save(tmp_path / "e.safetensors")
    back = LatentClassifier.load(tmp_path / "e.safetensors")
    assert isinstance(back, ClassifierEnsemble) and back.classes == ["a", "b", "c"]
    assert back.meta == ens.meta and torch.equal(back(z), ens(z))
    single = train_classifier(z, y, ["a", "b", "c"], epochs=2, members=1)
    assert isinstance(single, LatentClassifier) and not isinstance(single, ClassifierEnsemble)


def test_ensemble_refuses_mixed_members_and_a_file_missing_one(tmp_path):
    from safetensors.torch import load_file, save_file

    from spell_core.storage import StorageError

    a, b = LatentClassifier(4, ["a", "b"]), LatentClassifier(4, ["a", "c"])
    with pytest.raises(ValueError, match="share classes"):
        ClassifierEnsemble([a, b])
    with pytest.raises(ValueError, match="at least 2"):
        ClassifierEnsemble([a])
    with pytest.raises(ValueError, match="members must be >= 1"):
        train_classifier(*separable(), ["a", "b", "c"], epochs=1, members=0)
    path = tmp_path / "e.safetensors"
    ClassifierEnsemble([a, LatentClassifier(4, ["a", "b"])]).save(path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith("members.1.head")}
    save_file(tensors, str(path), header)
    with pytest.raises(StorageError, match="damaged"):
        LatentClassifier.load(path)


def test_adversarial_inputs_stay_in_their_ball_and_raise_the_loss():
    z, y = separable()
    net = train_classifier(z, y, ["a", "b", "c"], epochs=15, held_out=0)
    radius = 0.15
    attacked = adversarial_inputs(net, z, y, radius, steps=10)
    moved = ((attacked - z) / net.std[:, None, None]).flatten(1).norm(dim=1)
    assert moved.max() <= radius * math.sqrt(z[0].numel()) * (1 + 1e-5) and moved.min() > 0
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(z.shape, generator=g)
    noise = noise / noise.flatten(1).norm(dim=1)[:, None, None, None] * moved[:, None, None, None]
    with torch.no_grad():
        clean, random, worst = (F.cross_entropy(net(v), y) for v in (z, z + noise * net.std[:, None, None], attacked))
    assert worst > 3 * random and random < 2 * clean + 0.05


def test_robust_training_keeps_its_accuracy_under_attack():
    """The test that fails without adversarial training: on held-out examples attacked at the training radius, the
    standard classifier loses a quarter of its accuracy, the robust one keeps it (both 1.0 clean)."""
    z, y = separable()
    zt, yt = separable(seed=1)
    standard = train_classifier(z, y, ["a", "b", "c"], epochs=15)
    robust = train_classifier(z, y, ["a", "b", "c"], epochs=15, robustness=0.15)
    assert robust.meta["robustness"] == 0.15 and robust.meta["held_out_attacked_accuracy"] >= 0.95
    assert "held_out_attacked_accuracy" not in standard.meta
    accuracy = {}
    for name, net in (("standard", standard), ("robust", robust)):
        attacked = adversarial_inputs(net, zt, yt, 0.15, steps=10)
        with torch.no_grad():
            accuracy[name] = (float((net(zt).argmax(1) == yt).float().mean()),
                              float((net(attacked).argmax(1) == yt).float().mean()))
    assert accuracy["standard"][0] >= 0.98 and accuracy["robust"][0] >= 0.98
    assert accuracy["standard"][1] <= 0.85 and accuracy["robust"][1] >= 0.95, accuracy


class ToyUNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.to_q = nn.Linear(16, 16)
        self.to_v = nn.Linear(16, 16)

    def forward(self, x, s, prompt):
        h = x.flatten(1) + prompt
        return (self.to_v(torch.tanh(self.to_q(h))) / (1 + s)).view_as(x)


def toy_task(unet, lora, classifier):
    prompts = [torch.zeros(16), torch.ones(16) * 0.1]

    def denoiser(prompt, on):
        def d(x, s):
            lora.enabled = on
            return unet(x, s, prompt)
        return d
    sig = torch.linspace(0.01, 10, 1000)
    return FairLoRATask(denoiser=denoiser, sigmas=lambda n: torch.cat([torch.linspace(8, 0.2, n), torch.zeros(1)]),
                        schedule_sigmas=sig, shape=(1, 4, 4), classify=classifier,
                        target=torch.tensor([0.5, 0.5]), prompts=prompts[:1], keep=prompts[1:])


@pytest.mark.parametrize("gradient,draw,extra", [("adjusted", "stratified", {}), ("naive", "stratified", {}),
                                                ("naive", "carried", {}), ("adjusted", "stratified", {"pool": 6}),
                                                ("adjusted", "stratified", {"class_reference": True})])
def test_checkpoints_resume_exactly(tmp_path, gradient, draw, extra):
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).requires_grad_(False)
    config = FairLoRAConfig(iterations=4, batch=4, steps=(2, 3), rank=2, gradient=gradient, keep_prompts_per_step=1,
                            draw=draw, **extra)
    by_class = bool(extra.get("class_reference"))

    def fresh():
        unet = ToyUNet()
        lora = LoRA(attention_linears(unet, ("to_q", "to_v")), rank=2).attach()
        task = toy_task(unet, lora, classifier)
        if by_class:
            task.class_prompts = [torch.full((1, 16), -0.2), torch.full((1, 16), 0.2)]
        if draw == "carried":
            task.target = torch.tensor([0.3, 0.7])  # 1.2 seats of 4: which batch gets the second one is carried
        return FairTrainer(task, lora, config)

    straight = fresh()
    for _ in range(4):
        straight.step()
    first = fresh()
    for _ in range(2):
        first.step()
    first.save_checkpoint(tmp_path / "ck.safetensors")
    second = fresh()
    second.load_checkpoint(tmp_path / "ck.safetensors")
    assert second.iteration == 2 and len(second.log) == 2
    for _ in range(2):
        second.step()
    assert all(torch.equal(a, b) for a, b in zip(straight.params, second.params))
    assert all(torch.equal(a, b) for a, b in zip(straight.ema, second.ema))
    assert [r["total"] for r in straight.log] == [r["total"] for r in second.log]
    assert any(abs(r["grad_norm"]) > 0 for r in straight.log)
    if by_class:
        assert any(r["moved"] > 0 for r in straight.log)  # the class references took part
    if extra.get("pool"):  # the pool travelled with the checkpoint: 4 + 2 images of the prompt when it was saved
        assert len(second.pools[0]) == 6 and torch.equal(straight.pools[0], second.pools[0])
    other = FairTrainer(toy_task(ToyUNet(), LoRA(attention_linears(ToyUNet(), ("to_q", "to_v")), rank=2), classifier),
                        LoRA(attention_linears(ToyUNet(), ("to_q", "to_v")), rank=2),
                        FairLoRAConfig(iterations=4, batch=4, steps=(2, 3), rank=2, lr=0.5))
    with pytest.raises(ValueError, match="other settings .*lr"):
        other.load_checkpoint(tmp_path / "ck.safetensors")


def test_the_lowest_validation_keeps_its_ema_weights_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).requires_grad_(False)

    def fresh():
        unet = ToyUNet()
        lora = LoRA(attention_linears(unet, ("to_q", "to_v")), rank=2).attach()
        return FairTrainer(toy_task(unet, lora, classifier), lora,
                           FairLoRAConfig(iterations=4, batch=4, steps=(2, 3), rank=2, lr=0.05, ema_warmup=True))

    t = fresh()
    assert t.best is None and t.best_state_dict().keys() == t.ema_state_dict().keys()
    snapshots = {}
    for bias_now in (0.30, 0.10, 0.10, float("nan"), 0.20):  # lowest at iteration 2; the equal one and NaN not kept
        t.step()
        snapshots[t.iteration] = t.ema_state_dict()
        kept = t.note_validation(bias_now)
        assert kept == (t.iteration in (1, 2))
    assert t.best["iteration"] == 2 and t.best["bias"] == 0.10
    raw = [p.detach().clone() for p in t.params]
    best, last = t.best_state_dict(), t.ema_state_dict()
    assert all(torch.equal(best[k], snapshots[2][k]) for k in best)
    assert any(not torch.equal(last[k], snapshots[2][k]) for k in last)  # training went on past it
    assert all(torch.equal(a, b) for a, b in zip(t.params, raw))  # the raw weights are back in the LoRA
    t.save_checkpoint(tmp_path / "ck.safetensors")
    back = fresh()
    back.load_checkpoint(tmp_path / "ck.safetensors")
    assert back.best["iteration"] == 2 and back.best["bias"] == 0.10
    assert all(torch.equal(a, b) for a, b in zip(back.best["ema"], t.best["ema"]))
    assert not back.note_validation(0.15) and back.note_validation(0.05) and back.best["iteration"] == 5


def test_ema_warm_up_starts_at_the_trained_weights_and_widens_to_the_decay():
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).requires_grad_(False)

    def trainer(**kw):
        unet = ToyUNet()
        lora = LoRA(attention_linears(unet, ("to_q", "to_v")), rank=2).attach()
        return FairTrainer(toy_task(unet, lora, classifier), lora,
                           FairLoRAConfig(iterations=3, batch=4, steps=(2, 3), rank=2, lr=0.05, **kw))

    warm, flat = trainer(ema_warmup=True), trainer()
    start = [p.detach().clone() for p in flat.params]
    warm.step()
    flat.step()
    # the first update replaces the untrained weights; without warm-up the EMA keeps 99.6 % of them
    assert all(torch.equal(e, p) for e, p in zip(warm.ema, warm.params))
    moved = [p - s for p, s in zip(flat.params, start)]
    assert any(float(m.abs().max()) > 0 for m in moved)
    assert all(torch.allclose(e - s, 0.004 * m, atol=1e-7) for e, s, m in zip(flat.ema, start, moved))
    assert [warm.ema_decay(k) for k in (0, 1, 8)] == [0.0, 2 / 11, 0.5]
    assert warm.ema_decay(10_000) == flat.ema_decay(0) == 0.996


def test_config_refuses_bad_settings():
    for bad in (dict(draw="x"), dict(gradient="x"), dict(steps=(3, 2)), dict(batch=1), dict(lr=math.nan)):
        with pytest.raises(ValueError):
            FairLoRAConfig(**bad).check()


def test_class_references_are_each_images_frozen_chain_under_its_class_prompt():
    unet = ToyUNet()
    lora = LoRA(attention_linears(unet, ("to_q", "to_v")), rank=2).attach()
    with torch.no_grad():
        for u in lora.up:
            u.normal_()  # a trained LoRA: the references must still come from the frozen model
    task = toy_task(unet, lora, nn.Flatten())
    noise = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([1, 0, 2, 1, 2])
    sigmas = task.sigmas(4)
    one_by_one = lambda prompts: torch.cat([sample_chain(task.denoiser(prompts[int(k)], False), noise[j:j + 1],
                                                         sigmas, None) for j, k in enumerate(labels)])
    task.class_prompts = [torch.full((1, 16), v) for v in (-0.3, 0.0, 0.3)]  # one shape: one stacked chain
    stacked = class_references(task, noise, labels, sigmas)
    assert torch.allclose(stacked, one_by_one(task.class_prompts), atol=1e-6)
    assert not torch.allclose(stacked[0], stacked[1])
    task.class_prompts = [torch.full((16,), -0.3), torch.full((1, 16), 0.0), torch.full((16,), 0.3)]  # per class
    assert torch.allclose(class_references(task, noise, labels, sigmas), one_by_one(task.class_prompts), atol=1e-6)


@pytest.mark.parametrize("by_class", [False, True])
def test_a_moved_image_is_kept_near_its_new_class_prompts_frozen_image(by_class):
    """Every image of the batch is assigned class 1 (target [0, 1]) while the classifier reads class 0 everywhere:
    all are moved. The paper's rule keeps each at weight 0.3 near the frozen image of the same prompt; with
    class_reference each is kept at weight 1 near the frozen image of class 1's prompt."""
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).requires_grad_(False)
    with torch.no_grad():
        classifier[1].weight.mul_(1e-3)
        classifier[1].bias.copy_(torch.tensor([5.0, 0.0]))
    unet = ToyUNet()
    lora = LoRA(attention_linears(unet, ("to_q", "to_v")), rank=2).attach()
    with torch.no_grad():
        for u in lora.up:
            u.normal_(std=0.3)
    task = toy_task(unet, lora, classifier)
    task.target, task.keep = torch.tensor([0.0, 1.0]), []
    task.class_prompts = [torch.full((1, 16), -0.5), torch.full((1, 16), 0.5)] if by_class else []
    trainer = FairTrainer(task, lora, FairLoRAConfig(batch=4, steps=(3, 3), rank=2, class_reference=by_class))
    seen = {}
    draw, classify = trainer._noise, task.classify
    trainer._noise = lambda n: seen.setdefault("noise", draw(n))
    task.classify = lambda z: (seen.__setitem__("x", z) if z.requires_grad else None) or classify(z)
    with torch.enable_grad():
        parts = trainer.losses()
    assert float(parts["moved"]) == 1.0
    sigmas = task.sigmas(3)
    with torch.no_grad():
        if by_class:
            expected = cosine_distance(seen["x"], class_references(task, seen["noise"], torch.ones(4, dtype=torch.long),
                                                                   sigmas)).mean()
        else:
            frozen = sample_chain(task.denoiser(task.prompts[0], False), seen["noise"], sigmas, None)
            expected = 0.3 * cosine_distance(seen["x"], frozen).mean()
    assert torch.allclose(parts["preserve"].detach(), expected, rtol=1e-5)


def test_the_pool_is_assigned_with_the_batch_and_keeps_the_latest_images():
    """The target (half and half) is matched over the pool and the batch: with four images of class 0 in the pool,
    all four of the batch are assigned class 1; without the pool, two of them."""
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).requires_grad_(False)
    with torch.no_grad():
        classifier[1].weight.mul_(1e-3)
        classifier[1].bias.copy_(torch.tensor([1.0, 0.0]))  # every image reads as class 0, without certainty

    def trainer(pool):
        unet = ToyUNet()
        lora = LoRA(attention_linears(unet, ("to_q", "to_v")), rank=2).attach()
        task = toy_task(unet, lora, classifier)
        task.keep = []
        return FairTrainer(task, lora, FairLoRAConfig(batch=4, steps=(2, 2), rank=2, pool=pool))

    alone, pooled = trainer(0), trainer(6)
    pooled.pools[0] = torch.tensor([[1.0, 0.0]] * 4)
    with torch.enable_grad():
        assert float(alone.losses()["moved"]) == 0.5
        assert float(pooled.losses()["moved"]) == 1.0
    assert alone.pools == {}
    latest = pooled.pools[0]
    assert latest.shape == (6, 2) and torch.equal(latest[:2], torch.tensor([[1.0, 0.0]] * 2))
    assert torch.allclose(latest[2:], torch.tensor([1.0, 0.0]).exp().div(1 + math.e).expand(4, 2), atol=1e-2)
    with pytest.raises(ValueError, match="pool"):
        FairLoRAConfig(pool=-1).check()


def test_class_reference_needs_one_prompt_per_class():
    unet = ToyUNet()
    lora = LoRA(attention_linears(unet, ("to_q", "to_v")), rank=2)
    task = toy_task(unet, lora, nn.Flatten())
    task.class_prompts = [torch.zeros(16)]
    with pytest.raises(ValueError, match="one prompt per class \\(2\\), got 1"):
        FairTrainer(task, lora, FairLoRAConfig(batch=4, rank=2, class_reference=True))
