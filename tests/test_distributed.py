"""Two CPU processes (gloo) must reproduce one process on the concatenated batch.

For every case the loss value on each rank must equal the single-process loss, and the average of the
two ranks' parameter gradients (what DDP applies) must equal the single-process gradients. Ranks hold
different numbers of rows / concepts, one case gives a rank no concept at all.
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from simzss.config import TextConfig
from simzss.losses import concept_loss, contrastive_loss
from simzss.models import FrozenVisionTower, SimZSS, TextTower

Result = dict[str, Tensor]  # "loss" + "grad/<param>" entries


def _rows(sizes: list[int], rank: int, world: int) -> slice:
    """This rank's rows of a global tensor split by ``sizes`` (everything on one process)."""
    if world == 1:
        return slice(None)
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _collect(loss: Tensor, modules: dict[str, nn.Module]) -> Result:
    loss.backward()
    out = {"loss": loss.detach().clone()}
    for prefix, module in modules.items():
        for name, p in module.named_parameters():
            if p.grad is not None:
                out[f"grad/{prefix}.{name}"] = p.grad.detach().clone()
    return out


def _contrastive_case(sizes: list[int], rank: int, world: int, equal_sizes: bool = False) -> Result:
    g = torch.Generator().manual_seed(0)
    n = sum(sizes)
    x_img, x_txt = torch.randn(n, 8, generator=g), torch.randn(n, 6, generator=g)
    torch.manual_seed(1)
    heads = nn.ModuleDict({"img": nn.Linear(8, 5), "txt": nn.Linear(6, 5)})
    heads.scale = nn.Parameter(torch.tensor(2.0))  # type: ignore[attr-defined]
    rows = _rows(sizes, rank, world)
    loss = contrastive_loss(heads["img"](x_img[rows]), heads["txt"](x_txt[rows]), heads.scale.exp(),
                            equal_sizes=equal_sizes)
    return _collect(loss, {"heads": heads})


def _concept_case(sizes: list[int], labels: list[int], target: str, rank: int, world: int,
                  num_classes: int | None = None) -> Result:
    g = torch.Generator().manual_seed(0)
    n = sum(sizes)
    x_txt, x_vis = torch.randn(n, 6, generator=g), torch.randn(n, 8, generator=g)
    torch.manual_seed(2)
    heads = nn.ModuleDict({"txt": nn.Linear(6, 5), "vis": nn.Linear(8, 5)})
    heads.scale = nn.Parameter(torch.tensor(math.log(10.0)))  # type: ignore[attr-defined]
    rows = _rows(sizes, rank, world)
    stats = concept_loss(heads["txt"](x_txt[rows]), heads["vis"](x_vis[rows]), torch.tensor(labels)[rows],
                         heads.scale.exp(), target, num_classes=num_classes)
    result = _collect(stats.loss, {"heads": heads})
    result.update(accuracy=stats.accuracy, num_concepts=stats.num_concepts, num_classes=stats.num_classes)
    return result


def _tiny_model(query: str, concept_scale: float | None) -> SimZSS:
    torch.manual_seed(3)
    vision = FrozenVisionTower(
        "vit_small_patch14_reg4_dinov2", pretrained=False, img_size=28,
        model_kwargs={"depth": 1, "embed_dim": 16, "num_heads": 2},
    )
    text = TextTower(TextConfig(layers=1, width=16, heads=2, context_length=12), 40, 0, 16)
    return SimZSS(vision, text, embed_dim=16, query=query, concept_scale=concept_scale, concept_weight=0.5)


