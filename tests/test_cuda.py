"""On CUDA the code computes what it computes on the CPU: a training step in fp32 and under bf16 autocast
(loss and gradients), beam search (the same captions), compile_step (the eager step's loss and gradients),
and a one-process NCCL DDP step. Marked `cuda` and skipped without CUDA; gpu_check.py runs them with
`pytest -m cuda tests/test_cuda.py` on a lent GPU machine (docs/gpu.md).

Tolerances (stated here, first guesses: not yet run on a GPU):
- fp32, TF32 off: loss within 1e-4 relative; each parameter's gradient within 1e-3 of its norm (plus 1e-3
  of the global gradient norm, for tensors whose gradient is near zero). Only the summation order differs.
- bf16 autocast: loss within 2e-2 relative; gradients within 0.1 per tensor and 5e-2 overall (bf16 keeps 8
  bits of mantissa, ~0.4% per rounding, over a few layers).
- compile_step vs eager on CUDA: loss 1e-4, gradients 1e-3 per tensor and 1e-4 overall (fused kernels reorder
  sums); one-process DDP vs the plain step: 1e-5.
"""
from __future__ import annotations

import copy
import socket
from contextlib import contextmanager
from typing import Any, Iterator

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from satkit.training import trainer
from satkit.config import Config
from satkit.decoding import beam_search
from satkit.training.losses import target_log_probs
from satkit.model import build_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by python -m tools.gpu_check)")]

WORD_MAP = {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 40)}}
CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def tiny_config(**changes: Any) -> Config:
    """A small soft-attention model whose whole encoder trains (BatchNorm in train mode), no dropout, no clip."""
    cfg = Config(encoder="resnet18", encoder_stages=2, enc_size=4, attention_dim=32, embed_dim=16, decoder_dim=32,
                 dropout=0.0, encoder_weights="none", fine_tune_encoder=True, fine_tune_stages=0, grad_clip=0.0,
                 vocab_size=len(WORD_MAP))
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(cfg: Config, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(cfg.model_config(), encoder_weights="none", fine_tune=True, fine_tune_stages=0)


def tiny_batch(seed: int = 1, images: int = 4, captions: int = 2, length: int = 9) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, len(WORD_MAP), (images, captions, length), generator=generator)
    caplens = torch.randint(4, length + 1, (images, captions), generator=generator)
    tokens[..., 0] = WORD_MAP["<start>"]
    for i in range(images):
        for c in range(captions):
            tokens[i, c, caplens[i, c] - 1] = WORD_MAP["<end>"]
            tokens[i, c, caplens[i, c]:] = WORD_MAP["<pad>"]
    return {"image": torch.randn(images, 3, 64, 64, generator=generator), "captions": tokens, "caplens": caplens}


