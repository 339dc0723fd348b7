"""Exports: round trip, atomicity, overwrite refusal, hub-name vision loading, checkpoint export, hub push."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import TINY_CAPTIONS, TINY_VISION, tiny_model_config, tiny_tokenizer
import simzss.io as sio
from simzss.cli import export as export_cli
from simzss.io import export as ex
from simzss.models.pretrained import load_tokenizer_dir
from simzss.config import TextConfig, TrainConfig, to_yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, tokenizer dir, work dir): a random-init SimZSS small enough for CPU tests."""
    from simzss.models.simzss import SimZSS

    torch.manual_seed(0)
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("tiny")
    tok = tiny_tokenizer(work / "tok")
    model = SimZSS.from_config(tiny_model_config(str(work / "tok")), tok).eval()
    with torch.no_grad():  # make the text side differ from a fresh init, so a failed load would show
        for p in model.trainable_state_dict().values():
            if p.is_floating_point():
                p.add_(0.01 * torch.randn_like(p))
    return model, work / "tok", work


@pytest.fixture(scope="module")
def exported(tiny):
    model, _, work = tiny
    return ex.save_pretrained(model, work / "export")


def _images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 56, 70, generator=g)


def _same_embeddings(a, b) -> None:
    with torch.no_grad():
        ta, tb = a.encode_texts(TINY_CAPTIONS), b.encode_texts(TINY_CAPTIONS)
        (ca, pa), (cb, pb) = a.encode_image(_images()), b.encode_image(_images())
    torch.testing.assert_close(ta, tb, rtol=0, atol=1e-6)
    torch.testing.assert_close(ca, cb, rtol=0, atol=1e-6)
    torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)


def test_round_trip_same_embeddings_and_segmentation(tiny, exported) -> None:
    from PIL import Image

    from simzss.inference import segment_pil

    model, _, _ = tiny
    meta = sio.read_export_config(exported)
    assert meta["format_version"] == ex.FORMAT_VERSION
    assert meta["vision_weights_included"] is True  # random-init tower: auto-included
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "config.json", "model.safetensors", "tokenizer"]
    loaded = sio.load_pretrained(exported)
    assert not loaded.training and loaded.config == model.config
    _same_embeddings(model, loaded)

    g = torch.Generator().manual_seed(2)
    image = Image.fromarray((torch.rand(63, 77, 3, generator=g) * 255).byte().numpy())
    kw = dict(labels=["cat", "grass", "sky"], short_side=56, crop=56, stride=28)
    m1, s1 = segment_pil(model, image, **kw)
    m2, s2 = segment_pil(loaded, image, **kw)
    assert m1.shape == (63, 77) and m1.dtype.name == "uint8"
    torch.testing.assert_close(s1, s2, rtol=0, atol=1e-5)
    assert (m1 == m2).all()


