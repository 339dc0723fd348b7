"""Losses against NumPy re-computations of the formulas, plus their invariances and edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simzss.losses import (
    class_prototypes,
    concept_accuracy,
    concept_loss,
    concept_targets,
    contrastive_loss,
    gather_with_grad,
    pool_visual_concepts,
)


def _np_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_ce(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-row cross-entropy."""
    logits = logits - logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(targets)), targets]


def _np_concept_loss(text: np.ndarray, visual: np.ndarray, labels: np.ndarray, scale: float, target: str) -> float:
    classes = sorted(set(labels.tolist()))
    t = _np_normalize(text)
    protos = _np_normalize(np.stack([t[labels == c].sum(0) for c in classes]))
    logits = scale * _np_normalize(visual) @ protos.T
    idx = np.array([classes.index(c) for c in labels])
    tgt = logits.argmax(1) if target == "argmax" else idx
    return float(_np_ce(logits, tgt).mean())


def test_gather_with_grad_is_identity_on_one_process() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x


def test_contrastive_loss_matches_hand_computation() -> None:
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    scale = 12.5
    logits = scale * _np_normalize(img) @ _np_normalize(txt).T
    labels = np.arange(5)
    expected = 0.5 * (_np_ce(logits, labels).mean() + _np_ce(logits.T, labels).mean())
    got = contrastive_loss(torch.tensor(img), torch.tensor(txt), scale)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # norm of the inputs does not matter, and a perfect pairing at a high scale costs ~nothing
    assert contrastive_loss(torch.tensor(img) * 3, torch.tensor(txt), scale).item() == pytest.approx(expected, rel=1e-6)
    eye = torch.eye(4)
    assert contrastive_loss(eye, eye, 100.0).item() < 1e-6


def test_contrastive_loss_gradients_reach_scale_and_features() -> None:
    img = torch.randn(4, 3, requires_grad=True)
    txt = torch.randn(4, 3, requires_grad=True)
    log_scale = torch.tensor(2.0, requires_grad=True)
    contrastive_loss(img, txt, log_scale.exp()).backward()
    assert img.grad is not None and txt.grad is not None and log_scale.grad is not None
    assert img.grad.abs().sum() > 0 and log_scale.grad.abs() > 0


def test_contrastive_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        contrastive_loss(torch.randn(3, 4), torch.randn(2, 4), 10.0)


def test_pool_visual_concepts_matches_hand_computation() -> None:
    rng = np.random.default_rng(1)
    patches, queries = rng.normal(size=(2, 6, 4)), rng.normal(size=(2, 3, 4))
    tau = 0.1
    z, q = _np_normalize(patches), _np_normalize(queries)
    sim = np.einsum("bkd,bnd->bkn", q, z) / tau
    s = np.exp(sim - sim.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    expected = _np_normalize(np.einsum("bkn,bnd->bkd", s, z))
    got = pool_visual_concepts(torch.tensor(patches), torch.tensor(queries), tau)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-8)


def test_pool_visual_concepts_tiny_tau_picks_the_most_similar_patch() -> None:
    torch.manual_seed(0)
    patches, queries = torch.randn(3, 10, 8) * 5, torch.randn(3, 4, 8)
    got = pool_visual_concepts(patches, queries, tau=1e-4)
    z = F.normalize(patches, dim=-1)
    best = (F.normalize(queries, dim=-1) @ z.transpose(1, 2)).argmax(-1)  # [3, 4]
    expected = torch.stack([z[b, best[b]] for b in range(3)])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(3, 4))


def test_pool_visual_concepts_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[B,N,D\]"):
        pool_visual_concepts(torch.randn(2, 5, 4), torch.randn(3, 1, 4))


@pytest.mark.parametrize("target", ["label", "argmax"])
def test_concept_loss_matches_hand_computation(target: str) -> None:
    rng = np.random.default_rng(2)
    text, visual = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
    labels = np.array([3, 0, 3, 9, 0, 3, 4])
    expected = _np_concept_loss(text, visual, labels, 1 / 0.07, target)
    got = concept_loss(torch.tensor(text), torch.tensor(visual), torch.tensor(labels), 1 / 0.07, target)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_concept_loss_argmax_target_differs_from_label_target() -> None:
    # visual concepts that all point to class 1's prototype: the argmax target is 1 everywhere
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    visual = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.1, 1.0]])
    labels = torch.tensor([0, 1, 1])
    with_label = concept_loss(text, visual, labels, 10.0, "label")
    with_argmax = concept_loss(text, visual, labels, 10.0, "argmax")
    # by hand: logits row = 10 * [cos(v, e0), cos(v, e1)]
    rows = 10 * F.normalize(visual, dim=-1)
    ce = lambda t: F.cross_entropy(rows, torch.tensor(t)).item()  # noqa: E731
    assert with_label.item() == pytest.approx(ce([0, 1, 1]), rel=1e-6)
    assert with_argmax.item() == pytest.approx(ce([1, 1, 1]), rel=1e-6)
    assert with_argmax.item() < with_label.item()