def _model_case(query: str, concept_scale: float | None, concepts: list[list[tuple[int, int]]],
                rank: int, world: int, equal_batch_sizes: bool = False, concept_classes: int | None = None) -> Result:
    """Full SimZSS forward; ``concepts[b]`` = [(label, token position), ...] of sample b (4 samples)."""
    g = torch.Generator().manual_seed(4)
    B, L = len(concepts), 10
    images = torch.randn(B, 3, 28, 28, generator=g)
    input_ids = torch.randint(1, 40, (B, L), generator=g)
    attention_mask = torch.ones(B, L, dtype=torch.long)
    attention_mask[1, 6:] = 0
    input_ids[attention_mask == 0] = 0
    rows = _rows([B // 2, B - B // 2], rank, world)
    local = concepts[rows]
    K = max(len(c) for c in local)  # K differs per rank, as in real batches
    concept_mask = torch.zeros(len(local), K, L, dtype=torch.bool)
    concept_labels = torch.full((len(local), K), -1)
    for b, sample in enumerate(local):
        for k, (label, pos) in enumerate(sample):
            concept_mask[b, k, pos : pos + 2] = True
            concept_labels[b, k] = label
    batch = SimpleNamespace(images=images[rows], input_ids=input_ids[rows], attention_mask=attention_mask[rows],
                            concept_mask=concept_mask, concept_labels=concept_labels)
    model = _tiny_model(query, concept_scale).train()
    model.equal_batch_sizes = equal_batch_sizes  # both ranks hold 2 samples
    model.concept_classes = concept_classes  # a class table by bank id instead of the sorted slot labels
    out = model(batch)
    result = _collect(out.loss, {"model": model})
    result["concept_loss"] = out.concept_loss.detach()
    result["num_concepts"] = torch.as_tensor(out.num_concepts)
    result["num_classes"] = torch.as_tensor(out.num_classes)
    return result


CONCEPTS_A = [[(1, 1), (4, 4)], [(2, 2)], [(1, 3)], []]  # 3 concepts on rank 0, 1 on rank 1
CONCEPTS_B = [[(1, 1), (4, 4)], [(4, 2), (1, 5), (7, 0)], [], []]  # rank 1 has none


def _all_cases(rank: int, world: int) -> dict[str, Result]:
    return {
        "contrastive_equal": _contrastive_case([3, 3], rank, world),
        "contrastive_equal_promised": _contrastive_case([3, 3], rank, world, equal_sizes=True),
        "contrastive_unequal": _contrastive_case([4, 2], rank, world),
        "concept_label": _concept_case([4, 3], [0, 2, 2, 5, 2, 5, 7], "label", rank, world),
        "concept_empty_rank": _concept_case([5, 0], [3, 1, 3, 0, 1], "label", rank, world),
        "concept_argmax": _concept_case([2, 4], [0, 2, 2, 5, 2, 5], "argmax", rank, world),
        # empty slots (-1) on both ranks, classes shared across ranks, a class table by bank id
        "concept_empty_slots": _concept_case([4, 3], [0, -1, 2, 5, -1, 5, 2], "label", rank, world),
        "concept_empty_slots_bank": _concept_case([4, 3], [0, -1, 2, 5, -1, 5, 2], "argmax", rank, world, 6),
        "model_concept_query": _model_case("concept", None, CONCEPTS_A, rank, world),
        "model_prototype_query": _model_case("prototype", 1 / 0.07, CONCEPTS_B, rank, world),
        "model_equal_batches": _model_case("concept", 1 / 0.07, CONCEPTS_B, rank, world, equal_batch_sizes=True),
        "model_bank_table": _model_case("prototype", None, CONCEPTS_A, rank, world, concept_classes=8),
    }


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(_all_cases(rank, world), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_two_processes_match_one(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    reference = _all_cases(0, 1)
    for case, ref in reference.items():
        for key, expected in ref.items():
            got = [r[case][key] for r in ranks if key in r[case]]
            if key.startswith("grad/"):
                # DDP: average over ranks; a rank whose graph never reached a parameter contributes 0.
                mean = sum(got) / 2
                torch.testing.assert_close(mean, expected, atol=1e-5, rtol=1e-4, msg=f"{case} {key}")
            else:
                assert len(got) == 2, f"{case} {key}"
                for r, value in enumerate(got):
                    torch.testing.assert_close(value, expected, atol=1e-5, rtol=1e-5, msg=f"{case} {key} rank {r}")
        grads = [k for k in ref if k.startswith("grad/")]
        assert grads, case
        for r in ranks:  # no gradient the single process does not have
            assert set(k for k in r[case] if k.startswith("grad/")) <= set(grads), case
    assert int(reference["model_prototype_query"]["num_concepts"]) == 5
    assert int(reference["model_concept_query"]["num_classes"]) == 3