def test_loading_needs_no_training_code(exported) -> None:
    """load_pretrained imports only the model, config and tokenizer side of simzss (checked in a fresh process)."""
    import subprocess
    import sys

    code = (
        "import sys; from simzss import SimZSS; m = SimZSS.from_pretrained(sys.argv[1]); "
        "bad = sorted(k for k in sys.modules if k.startswith(('simzss.engine', 'simzss.data.stream', 'simzss.data.prepare', 'simzss.eval', "
        "'webdataset', 'spacy'))); print(bad); sys.exit(1 if bad else 0)"
    )
    run = subprocess.run([sys.executable, "-c", code, str(exported)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]


def test_model_card_and_config(tiny, exported) -> None:
    model, _, _ = tiny
    card = (exported / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: simzss")
    block = card.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(block)["vision"]["name"] == TINY_VISION
    assert "No evaluation results" in card
    meta = json.loads((exported / "config.json").read_text())
    assert meta["model"]["text"]["width"] == 64 and meta["files"]["model.safetensors"] > 0


def test_load_is_the_from_pretrained_entry(exported) -> None:
    from simzss.models.simzss import SimZSS

    assert isinstance(SimZSS.from_pretrained(exported), SimZSS)


def test_crash_mid_write_leaves_nothing(tiny, tmp_path, monkeypatch) -> None:
    model, _, _ = tiny

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ex, "model_card", boom)  # fails after the weights and tokenizer are written
    with pytest.raises(OSError, match="disk full"):
        ex.save_pretrained(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no OUT_DIR and no temp folder left behind


def test_crash_during_overwrite_keeps_the_old_export(tiny, tmp_path, monkeypatch) -> None:
    model, _, _ = tiny
    out = ex.save_pretrained(model, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    real_save_file = ex.save_file

    def half_write(tensors, path, metadata=None):  # a partial weights file, then the crash
        real_save_file(dict(list(tensors.items())[:1]), path, metadata=metadata)
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "save_file", half_write)
    with pytest.raises(KeyboardInterrupt):
        ex.save_pretrained(model, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    sio.read_export_config(out)


def test_partial_export_is_not_loadable(exported, tmp_path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    with open(broken / "model.safetensors", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(ex.ExportError, match="incomplete"):
        sio.load_pretrained(broken)
    (broken / "config.json").unlink()
    assert not ex.is_export(broken)
    with pytest.raises(ex.ExportError, match="no config.json"):
        sio.load_pretrained(broken)


def test_newer_format_is_refused(exported, tmp_path) -> None:
    import shutil

    newer = tmp_path / "newer"
    shutil.copytree(exported, newer)
    meta = json.loads((newer / "config.json").read_text())
    meta["format_version"] = ex.FORMAT_VERSION + 1
    (newer / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ex.ExportError, match="newer simzss"):
        sio.load_pretrained(newer)


def test_overwrite_refusal(tiny, tmp_path) -> None:
    model, _, _ = tiny
    out = ex.save_pretrained(model, tmp_path / "out")
    stamp = (out / "config.json").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="--overwrite"):
        ex.save_pretrained(model, out)
    assert (out / "config.json").stat().st_mtime_ns == stamp
    ex.save_pretrained(model, out, overwrite=True)
    sio.read_export_config(out)
    # --overwrite never deletes a folder that is not an export
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.jpg").write_bytes(b"x")
    with pytest.raises(ex.ExportError, match="not a simzss export"):
        ex.save_pretrained(model, other, overwrite=True)
    assert (other / "keep.jpg").exists()


def test_random_init_vision_cannot_be_left_out(tiny, tmp_path) -> None:
    model, _, _ = tiny
    with pytest.raises(ex.ExportError, match="must be included"):
        ex.save_pretrained(model, tmp_path / "out", include_vision=False)
    assert not (tmp_path / "out").exists()


def test_hub_vision_is_referenced_by_name(tiny, tmp_path, monkeypatch) -> None:
    """pretrained: true and no vision weights: loading asks timm for the hub name with pretrained=True."""
    import timm

    model, _, _ = tiny
    cfg = dataclasses.replace(model.config, vision=dataclasses.replace(model.config.vision, pretrained=True))
    out = ex.write_export(tmp_path / "out", config=cfg, tokenizer=model.tokenizer, trainable_state=model.trainable_state_dict())
    meta = sio.read_export_config(out)
    assert meta["vision_weights_included"] is False
    assert not [k for k in load_file(str(out / "model.safetensors")) if k.startswith("vision.")]

    calls = []
    real_create = timm.create_model

    def fake_create(name, pretrained=False, **kwargs):
        calls.append((name, pretrained, kwargs))
        return real_create(name, pretrained=False, **kwargs)  # no network: stand in for the download

    monkeypatch.setattr(timm, "create_model", fake_create)
    loaded = sio.load_pretrained(out)
    assert any(name == TINY_VISION and pretrained and kw.get("depth") == 2 for name, pretrained, kw in calls), calls
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_texts(TINY_CAPTIONS), model.encode_texts(TINY_CAPTIONS), rtol=0, atol=1e-6)


def _fake_checkpoint(model, run: Path, *, with_vision: bool, step: int = 10) -> Path:
    """A checkpoint folder laid out like the trainer writes it (random-init vision under ``vision.`` when kept)."""
    from simzss.engine.checkpoint import checkpoint_name, save_model_weights

    ckpt = run / "checkpoints" / checkpoint_name(step)
    ckpt.mkdir(parents=True)
    state = dict(model.trainable_state_dict())
    if with_vision:
        state.update({f"vision.{k}": v for k, v in model.vision.state_dict().items()})
    save_model_weights(state, ckpt / "model.safetensors")
    train_cfg = TrainConfig(model=model.config, run_name="tiny")
    (ckpt / "config.yaml").write_text(to_yaml(train_cfg))
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step}))
    return ckpt


