"""The trainer: optimizer groups, schedule, checkpoints, exact resume, preemption, non-finite losses.

Most tests train the real (tiny, random-init) SimZSS model on a small in-memory stream of real
``Batch`` objects, substituted for the webdataset stream and tokenizer through the trainer's module
level builders; the tests at the end run the whole toy-world pipeline, from images (slow) and from a
feature cache.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import VOCAB, MemoryStream, tiny_cfg, tiny_overrides
from simzss.cli import train as train_cli
from simzss.config import TrainConfig, VisionConfig, load_config
from simzss.engine import checkpoint as ckpt_io
from simzss.engine import trainer as trainer_mod
from simzss.engine.optim import WarmupCosine, build_optimizer, build_scheduler, param_groups, scaled_lr

torch.set_num_threads(1)



class TinyTokenizer:
    """What SimZSS.from_config needs from a tokenizer: a vocabulary size and a pad id."""

    pad_token_id = 0

    def __len__(self) -> int:
        return VOCAB


@pytest.fixture
def memory_data(monkeypatch: pytest.MonkeyPatch) -> Dict[str, Any]:
    """Route the trainer to the tiny tokenizer and the in-memory stream (4 batches per epoch)."""
    opts: Dict[str, Any] = {"num_batches": 4}
    monkeypatch.setattr(trainer_mod, "build_tokenizer", lambda cfg: TinyTokenizer())
    monkeypatch.setattr(
        trainer_mod, "build_loader",
        lambda cfg, tok, *, rank, world_size: MemoryStream(opts["num_batches"], cfg.batch_size, seed=cfg.seed),
    )
    return opts


# --- optimizer and schedule ----------------------------------------------------------------------


class _Named(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.logit_scale = nn.Parameter(torch.tensor(1.0))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_param_groups_no_decay_on_biases_norms_logit_scale() -> None:
    decay, no_decay = param_groups(_Named().named_parameters(), 0.2)
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert sorted(decay["names"]) == ["embed.weight", "lin.weight"]
    assert sorted(no_decay["names"]) == ["lin.bias", "logit_scale", "norm.bias", "norm.weight"]
    opt = build_optimizer(_Named(), tiny_cfg(Path("/tmp")).optim, global_batch=512)
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6
    assert sum(len(g["params"]) for g in opt.param_groups) == 6  # frozen layer left out


def test_warmup_cosine_values_and_lr_scaling() -> None:
    f = WarmupCosine(warmup_steps=10, total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    assert f(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    cfg = tiny_cfg(Path("/tmp"), "optim.lr=3e-5", "optim.scale_lr=true")
    assert scaled_lr(cfg.optim, 1024 * 8) == pytest.approx(3e-5 * 32)
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2, 2))], lr=1.0)
    sched = build_scheduler(opt, total_steps=20, warmup=0.25)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 14 / 15)))
    assert json.dumps(sched.state_dict())  # serialisable without pickle


def _adamw_by_hand(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int, *, lr: float,
                   wd: float, betas: Any, eps: float) -> Any:
    """One AdamW step written from Loshchilov & Hutter's algorithm (decoupled decay), not from torch's code."""
    b1, b2 = betas
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    return p - lr * m_hat / (v_hat.sqrt() + eps), m, v


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_skipped_step_leaves_weights_moments_step_and_decay_untouched(fused: bool, device: str) -> None:
    """A non-finite step (flag on the device, NaN gradients) changes nothing: not the weights (no weight decay
    either), not the Adam moments, not the step count, so the next good step is AdamW's second step, never its
    third. Fused: the flag goes to the kernel as found_inf (no host read); otherwise it is read on the host."""
    from simzss.engine.optim import skips_on_device, step_unless

    lr, wd = 0.05, 0.5
    cfg = replace(tiny_cfg(Path("/tmp")).optim, lr=lr, weight_decay=wd, scale_lr=False)
    p = nn.Parameter(torch.linspace(-1.0, 1.0, 6, device=device).reshape(2, 3))  # a matrix: decayed
    if fused:
        opt = build_optimizer(nn.ParameterDict({"w": p}), cfg, global_batch=256)
    else:
        opt = torch.optim.AdamW([p], lr=lr, weight_decay=wd, betas=tuple(cfg.betas), eps=cfg.eps, foreach=False)
    assert skips_on_device(opt) is fused
    grads = [torch.full_like(p, 0.3), torch.full_like(p, float("nan")), torch.linspace(0.1, -0.2, 6).reshape(2, 3)]
    w, m, v = p.detach().cpu().clone(), torch.zeros(2, 3), torch.zeros(2, 3)
    t = 0
    for i, g in enumerate(grads):
        bad = i == 1
        before = {k: x.clone() for k, x in opt.state[p].items()} if opt.state.get(p) else {}
        w_before = p.detach().clone()
        p.grad = g.to(device)
        step_unless(opt, torch.tensor(bad, device=device), opt.step)
        opt.zero_grad(set_to_none=True)
        if bad:
            assert torch.equal(p.detach(), w_before)  # no Adam update, no decay
            for k, x in before.items():
                assert torch.equal(opt.state[p][k], x), k
            continue
        t += 1
        w, m, v = _adamw_by_hand(w, g.cpu(), m, v, t, lr=lr, wd=wd, betas=cfg.betas, eps=cfg.eps)
        torch.testing.assert_close(p.detach().cpu(), w, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["exp_avg"].cpu(), m, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"].cpu(), v, rtol=1e-6, atol=1e-9)
        assert float(opt.state[p]["step"]) == t


# --- checkpoint format ---------------------------------------------------------------------------


def test_state_flattening_round_trip(tmp_path: Path) -> None:
    import numpy as np

    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}}, "groups": [{"betas": (0.9, 0.98)}],
             "np": np.arange(5, dtype=np.uint32), "rng": ckpt_io.rng_state()}
    ckpt_io.save_state(state, tmp_path, "x")
    back = ckpt_io.load_state(tmp_path, "x")
    assert torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert back["groups"][0]["betas"] == (0.9, 0.98) and list(back["np"]) == list(range(5))
    ckpt_io.set_rng_state(back["rng"])
    a = torch.rand(3)
    ckpt_io.set_rng_state(back["rng"])
    assert torch.equal(a, torch.rand(3))
    with pytest.raises(TypeError, match="object"):
        ckpt_io.flatten_state({"bad": object()})


def test_rotation_and_resolve(tmp_path: Path) -> None:
    for step in (5, 10, 15, 20):
        d = tmp_path / ckpt_io.checkpoint_name(step)
        d.mkdir()
        (d / "trainer_state.json").write_text("{}")
    (tmp_path / ckpt_io.checkpoint_name(25)).mkdir()  # incomplete: no trainer_state.json
    removed = ckpt_io.rotate_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["step-000000005", "step-000000010"]
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path)] == ["step-000000015", "step-000000020"]
    assert ckpt_io.resolve_resume("latest", tmp_path).name == "step-000000020"
    assert ckpt_io.resolve_resume("latest", tmp_path / "nothing-yet") is None
    with pytest.raises(FileNotFoundError):
        ckpt_io.resolve_resume(str(tmp_path / "missing"), tmp_path)


# --- training ------------------------------------------------------------------------------------


def _weights(result: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    return load_file(str(Path(result["checkpoint"]) / "model.safetensors"))


def test_train_writes_config_checkpoints_metrics(tmp_path: Path, memory_data: Dict[str, Any]) -> None:
    cfg = tiny_cfg(tmp_path, "checkpoint_every=2", "keep_checkpoints=2", "report_to=tensorboard")
    result = trainer_mod.train(cfg)
    run = Path(result["run_dir"])
    assert result["step"] == 8 and result["stopped"] is None and result["epoch"] == 2
    # Resolved config saved in the run folder and in each checkpoint; loadable as a TrainConfig.
    assert load_config(TrainConfig, run / "config.yaml").model.text.width == 64
    ckpts = ckpt_io.list_checkpoints(run / "checkpoints")
    assert [p.name for p in ckpts] == ["step-000000006", "step-000000008"]  # rotation kept 2 of 4
    last = ckpts[-1]
    assert load_config(TrainConfig, last / "config.yaml").batch_size == 8
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["loader"] == {"epoch": 1, "batches_consumed": 4} and state["run_id"] == result["run_id"]
    assert state["config"]["model"]["text"]["layers"] == 2 and state["skipped"] == {"corrupt_image": 2}
    weights = _weights(result)
    assert "logit_scale" in weights and any(k.startswith("vision.") for k in weights)  # random-init tower kept
    assert not list((run / "checkpoints").glob(".tmp-*"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    for key in ("loss", "global_loss", "concept_loss", "concept_accuracy", "concepts_per_batch", "classes_per_batch",
                "logit_scale", "lr", "samples_per_s_per_gpu", "data_time", "step_time", "skipped_samples"):
        assert key in rows[-1], key
    assert rows[-1]["skipped_samples"] == 2 and rows[-1]["concepts_per_batch"] == 16
    assert list((run / "tensorboard").iterdir())


def test_resume_matches_uninterrupted_run(tmp_path: Path, memory_data: Dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop mid-epoch by SIGTERM (delivered during a forward pass), resume, compare with a straight run."""
    straight = trainer_mod.train(tiny_cfg(tmp_path, "run_name=straight", "epochs=3"))

    from simzss.models.simzss import SimZSS

    forward = SimZSS.forward
    calls = {"n": 0}

    def forward_then_signal(self: SimZSS, batch: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 6:  # step 6 of 12, mid-epoch 2
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, batch)

    monkeypatch.setattr(SimZSS, "forward", forward_then_signal)
    first = trainer_mod.train(tiny_cfg(tmp_path, "run_name=split", "epochs=3"))
    assert first["stopped"] == "SIGTERM" and first["step"] == 6
    assert Path(first["checkpoint"]).name == "step-000000006"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    monkeypatch.setattr(SimZSS, "forward", forward)
    second = trainer_mod.train(tiny_cfg(tmp_path, "run_name=split", "epochs=3", "resume=latest"))
    assert second["step"] == 12 and second["run_id"] == first["run_id"]

    a, b = _weights(straight), _weights(second)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    opt_a = ckpt_io.load_state(Path(straight["checkpoint"]), "optimizer")
    opt_b = ckpt_io.load_state(Path(second["checkpoint"]), "optimizer")
    torch.testing.assert_close(opt_a["state"][0]["exp_avg"], opt_b["state"][0]["exp_avg"], rtol=0, atol=1e-6)


