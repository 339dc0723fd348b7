"""Zero-shot image-text retrieval: Recall@1/5/10 in both directions, several captions per image.

Records stream from :func:`simzss.eval.datasets.iter_retrieval_records` (webdataset shards or a Karpathy json).
Every rank reads the same record stream (so every rank knows every caption and its image), embeds the images and
captions whose index is ``rank (mod world_size)``, and the embeddings are gathered so that every rank scores the
full similarity matrix. Images that fail to decode, and images left with no caption, are dropped with their
captions and counted in ``skipped``.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from simzss.eval.classification import check_image_size, eval_transform
from simzss.eval.datasets import iter_retrieval_records, parse_spec
from simzss.eval.metrics import retrieval_recall
from simzss.eval.segmentation import EvalRun
from simzss.models.zeroshot import ZeroShotModel, get_mean_std
from simzss.logs import progress as progress_bar

log = logging.getLogger(__name__)


def _gather_indexed(accelerator: Any, idx: Tensor, emb: Tensor) -> Tuple[Tensor, Tensor]:
    """Concatenate every rank's (global index, embedding) rows (ranks may hold different numbers of rows)."""
    if accelerator is None or accelerator.num_processes == 1:
        return idx, emb
    idx = accelerator.gather(accelerator.pad_across_processes(idx, dim=0, pad_index=-1))
    emb = accelerator.gather(accelerator.pad_across_processes(emb, dim=0))
    keep = idx >= 0
    return idx[keep], emb[keep]


def _assemble(n: int, idx: Tensor, emb: Tensor) -> Tuple[Tensor, Tensor]:
    """Dense ``[n, D]`` matrix from indexed rows, and a mask of the rows present."""
    out = emb.new_zeros((n, emb.shape[1]))
    present = torch.zeros(n, dtype=torch.bool, device=emb.device)
    out[idx] = emb
    present[idx] = True
    return out, present


def evaluate_retrieval(
    model: ZeroShotModel,
    dataset_spec: str,
    *,
    image_size: int = 224,
    batch_size: int = 64,
    text_batch_size: int = 256,
    image_root: Optional[str] = None,
    split: str = "test",
    workers: int = 0,
    accelerator: Any = None,
    max_images: Optional[int] = None,
    progress: bool = False,
) -> Dict[str, Any]:
    """R@1/5/10 (x100) image->text and text->image, plus counts. ``workers`` > 0 decodes images in threads."""
    name, _ = parse_spec(dataset_spec)
    run = EvalRun.start(model, accelerator)
    net, device, rank, world, autocast = run.net, run.device, run.rank, run.world, run.autocast
    check_image_size(net, image_size)
    mean, std = get_mean_std(net)
    transform = eval_transform(image_size, mean, std)
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None
    skipped: Dict[str, int] = {}
    local_bad = 0

    def load(fn: Callable[[], Image.Image]) -> Optional[Tensor]:
        try:
            return transform(fn())
        except Exception as e:  # noqa: BLE001 - undecodable image: counted, logged skip
            log.warning("%s: image skipped: %s: %s", name, type(e).__name__, e)
            return None

    img_idx: List[Tensor] = []
    img_emb: List[Tensor] = []
    pending: List[Tuple[int, Callable[[], Image.Image]]] = []

    def flush() -> None:
        nonlocal local_bad
        if not pending:
            return
        tensors = list(pool.map(load, [p[1] for p in pending])) if pool else [load(p[1]) for p in pending]
        ok = [(i, t) for (i, _), t in zip(pending, tensors) if t is not None]
        local_bad += len(pending) - len(ok)
        pending.clear()
        if ok:
            with autocast():
                cls, _ = net.encode_image(torch.stack([t for _, t in ok]).to(device))
            img_idx.append(torch.tensor([i for i, _ in ok], dtype=torch.long, device=device))
            img_emb.append(F.normalize(cls.float(), dim=-1))

    key_to_idx: Dict[str, int] = {}
    captions: List[str] = []
    caption_image: List[int] = []
    try:
        with torch.no_grad():
            with autocast():
                dim = net.encode_texts(["a photo"]).shape[-1]
            records = iter_retrieval_records(dataset_spec, image_root=image_root, split=split, skipped=skipped)
            if progress and rank == 0:
                records = progress_bar(records, desc=name, unit="img")
            for key, loader_fn, caps in records:
                idx = key_to_idx.get(key)
                if idx is None:
                    if max_images is not None and len(key_to_idx) >= max_images:
                        continue
                    idx = key_to_idx[key] = len(key_to_idx)
                    if idx % world == rank:
                        pending.append((idx, loader_fn))
                        if len(pending) >= batch_size:
                            flush()
                captions += caps
                caption_image += [idx] * len(caps)
            flush()
            n_img = len(key_to_idx)
            local_i = torch.cat(img_idx) if img_idx else torch.zeros(0, dtype=torch.long, device=device)
            local_e = torch.cat(img_emb) if img_emb else torch.zeros(0, dim, device=device)
            images, present = _assemble(n_img, *_gather_indexed(accelerator, local_i, local_e))

            mine = list(range(rank, len(captions), world))
            t_idx, t_emb = [], []
            for s in range(0, len(mine), text_batch_size):
                chunk = mine[s : s + text_batch_size]
                with autocast():
                    e = net.encode_texts([captions[i] for i in chunk])
                t_idx.append(torch.tensor(chunk, dtype=torch.long, device=device))
                t_emb.append(F.normalize(e.float(), dim=-1))
            local_ti = torch.cat(t_idx) if t_idx else torch.zeros(0, dtype=torch.long, device=device)
            local_te = torch.cat(t_emb) if t_emb else torch.zeros(0, dim, device=device)
            texts, _ = _assemble(len(captions), *_gather_indexed(accelerator, local_ti, local_te))
            bad = torch.tensor([local_bad], device=device)
            if accelerator is not None and world > 1:
                bad = accelerator.reduce(bad, reduction="sum")
    finally:
        if pool is not None:
            pool.shutdown()
        run.finish()

    cap_img = torch.tensor(caption_image, dtype=torch.long, device=device)
    has_caption = torch.zeros(n_img, dtype=torch.bool, device=device)
    has_caption[cap_img] = True
    keep_img = present & has_caption
    if int(bad):
        skipped["undecodable_image"] = int(bad)
    no_caption = int((present & ~has_caption).sum())
    if no_caption:
        skipped["no_caption"] = no_caption
        log.warning("%s: %d images have no caption (dropped)", name, no_caption)
    new_index = torch.full((n_img,), -1, dtype=torch.long, device=device)
    new_index[keep_img] = torch.arange(int(keep_img.sum()), device=device)
    keep_txt = keep_img[cap_img] if len(caption_image) else torch.zeros(0, dtype=torch.bool, device=device)
    if int(keep_img.sum()) == 0 or int(keep_txt.sum()) == 0:
        raise ValueError(f"{dataset_spec}: no image-caption pairs to evaluate (skipped: {skipped})")
    dropped_captions = int((~keep_txt).sum())
    if dropped_captions:
        skipped["captions_of_dropped_images"] = dropped_captions
    result: Dict[str, Any] = {"dataset": name}
    result.update(retrieval_recall(images[keep_img], texts[keep_txt], new_index[cap_img[keep_txt]]))
    result.update(num_images=int(keep_img.sum()), num_texts=int(keep_txt.sum()), skipped=skipped)
    return result


__all__ = ["evaluate_retrieval"]