def test_export_of_latest_skips_a_damaged_newest_checkpoint(tiny, tmp_path, caplog) -> None:
    """`RUN/checkpoints/latest` (or the run folder) is the newest checkpoint that loads, as for resume: a
    truncated newest model.safetensors is skipped with a warning naming it; named explicitly, it is an error."""
    model, _, _ = tiny
    run = tmp_path / "run"
    _fake_checkpoint(model, run, with_vision=True, step=10)
    newest = _fake_checkpoint(model, run, with_vision=True, step=20)
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with caplog.at_level("WARNING"):
        assert export_cli.main([str(run / "checkpoints" / "latest"), str(tmp_path / "export")]) == 0
    assert newest.name in caplog.text and "skipping damaged checkpoint" in caplog.text
    _same_embeddings(model, sio.load_pretrained(tmp_path / "export"))
    assert export_cli.main([str(newest), str(tmp_path / "export2")]) != 0  # named explicitly: refused, not replaced


def test_export_command_from_checkpoint(tiny, tmp_path, capsys) -> None:
    model, _, _ = tiny
    run = tmp_path / "run"
    _fake_checkpoint(model, run, with_vision=True)
    results = {"folder:/toy/val": {"mIoU": 41.5, "pixel_acc": 80.25, "per_class": {"cat": 1.0}}}
    (run / "eval.json").write_text(json.dumps({"step": 10, "results": results}))  # the trainer's eval.json
    out = tmp_path / "export"
    assert export_cli.main([str(run), str(out)]) == 0  # a run folder resolves to its newest checkpoint
    assert "included" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "At training step 10" in card and "| folder:/toy/val | mIoU | 41.5 |" in card and "run_name: tiny" in card
    _same_embeddings(model, sio.load_pretrained(out))
    assert export_cli.main([str(run), str(out)]) == 2  # exists: a usage error
    assert "--overwrite" in capsys.readouterr().err

    results = tmp_path / "results.json"
    results.write_text(json.dumps({"mIoU": 12.0}))
    assert export_cli.main([str(run / "checkpoints"), str(out), "--overwrite", "--eval-results", str(results)]) == 0
    assert "| - | mIoU | 12 |" in (out / "README.md").read_text()


def test_export_command_hashes_each_checkpoint_file_once(tiny, tmp_path, monkeypatch) -> None:
    """With checksums (``checkpoint_checksum: true``) the command resolves the checkpoint, to tell a damaged one
    from a failed export, and exports it: each file's sha256 is computed once, not once per step."""
    from simzss.engine import checkpoint as ckpt_io

    model, _, _ = tiny
    ckpt = _fake_checkpoint(model, tmp_path / "run", with_vision=True)
    ckpt_io.write_manifest(ckpt, checksum=True)
    hashed: list = []
    real = ckpt_io.file_sha256
    monkeypatch.setattr(ckpt_io, "file_sha256", lambda path: hashed.append(Path(path).name) or real(path))
    assert export_cli.main([str(ckpt), str(tmp_path / "export")]) == 0
    assert "model.safetensors" in hashed and len(hashed) == len(set(hashed)), hashed
    _same_embeddings(model, sio.load_pretrained(tmp_path / "export"))