def test_concept_loss_is_invariant_to_concept_order_and_class_ids() -> None:
    torch.manual_seed(0)
    text, visual = torch.randn(9, 6), torch.randn(9, 6)
    labels = torch.tensor([1, 4, 4, 2, 1, 7, 2, 4, 7])
    base = concept_loss(text, visual, labels)
    perm = torch.randperm(9)
    torch.testing.assert_close(concept_loss(text[perm], visual[perm], labels[perm]), base)
    # absent classes are masked: renaming the classes (leaving gaps of unused ids) changes nothing
    renamed = torch.tensor([{1: 0, 2: 50, 4: 3, 7: 999}[int(v)] for v in labels])
    torch.testing.assert_close(concept_loss(text, visual, renamed), base)


def test_concept_loss_absent_classes_do_not_enter_the_softmax() -> None:
    """Equal to a softmax over all k bank classes where absent classes' logits are -inf."""
    torch.manual_seed(1)
    k = 6
    text, visual = torch.randn(5, 4), torch.randn(5, 4)
    labels = torch.tensor([0, 3, 3, 5, 0])
    protos = torch.zeros(k, 4).index_add(0, labels, F.normalize(text, dim=-1))
    logits = 10.0 * F.normalize(visual, dim=-1) @ F.normalize(protos, dim=-1).T
    absent = torch.ones(k, dtype=torch.bool)
    absent[labels] = False
    expected = F.cross_entropy(logits.masked_fill(absent, float("-inf")), labels)
    torch.testing.assert_close(concept_loss(text, visual, labels, 10.0), expected)


def test_concept_loss_with_no_concepts_is_zero_and_backpropagates() -> None:
    text = torch.randn(0, 4, requires_grad=True)
    visual = torch.randn(0, 4, requires_grad=True)
    loss = concept_loss(text, visual, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert text.grad is not None and text.grad.shape == (0, 4)
    stats = concept_loss(text, visual, torch.zeros(0, dtype=torch.long), return_stats=True)
    assert stats.num_concepts == 0 and stats.num_classes == 0 and torch.isnan(stats.accuracy)


def test_concept_loss_stats_and_accuracy() -> None:
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    visual = torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.9, 0.0]])  # 2nd points to class 0 but is class 1
    labels = torch.tensor([2, 5, 2])
    stats = concept_loss(text, visual, labels, return_stats=True)
    assert stats.num_concepts == 3 and stats.num_classes == 2
    assert stats.accuracy.item() == pytest.approx(2 / 3)
    assert concept_accuracy(text, visual, labels).item() == pytest.approx(2 / 3)
    torch.testing.assert_close(stats.loss, concept_loss(text, visual, labels))


def test_concept_loss_gradients_flow_to_both_sides() -> None:
    text = torch.randn(4, 3, requires_grad=True)
    visual = torch.randn(4, 3, requires_grad=True)
    concept_loss(text, visual, torch.tensor([0, 1, 0, 2])).backward()
    assert text.grad.abs().sum() > 0 and visual.grad.abs().sum() > 0  # type: ignore[union-attr]


def test_concept_loss_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        concept_loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="expects"):
        concept_loss(torch.randn(2, 3), torch.randn(3, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="target"):
        concept_loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), target="soft")


def test_class_prototypes_by_hand() -> None:
    text = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, 1.0], [1.0, 1.0]])
    protos, classes, index = class_prototypes(text, torch.tensor([7, 2, 7, 2]))
    assert classes.tolist() == [2, 7] and index.tolist() == [1, 0, 1, 0]
    s = 2**-0.5
    expected = F.normalize(torch.tensor([[s, 1 + s], [1.0, 1.0]]), dim=-1)
    torch.testing.assert_close(protos, expected)


def test_concept_targets_index_the_present_classes() -> None:
    targets = concept_targets(torch.tensor([7, 2, 7, 9, 2], dtype=torch.int32))
    assert targets.classes.tolist() == [2, 7, 9] and targets.local_index.tolist() == [1, 0, 1, 2, 0]
    assert targets.global_index.tolist() == targets.local_index.tolist() and targets.sizes == [5]
    assert targets.num_global == 5 and targets.classes.dtype == torch.long
    empty = concept_targets(torch.zeros(0, dtype=torch.long))
    assert empty.num_global == 0 and empty.classes.numel() == 0 and empty.local_index.numel() == 0
    with pytest.raises(ValueError, match=">= 0"):
        concept_targets(torch.tensor([3, -1]))
    with pytest.raises(ValueError, match=r"\[n\]"):
        concept_targets(torch.zeros(2, 2, dtype=torch.long))


@pytest.mark.parametrize("target", ["label", "argmax"])
def test_concept_loss_with_precomputed_targets_is_the_same(target: str) -> None:
    """Targets computed up front (what SimZSS does before its towers run) change nothing."""
    torch.manual_seed(0)
    text, visual = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([4, 1, 4, 0, 1, 1])
    plain = concept_loss(text, visual, labels, 12.0, target, return_stats=True)
    early = concept_loss(text, visual, labels, 12.0, target, return_stats=True, targets=concept_targets(labels))
    torch.testing.assert_close(early.loss, plain.loss)
    torch.testing.assert_close(early.accuracy, plain.accuracy)
    assert (early.num_concepts, early.num_classes) == (plain.num_concepts, plain.num_classes) == (6, 3)
    g_plain = torch.autograd.grad(plain.loss, (text, visual))
    g_early = torch.autograd.grad(early.loss, (text, visual))
    for a, b in zip(g_plain, g_early):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="targets are for 3 concepts"):
        concept_loss(text, visual, labels, targets=concept_targets(labels[:3]))
