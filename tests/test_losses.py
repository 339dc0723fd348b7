"""Losses against NumPy re-computations of the formulas, plus their invariances and edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simzss.losses import (
    concept_loss,
    contrastive_loss,
    gather_with_grad,
    pool_visual_concepts,
    slot_classes,
    slot_concept_loss,
    slot_prototypes,
)


def _np_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_ce(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-row cross-entropy."""
    logits = logits - logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(targets)), targets]


def _np_concept_loss(text: np.ndarray, visual: np.ndarray, labels: np.ndarray, scale: float, target: str,
                     normalize_members: bool = True) -> float:
    """The concept loss on the concepts given (no empty slot), vectorised in NumPy."""
    classes = sorted(set(labels.tolist()))
    t = _np_normalize(text) if normalize_members else text
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


def _loop_concept_loss(text: torch.Tensor, visual: torch.Tensor, labels: list[int], scale: float, target: str,
                       normalize_members: bool) -> tuple[torch.Tensor, float]:
    """(loss, accuracy) written from the method, one concept at a time, in plain Python over the slots: the
    prototype of class c is the normalised sum of the (normalised) text concepts labelled c; each concept's
    logits are scale x cos(visual concept, prototype) over the classes present; cross-entropy against its
    label or the argmax, averaged over the concepts; slots labelled -1 hold no concept."""
    concepts = [i for i, c in enumerate(labels) if c >= 0]
    if not concepts:
        return (text.sum() + visual.sum()) * 0, float("nan")
    present = sorted({labels[i] for i in concepts})
    protos = []
    for c in present:
        total = torch.zeros_like(text[0])
        for i in concepts:
            if labels[i] == c:
                total = total + (text[i] / text[i].norm() if normalize_members else text[i])
        protos.append(total / total.norm())
    losses, correct = [], 0
    for i in concepts:
        v = visual[i] / visual[i].norm()
        logits = torch.stack([scale * torch.dot(v, h) for h in protos])
        best = max(range(len(present)), key=lambda j: (float(logits[j].detach()), -j))  # first maximum
        true = present.index(labels[i])
        correct += best == true
        goal = best if target == "argmax" else true
        losses.append(torch.logsumexp(logits, 0) - logits[goal])
    return torch.stack(losses).mean(), correct / len(concepts)


def _slot_case(seed: int, slots: int, classes: int, empty: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (slots,), generator=g)
    labels[torch.rand(slots, generator=g) < empty] = -1  # empty slots
    norms = torch.rand(slots, 1, generator=g, dtype=torch.float64) * 3  # members of any norm (release pooling)
    text = torch.randn(slots, 6, generator=g, dtype=torch.float64) * norms
    return text, torch.randn(slots, 6, generator=g, dtype=torch.float64), labels


@pytest.mark.parametrize("target", ["label", "argmax"])
@pytest.mark.parametrize("num_classes", [None, 9])
@pytest.mark.parametrize("normalize_members", [True, False])
@pytest.mark.parametrize("seed,slots,classes,empty", [(0, 12, 9, 0.3), (1, 7, 9, 0.0), (2, 10, 9, 1.0), (3, 0, 9, 0.0),
                                                      (4, 30, 9, 0.5), (5, 8, 1, 0.25)])
def test_concept_loss_equals_the_per_concept_loop(target, num_classes, normalize_members, seed, slots, classes, empty):
    """Value, gradients, accuracy and counts against the loop reference; empty slots, one class, all slots empty,
    no slot at all; with a class table sized by the bank or by the present classes."""
    text, visual, labels = _slot_case(seed, slots, classes, empty)
    text.requires_grad_(True)
    visual.requires_grad_(True)
    got = concept_loss(text, visual, labels, 7.5, target, num_classes=num_classes, normalize_members=normalize_members)
    ref, ref_accuracy = _loop_concept_loss(text, visual, labels.tolist(), 7.5, target, normalize_members)
    torch.testing.assert_close(got.loss, ref, rtol=1e-10, atol=1e-10)
    assert got.loss.requires_grad
    if math.isnan(ref_accuracy):
        assert torch.isnan(got.accuracy)
    else:
        assert float(got.accuracy) == pytest.approx(ref_accuracy)
    assert int(got.num_concepts) == int((labels >= 0).sum())
    assert int(got.num_classes) == len(set(labels[labels >= 0].tolist()))
    for a, e in zip(torch.autograd.grad(got.loss, (text, visual)), torch.autograd.grad(ref, (text, visual))):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)
        assert torch.isfinite(a).all()
    keep = labels >= 0
    if keep.any():  # and the vectorised NumPy formula
        expected = _np_concept_loss(text[keep].detach().numpy(), visual[keep].detach().numpy(), labels[keep].numpy(),
                                    7.5, target, normalize_members)
        assert got.loss.item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("target", ["label", "argmax"])
