"""The one pass over the per-example buffer: clip, sum over examples, noise, scale.

The buffer holds, parameter after parameter, a contiguous (B, numel) block of per-example
gradients (``dpdm_fast.engine.clipping.layout.FlatLayout``). Each program takes one tile of one
parameter's columns and, for every example b, reads the tile's B rows once:

    total[j] += sum_b min(1, C / (norm_b + 1e-6)) * scale * block[b, j]

(per-layer clipping, ``PER_LAYER``: the factor is min(1, C_p / (norm_{p,b} + 1e-6)) with the tile's
parameter p's own bound C_p and per-parameter norm, from a (params, B) norm table)

then, in the final pass of a step (``FINAL``), adds Gaussian noise std * z[j] and divides by the
expected batch size, writing the result into the flat gradient storage the parameters' ``.grad``
views point to. z comes from Philox (``tl.randint4x``), a counter-based generator: z[j] is a function
of (seed, j) only, so a step's noise is reproducible from its seed whatever the tiling or GPU. The
Gaussian is Box-Muller in fp64 from a 53-bit uniform in (0, 1), so a draw can reach 8.6 standard
deviations (``tl.randn``'s fp32 version stops at 5.7: a bounded noise makes some outputs impossible
under one neighbour, which costs delta). With ``draws=4`` each coordinate is (z1 + z2 + z3 + z4) / 2
(the floating-point-attack defence of Holohan et al., as Opacus's secure mode), still N(0, 1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_output, interpreting
from .tiles import tile_table as _tile_table

# Columns per program; the interpreter pays Python time per program, so it takes far wider tiles.
TILE = 1 << 16 if interpreting() else 1024


@triton.jit
def _normal_from_bits(i1, i2, i3):
    """N(0, 1) from three uint32: Box-Muller in fp64, radius from a 53-bit uniform in (0, 1)
    (at most sqrt(2 * 54 * ln 2) = 8.65), angle from a 32-bit one."""
    u1 = ((i1 >> 5).to(tl.float64) * 67108864.0 + (i2 >> 6).to(tl.float64) + 0.5) * (1.0 / 9007199254740992.0)
    u2 = (i3.to(tl.float64) + 0.5) * (1.0 / 4294967296.0)
    return (tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)).to(tl.float32)


@triton.jit
def _normal(seed, idx):
    i1, i2, i3, _ = tl.randint4x(seed, idx)
    return _normal_from_bits(i1, i2, i3)


@triton.jit(do_not_specialize=["seed"])
def _clip_reduce_kernel(buf_ptr, norms_ptr, written_ptr, tiles_ptr, total_ptr, out_ptr, bounds_ptr,
                        B, P, max_norm, scale, std, divisor, seed,
                        BLOCK: tl.constexpr, FINAL: tl.constexpr, DRAWS: tl.constexpr, PER_LAYER: tl.constexpr):
    t = tl.program_id(0)
    offset = tl.load(tiles_ptr + 4 * t)          # the parameter's offset in the flat vector
    numel = tl.load(tiles_ptr + 4 * t + 1)
    start = tl.load(tiles_ptr + 4 * t + 2)       # the tile's first column within the parameter
    index = tl.load(tiles_ptr + 4 * t + 3)       # the parameter's index (for its written flag)
    cols = start + tl.arange(0, BLOCK)
    ok = cols < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    rows = tl.load(written_ptr + index) * B      # 0 when this backward left the parameter untouched
    base = buf_ptr + offset * B
    bound = max_norm
    row_norms = norms_ptr
    if PER_LAYER:                                # this parameter's bound and its row of the norm table
        bound = tl.load(bounds_ptr + index)
        row_norms = norms_ptr + index * B
    for b in range(rows):
        factor = tl.minimum(bound / (tl.load(row_norms + b) + 1e-6), 1.0) * scale
        acc += factor * tl.load(base + b * numel + cols, mask=ok, other=0.0)
    flat = offset + cols
    total = tl.load(total_ptr + flat, mask=ok, other=0.0) + acc
    if FINAL:
        if DRAWS > 0:
            idx = flat.to(tl.int32)
            z = _normal(seed, idx)
            if DRAWS == 4:
                z = (z + _normal(seed, idx + P) + _normal(seed, idx + 2 * P) + _normal(seed, idx + 3 * P)) * 0.5
            total = total + std * z
        total = total / divisor
    tl.store(out_ptr + flat, total, mask=ok)


def tile_table(numels: list[int], device: torch.device | str, tile: int = TILE) -> torch.Tensor:
    """(tiles, 4) int64 rows (offset, numel, start, index) for this kernel's tile width."""
    return _tile_table(numels, device, tile)