def test_nonfinite_losses_skipped_then_run_stops(tmp_path: Path, memory_data: Dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import simzss.models.simzss as simzss_mod

    real = simzss_mod.contrastive_loss
    bad_steps = {2, 3}
    calls = {"n": 0}

    def flaky(*args: Any, **kw: Any) -> torch.Tensor:
        calls["n"] += 1
        loss = real(*args, **kw)
        return loss * float("nan") if calls["n"] in bad_steps else loss

    monkeypatch.setattr(simzss_mod, "contrastive_loss", flaky)
    result = trainer_mod.train(tiny_cfg(tmp_path, "run_name=flaky", "epochs=1", "max_nonfinite=3"))
    assert result["step"] == 4 and result["nonfinite_steps"] == 2
    assert all(torch.isfinite(v).all() for v in _weights(result).values())

    bad_steps.update(range(1, 100))
    calls["n"] = 0
    with pytest.raises(trainer_mod.NonFiniteLossError, match="max_nonfinite=3"):
        trainer_mod.train(tiny_cfg(tmp_path, "run_name=diverged", "epochs=5", "max_nonfinite=3"))
    ckpts = ckpt_io.list_checkpoints(tmp_path / "runs" / "diverged" / "checkpoints")
    assert [p.name for p in ckpts] == ["step-000000003"]
    calls["n"] = 0
    cli = [f"output_dir={tmp_path / 'runs'}", "run_name=cli", "batch_size=8", "max_nonfinite=3", "data.shards=[x.tar]",
           "model.vision.name=vit_small_patch14_reg4_dinov2", "model.vision.pretrained=false",
           "model.vision.model_kwargs={depth: 2, img_size: 28}", "model.text.layers=2", "model.text.width=64"]
    assert train_cli.main(cli) == 1  # the CLI's exit code for a diverged run


def test_lit_trains(tmp_path: Path, memory_data: Dict[str, Any]) -> None:
    result = trainer_mod.train(tiny_cfg(tmp_path, "run_name=lit", "model.concept_weight=0", "epochs=1"))
    assert result["step"] == 4 and result["nonfinite_steps"] == 0
    assert math.isfinite(result["metrics"]["loss"]) and result["metrics"]["concept_loss"] == 0.0
    assert result["metrics"]["loss"] == pytest.approx(result["metrics"]["global_loss"])


def test_max_steps_and_eval_hook(tmp_path: Path, memory_data: Dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    seen: List[int] = []

    def fake_eval(cfg: TrainConfig, model: nn.Module, accelerator: Any) -> Dict[str, Any]:
        assert not model.training
        seen.append(1)
        return {spec: {"mIoU": 0.25 * len(seen)} for spec in cfg.eval.datasets}

    monkeypatch.setattr(trainer_mod, "run_evaluation", fake_eval)
    # evaluations during training need their datasets at start-up: refused before anything is written
    with pytest.raises(trainer_mod.ConfigError, match=r"eval.datasets\[0\].*eval.every=4"):
        trainer_mod.train(tiny_cfg(tmp_path, "run_name=ev0", "eval.every=4", "eval.datasets=[folder:/no/such/dir]"))
    assert not (tmp_path / "runs" / "ev0").exists()
    with pytest.raises(trainer_mod.ConfigError, match=r"expected NAME:PATH"):
        trainer_mod.train(tiny_cfg(tmp_path, "run_name=ev0", "eval.datasets=[nocolon]"))
    spec = f"folder:{tmp_path}"
    result = trainer_mod.train(tiny_cfg(tmp_path, "run_name=ev", "max_steps=6", "eval.every=4", f"eval.datasets=['{spec}']"))
    assert result["step"] == 6 and len(seen) == 2
    saved = json.loads((Path(result["run_dir"]) / "eval.json").read_text())
    assert saved == {"step": 6, "results": {spec: {"mIoU": 0.5}}}


def test_final_only_evaluation_skips_missing_datasets(tmp_path: Path, memory_data: Dict[str, Any],
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Issue 19: a config reused on other data (configs/demo.yaml: eval.every 0, a demo eval folder) trains
    without eval.datasets=[]; the missing dataset is named in a warning and skipped by the final evaluation,
    while the ones that exist are still evaluated."""
    import logging

    evaluated: List[List[str]] = []

    def fake_eval(cfg: TrainConfig, model: nn.Module, accelerator: Any) -> Dict[str, Any]:
        evaluated.append(list(cfg.eval.datasets))
        return {spec: {"mIoU": 0.5} for spec in cfg.eval.datasets}

    monkeypatch.setattr(trainer_mod, "run_evaluation", fake_eval)
    present = f"folder:{tmp_path}"
    with caplog.at_level(logging.WARNING, logger="simzss.engine.trainer"):
        result = trainer_mod.train(tiny_cfg(tmp_path, "run_name=reuse", "max_steps=2", "eval.every=0",
                                            f"eval.datasets=['folder:{tmp_path}/gone', '{present}']"))
    assert result["step"] == 2 and evaluated == [[present]] and list(result["eval"]) == [present]
    warned = [r.getMessage() for r in caplog.records if "gone" in r.getMessage()]
    assert any("final evaluation will skip it" in m for m in warned), warned


# --- the real pipeline on the toy world ----------------------------------------------------------


@pytest.fixture(scope="module")
def toy_world(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """A small prepared toy world (320 captioned 56 px images), its tokenizer and concept bank."""
    from simzss.cli import tokenizer as tokenizer_cli
    from simzss.concepts import ConceptBank
    from simzss.data.prepare import prepare_shards
    from simzss.data.synthetic import generate_toy_world

    root = tmp_path_factory.mktemp("toy")
    generate_toy_world(root / "data", num_train=320, num_val=6, image_size=56, shard_size=160)
    bank = root / "data" / "val" / "classes.txt"
    prepare_shards(str(root / "data" / "train" / "shard-{000000..000001}.tar"), root / "prepared",
                   bank=ConceptBank.from_file(bank), progress=False)
    assert tokenizer_cli.main(["--shards", str(root / "data" / "train"), "--out", str(root / "tokenizer"), "--vocab-size", "512"]) == 0
    return {"root": root, "bank": bank, "val": root / "data" / "val"}


def toy_overrides(toy: Dict[str, Path], *extra: str) -> List[str]:
    """The real stream, tokenizer and evaluator; a tiny model at 56 px."""
    root = toy["root"]
    return [
        f"output_dir={root / 'runs'}", "batch_size=16", "log_every=1", "checkpoint_every=0",
        f"data.shards=['{root / 'prepared' / 'shard-{000000..000001}.tar'}']", "data.image_size=56", "data.workers=0",
        "data.shuffle_buffer=64", f"data.concept_bank={toy['bank']}", f"model.tokenizer={root / 'tokenizer'}",
        "model.vision.name=vit_small_patch14_reg4_dinov2", "model.vision.pretrained=false",
        "model.vision.model_kwargs={depth: 2, img_size: 56}", "model.text.layers=2", "model.text.width=64",
        "model.text.heads=2", "model.text.context_length=32", "optim.scale_lr=false", "optim.warmup=0.1",
        f"eval.datasets=['folder:{toy['val']}']", "eval.image_size=56", "eval.crop=56", "eval.stride=28",
        *extra,
    ]


@pytest.mark.slow
def test_toy_world_concept_accuracy_rises(toy_world: Dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    # The paper's concept-loss knobs: on a random-init tower the release's argmax self-targets collapse
    # (docs/recipe.md), so only true-label targets show the loss learning here.
    paper = ("model.query=concept", "model.concept_target=label", "model.concept_pooling=mean",
             "model.prototype_member_norm=true")
    cfg = load_config(TrainConfig, None, toy_overrides(toy_world, "run_name=toy", "epochs=3", "optim.lr=2e-3",
                                                       "model.concept_weight=1.0", *paper))
    result = trainer_mod.train(cfg)
    rows = [json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == result["step"] == 60
    head, tail = steps[:8], steps[-8:]
    mean = lambda rs, k: sum(float(r[k]) for r in rs) / len(rs)  # noqa: E731
    assert mean(tail, "loss") < mean(head, "loss") - 0.2
    assert mean(tail, "concept_accuracy") > mean(head, "concept_accuracy") + 0.1
    assert all(r["concepts_per_batch"] > 0 for r in steps)
    spec = f"folder:{toy_world['val']}"
    assert 0.0 <= result["eval"][spec]["mIoU"] <= 100.0
    assert json.loads((Path(result["run_dir"]) / "eval.json").read_text())["results"][spec]["mIoU"] == result["eval"][spec]["mIoU"]
    assert "final mIoU" in capsys.readouterr().out


@pytest.mark.slow
def test_sigusr1_subprocess_checkpoints_and_resumes(toy_world: Dict[str, Path], tmp_path: Path) -> None:
    """`python train.py` on SIGUSR1: finish the step, checkpoint, exit 0; `resume=latest` completes the run."""
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    args = [sys.executable, str(root / "train.py"), *toy_overrides(toy_world, "run_name=preempt", "max_steps=400",
                                                                    "optim.lr=1e-3", "eval.datasets=[]")]
    metrics = toy_world["root"] / "runs" / "preempt" / "metrics.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no training progress"
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "stopped by SIGUSR1" in out
    ckpt = ckpt_io.latest_checkpoint(metrics.parent / "checkpoints")
    assert ckpt is not None
    stopped_at = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    assert 2 <= stopped_at < 400
    resumed = trainer_mod.train(load_config(TrainConfig, None, toy_overrides(
        toy_world, "run_name=preempt", f"max_steps={stopped_at + 2}", "optim.lr=1e-3", "eval.datasets=[]", "resume=latest")))
    assert resumed["step"] == stopped_at + 2


@pytest.mark.slow
def test_two_process_ddp_and_exact_resume(toy_world: Dict[str, Path], tmp_path: Path) -> None:
    """torchrun, 2 CPU processes (gloo): per-rank state in checkpoints; resuming a mid-run checkpoint
    reproduces the uninterrupted run's weights."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]

    def launch(*extra: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               str(root / "train.py"), *toy_overrides(toy_world, "batch_size=8", "max_steps=4", "checkpoint_every=2",
                                                      "keep_checkpoints=3", "eval.datasets=[]",
                                                      # a worker process: its augmentation RNG is seeded per epoch
                                                      "data.workers=1", *extra)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    launch("run_name=ddp_straight")
    runs = toy_world["root"] / "runs"
    straight = runs / "ddp_straight" / "checkpoints"
    mid = straight / "step-000000002"
    assert (mid / "rank-0.json").exists() and (mid / "rank-1.json").exists()
    assert json.loads((mid / "trainer_state.json").read_text())["world_size"] == 2
    rows = (runs / "ddp_straight" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 4  # rank 0 only
    launch("run_name=ddp_resumed", f"resume={mid}")
    a = load_file(str(straight / "step-000000004" / "model.safetensors"))
    b = load_file(str(runs / "ddp_resumed" / "checkpoints" / "step-000000004" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_resume_errors_and_extension(tmp_path: Path, memory_data: Dict[str, Any]) -> None:
    with pytest.raises(trainer_mod.ConfigError, match="resume="):
        trainer_mod.train(tiny_cfg(tmp_path, "run_name=r", f"resume={tmp_path / 'missing'}"))
    first = trainer_mod.train(tiny_cfg(tmp_path, "run_name=r", "max_steps=4", "optim.warmup=0"))
    assert first["metrics"]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))  # lr of step 4
    # Extending a finished run: the schedule shape follows the new config, the position the checkpoint.
    longer = trainer_mod.train(tiny_cfg(tmp_path, "run_name=r", "max_steps=8", "optim.warmup=0", "resume=latest"))
    rows = [json.loads(line) for line in (Path(longer["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert rows[4]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))  # step 5 of 8
    # A checkpoint of a different model does not load, with a message naming resume.
    with pytest.raises(trainer_mod.ConfigError, match="does not fit"):
        trainer_mod.train(tiny_cfg(tmp_path, "run_name=other", "model.text.width=32", f"resume={longer['checkpoint']}"))


def test_cli_resume_option(tmp_path: Path, memory_data: Dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """`simzss train --resume latest|PATH` sets the config's resume field (and beats a resume= override)."""
    base = tiny_overrides(tmp_path) + ["run_name=cli", "optim.warmup=0", "keep_checkpoints=0"]
    assert train_cli.main([*base, "--resume", "latest", "--print-config"]) == 0
    assert "resume: latest" in capsys.readouterr().out
    assert train_cli.main([*base, "resume=nowhere", "--print-config", "--resume", str(tmp_path / "x y")]) == 0
    assert f"resume: {tmp_path / 'x y'}" in capsys.readouterr().out  # a path is taken verbatim
    assert train_cli.main([*base, "--resume", " "]) == 2
    assert "--resume" in capsys.readouterr().err

    assert train_cli.main([*base, "max_steps=2", "checkpoint_every=1"]) == 0
    assert train_cli.main([*base, "max_steps=4", "--resume", "latest"]) == 0  # continues at step 3
    run = tmp_path / "runs" / "cli"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # A checkpoint path: a new run starting from step 1 of the first one.
    first = run / "checkpoints" / "step-000000001"
    assert train_cli.main([*base, "run_name=cli2", "max_steps=3", "--resume", str(first)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "runs" / "cli2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3]
    with pytest.raises(SystemExit):
        train_cli.main(["--resume"])  # argparse: the option needs a value


def test_real_stream_with_two_workers_resumes_exactly(toy_world: Dict[str, Path]) -> None:
    """The real image stream (prepared toy-world shards, 2 data workers): resuming a checkpoint written in
    epoch 1 after an odd number of its batches gives the uninterrupted run's weights."""
    common = ["batch_size=16", "data.num_samples=48", "data.workers=2", "data.crop_scale=[0.3, 1.0]", "max_steps=6",
              "checkpoint_every=4", "keep_checkpoints=0", "eval.datasets=[]", "optim.lr=1e-3"]
    before = set(multiprocessing.active_children())
    straight = trainer_mod.train(load_config(TrainConfig, None, toy_overrides(toy_world, "run_name=w2_straight", *common)))
    mid = Path(straight["run_dir"]) / "checkpoints" / "step-000000004"
    state = json.loads((mid / "trainer_state.json").read_text())
    assert state["loader"]["epoch"] == 1 and state["loader"]["batches_consumed"] == 1  # 3 batches per epoch
    torch.manual_seed(12345)  # the resumed run must not depend on the process RNG it starts with
    resumed = trainer_mod.train(load_config(TrainConfig, None, toy_overrides(
        toy_world, "run_name=w2_resumed", *common, f"resume={mid}")))
    assert resumed["step"] == 6
    assert set(multiprocessing.active_children()) <= before  # each run ended its data workers when it finished
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


# --- training from a feature cache ---------------------------------------------------------------

TOY_VISION = {"name": "vit_small_patch14_reg4_dinov2", "model_kwargs": {"depth": 2, "img_size": 56}}


@pytest.fixture(scope="module")
def toy_cache(toy_world: Dict[str, Path]) -> Dict[str, Path]:
    """One random-init tower saved to a weights file, and the toy world's feature cache made with it."""
    from safetensors.torch import save_file

    from simzss.config import VisionConfig
    from simzss.cli.cache_features import cache_features
    from simzss.models.vision import FrozenVisionTower

    root = toy_world["root"]
    torch.manual_seed(7)
    tower = FrozenVisionTower(TOY_VISION["name"], pretrained=False, model_kwargs=TOY_VISION["model_kwargs"])
    weights = root / "vision.safetensors"
    save_file({k: v.contiguous() for k, v in tower.model.state_dict().items()}, str(weights))
    vision = VisionConfig(name=TOY_VISION["name"], pretrained=False, weights=str(weights),
                          model_kwargs=dict(TOY_VISION["model_kwargs"]))
    cache_features([str(root / "prepared")], root / "cache", vision=vision, image_size=56, workers=0, progress=False)
    return {"cache": root / "cache", "weights": weights}


def cache_overrides(toy: Dict[str, Path], cache: Dict[str, Path], *extra: str) -> List[str]:
    """The toy-world run (real tokenizer, stream, evaluator) trained from the feature cache."""
    return toy_overrides(toy, f"data.feature_cache={cache['cache']}", f"model.vision.weights={cache['weights']}",
                         "optim.lr=1e-3", *extra)


def test_train_from_feature_cache_checkpoint_resume_eval(
    toy_world: Dict[str, Path], toy_cache: Dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Train from cached features without running the tower, checkpoint, resume exactly mid-epoch, evaluate
    zero-shot with the (still built) tower, and load the checkpoint for export."""
    from simzss.io import load_checkpoint
    from simzss.data.features import read_cache_meta, weights_fingerprint
    from simzss.models.vision import FrozenVisionTower

    tower_calls = {"n": 0}
    forward = FrozenVisionTower.forward

    def counting_forward(self: FrozenVisionTower, images: torch.Tensor, **kw: Any) -> Any:
        tower_calls["n"] += 1
        return forward(self, images, **kw)

    monkeypatch.setattr(FrozenVisionTower, "forward", counting_forward)
    calls_at_eval: List[int] = []
    real_eval = trainer_mod.run_evaluation

    def eval_spy(cfg: TrainConfig, model: nn.Module, accelerator: Any) -> Dict[str, Any]:
        calls_at_eval.append(tower_calls["n"])
        return real_eval(cfg, model, accelerator)

    monkeypatch.setattr(trainer_mod, "run_evaluation", eval_spy)

    # 320 samples / 16 = 20 steps per epoch; 5 steps, checkpoints at 3 and 5
    common = ("max_steps=5", "checkpoint_every=3", "keep_checkpoints=3")
    straight = trainer_mod.train(load_config(TrainConfig, None, cache_overrides(
        toy_world, toy_cache, "run_name=cache_straight", "eval.datasets=[]", *common)))
    assert straight["step"] == 5 and tower_calls["n"] == 0  # the tower never ran in a training step
    rows = [json.loads(line) for line in (Path(straight["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(math.isfinite(r["loss"]) and r["concepts_per_batch"] > 0 for r in rows)
    ckpts = ckpt_io.list_checkpoints(Path(straight["run_dir"]) / "checkpoints")
    assert [p.name for p in ckpts] == ["step-000000003", "step-000000005"]
    mid_state = json.loads((ckpts[0] / "trainer_state.json").read_text())
    assert mid_state["loader"]["epoch"] == 0 and mid_state["loader"]["batches_consumed"] == 3  # TrainLoader state

    resumed = trainer_mod.train(load_config(TrainConfig, None, cache_overrides(
        toy_world, toy_cache, "run_name=cache_resumed", f"resume={ckpts[0]}", *common)))
    assert resumed["step"] == 5
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and not any(k.startswith("vision.") for k in a)  # tower rebuilt from its file
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)

    assert calls_at_eval == [0] and tower_calls["n"] > 0  # the eval hook ran the tower, training did not
    spec = f"folder:{toy_world['val']}"
    assert 0.0 <= resumed["eval"][spec]["mIoU"] <= 100.0
    assert json.loads((Path(resumed["run_dir"]) / "eval.json").read_text())["step"] == 5
    model = load_checkpoint(resumed["checkpoint"])  # what `simzss export` loads
    assert weights_fingerprint(model.vision) == read_cache_meta(toy_cache["cache"])["vision"]["fingerprint"]


def test_incompatible_feature_cache_is_refused(
    toy_world: Dict[str, Path], toy_cache: Dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from simzss.cli.cache_features import cache_features

    def cfg(*extra: str) -> TrainConfig:
        return load_config(TrainConfig, None, cache_overrides(toy_world, toy_cache, "eval.datasets=[]", *extra))

    # settings: refused before any model is built, naming the config field
    with pytest.raises(trainer_mod.ConfigError, match=r"image size 56 != training image size 112 \(data.image_size\)"):
        trainer_mod.Trainer(cfg("run_name=bad_size", "data.image_size=112"))
    with pytest.raises(trainer_mod.ConfigError, match=r"model.vision.model_kwargs"):
        trainer_mod.Trainer(cfg("run_name=bad_depth", "model.vision.model_kwargs={depth: 3, img_size: 56}"))
    with pytest.raises(trainer_mod.ConfigError, match=r"data.feature_cache=.*not a feature cache"):
        trainer_mod.Trainer(cfg("run_name=no_cache", f"data.feature_cache={tmp_path}"))
    assert train_cli.main(cache_overrides(toy_world, toy_cache, "run_name=cli", "data.image_size=112")) == 2
    assert "data.image_size" in capsys.readouterr().err

    # weights: a cache of a random-init tower only fits a model whose tower has the same weights
    random_cache = tmp_path / "random_cache"
    vision = VisionConfig(name=TOY_VISION["name"], pretrained=False, model_kwargs=dict(TOY_VISION["model_kwargs"]))
    torch.manual_seed(0)  # the trainer's set_seed(seed=0) draws the same tower
    cache_features([str(toy_world["root"] / "prepared" / "shard-000000.tar")], random_cache, vision=vision,
                   image_size=56, workers=0, progress=False)
    random_cfg = ("model.vision.weights=null", f"data.feature_cache={random_cache}")
    trainer_mod.Trainer(cfg("run_name=same_seed", "seed=0", *random_cfg))  # same weights: accepted
    with pytest.raises(trainer_mod.ConfigError, match=r"fingerprint .* != model's .*model.vision.weights=FILE"):
        trainer_mod.Trainer(cfg("run_name=other_seed", "seed=1", *random_cfg))
    with pytest.raises(trainer_mod.ConfigError, match=r"random-init != model's file:vision.safetensors"):
        trainer_mod.Trainer(cfg("run_name=file_vs_random", f"data.feature_cache={random_cache}"))


def test_wandb_mode_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """WANDB_MODE wins; else online with credentials (WANDB_API_KEY or a netrc entry); else offline, logged."""
    import logging

    from simzss.engine.tracking import wandb_mode

    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    with caplog.at_level(logging.INFO, logger="simzss.engine.tracking"):
        assert wandb_mode() == "offline"
    assert any("WANDB_API_KEY" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"  # explicit mode beats credentials
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode() == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY")
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine example.com\n  login me\n  password pw\n")
    netrc.chmod(0o600)
    assert wandb_mode() == "offline"  # a netrc without a wandb entry
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "p" * 40 + "\n")
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    netrc.write_text("machine wandb.example.org\n  login user\n  password pw\n")
    assert wandb_mode() == "online"  # a self-hosted server's entry
    assert wandb_mode({"WANDB_MODE": "online"}, netrc_path=tmp_path / "missing") == "online"
    assert wandb_mode({}, netrc_path=tmp_path / "missing") == "offline"


# --- the device feed learns the same as the old host path ------------------------------------------


class Uint8Stream(MemoryStream):
    """MemoryStream with uint8 crops, as the data workers now ship them (normalised on the device)."""

    def _make(self, epoch: int, i: int) -> Any:
        batch = super()._make(epoch, i)
        pixels = ((batch.images * 0.25 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return replace(batch, images=pixels)


def test_device_feed_and_sync_free_skip_learn_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer (uint8 images normalised by to_device, fused AdamW, non-finite steps skipped on the device,
    values read only at log time) gives the losses and weights of a plain loop written like the old trainer: host
    float normalisation written out here (ImageNet statistics, DINOv2's), torch's default AdamW, a host check of
    every loss and gradient norm.
    Step 3 has a NaN loss; it must be skipped in both."""
    import dataclasses

    from accelerate.utils import set_seed

    import simzss.models.simzss as simzss_mod
    from simzss.models.simzss import SimZSS

    real = simzss_mod.contrastive_loss
    calls = {"n": 0}

    def nan_at_3(*args: Any, **kw: Any) -> torch.Tensor:
        calls["n"] += 1
        loss = real(*args, **kw)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(simzss_mod, "contrastive_loss", nan_at_3)
    monkeypatch.setattr(trainer_mod, "build_tokenizer", lambda cfg: TinyTokenizer())
    monkeypatch.setattr(trainer_mod, "build_loader",
                        lambda cfg, tok, *, rank, world_size: Uint8Stream(3, cfg.batch_size, seed=cfg.seed))
    cfg = tiny_cfg(tmp_path, "run_name=feed", "max_steps=6", "log_every=2", "optim.grad_clip=1.0")
    result = trainer_mod.train(cfg)
    rows = [json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6] and result["nonfinite_steps"] == 1

    # the reference: the old trainer's step, written out
    calls["n"] = 0
    set_seed(cfg.seed)
    model = SimZSS.from_config(cfg.model, TinyTokenizer())
    model.equal_batch_sizes = True
    groups = [g for g in param_groups(model.named_parameters(), cfg.optim.weight_decay) if g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    sched = build_scheduler(opt, 6, cfg.optim.warmup)
    set_seed(cfg.seed, device_specific=True)
    params = [p for p in model.parameters() if p.requires_grad]
    imagenet_mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    imagenet_std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    stream, losses, skipped = Uint8Stream(3, cfg.batch_size, seed=cfg.seed), [], 0
    model.train()
    for step in range(6):
        if step == 3:
            stream.set_epoch(1)
        batch = next(iter(stream))
        out = model(dataclasses.replace(batch, images=(batch.images.float() / 255 - imagenet_mean) / imagenet_std))
        out.loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        if math.isfinite(out.loss.item()) and math.isfinite(norm.item()):
            opt.step()
        else:
            skipped += 1
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(out.loss.item())
    assert skipped == 1 and math.isnan(losses[2])
    for row in rows:
        assert row["loss"] == pytest.approx(losses[row["step"] - 1], abs=1e-5), row["step"]
    trained = _weights(result)
    for name, p in model.trainable_state_dict().items():
        torch.testing.assert_close(trained[name], p.detach(), rtol=0, atol=1e-5, msg=name)


def test_failed_start_leaves_no_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 19 defect 5: a missing tokenizer folder (or other start-up error) must not leave runs/NAME/config.yaml
    and an empty checkpoints/ behind: the tokenizer, model and data are built before the run folder is made."""
    missing = tmp_path / "no-tokenizer"
    with pytest.raises(trainer_mod.ConfigError, match="model.tokenizer="):
        trainer_mod.train(tiny_cfg(tmp_path, "run_name=notok", f"model.tokenizer={missing}"))
    assert not (tmp_path / "runs" / "notok").exists()
    capsys.readouterr()
    assert train_cli.main(tiny_overrides(tmp_path, "run_name=notok2", f"model.tokenizer={missing}")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err
    assert err.count("simzss tokenizer") == 1, err  # the advice is given once
    assert not (tmp_path / "runs").exists()


def test_engine_reads_the_device_only_at_check_steps(tmp_path: Path, memory_data: Dict[str, Any],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 16: no per-step host syncs in the training loop. Every host read of a tensor made by the engine or
    the model (``.item()``, ``.tolist()``, ``bool``/``float``/``int`` of a tensor) happens at a check step: a log
    step (every 4th here) or the last step. The losses read back only without the two promises the trainer makes
    (checked here), and check label ranges on CPU tensors only, so they are left out of the spy."""
    package = Path(trainer_mod.__file__).parents[1]
    engine = tuple(str(package / part) for part in ("engine", "models"))
    reads: List[int] = []
    current = {"trainer": None}
    real_init = trainer_mod.Trainer.__init__

    def remember(self: Any, cfg: TrainConfig) -> None:
        real_init(self, cfg)
        current["trainer"] = self

    monkeypatch.setattr(trainer_mod.Trainer, "__init__", remember)

    def spy(name: str) -> None:
        real = getattr(torch.Tensor, name)

        def wrapper(self: torch.Tensor, *args: Any, **kw: Any) -> Any:
            import sys

            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(engine) and current["trainer"] is not None:
                reads.append(current["trainer"].step)
            return real(self, *args, **kw)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        spy(name)
    result = trainer_mod.train(tiny_cfg(tmp_path, "run_name=sync", "max_steps=10", "log_every=4"))
    assert result["step"] == 10
    model = current["trainer"].unwrapped
    # right padding (no mask check on the device) and the bank's size (no class count read back) are promised
    assert model.right_padded_inputs is True and model.concept_classes == len(trainer_mod.build_concept_bank(
        current["trainer"].cfg))
    # step 0: the feed reads the tower's mean/std (CPU tensors) once before the loop
    assert reads and set(reads) <= {0, 4, 8, 10} and {4, 8, 10} <= set(reads), sorted(set(reads))


def test_single_process_stops_at_the_signalled_step(tmp_path: Path, memory_data: Dict[str, Any],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """In one process the stop flag is host-only: a SIGTERM stops the run after the step it arrived in, even
    between log steps, with a checkpoint there."""
    from simzss.models.simzss import SimZSS

    forward = SimZSS.forward
    calls = {"n": 0}

    def forward_then_signal(self: SimZSS, batch: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, batch)

    monkeypatch.setattr(SimZSS, "forward", forward_then_signal)
    result = trainer_mod.train(tiny_cfg(tmp_path, "run_name=stop3", "epochs=3", "log_every=5"))
    assert result["stopped"] == "SIGTERM" and result["step"] == 3
    assert Path(result["checkpoint"]).name == "step-000000003"
    rows = [json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3]  # the stop step is logged


class PaddedStream(MemoryStream):
    """MemoryStream captions (8 tokens) right-padded to a 16-token context, as the tokenizer pads them."""

    def _make(self, epoch: int, i: int) -> Any:
        batch = super()._make(epoch, i)
        b, length = batch.input_ids.shape
        pad = lambda t: torch.cat([t, t.new_zeros(*t.shape[:-1], 16 - length)], dim=-1)  # noqa: E731
        return replace(batch, input_ids=pad(batch.input_ids), attention_mask=pad(batch.attention_mask),
                       concept_mask=pad(batch.concept_mask))


def test_dynamic_padding_trims_before_the_copy_and_learns_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """data.dynamic_padding: the feed trims each CPU batch to its longest caption (8 of 16 tokens here) before the
    copy; losses and weights stay those of the padded run (1e-5)."""
    from simzss.models.simzss import SimZSS

    monkeypatch.setattr(trainer_mod, "build_tokenizer", lambda cfg: TinyTokenizer())
    monkeypatch.setattr(trainer_mod, "build_loader",
                        lambda cfg, tok, *, rank, world_size: PaddedStream(3, cfg.batch_size, seed=cfg.seed))
    widths: List[int] = []
    forward = SimZSS.forward

    def spy(self: SimZSS, batch: Any) -> Any:
        widths.append(int(batch.input_ids.shape[1]))
        return forward(self, batch)

    monkeypatch.setattr(SimZSS, "forward", spy)
    runs = {}
    for dynamic in ("false", "true"):
        widths.clear()
        runs[dynamic] = trainer_mod.train(tiny_cfg(tmp_path, f"run_name=pad_{dynamic}", "max_steps=4",
                                                   "model.text.context_length=16", f"data.dynamic_padding={dynamic}"))
        assert widths == [16 if dynamic == "false" else 8] * 4
    rows = {k: [json.loads(line)["loss"] for line in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
            for k, r in runs.items()}
    assert rows["true"] == pytest.approx(rows["false"], abs=1e-5)
    a, b = _weights(runs["false"]), _weights(runs["true"])
    for k in a:  # float noise of the shorter matmuls, which Adam's normalised update carries into the weights
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4, msg=k)