def test_checkpoint_without_random_init_vision_is_a_clear_error(tiny, tmp_path, capsys) -> None:
    model, _, _ = tiny
    ckpt = _fake_checkpoint(model, tmp_path / "run", with_vision=False)
    assert export_cli.main([str(ckpt), str(tmp_path / "export")]) == 1
    err = capsys.readouterr().err
    assert "random-init" in err and "Traceback" not in err
    assert not (tmp_path / "export").exists()
    assert export_cli.main([str(tmp_path / "nowhere"), str(tmp_path / "export")]) == 2  # usage error
    assert "no such checkpoint" in capsys.readouterr().err


def test_push_to_hub_arguments_and_failure(tiny, tmp_path, monkeypatch, capsys) -> None:
    import huggingface_hub

    model, _, _ = tiny
    ckpt = _fake_checkpoint(model, tmp_path / "run", with_vision=True)
    calls = {}

    class Info:
        commit_url = "https://huggingface.co/me/tiny/commit/abc"

    def create_repo(repo_id, **kw):
        calls["create"] = (repo_id, kw)

    def upload_folder(**kw):
        calls["upload"] = kw
        return Info()

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    out = tmp_path / "export"
    assert export_cli.main([str(ckpt), str(out), "--push-to-hub", "me/tiny"]) == 0
    assert calls["create"][0] == "me/tiny" and calls["create"][1]["exist_ok"] is True
    assert calls["upload"]["repo_id"] == "me/tiny"
    assert Path(calls["upload"]["folder_path"]) == out.absolute()
    assert calls["upload"]["repo_type"] == "model"
    assert "abc" in capsys.readouterr().out

    def offline(**kw):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "upload_folder", offline)
    assert export_cli.main([str(ckpt), str(out), "--overwrite", "--push-to-hub", "me/tiny"]) == 1
    err = capsys.readouterr().err
    assert "push to the Hugging Face Hub (me/tiny) failed: ConnectionError" in err and "Traceback" not in err
    sio.read_export_config(out)  # the local export is still there and complete