def clip_reduce(buffer: torch.Tensor, numels: list[int], written: torch.Tensor, norms: torch.Tensor,
                max_norm: float, scale: float, total: torch.Tensor, *, tiles: torch.Tensor | None = None,
                final: bool = False, std: float = 0.0, divisor: float = 1.0, seed: int = 0, draws: int = 1,
                out: torch.Tensor | None = None, bounds: torch.Tensor | None = None) -> torch.Tensor:
    """Fold a backward's per-example buffer into the clipped sum ``total`` (P,) (in place), or,
    with ``final=True``, write ``(total + clipped sum + std * z) / divisor`` into ``out`` (P,).

    buffer: the flat per-example buffer of B = norms.numel() examples; numels: the parameters'
    sizes in layout order; written: (params,) int32, 1 where this backward wrote the parameter's
    block (others are not read: they may hold stale data); norms: (B,) fp32 per-example norms, or,
    with ``bounds`` ((params,) fp32 per-layer clip bounds; ``max_norm`` is then unused), the
    contiguous (params, B) fp32 table of per-parameter norms.
    """
    per_layer = bounds is not None
    if per_layer and (norms.dim() != 2 or norms.shape[0] != len(numels) or bounds.numel() != len(numels)
                      or not norms.is_contiguous()):
        raise ValueError(f"per-layer clipping needs a contiguous ({len(numels)}, B) norm table and {len(numels)} "
                         f"bounds, got {tuple(norms.shape)} and {bounds.numel()}")
    B, P = norms.shape[-1] if per_layer else norms.numel(), sum(numels)
    if total.device.type != "cuda" and not interpreting():
        raise RuntimeError("the Triton clip/noise pass on CPU tensors needs TRITON_INTERPRET=1 (set before "
                           "importing dpdm_fast)")
    check_output(total, (P,), "total")
    if draws not in (1, 4):
        raise ValueError(f"draws must be 1 or 4, got {draws}")
    if buffer.numel() < B * P or buffer.dtype != torch.float32:
        raise ValueError(f"buffer must hold {B} x {P} fp32 values, has {buffer.numel()} {buffer.dtype}")
    if P >= 2**31 // draws:
        raise ValueError(f"{P} parameters: Philox offsets are int32, at most {2**31 // draws - 1} coordinates")
    out = total if out is None else out
    check_output(out, (P,))
    tiles = tile_table(numels, total.device) if tiles is None else tiles
    if tiles.shape[0] == 0:
        return out
    _clip_reduce_kernel[(tiles.shape[0],)](buffer, norms, written, tiles, total, out,
                                           bounds if per_layer else norms, B, P, float(max_norm),
                                           float(scale), float(std), float(divisor), int(seed), BLOCK=TILE,
                                           FINAL=bool(final), DRAWS=draws if std else 0, PER_LAYER=per_layer)
    return out


def reference_clip_reduce(buffer: torch.Tensor, numels: list[int], written: torch.Tensor, norms: torch.Tensor,
                          max_norm: float, scale: float, total: torch.Tensor,
                          bounds: torch.Tensor | None = None) -> torch.Tensor:
    """The noise-free part in torch: total + sum_b factor_b * block_b over the written blocks (per-layer:
    each parameter's own factors from its bound and its row of the (params, B) norm table)."""
    B = norms.shape[-1]
    if bounds is None:
        factors = [(max_norm / (norms + 1e-6)).clamp(max=1.0) * scale] * len(numels)
    else:
        factors = list((bounds[:, None] / (norms + 1e-6)).clamp(max=1.0) * scale)
    parts, offset = [], 0
    for n, w, f in zip(numels, written.tolist(), factors):
        blk = buffer[B * offset:B * (offset + n)].view(B, n)
        parts.append(f @ blk if w else torch.zeros(n, device=total.device))
        offset += n
    return total + torch.cat(parts)
