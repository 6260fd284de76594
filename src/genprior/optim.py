"""Adam over stacked per-image parameters.

Every tensor an image fine-tunes is stored stacked, with the image as dimension 0 (see
docs/architecture.md). Adam is element-wise, so one Adam over the stacked tensors is B
independent Adams, as long as two things stay per image:

- the learning rate: each group's ``lr`` is a ``[B]`` tensor, so images in different stages
  of the progressive schedule (one stopped its stage early) get their own rates;
- the step count used by the bias correction, and whether a step happens at all: images that
  have finished are frozen (no update, no moment decay, no step).

The arithmetic is torch.optim.Adam's single-tensor path (torch >= 1.3: eps added after the bias
correction; DGP SPEC §12.15), with the bias corrections and step size computed in float64 as
torch does with its Python scalars, so that B = 1 matches ``torch.optim.Adam`` to rounding.

DGP's progressive unfreezing keeps *frozen* blocks inside the optimizer with lr 0: their
moments and step counts keep building up (SPEC §6.2 step 6, quirk 2). Here that falls out
naturally: a group with lr 0 for an image still updates that image's moments and step.
This differs from Lightning's ``BaseFinetuning``, which adds parameter groups only when they
are unfrozen and so starts their Adam state from zero.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from genprior.perf import to_device_async


class StackedOptimizer(torch.optim.Optimizer):
    """Base of the per-image optimizers: stacked tensors, [B] learning rates, an active mask."""

    def __init__(self, params: Iterable[dict[str, Any]], batch_size: int, defaults: dict[str, Any]) -> None:
        self.batch_size = batch_size
        super().__init__(params, {"lr": torch.zeros(batch_size, dtype=torch.float64), **defaults})
        for group in self.param_groups:
            for p in group["params"]:
                if p.shape[0] != batch_size:
                    raise ValueError(
                        f"parameter of shape {tuple(p.shape)} in group {group.get('name')!r} "
                        f"is not stacked over {batch_size} images"
                    )
            group["lr"] = torch.as_tensor(group["lr"], dtype=torch.float64).expand(batch_size).clone()
        # Images that take part in the next step; finished images are frozen.
        self.active = torch.ones(batch_size, dtype=torch.bool)

    def set_lrs(self, lrs: dict[str, Tensor]) -> None:
        """Set every group's per-image learning rates ([B] float64 tensors), by group name."""
        for group in self.param_groups:
            group["lr"] = lrs[group["name"]]

    @staticmethod
    def _evaluate(closure: Any) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


