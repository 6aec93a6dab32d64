"""spell_core.fairness alone: target parsing, running-count targets, assignments, losses and their gradients,
heads (training, interpolation, files), the running count file."""
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from spell_core import fairness as F

CLASSES = ["young", "old"]


def test_parse_target_reads_shares_in_class_order():
    assert F.parse_target("old: 0.25, young: 0.75", CLASSES).tolist() == [0.75, 0.25]
    assert F.parse_target("young: 75%; old: 25%", CLASSES).tolist() == [0.75, 0.25]
    assert F.parse_target("a: 1", ["a", "b", "c"]).tolist() == [1.0, 0.0, 0.0]  # left out: 0


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("young 0.5, old: 0.5", "cannot read 'young 0.5'"),
    ("young: 0.5, kid: 0.5", "unknown class 'kid' in 'kid: 0.5'"),
    ("young: 0.5, young: 0.5", "appears twice"),
    ("young: half, old: 0.5", "share 'half' in 'young: half' is not a number"),
    ("young: -0.5, old: 1.5", "share '-0.5' in 'young: -0.5' must be"),
    ("young: 0.7, old: 0.2", "sum to 0.9"),
    ("young: nan, old: 1", "must be a finite"),
])
def test_parse_target_errors_quote_the_bad_token(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        F.parse_target(text, CLASSES)


def test_parse_target_tolerance_is_1e_3():
    F.parse_target("young: 0.7505, old: 0.25", CLASSES)
    with pytest.raises(ValueError):
        F.parse_target("young: 0.752, old: 0.25", CLASSES)


def test_bias_closed_forms():
    assert F.bias(torch.tensor([0.5, 0.5])) == 0
    assert F.bias(torch.tensor([1.0, 0.0])) == 1
    assert F.bias(torch.tensor([0.5, 0.25, 0.25])) == pytest.approx((0.25 + 0.25 + 0) / 3)


def brute_batch_counts(counts, p, batch):
    best, arg = math.inf, None
    k = len(p)
    for b in itertools.product(range(batch + 1), repeat=k):
        if sum(b) != batch or any(bi > 0 and pi == 0 for bi, pi in zip(b, p)):
            continue
        total = sum(counts) + batch
        d = sum((c + bi - pi * total) ** 2 for c, bi, pi in zip(counts, b, p))
        if d < best - 1e-12:
            best, arg = d, b
    return best


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=3, max_size=3), st.integers(1, 6),
       st.sampled_from([(0.5, 0.25, 0.25), (0.1, 0.6, 0.3), (1.0, 0.0, 0.0), (0.34, 0.33, 0.33)]))
def test_batch_counts_are_optimal(counts, batch, p):
    """Greedy seat allocation reaches the brute-force optimum of ||counts + b − p (N + B)||²."""
    b = F.batch_counts(torch.tensor(counts), torch.tensor(p), batch)
    assert int(b.sum()) == batch and (b >= 0).all()
    total = sum(counts) + batch
    got = sum((c + bi - pi * total) ** 2 for c, bi, pi in zip(counts, b.tolist(), p))
    assert got == pytest.approx(brute_batch_counts(counts, p, batch), abs=1e-9)


def test_batch_counts_make_up_for_earlier_runs():
    """75/25 target, earlier outputs all 'young': the next batch of 4 is all 'old'."""
    assert F.batch_counts(torch.tensor([12, 0]), torch.tensor([0.75, 0.25]), 4).tolist() == [0, 4]
    assert F.batch_counts(torch.tensor([0, 0]), torch.tensor([0.75, 0.25]), 4).tolist() == [3, 1]


