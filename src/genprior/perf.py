"""Speed options of the batched engine, and the automatic batch size (issue 8).

Every option is a switch with a plain fallback, and every option that is on by default keeps
each image's result within float rounding of the plain fp32 path (tests/test_performance.py):

| option | default | what it does |
|---|---|---|
| ``autocast`` | ``none`` | ``bf16``: G and D forward passes under ``torch.autocast`` in bfloat16; spectral norms, the degradation and the losses stay fp32 |
| ``compile`` | false | ``torch.compile`` of the discriminator forward and of DGP's per-image generator call |
| ``channels_last`` | false | D's weights and inputs in channels-last memory order (faster convolutions on GPUs and oneDNN) |
| ``fused_optimizer`` | true | on the CPU for B >= 2, torch's fused Adam kernel once per image and group (one pass over parameter, gradient and moments); elsewhere PerImageAdam with ``torch._foreach_*`` ops over each group's stacked tensors and one host-to-device copy of the per-image rates per step, the loop's arithmetic element for element |
| ``cache_frozen_sn`` | true | the frozen discriminator (and G's never-tuned output layer) keep W / sigma(W) between steps instead of recomputing one power iteration per forward: eval mode never moves u0, so the value is the same tensor |
| ``sync_free`` | true | the step's per-image schedule values (use_in, ftr_num, loss weights) are decided on the host, so a step never waits for the device; losses stay on the device and are read only on logged steps |
| ``fused_attention`` | true | G's and D's self-attention for B >= 2 through ``F.scaled_dot_product_attention`` (flash kernels on the CPU, flash or memory-efficient on CUDA): the [HW, HW/4] attention map of each image is never stored, forward or backward; B = 1 keeps the reference's two products |
| ``sn_scale_outputs`` | true | G's spectrally normalised layers with per-image weights (B >= 2) divide their outputs by sigma instead of their weights wherever the weight is the larger tensor (G's 4x4 to 32x32 convolutions and its linear layers): ``W x / sigma == (W / sigma) x``, with four weight-sized passes per layer and step fewer |
| ``cpu_malloc_tuning`` | true | CPU runs on Linux/glibc: ``mallopt`` keeps freed memory in the process instead of unmapping and re-faulting large tensors every step (:func:`tune_cpu_malloc`) |

``trainer.batch_size=auto`` (the default) picks B: on a GPU from the free memory and the measured
peak of a B = 1 and a B = 2 step (:func:`auto_batch_size`), on the CPU :data:`CPU_AUTO_BATCH`.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from genprior.precision import compute_dtype

log = logging.getLogger("genprior")

# On the CPU "auto" is one image at a time: at production widths a CPU step is compute-bound
# (docs/benchmarks.md: the same time per image at B = 1 and B = 8), and B = 1 keeps every
# image's result independent of how a run is sharded (tests/test_evaluate.py compares a 1- and
# a 2-process evaluation bit for bit). Small models do gain from batching on a CPU
# (docs/performance.md): set trainer.batch_size explicitly there.
CPU_AUTO_BATCH = 1
AUTO_BATCH_CAP = 64  # beyond this a GPU is saturated at BigGAN-128 and only latency grows
AUTO_BATCH_MARGIN = 0.85  # fraction of the free memory the extrapolated peak may use


@dataclass
class PerfConfig:
    """``perf.*``: execution options of the batched engine (module docstring)."""

    autocast: str = "none"  # none | bf16
    compile: bool = False
    channels_last: bool = False
    fused_optimizer: bool = True
    cache_frozen_sn: bool = True
    sync_free: bool = True
    fused_attention: bool = True
    sn_scale_outputs: bool = True
    # CPU runs on Linux/glibc: keep freed memory in the process (mallopt) instead of handing
    # every large tensor back to the kernel and faulting it in again (docs/performance.md)
    cpu_malloc_tuning: bool = True


AUTOCAST_MODES = ("none", "bf16")

# glibc mallopt parameters and the values set by tune_cpu_malloc: serve tensors up to 32 MiB
# from the heap rather than fresh mmaps, and return heap memory to the kernel only beyond 1 GiB
# free (glibc's defaults adapt only up to the sizes already freed and trim at twice that, so a
# DGP step at B = 8 keeps unmapping and re-faulting its 16 MiB attention maps).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MALLOC_SETTINGS = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20))
_malloc_tuned = False


def tune_cpu_malloc() -> bool:
    """Apply ``_MALLOC_SETTINGS`` to this process's glibc allocator, once; False where there is
    no glibc (macOS, Windows, musl) or it refuses. Results are unchanged, only speed (and a
    resident size that stays at its peak instead of shrinking between steps)."""
    global _malloc_tuned
    if _malloc_tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _malloc_tuned = all(mallopt(param, value) == 1 for param, value in _MALLOC_SETTINGS)
    return _malloc_tuned


def check(perf: Any) -> None:
    if str(perf.autocast) not in AUTOCAST_MODES:
        raise ValueError(f"perf.autocast must be one of {', '.join(AUTOCAST_MODES)}, got {perf.autocast!r}")


def perf_settings(cfg: Any) -> PerfConfig:
    """The ``perf`` section of a composed config as a PerfConfig (defaults when absent)."""
    section = cfg.get("perf") if hasattr(cfg, "get") else None
    if section is None:
        return PerfConfig()
    values = {k: section[k] for k in PerfConfig.__dataclass_fields__ if k in section}
    perf = PerfConfig(**values)
    check(perf)
    trainer = cfg.get("trainer") if hasattr(cfg, "get") else None
    if trainer is not None and compute_dtype(trainer.precision) == torch.float64:
        perf = for_float64(perf)
    return perf


def for_float64(perf: PerfConfig) -> PerfConfig:
    """The options a float64 run keeps: every option computes in float64 except bf16 autocast,
    which is switched off with a logged notice (a bf16 step would void the float64 proof)."""
    if perf.autocast != "none":
        log.warning("trainer.precision=64-true: perf.autocast=%s is switched off (the step runs "
                    "in float64)", perf.autocast)
        perf = dataclasses.replace(perf, autocast="none")
    return perf


def to_device_async(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without a blocking copy (``perf.sync_free``): pinned
    and non-blocking on CUDA, a plain ``.to`` elsewhere."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def autocast(device: torch.device, mode: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` in bfloat16 for ``mode == "bf16"``, else a no-op context."""
    if mode == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Leave any autocast region: for the spectral norms and reductions that must stay fp32."""
    active = [d for d in ("cuda", "cpu") if torch.is_autocast_enabled(d)]
    if not active:
        yield
        return
    with torch.autocast(device_type=active[0], enabled=False):
        yield


def maybe_compile(fn: Callable[..., Any], enabled: bool) -> Callable[..., Any]:
    """``torch.compile(fn)`` when asked and available; otherwise ``fn`` itself."""
    if not enabled:
        return fn
    if not hasattr(torch, "compile"):  # pragma: no cover - torch < 2
        log.warning("perf.compile=true needs torch >= 2; running eagerly")
        return fn
    return torch.compile(fn, dynamic=False)


# ---------------------------------------------------------------------- automatic batch size
def auto_batch_size(
    peak_bytes: Callable[[int], int],
    free_bytes: int,
    n_items: int,
    cap: int = AUTO_BATCH_CAP,
    margin: float = AUTO_BATCH_MARGIN,
) -> int:
    """The largest B whose extrapolated peak memory fits in ``margin * free_bytes``.

    ``peak_bytes(B)`` measures the peak memory of one optimisation step of B images (from a
    clean start). The peak is linear in B (the shared G, D and framework, plus per-image
    tensors, gradients, Adam moments and activations), so two probes give both terms.
    """
    if n_items <= 1:
        return 1
    one, two = peak_bytes(1), peak_bytes(2)
    per_image = max(two - one, 1)
    shared = max(one - per_image, 0)
    fits = int((margin * free_bytes - shared) // per_image)
    chosen = max(1, min(fits, cap, n_items))
    log.info("trainer.batch_size=auto: %.2f GiB shared + %.2f GiB per image, %.1f GiB free -> B = %d",
             shared / 2**30, per_image / 2**30, free_bytes / 2**30, chosen)
    return chosen


def resolve_batch_size(value: Any, device: torch.device, n_items: int,
                       probe: Callable[[int], int] | None = None) -> int:
    """``trainer.batch_size``: a positive int, or "auto" (GPU: measured; CPU: CPU_AUTO_BATCH)."""
    if str(value) != "auto":
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"trainer.batch_size must be a positive integer or 'auto', got {value!r}") from None
        return max(1, number)
    if device.type != "cuda" or probe is None:
        return max(1, min(CPU_AUTO_BATCH, max(n_items, 1)))
    free, _ = torch.cuda.mem_get_info(device)
    return auto_batch_size(probe, free, n_items)