def _unsafe_loads(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, why) of every torch.load without weights_only=True and every pickle.load(s) in a module."""
    torch_names, pickle_names, found = {"torch"}, {"pickle"}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch":
                    torch_names.add(a.asname or a.name)
                if a.name == "pickle":
                    pickle_names.add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization", "pickle"):
            if any(a.name in ("load", "loads") for a in node.names):
                found.append((node.lineno, f"from {node.module} import load"))
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("load", "loads")):
            continue
        owner = node.func.value
        name = owner.id if isinstance(owner, ast.Name) else ast.unparse(owner)
        if name in pickle_names:
            found.append((node.lineno, "pickle.load"))
        elif (name in torch_names or name == "torch.serialization") and node.func.attr == "load":
            if not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True for k in node.keywords):
                found.append((node.lineno, "torch.load without weights_only=True"))
    return found


def test_unsafe_load_check_catches_offenders() -> None:
    bad = "import torch as th\nfrom torch import load\nth.load('x')\ntorch.load('y', weights_only=False)\nimport pickle\npickle.loads(b'')\n"
    assert len(_unsafe_loads(ast.parse(bad))) == 4
    assert _unsafe_loads(ast.parse("import torch\ntorch.load('x', map_location='cpu', weights_only=True)\n")) == []


def test_torch_load_only_with_weights_only() -> None:
    """Every torch.load( call in the package passes weights_only=True, and nothing is unpickled directly."""
    offenders = []
    for path in sorted((ROOT / "simzss").rglob("*.py")):
        for line, why in _unsafe_loads(ast.parse(path.read_text(encoding="utf-8"))):
            offenders.append(f"{path.relative_to(ROOT)}:{line}: {why}")
    assert not offenders, offenders


def _save_tiny_hf_text_model(kind: str, folder: Path, vocab_size: int) -> TextConfig:
    """A tiny pretrained-style model saved like a hub download (BERT encoder, or a CLIP dual encoder)."""
    from transformers import BertConfig, BertModel, CLIPConfig, CLIPModel

    torch.manual_seed(5)
    if kind == "bert":
        BertModel(BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=40)).save_pretrained(folder)
        return TextConfig(kind="pretrained", name_or_path=str(folder), pooling="cls", context_length=32)
    text = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=40, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=28,
                  patch_size=14)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision)).save_pretrained(folder)
    return TextConfig(kind="pretrained", name_or_path=str(folder), pooling="eos", context_length=32)


@pytest.mark.parametrize("kind", ["bert", "clip"])
def test_pretrained_text_tower_export_loads_offline(tiny, tmp_path, monkeypatch, kind) -> None:
    """Export and checkpoint of a pretrained-kind text tower load with the base model gone and the hub offline."""
    import shutil

    import huggingface_hub
    import transformers

    from simzss.engine.checkpoint import save_model_weights
    from simzss.models.simzss import SimZSS

    _, tok_dir, _ = tiny
    tok = load_tokenizer_dir(tok_dir)
    base = tmp_path / "base-model"
    text_cfg = _save_tiny_hf_text_model(kind, base, len(tok))
    cfg = dataclasses.replace(tiny_model_config(str(tok_dir)), text=text_cfg)
    model = SimZSS.from_config(cfg, tok).eval()
    assert model.text.hf_config is not None and model.text.transformer.dtype == torch.float32
    with torch.no_grad():  # trained weights differ from the base model's: a load from the base would show
        for p in model.text.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = ex.save_pretrained(model, tmp_path / "export")
    assert (out / "text_config" / "config.json").is_file()
    assert "text_config/config.json" in sio.read_export_config(out)["files"]
    ckpt = tmp_path / "run" / "checkpoints" / "step-1"  # a checkpoint that saved the text config too
    ckpt.mkdir(parents=True)
    save_model_weights({**model.trainable_state_dict(), **{f"vision.{k}": v for k, v in model.vision.state_dict().items()}},
                       ckpt / "model.safetensors")
    (ckpt / "config.yaml").write_text(to_yaml(TrainConfig(model=cfg, run_name="tiny")))
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1}))
    assert sio.write_text_config(model, ckpt) == ckpt / "text_config"

    shutil.rmtree(base)  # the base model is gone, and the hub is unreachable
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_download(*args, **kwargs):
        raise AssertionError(f"from_pretrained called while loading an export: {args}")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", no_download)
    loaded = sio.load_pretrained(out)
    assert loaded.config.text.name_or_path == str(base)
    _same_embeddings(model, loaded)
    _same_embeddings(model, sio.load_checkpoint(ckpt))
    again = ex.export_checkpoint(ckpt, tmp_path / "export2")
    assert (again / "text_config" / "config.json").is_file()
    _same_embeddings(model, sio.load_pretrained(again))

    # a damaged text config (same size, so it passes the completeness check) is a clear error
    saved = out / "text_config" / "config.json"
    size = saved.stat().st_size
    saved.write_text(json.dumps({"model_type": "no_such_model"}).ljust(size))
    with pytest.raises(ex.ExportError, match="cannot load the text model config"):
        sio.load_pretrained(out)


@pytest.mark.parametrize("module", ["simzss.cli.export", "simzss.cli.import_official"])
def test_command_modules_import_no_torch_before_parsing(module: str) -> None:
    """`simzss export --help` / `import-official --help` stay fast: the parser modules load no torch or transformers."""
    import subprocess
    import sys

    code = (f"import sys, {module} as m; m.build_parser(); "
            "print(sorted(n for n in ('torch', 'transformers', 'timm', 'safetensors') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