def test_carried_labels_keep_every_class_within_one_seat_of_its_share():
    skewed = torch.tensor([0.3] + [0.7 / 9] * 9)
    seats = torch.zeros(10)
    for n in range(40):
        y = F.carried_labels(skewed, 20, n)
        assert y.numel() == 20 and torch.equal(y, F.carried_labels(skewed, 20, n))  # a function of n alone
        seats += torch.bincount(y, minlength=10)
        assert (seats - (n + 1) * 20 * skewed).abs().max() < 1 + 1e-9, (n, seats)
    assert torch.bincount(F.carried_labels(skewed, 20, 0), minlength=10)[0] == 6
    # whole seats: the same labels as the stratified draw, every batch
    g = torch.Generator().manual_seed(0)
    for n in range(5):
        assert torch.equal(F.carried_labels(torch.full((10,), 0.1), 20, n),
                           F.stratified_labels(torch.full((10,), 0.1), 20, g))
    # a class of share below one seat per batch still gets its seat every few batches
    rare = torch.tensor([0.95, 0.05])
    got = torch.stack([torch.bincount(F.carried_labels(rare, 4, n), minlength=2) for n in range(10)])
    assert got[:, 1].sum() == 2 and got.sum(1).eq(4).all()


def test_stratified_labels_match_whole_targets_exactly():
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        y = F.stratified_labels(torch.tensor([0.75, 0.25]), 8, g)
        assert torch.bincount(y, minlength=2).tolist() == [6, 2]
        y = F.stratified_labels(torch.full((10,), 0.1), 16, g)
        counts = torch.bincount(y, minlength=10)
        assert counts.sum() == 16 and counts.min() >= 1 and counts.max() <= 2


