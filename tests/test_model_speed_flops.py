"""The FLOP formula behind MFU (simzss.models.flops) against torch's own count (FlopCounterMode) on tiny towers."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from simzss.config import TextConfig
from simzss.models import FrozenVisionTower, TextTower
from simzss.models.flops import TowerShape, train_flops_per_sample, transformer_forward_flops, vit_forward_flops


def _count(fn) -> int:
    """Torch's count; the math attention backend, as the counter has no formula for the CPU fused kernel."""
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("image_size,depth,width", [(56, 2, 64), (98, 1, 96)])
def test_vit_forward_flops_match_torch_count(image_size: int, depth: int, width: int) -> None:
    torch.manual_seed(0)
    tower = FrozenVisionTower("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=image_size,
                              model_kwargs={"depth": depth, "embed_dim": width, "num_heads": 2})
    counted = _count(lambda: tower(torch.randn(1, 3, image_size, image_size)))
    formula = vit_forward_flops(TowerShape(depth, width), image_size, tower.patch_size, tower.num_prefix_tokens)
    assert formula == pytest.approx(counted, rel=0.03)


def test_text_forward_and_backward_flops_match_torch_count() -> None:
    torch.manual_seed(0)
    layers, width, ctx, out = 2, 64, 16, 48
    tower = TextTower(TextConfig(layers=layers, width=width, heads=2, context_length=ctx), 100, 0, out).train()
    ids, mask = torch.randint(1, 100, (1, ctx)), torch.ones(1, ctx, dtype=torch.long)

    def step() -> None:
        _, pooled = tower(ids, mask, right_padded=True)
        tower.proj(pooled).sum().backward()

    counted = _count(step)
    shape = TowerShape(layers, width)
    parts = train_flops_per_sample(None, shape, image_size=14, patch_size=14, prefix_tokens=1, context_length=ctx,
                                   embed_dim=out, batch_size=1)
    formula = parts["text_forward_backward"] + parts["projection_forward_backward"]
    # the first layer's input gradient is still computed (the embeddings train), so backward is 2x forward
    assert formula == pytest.approx(counted, rel=0.03)
    assert parts["vision_forward"] == 0 and parts["text_forward_backward"] == 3 * transformer_forward_flops(shape, ctx)


def test_release_sizes_give_the_issue_figure() -> None:
    """ViT-B/14 at 224 px (4 registers) + a 12x512 text tower at 77 tokens: about 65 GFLOP a sample."""
    parts = train_flops_per_sample(TowerShape(12, 768), TowerShape(12, 512), image_size=224, patch_size=14,
                                   prefix_tokens=5, context_length=77, embed_dim=768, batch_size=1024,
                                   concept_slots=4, class_table_rows=1000, concept_pooling="sum_normalized")
    assert 60e9 < parts["total"] < 70e9 and parts["vision_forward"] / parts["total"] > 0.7


@pytest.mark.parametrize("pooling", ["mean", "sum_normalized"])
@pytest.mark.parametrize("concept_weight", [0.5, 0.0])
def test_whole_step_flops_match_torch_count(pooling: str, concept_weight: float) -> None:
    """A SimZSS (and LiT) forward + backward on cached features: towers, projections, span pooling, concept
    softmax over the patches and both loss heads, against torch's count of the same step."""
    from simzss.data.batch import Batch
    from simzss.models import SimZSS

    torch.manual_seed(0)
    b, k, length, width, dim, grid, bank = 6, 3, 10, 32, 16, 4, 7
    text = TextTower(TextConfig(layers=2, width=width, heads=2, context_length=length), 60, 0, dim)
    model = SimZSS(None, text, embed_dim=dim, concept_weight=concept_weight, concept_pooling=pooling).train()
    model.concept_classes, model.right_padded_inputs = bank, True
    labels = torch.randint(0, bank, (b, k))
    labels[0, 1] = -1
    spans = torch.zeros(b, k, length, dtype=torch.bool)
    spans[:, :, 2:4] = True
    batch = Batch(images=None, input_ids=torch.randint(1, 60, (b, length)), attention_mask=torch.ones(b, length,
                  dtype=torch.long), concept_mask=spans, concept_labels=labels, captions=[""] * b,
                  keys=[str(i) for i in range(b)], vision_cls=torch.randn(b, dim),
                  vision_patches=torch.randn(b, grid, grid, dim))
    counted = _count(lambda: model(batch).loss.backward())
    parts = train_flops_per_sample(None, TowerShape(2, width), image_size=grid * 14, patch_size=14, prefix_tokens=5,
                                   context_length=length, embed_dim=dim, batch_size=b,
                                   concept_slots=k if concept_weight else 0, class_table_rows=bank,
                                   concept_pooling=pooling)
    assert parts["total"] * b == pytest.approx(counted, rel=0.01)
    assert (parts["concept_forward_backward"] > 0) == (concept_weight > 0)
