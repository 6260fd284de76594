"""PerImageAdam equals torch.optim.Adam per image, with per-image lr, steps and freezing."""

import torch

from genprior.optim import PerImageAdam

# PerImageAdam updates the stacked [B, ...] tensors with per-image step-size tensors, Adam one
# image's slice with Python scalars: the same elementwise formula, but other loops (which
# elements take the vectorised path and which the scalar tail differs, and the two may round
# differently on other CPUs). Measured 0 apart (threads 1/2/4); float32 Adam itself ends 1.7e-7
# from float64 Adam in the first test (|p| <= 2.1, six steps), so 2e-6 (8 float32 ulps at 2)
# is a 10x margin, while a wrong per-image rate, step count or bias correction moves p by >1e-3.
ATOL = 2e-6


def _run_reference(p0: torch.Tensor, grads: list[torch.Tensor], lrs: list[float]) -> torch.Tensor:
    p = p0.clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=lrs[0], betas=(0.0, 0.999), eps=1e-8)
    for g, lr in zip(grads, lrs):
        opt.param_groups[0]["lr"] = lr
        p.grad = g.clone()
        opt.step()
    return p.detach()


def test_matches_torch_adam_per_image_with_different_lrs() -> None:
    torch.manual_seed(0)
    B, steps = 3, 6
    p0 = torch.randn(B, 4, 5)
    grads = [torch.randn(B, 4, 5) for _ in range(steps)]
    lrs = [[1e-2 * (b + 1) * (0.5 if t % 2 else 1.0) for b in range(B)] for t in range(steps)]
    lrs[2][1] = 0.0  # a frozen group still builds up moments (DGP progressive unfreezing)
    p = p0.clone().requires_grad_(True)
    opt = PerImageAdam([{"params": [p], "name": "g", "lr": 0.0}], batch_size=B)
    for t in range(steps):
        opt.set_lrs({"g": torch.tensor(lrs[t], dtype=torch.float64)})
        p.grad = grads[t].clone()
        opt.step()
    for b in range(B):
        ref = _run_reference(p0[b], [g[b] for g in grads], [lr[b] for lr in lrs])
        torch.testing.assert_close(p.detach()[b], ref, rtol=0, atol=ATOL)


def test_inactive_image_is_frozen_and_keeps_its_step_count() -> None:
    torch.manual_seed(1)
    p0 = torch.randn(2, 3)
    grads = [torch.randn(2, 3) for _ in range(4)]
    p = p0.clone().requires_grad_(True)
    opt = PerImageAdam([{"params": [p], "name": "g", "lr": 1e-2}], batch_size=2)
    for t in range(4):
        opt.active = torch.tensor([True, t < 2])
        before = p.detach().clone()
        p.grad = grads[t].clone()
        opt.step()
        if t >= 2:  # a frozen image is not written at all: bit for bit
            torch.testing.assert_close(p.detach()[1], before[1], rtol=0, atol=0)
    assert opt.image_steps.tolist() == [4.0, 2.0]
    ref1 = _run_reference(p0[1], [g[1] for g in grads[:2]], [1e-2, 1e-2])
    torch.testing.assert_close(p.detach()[1], ref1, rtol=0, atol=ATOL)
    ref0 = _run_reference(p0[0], [g[0] for g in grads], [1e-2] * 4)
    torch.testing.assert_close(p.detach()[0], ref0, rtol=0, atol=ATOL)


def test_masked_tensor_skips_steps_like_a_none_grad() -> None:
    """torch Adam skips a tensor whose grad is None; a mask key reproduces that per image."""
    torch.manual_seed(2)
    p0 = torch.randn(2, 3)
    grads = [torch.randn(2, 3) for _ in range(5)]
    uses = [True, False, False, True, True]  # image 0's tensor gets no grad on steps 1 and 2
    p = p0.clone().requires_grad_(True)
    opt = PerImageAdam([{"params": [p], "name": "g", "lr": 1e-2, "mask_keys": ["bn"]}], batch_size=2)
    for t in range(5):
        opt.masks = {"bn": torch.tensor([uses[t], True])}
        p.grad = grads[t].clone()
        opt.step()
    ref = torch.optim.Adam([q := p0[0].clone().requires_grad_(True)], lr=1e-2, betas=(0.0, 0.999))
    for t in range(5):
        q.grad = grads[t][0].clone() if uses[t] else None
        ref.step()
    torch.testing.assert_close(p.detach()[0], q.detach(), rtol=0, atol=ATOL)