def test_concept_loss_matches_hand_computation(target: str) -> None:
    rng = np.random.default_rng(2)
    text, visual = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
    labels = np.array([3, 0, 3, 9, 0, 3, 4])
    expected = _np_concept_loss(text, visual, labels, 1 / 0.07, target)
    got = concept_loss(torch.tensor(text), torch.tensor(visual), torch.tensor(labels), 1 / 0.07, target).loss
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_concept_loss_argmax_target_differs_from_label_target() -> None:
    # visual concepts that all point to class 1's prototype: the argmax target is 1 everywhere
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    visual = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.1, 1.0]])
    labels = torch.tensor([0, 1, 1])
    with_label = concept_loss(text, visual, labels, 10.0, "label").loss
    with_argmax = concept_loss(text, visual, labels, 10.0, "argmax").loss
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
    base = concept_loss(text, visual, labels).loss
    perm = torch.randperm(9)
    torch.testing.assert_close(concept_loss(text[perm], visual[perm], labels[perm]).loss, base)
    # absent classes are masked: renaming the classes (leaving gaps of unused ids) changes nothing
    renamed = torch.tensor([{1: 0, 2: 50, 4: 3, 7: 999}[int(v)] for v in labels])
    torch.testing.assert_close(concept_loss(text, visual, renamed).loss, base)
    torch.testing.assert_close(concept_loss(text, visual, renamed, num_classes=1000).loss, base)


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
    for num_classes in (None, k):
        torch.testing.assert_close(concept_loss(text, visual, labels, 10.0, num_classes=num_classes).loss, expected)


def test_concept_loss_with_no_concepts_is_zero_and_backpropagates() -> None:
    for labels in (torch.zeros(0, dtype=torch.long), torch.full((3,), -1)):
        text = torch.randn(len(labels), 4, requires_grad=True)
        visual = torch.randn(len(labels), 4, requires_grad=True)
        stats = concept_loss(text, visual, labels)
        assert stats.loss.item() == 0.0 and stats.loss.requires_grad
        stats.loss.backward()
        assert text.grad is not None and text.grad.shape == (len(labels), 4) and not text.grad.any()
        assert int(stats.num_concepts) == 0 and int(stats.num_classes) == 0 and torch.isnan(stats.accuracy)


def test_concept_loss_stats_and_accuracy() -> None:
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [5.0, 5.0]])
    visual = torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.9, 0.0], [0.0, 1.0]])  # 2nd points to class 0 but is class 1
    labels = torch.tensor([2, 5, 2, -1])  # the last slot is empty
    stats = concept_loss(text, visual, labels)
    assert int(stats.num_concepts) == 3 and int(stats.num_classes) == 2
    assert stats.accuracy.item() == pytest.approx(2 / 3)
    torch.testing.assert_close(stats.loss, concept_loss(text[:3], visual[:3], labels[:3]).loss)


def test_concept_loss_gradients_flow_to_both_sides() -> None:
    text = torch.randn(4, 3, requires_grad=True)
    visual = torch.randn(4, 3, requires_grad=True)
    concept_loss(text, visual, torch.tensor([0, 1, 0, 2])).loss.backward()
    assert text.grad.abs().sum() > 0 and visual.grad.abs().sum() > 0  # type: ignore[union-attr]


def test_concept_loss_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="expects"):
        concept_loss(torch.randn(2, 3), torch.randn(3, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="expects"):
        concept_loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="target"):
        concept_loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), target="soft")
    with pytest.raises(ValueError, match=r"\[S\]"):
        slot_classes(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="label 5 is not below num_classes=5"):
        slot_classes(torch.tensor([0, 5, -1]), 5)


def test_slot_prototypes_by_hand() -> None:
    text = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, 1.0], [1.0, 1.0], [9.0, 9.0]])
    labels = torch.tensor([7, 2, 7, 2, -1])  # the empty slot adds nothing
    s = 2**-0.5
    for num_classes, rows in ((None, [0, 1]), (10, [2, 7])):
        protos, present = slot_prototypes(text, slot_classes(labels, num_classes))
        assert present.nonzero().flatten().tolist() == rows
        torch.testing.assert_close(protos[rows], F.normalize(torch.tensor([[s, 1 + s], [1.0, 1.0]]), dim=-1))
        assert not protos[~present].any()


def test_slot_classes_rank_the_present_labels_like_unique() -> None:
    labels = torch.tensor([7, -1, 2, 7, 9, -1, 2], dtype=torch.int32)
    dense = slot_classes(labels)
    _, inverse = torch.unique(labels[labels >= 0], return_inverse=True)
    assert dense.size == 3 and torch.equal(dense.index[labels >= 0], inverse)  # sized to the present classes
    assert torch.equal(dense.valid, labels >= 0) and dense.index.dtype == torch.long
    assert int(dense.index.max()) < dense.size  # empty slots point at a real row too (with zero weight)
    table = slot_classes(labels, 10)
    assert table.size == 10 and torch.equal(table.index[labels >= 0], labels[labels >= 0].long())
    assert slot_classes(torch.full((4,), -1)).size == 1 and slot_classes(torch.zeros(0, dtype=torch.long)).size == 1


def test_slot_concept_loss_checks_the_slot_count() -> None:
    classes = slot_classes(torch.tensor([0, 1, -1]))
    protos, present = slot_prototypes(torch.randn(3, 4), classes)
    with pytest.raises(ValueError, match="for 3 slots"):
        slot_concept_loss(torch.randn(2, 4), classes, protos, present)


def test_concept_loss_under_bf16_autocast_keeps_exact_counts() -> None:
    """bf16 logits (CPU autocast): the loss stays close to fp32, and counts beyond bf16's exact integers (256)
    are exact."""
    torch.manual_seed(0)
    n = 1200
    text, visual = torch.randn(n, 16), torch.randn(n, 16)
    labels = torch.randint(0, 30, (n,))
    labels[::6] = -1
    labels[1] = -1  # 999 concepts: not a bf16 number
    reference = concept_loss(text, visual, labels, 10.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = concept_loss(text, visual, labels, 10.0)
    assert int(got.num_concepts) == int((labels >= 0).sum()) == int(reference.num_concepts)
    torch.testing.assert_close(got.loss.float(), reference.loss, rtol=2e-2, atol=2e-2)
    assert abs(float(got.accuracy) - float(reference.accuracy)) < 0.05