class PerImageAdam(StackedOptimizer):
    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        batch_size: int,
        betas: tuple[float, float] = (0.0, 0.999),
        eps: float = 1e-8,
        fused: bool = False,
    ) -> None:
        super().__init__(params, batch_size, {"betas": betas, "eps": eps})
        # fused (genprior.perf, docs/performance.md): on the CPU for B >= 2, torch's fused Adam
        # kernel per image (:meth:`_kernel_update`, float rounding of the loop); otherwise the
        # loop's arithmetic as torch._foreach_* ops over each group (bit for bit the loop).
        # False: one Python loop over the tensors.
        self.fused = fused
        self.image_steps = torch.zeros(batch_size, dtype=torch.float64)
        # Tensors that torch.optim.Adam would skip on some steps (their .grad is None there,
        # e.g. DGP's conditional-BN linears while instance norm replaces BN) carry a mask key;
        # ``masks[key]`` then says which images step them, with their own step counts.
        self.masks: dict[str, Tensor] = {}
        self.masked_steps: dict[str, Tensor] = {}
        self._mask_key: dict[int, str] = {}
        for group in self.param_groups:
            for p, key in zip(group["params"], group.get("mask_keys", [None] * len(group["params"]))):
                if key is not None:
                    self._mask_key[id(p)] = key
                    self.masked_steps.setdefault(key, torch.zeros(batch_size, dtype=torch.float64))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = self._evaluate(closure)
        if not bool(self.active.any()):
            return loss
        # One step count per image, shared by every tensor of that image that steps with it;
        # kept in each tensor's state so that state_dict() round-trips.
        self.image_steps += self.active.to(torch.float64)
        steps = {None: (self.active, self.image_steps)}
        for key, counts in self.masked_steps.items():
            mask = self.active & self.masks.get(key, torch.ones_like(self.active))
            counts += mask.to(torch.float64)
            steps[key] = (mask, counts)
        if self.fused:
            first = next((p for g in self.param_groups for p in g["params"] if p.grad is not None), None)
            # B = 1 keeps the foreach path, bit for bit the loop's (the parity fixtures)
            if first is not None and first.device.type == "cpu" and _HAS_FUSED_KERNEL and self.batch_size > 1:
                self._kernel_update(steps)
            else:
                self._fused_update(steps)
            return loss
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            eps = group["eps"]
            cache: dict[tuple[Any, torch.device, torch.dtype], tuple[Tensor, Tensor, Tensor, bool]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                key = self._mask_key.get(id(p))
                mask_cpu, counts = steps[key]
                state = self._init_state(p, counts)
                ck = (key, p.device, p.dtype)
                if ck not in cache:
                    step_size, bc2 = adam_scalars(group["lr"], counts, beta1, beta2)
                    cache[ck] = (
                        step_size.to(device=p.device, dtype=p.dtype),
                        bc2.to(device=p.device, dtype=p.dtype),
                        mask_cpu.to(p.device),
                        bool(mask_cpu.all()),
                    )
                step_size_t, bc2_t, mask_t, all_on = cache[ck]
                if not all_on and not bool(mask_cpu.any()):
                    continue
                view = (self.batch_size,) + (1,) * (p.dim() - 1)
                step_size_t, bc2_t = step_size_t.view(view), bc2_t.view(view)
                grad = p.grad
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                if all_on:
                    exp_avg.lerp_(grad, 1 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denom = (exp_avg_sq.sqrt() / bc2_t).add_(eps)
                    # torch.optim.Adam's addcdiv_(exp_avg, denom, value=-step_size) computes
                    # (step_size * exp_avg) / denom: the same order, so B = 1 is its rounding
                    p.sub_(step_size_t * exp_avg / denom)
                else:
                    _masked_adam(p, state, mask_t.view(view), step_size_t, bc2_t, beta1, beta2, eps)
        return loss

    def _kernel_update(self, steps: dict[Any, tuple[Tensor, Tensor]]) -> None:
        """CPU: torch's fused Adam kernel (the one behind ``torch.optim.Adam(fused=True)``), one
        call per image and group on that image's slices of the stacked tensors. One pass reads
        the parameter, gradient and moments and writes them back, where the ``_foreach_*`` path
        makes nine (3.3x faster at B = 8, docs/performance.md). Images outside the active mask
        or a tensor's mask are not called: no update, no moment decay, as in the loop. The
        kernel computes the same formula in float32 with the bias corrections in float64, so it
        equals the loop to float rounding (one ulp), not bit for bit."""
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for key, params in self._stepping_params(group).items():
                mask_cpu, counts = steps[key]
                states = [self._init_state(p, counts) for p in params]
                # per-image slices: one unbind per tensor instead of B selects
                slices = [
                    list(zip(*(t.unbind(0) for t in tensors)))
                    for tensors in (
                        params,
                        [p.grad if p.grad.is_contiguous() else p.grad.contiguous() for p in params],
                        [s["exp_avg"] for s in states],
                        [s["exp_avg_sq"] for s in states],
                    )
                ]
                for b in torch.nonzero(mask_cpu).flatten().tolist():
                    step = torch.tensor(float(counts[b]))
                    torch._fused_adam_(
                        list(slices[0][b]),
                        list(slices[1][b]),
                        list(slices[2][b]),
                        list(slices[3][b]),
                        [],
                        [step] * len(params),
                        lr=float(group["lr"][b]),
                        beta1=beta1,
                        beta2=beta2,
                        weight_decay=0.0,
                        eps=group["eps"],
                        amsgrad=False,
                        maximize=False,
                    )

    def _stepping_params(self, group: dict[str, Any]) -> dict[Any, list[Tensor]]:
        """The group's tensors with a gradient, by mask key (None: the image's own step count)."""
        by_key: dict[Any, list[Tensor]] = {}
        for p in group["params"]:
            if p.grad is not None:
                by_key.setdefault(self._mask_key.get(id(p)), []).append(p)
        return by_key

    def _init_state(self, p: Tensor, counts: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = counts
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _fused_update(self, steps: dict[Any, tuple[Tensor, Tensor]]) -> None:
        """The loop's update, with one host-to-device copy of every group's per-image step
        sizes and bias corrections, and ``torch._foreach_*`` ops over the tensors of a group
        that share a step count. Images outside a mask fall back to the loop's masked update."""
        segments: list[tuple[dict[str, Any], Any, list[Tensor]]] = []
        rows: list[Tensor] = []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for key, params in self._stepping_params(group).items():
                mask_cpu, counts = steps[key]
                if not bool(mask_cpu.any()):
                    continue
                rows += list(adam_scalars(group["lr"], counts, beta1, beta2))
                segments.append((group, key, params))
        if not segments:
            return
        first = segments[0][2][0]
        # float64 -> the parameters' dtype on the host: the same rounding as the loop's .to()
        table = to_device_async(torch.stack(rows).to(first.dtype), first.device)
        for index, (group, key, params) in enumerate(segments):
            beta1, beta2 = group["betas"]
            eps = group["eps"]
            step_size, bc2 = table[2 * index], table[2 * index + 1]
            mask_cpu, counts = steps[key]
            for p in params:
                self._init_state(p, counts)
            if not bool(mask_cpu.all()):
                mask = mask_cpu.to(first.device)
                for p in params:
                    view = (self.batch_size,) + (1,) * (p.dim() - 1)
                    _masked_adam(p, self.state[p], mask.view(view), step_size.view(view), bc2.view(view),
                                 beta1, beta2, eps)
                continue
            for chunk in _chunks(params, _FUSED_CHUNK_ELEMENTS):
                grads = [p.grad for p in chunk]
                exp_avgs = [self.state[p]["exp_avg"] for p in chunk]
                exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in chunk]
                views = [(self.batch_size,) + (1,) * (p.dim() - 1) for p in chunk]
                torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
                torch._foreach_mul_(exp_avg_sqs, beta2)
                torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
                denoms = torch._foreach_sqrt(exp_avg_sqs)
                torch._foreach_div_(denoms, [bc2.view(v) for v in views])
                torch._foreach_add_(denoms, eps)
                updates = torch._foreach_mul(exp_avgs, [step_size.view(v) for v in views])
                torch._foreach_div_(updates, denoms)  # (step_size * exp_avg) / denom, as addcdiv
                del denoms
                torch._foreach_sub_(chunk, updates)

    def reset_state(self) -> None:
        """Forget every moment and step count (a fresh optimizer for a new batch of images)."""
        self.state.clear()
        self.image_steps = torch.zeros(self.batch_size, dtype=torch.float64)
        for key in self.masked_steps:
            self.masked_steps[key] = torch.zeros(self.batch_size, dtype=torch.float64)


def adam_scalars(lrs: Tensor, counts: Tensor, beta1: float, beta2: float) -> tuple[Tensor, Tensor]:
    """Per-image step size ``lr / (1 - beta1^t)`` and ``sqrt(1 - beta2^t)`` as [B] float64.

    Computed with Python floats, image by image, as torch.optim.Adam computes them from its
    Python scalars (``bias_correction2 ** 0.5``), so that B = 1 uses the very same doubles;
    the caller casts them to the parameters' dtype as Adam's scalar arguments are cast.
    """
    steps = [max(float(t), 1.0) for t in counts.tolist()]
    step_size = [float(lr) / (1.0 - beta1**t) for lr, t in zip(lrs.tolist(), steps)]
    bc2 = [(1.0 - beta2**t) ** 0.5 for t in steps]
    return torch.tensor(step_size, dtype=torch.float64), torch.tensor(bc2, dtype=torch.float64)


# torch >= 2.4 has a CPU implementation of the fused Adam kernel.
_HAS_FUSED_KERNEL = hasattr(torch, "_fused_adam_")

# Temporaries of the fused update are bounded by chunks of this many elements (1 GiB in fp32).
_FUSED_CHUNK_ELEMENTS = 1 << 28


def _chunks(params: list[Tensor], max_elements: int) -> list[list[Tensor]]:
    chunks: list[list[Tensor]] = [[]]
    size = 0
    for p in params:
        if chunks[-1] and size + p.numel() > max_elements:
            chunks.append([])
            size = 0
        chunks[-1].append(p)
        size += p.numel()
    return chunks


def _masked_adam(p: Tensor, state: dict[str, Tensor], mask: Tensor, step_size: Tensor, bc2: Tensor,
                 beta1: float, beta2: float, eps: float) -> None:
    """The loop's update for images in ``mask`` only (the others keep moments and weights)."""
    grad, exp_avg, exp_avg_sq = p.grad, state["exp_avg"], state["exp_avg_sq"]
    exp_avg.copy_(torch.where(mask, exp_avg.lerp(grad, 1 - beta1), exp_avg))
    new_sq = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    exp_avg_sq.copy_(torch.where(mask, new_sq, exp_avg_sq))
    denom = (exp_avg_sq.sqrt() / bc2).add_(eps)
    update = step_size * exp_avg / denom
    p.sub_(torch.where(mask, update, torch.zeros_like(update)))


class PerImageSGD(StackedOptimizer):
    """Plain SGD (no momentum, no weight decay) over stacked per-image parameters.

    mGANprior's released optimiser (``--optimization GD``: ``torch.optim.SGD(latents, lr)``,
    mGANprior SPEC §3.3). The interface is PerImageAdam's: each group's ``lr`` is a ``[B]``
    tensor set with ``set_lrs``, and images outside ``active`` are not updated. The update
    ``p -= lr_b * grad`` equals torch.optim.SGD's ``p.add_(grad, alpha=-lr)`` to rounding (and
    bit for bit at lr = 1).
    """

    def __init__(self, params: Iterable[dict[str, Any]], batch_size: int) -> None:
        super().__init__(params, batch_size, {})
        self.masks: dict[str, Tensor] = {}  # accepted for interface parity; SGD has no state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = self._evaluate(closure)
        if not bool(self.active.any()):
            return loss
        all_on = bool(self.active.all())
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                view = (self.batch_size,) + (1,) * (p.dim() - 1)
                update = group["lr"].to(device=p.device, dtype=p.dtype).view(view) * p.grad
                if not all_on:  # frozen images: no update, even from a non-finite gradient
                    update = torch.where(self.active.to(p.device).view(view), update, torch.zeros_like(update))
                p.sub_(update)
        return loss


def carry_state(previous: PerImageAdam, new: PerImageAdam) -> None:
    """Copy Adam moments and step counts position by position (the reference's main.py bug).

    main.py keeps one optimizer for every image, so image k starts with image k-1's moments
    and bias-correction step count (DGP SPEC §6.1, quirk 3). Reproduced only when asked for
    (``dgp.carry_optimizer_state=true``).
    """
    if previous.batch_size != new.batch_size:
        raise ValueError("dgp.carry_optimizer_state needs the same batch size for every batch")
    new.image_steps = previous.image_steps.clone()
    new.masked_steps = {k: v.clone() for k, v in previous.masked_steps.items()}
    for old_group, new_group in zip(previous.param_groups, new.param_groups):
        for old_p, new_p in zip(old_group["params"], new_group["params"]):
            old = previous.state.get(old_p)
            if not old or old["exp_avg"].shape != new_p.shape:
                continue
            key = new._mask_key.get(id(new_p))
            new.state[new_p] = {
                "step": new.image_steps if key is None else new.masked_steps[key],
                "exp_avg": old["exp_avg"].clone(),
                "exp_avg_sq": old["exp_avg_sq"].clone(),
            }
