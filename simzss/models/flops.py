"""Model FLOPs per training sample, computed from the model's shapes (for MFU in ``benchmarks/bench_train_step.py``).

Counted: every matrix multiply (2 FLOPs per multiply-add) — linear layers, the patch embedding, attention's
QKᵀ and AV (full T×T, also for the causal text tower: kernels that skip the masked half do less work than
counted, as open_clip and the PaLM MFU convention count it), the span pooling and the loss heads: what
``torch.utils.flop_counter`` counts (tests/test_model_speed_flops.py checks the towers and a whole SimZSS step
against it). Not counted: norms, activations, softmax, embedding lookups, the prototypes' scatter-add
(elementwise or gathers, a fraction of a percent). A ViT block of width D over T
tokens (MLP ratio r) is (8 + 4r)·T·D² + 4·T²·D; for ViT-B/14 at 224 px (T = 261 with 4 registers) and a
12×512 text tower at 77 tokens this gives about 65 GFLOP per sample.

Training sample = frozen vision forward (1×; skipped with cached features) + text tower and projection forward
and backward (3×: the backward pass costs two matrix multiplies per forward one, the input's and the weight's
gradient) + the loss heads (2× where one operand is frozen, see ``train_flops_per_sample``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TowerShape", "transformer_forward_flops", "vit_forward_flops", "train_flops_per_sample"]


@dataclass(frozen=True)
class TowerShape:
    """The shapes a transformer's FLOPs depend on."""

    layers: int
    width: int
    mlp_ratio: float = 4.0


def transformer_forward_flops(shape: TowerShape, tokens: int) -> float:
    """Forward FLOPs of ``shape.layers`` pre-norm transformer blocks over ``tokens`` tokens (one sample)."""
    d, t = shape.width, tokens
    per_layer = 2 * t * d * 3 * d + 2 * t * d * d + 2 * 2 * t * d * int(shape.mlp_ratio * d) + 2 * 2 * t * t * d
    return float(shape.layers * per_layer)


def vit_forward_flops(shape: TowerShape, image_size: int, patch_size: int, prefix_tokens: int) -> float:
    """Forward FLOPs of a ViT on one ``image_size``² image: patch embedding plus the blocks over the patches and
    the ``prefix_tokens`` (CLS and registers)."""
    patches = (image_size // patch_size) ** 2
    embed = 2 * patches * 3 * patch_size**2 * shape.width
    return float(embed) + transformer_forward_flops(shape, patches + prefix_tokens)


def train_flops_per_sample(
    vision: TowerShape | None,
    text: TowerShape,
    *,
    image_size: int,
    patch_size: int,
    prefix_tokens: int,
    context_length: int,
    embed_dim: int,
    batch_size: int,
    concept_slots: int = 0,
    class_table_rows: int = 0,
    concept_pooling: str = "mean",
) -> dict[str, float]:
    """FLOPs of one training sample, by part, and their ``total``, as ``SimZSS.forward`` + backward computes them.

    ``vision=None``: cached features (no vision forward). ``batch_size``: the contrastive negatives (the global
    batch). ``concept_slots``: K, the concept columns per caption (every slot is computed; 0: LiT, no concept
    branch); ``class_table_rows``: rows of the concept class table (the bank size, or the classes present);
    ``concept_pooling``: "mean" projects the K span means, "sum_normalized" projects every token.

    Backward costs two products per forward one when both operands need gradients, one when an operand is the
    frozen tower's output (patch tokens, CLS) or a constant (the span masks).
    """
    if concept_pooling not in ("mean", "sum_normalized"):
        raise ValueError(f"concept_pooling must be 'mean' or 'sum_normalized', got {concept_pooling!r}")
    d, w, k, length = embed_dim, text.width, concept_slots, context_length
    patches = (image_size // patch_size) ** 2
    # the pooled (EOS) feature, plus K span means or every token for the concept branch
    projected_rows = 1 + ((k if concept_pooling == "mean" else length) if k else 0)
    span_width = w if concept_pooling == "mean" else d
    concept = 0.0
    if k:
        concept = (2 * 2 * k * length * span_width  # span pooling: mask @ tokens, gradient to the tokens only
                   + 2 * 2 * (2 * k * patches * d)  # query-patch scores and the weighted sum: gradient to the query
                   + 3 * 2 * k * class_table_rows * d)  # concept logits against the prototypes: both sides learn
    parts = {
        "vision_forward": 0.0 if vision is None else vit_forward_flops(vision, image_size, patch_size, prefix_tokens),
        "text_forward_backward": 3 * transformer_forward_flops(text, length),
        "projection_forward_backward": 3 * 2.0 * w * d * projected_rows,
        # image->text and text->image logits against the batch: gradient to the text side only
        "contrastive_forward_backward": 2 * 2 * (2.0 * batch_size * d),
        "concept_forward_backward": float(concept),
    }
    parts["total"] = sum(parts.values())
    return parts