def assignment_cost(probs, y):
    return float(torch.cdist(probs.double(), torch.nn.functional.one_hot(y, probs.shape[1]).double()).diagonal().sum())


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 9))
def test_two_class_sort_agrees_with_linear_sum_assignment(seed, batch):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(batch, 2, generator=g).softmax(1)
    labels = F.stratified_labels(torch.tensor([0.6, 0.4]), batch, g)
    y = F.assign(probs, labels)
    assert sorted(y.tolist()) == sorted(labels.tolist())
    cost = torch.cdist(probs.double(), torch.nn.functional.one_hot(labels, 2).double()).numpy()
    rows, cols = linear_sum_assignment(cost)
    assert assignment_cost(probs, y) == pytest.approx(float(cost[rows, cols].sum()), abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_multiclass_assignment_is_optimal_against_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(5, 3, generator=g).softmax(1)
    labels = torch.tensor([0, 0, 1, 2, 2])
    y = F.assign(probs, labels)
    assert sorted(y.tolist()) == sorted(labels.tolist())
    best = min(assignment_cost(probs, labels[list(perm)]) for perm in itertools.permutations(range(5)))
    assert assignment_cost(probs, y) == pytest.approx(best, abs=1e-9)


def test_whole_seats_are_assigned_to_the_nearest_images():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    labels = F.stratified_labels(torch.tensor([0.5, 0.5]), 4)
    assert labels.tolist() == [0, 0, 1, 1]  # whole: no draw
    assert F.assign(probs, labels).tolist() == [0, 1, 0, 1]


def test_batch_mean_loss_is_zero_at_target_and_its_gradient_points_toward_it():
    q = torch.tensor([0.75, 0.25])
    logits = torch.log(torch.tensor([[0.75, 0.25]] * 4)) * 8  # softmax(logits / 8) = q
    for div in F.DIVERGENCES:
        assert float(F.batch_mean_loss(logits, q, 8.0, div, floor=0)) == pytest.approx(0, abs=1e-6)
    x = torch.zeros(4, 2, requires_grad=True)  # p̂ = 0.5/0.5: too few of class 0
    F.batch_mean_loss(x, q).backward()
    assert (x.grad[:, 0] < 0).all() and (x.grad[:, 1] > 0).all()  # descent raises class 0's logit


def test_batch_mean_loss_gradient_matches_finite_differences():
    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    q = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    for div in F.DIVERGENCES:
        assert torch.autograd.gradcheck(lambda z: F.batch_mean_loss(z, q, 2.0, div), (x,))


def test_assignment_loss_pulls_each_image_toward_its_label():
    logits = torch.zeros(3, 2, requires_grad=True)
    F.assignment_loss(logits, torch.tensor([0, 1, 1])).backward()
    assert logits.grad[0, 0] < 0 and logits.grad[1, 1] < 0 and logits.grad[2, 1] < 0
    torch.testing.assert_close(logits.grad.sum(1), torch.zeros(3))


def toy_heads(classes=("a", "b"), levels=3, channels=4, seed=0):
    """Heads trained on features whose channel 0 (class a) or 1 (class b) is raised, more so at low noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(40) % 2
    sigmas = torch.tensor([10.0, 1.0, 0.1])[:levels]
    feats = []
    for s in sigmas:
        h = torch.randn(40, channels, 2, 2, generator=g) * float(s)
        h[torch.arange(40), y] += 3.0
        feats.append(F.pool_features(h, 2))
    return F.train_heads(torch.stack(feats), y, sigmas, list(classes), 2, channels, held_out=0.25, seed=seed)


def test_trained_heads_report_accuracy_per_level_and_round_trip(tmp_path):
    heads = toy_heads()
    assert len(heads.accuracy) == 3 and heads.accuracy[-1] == 1.0 and heads.accuracy[0] <= heads.accuracy[-1]
    heads.save(tmp_path / "h.safetensors")
    back = F.AttributeHeads.load(tmp_path / "h.safetensors")
    h = torch.randn(5, 4, 2, 2)
    assert torch.equal(back.logits(h, 0.5), heads.logits(h, 0.5)) and back.classes == ["a", "b"]
    (tmp_path / "bad.safetensors").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="bad.safetensors is not a readable safetensors"):
        F.AttributeHeads.load(tmp_path / "bad.safetensors")


def test_heads_interpolate_between_levels_in_log_sigma():
    heads = toy_heads()
    assert heads.bucket_weights(100.0) == [(0, 1.0)] and heads.bucket_weights(0.01) == [(2, 1.0)]
    (i, wi), (j, wj) = heads.bucket_weights(math.sqrt(10.0))  # halfway between 10 and 1 in log σ
    assert (i, j) == (0, 1) and wi == pytest.approx(0.5) and wj == pytest.approx(0.5)


def test_guidance_step_moves_predictions_toward_the_batch_target():
    heads = toy_heads()
    h = torch.zeros(8, 4, 2, 2)
    h[:, 0] += 3.0  # every image looks like class a
    for loss in F.LOSSES:
        run = F.FairRun(heads, torch.tensor([0.5, 0.5]), F.FairConfig(loss, strength=2.0, temperature=1.0), 8, seed=1)
        before = heads.logits(h, 0.1).softmax(-1)[:, 1].mean()
        after = heads.logits(run.step(h, 0.1), 0.1).softmax(-1)[:, 1].mean()
        assert after > before, loss


def test_strength_zero_returns_h_bit_identical():
    heads = toy_heads()
    h = torch.randn(4, 4, 2, 2)
    run = F.FairRun(heads, torch.tensor([0.5, 0.5]), F.FairConfig("batch mean", strength=0.0), 4)
    assert run.step(h, 1.0) is h


def test_running_count_sets_the_batch_target():
    heads = toy_heads()
    run = F.FairRun(heads, torch.tensor([0.5, 0.5]), F.FairConfig("per-image assignment"), 4,
                    counts=torch.tensor([10.0, 2.0]))
    assert run.q.tolist() == [0.0, 1.0]


def test_fairness_count_file_persists_and_refuses_other_classes(tmp_path):
    path = tmp_path / "c.json"
    count = F.open_count(path)
    assert count.counts(CLASSES).tolist() == [0, 0]
    count.add(CLASSES, [0, 0, 1])
    assert F.open_count(path) is count
    F.COUNTS.clear()  # a restart
    again = F.open_count(path)
    assert again.counts(CLASSES).tolist() == [2, 1] and again.runs() == 1
    with pytest.raises(ValueError, match="counts classes"):
        again.counts(["a", "b"])
    again.reset()
    assert not path.exists() and again.counts(["a", "b"]).tolist() == [0, 0]