@contextmanager
def no_tf32() -> Iterator[None]:
    """fp32 really in fp32: cuDNN convolutions default to TF32 (10-bit mantissa) on Ampere and later."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def step(model: torch.nn.Module, cfg: Config, device: torch.device) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """trainer.train_step (lr 0, so the weights stay) on the fixed batch: its loss parts and the gradients."""
    model.to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    state = trainer.TrainState()
    parts = trainer.train_step(model, tiny_batch(), optimizer, torch.amp.GradScaler(device.type, enabled=False), cfg,
                               state, device)
    trainer.check_losses(state)  # on CUDA the non-finite check is lagged: read it now (all-reduced in DDP)
    module = getattr(model, "module", model)
    grads = {name: p.grad.detach().float().cpu() for name, p in module.named_parameters() if p.grad is not None}
    return {key: float(value) for key, value in parts.items()}, grads


def assert_grads_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], per_tensor: float,
                       overall: float) -> None:
    assert got.keys() == expected.keys()
    total = torch.cat([g.flatten() for g in expected.values()]).norm()
    diff = torch.cat([(got[n] - expected[n]).flatten() for n in expected]).norm()
    assert diff <= overall * total, f"gradients differ by {diff / total:.3g} of their norm overall"
    for name, grad in expected.items():
        error = (got[name] - grad).norm()
        assert error <= per_tensor * (grad.norm() + 1e-3 * total), f"{name}: off by {error / grad.norm():.3g}"


@pytest.mark.parametrize("amp,loss_rtol,per_tensor,overall", [("off", 1e-4, 1e-3, 1e-3), ("bf16", 2e-2, 0.1, 5e-2)])
def test_a_cuda_training_step_matches_the_cpu_step(amp, loss_rtol, per_tensor, overall):
    cfg = tiny_config(amp=amp)
    model = tiny_model(cfg)
    cpu_parts, cpu_grads = step(copy.deepcopy(model), cfg, CPU)  # amp is CUDA-only: the CPU step is fp32
    with no_tf32():
        cuda_parts, cuda_grads = step(model, cfg, CUDA)
    for key in ("loss", "ce", "ds"):
        assert cuda_parts[key] == pytest.approx(cpu_parts[key], rel=loss_rtol, abs=1e-6), key
    assert_grads_close(cuda_grads, cpu_grads, per_tensor, overall)


def test_beam_search_on_cuda_returns_the_cpu_captions():
    """From the same annotations (so cuDNN's convolutions play no part), beam 3, 6 images."""
    model = tiny_model(tiny_config()).eval()
    with torch.no_grad():
        features = model.encoder(tiny_batch(images=6)["image"])
    on_cpu = beam_search(model, features, WORD_MAP, beam_size=3, max_len=12)
    model.to(CUDA)
    with no_tf32():
        on_cuda = beam_search(model, features.to(CUDA), WORD_MAP, beam_size=3, max_len=12)
    for (cpu,), (gpu,) in zip(on_cpu, on_cuda):
        assert gpu.tokens == cpu.tokens
        assert gpu.score == pytest.approx(cpu.score, abs=1e-4)


def test_compile_step_matches_eager_on_cuda():
    cfg = tiny_config()
    model = tiny_model(cfg).to(CUDA)
    batch = tiny_batch()
    with torch.no_grad():
        features = model.encoder.eval()(batch["image"].to(CUDA))
    captions, caplens = batch["captions"].flatten(0, 1).to(CUDA), batch["caplens"].flatten()

    def loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        out = model.decoder(features, captions, caplens)
        loss = -target_log_probs(out["logits"], out["targets"])[out["mask"]].mean()
        loss.backward()
        return loss.detach().cpu(), {n: p.grad.detach().cpu() for n, p in model.decoder.named_parameters()
                                     if p.grad is not None}

    with no_tf32():
        eager_loss, eager_grads = loss_and_grads()
        model.decoder.compile_step(dynamic=False)
        compiled_loss, compiled_grads = loss_and_grads()
    assert model.decoder._compiled_step is not None
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-6)
    assert_grads_close(compiled_grads, eager_grads, 1e-3, 1e-4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_one_process_nccl_ddp_step_matches_the_plain_step(monkeypatch):
    """init_process_group from env vars (world size 1, as torchrun sets them); the DDP step, with
    the NCCL all-reduce of the non-finite-loss check, gives the plain CUDA step's gradients."""
    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                       "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    cfg = tiny_config()
    model = tiny_model(cfg)
    with no_tf32():
        plain_parts, plain_grads = step(copy.deepcopy(model), cfg, CUDA)
        torch.cuda.set_device(0)
        dist.init_process_group(backend="nccl", init_method="env://")
        try:
            assert dist.get_world_size() == 1 and dist.get_backend() == "nccl"
            ddp = DistributedDataParallel(model.to(CUDA), device_ids=[0])
            ddp_parts, ddp_grads = step(ddp, cfg, CUDA)
        finally:
            dist.destroy_process_group()
    assert ddp_parts["loss"] == pytest.approx(plain_parts["loss"], rel=1e-5)
    assert_grads_close(ddp_grads, plain_grads, 1e-5, 1e-5)
