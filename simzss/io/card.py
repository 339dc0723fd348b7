"""Model cards: the ``README.md`` of an export (training config and evaluation results in Markdown)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Mapping, Optional, Tuple

from simzss import __version__
from simzss.config import ModelConfig, TrainConfig, to_yaml
from simzss.models.pretrained import FORMAT_VERSION

def _format_results(results: Any) -> str:
    """Markdown for evaluation results: a table of the scalar metrics and the full JSON.

    Accepts the trainer's ``eval.json`` (``{"step": N, "results": {spec: metrics}}``), ``simzss eval`` output
    (``{spec: metrics}``) or a flat ``{metric: value}``.
    """
    rows: List[Tuple[str, str, Any]] = []
    step = None
    table_src = results
    if isinstance(results, dict) and isinstance(results.get("results"), dict):
        step, table_src = results.get("step"), results["results"]

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k == "per_class":
                    continue
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
            name, _, metric = prefix.rpartition("/")
            rows.append((name or "-", metric, obj))

    walk("", table_src)
    out = [f"At training step {step}:", ""] if step is not None else []
    if rows:
        out += ["| evaluation | metric | value |", "|---|---|---|"]
        out += [f"| {n} | {m} | {v:.4g} |" if isinstance(v, float) else f"| {n} | {m} | {v} |" for n, m, v in rows]
        out.append("")
    out += ["<details><summary>all results (JSON)</summary>", "", "```json", json.dumps(results, indent=2), "```", "", "</details>"]
    return "\n".join(out)


def _source_line(source: Mapping[str, Any]) -> str:
    """``- Training step N: exported from checkpoint `RUN/checkpoints/step-N` `` (only the last three parts of the
    path: the card may be published, the rest of the path is the user's)."""
    ckpt = Path(str(source.get("checkpoint", "")))
    shown = "/".join(ckpt.parts[-3:]) if ckpt.parts else "?"
    return f"- Training step {source.get('step')}: exported from checkpoint `{shown}`"


def model_card(
    cfg: ModelConfig,
    *,
    name: str,
    vision_included: bool,
    train_config: Optional[TrainConfig] = None,
    eval_results: Optional[Any] = None,
    source: Optional[Mapping[str, Any]] = None,
) -> str:
    """Text of the export's README.md: what the model is, where it came from (``source``: the trainer
    checkpoint and its step), how to load it, evaluation results, training config."""
    v, t = cfg.vision, cfg.text
    if vision_included:
        vision_src = "weights included in `model.safetensors` (`vision.` prefix)"
    else:
        vision_src = "weights downloaded from the timm hub by name on load"
    text_desc = (
        f"from scratch, {t.layers} layers x {t.width} wide, {t.heads} heads"
        if t.kind == "scratch"
        else f"initialised from `{t.name_or_path}`"
    )
    config_yaml = to_yaml(train_config) if train_config is not None else to_yaml(cfg)
    lines = [
        "---",
        "library_name: simzss",
        "pipeline_tag: image-segmentation",
        "tags:",
        "- zero-shot-segmentation",
        "- open-vocabulary-segmentation",
        "- simzss",
        "---",
        "",
        f"# {name}",
        "",
        "An open-vocabulary zero-shot segmentation model trained by the SimZSS recipe "
        "(Stegmüller, Lebailly et al., ICLR 2025): a frozen vision tower and a text tower aligned to it.",
        "",
        f"- Vision tower (frozen): `{v.name}`"
        + (f" with `{json.dumps(v.model_kwargs)}`" if v.model_kwargs else "")
        + f" — {vision_src}",
        f"- Text tower: {text_desc}, {t.pooling} pooling, context {t.context_length}",
        f"- Exported by simzss {__version__} (export format {FORMAT_VERSION})",
        *([_source_line(source)] if source is not None else []),
        "",
        "## Usage",
        "",
        "```python",
        "from simzss import SimZSS",
        "",
        'model = SimZSS.from_pretrained("PATH/TO/THIS/FOLDER")',
        "```",
        "",
        "```bash",
        'simzss segment image.jpg --model PATH/TO/THIS/FOLDER --labels "cat,grass,sky" --out overlay.png',
        "```",
        "",
        "## Evaluation results",
        "",
        _format_results(eval_results) if eval_results is not None else "No evaluation results were recorded.",
        "",
        "## Training configuration",
        "",
        "```yaml",
        config_yaml.rstrip("\n"),
        "```",
        "",
    ]
    return "\n".join(lines)
