"""Interpolation geometry of text-encoder output states: slerp, LayerNorm-exact slerp, slerp about a centre.

Pure tensor functions (no models). Every function works row-wise over the last axis: inputs are
``[..., d]`` and broadcast against each other; fractions ``t`` are scalars or tensors
broadcastable to ``[...]`` (one per row). Arithmetic happens in float32 or wider; results keep that dtype.

Geometries (docs/method.md, "Where to interpolate, and how" and "The regulariser, precisely"):

- ``layernorm``: an encoder output is ``h = gamma * xhat + beta`` where ``xhat`` (the normalised
  state before the final LayerNorm) has zero mean and norm ``sqrt(d)``: every output lies on the
  ellipsoid centred at ``beta`` with axes ``gamma``. :func:`layernorm_slerp` slerps ``xhat`` and maps
  back, so interpolated states stay on that manifold (``xhat`` is taken from the pre-LayerNorm
  state, never computed by dividing by ``gamma``, which may have tiny entries).
- ``centered``: :func:`centered_slerp` slerps the unit directions about a centre and interpolates
  the radius linearly (the method's "slerp around the centre" for encoders without a final LayerNorm).
- ``linear``: :func:`lerp`.
"""

from __future__ import annotations

import torch

#: Below this angle (radians) slerp falls back to lerp (the two directions are equal to float precision).
SMALL_ANGLE = 1e-4
#: Norms below this count as zero (direction undefined: slerp falls back to lerp).
TINY_NORM = 1e-12


def _fraction(t: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor broadcastable to ``like[..., :1]`` (one fraction per row)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.unsqueeze(-1) if t.dim() > 0 else t


def _promote(*xs: torch.Tensor) -> list[torch.Tensor]:
    dtype = torch.promote_types(torch.promote_types(xs[0].dtype, xs[-1].dtype), torch.float32)
    return [x.to(dtype) for x in xs]


def _lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # Exact at t = 0 and t = 1, and exactly a wherever a == b (positions before the token stay identical).
    step = b - a
    return torch.where(t < 0.5, a + t * step, b - (1 - t) * step)


def lerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Linear interpolation ``(1 - t) a + t b`` per row; exact at ``t = 0``, ``t = 1`` and where ``a == b``.

    a, b: ``[..., d]``; t: scalar, or broadcastable to ``a.shape[:-1]`` (one fraction per row).
    Returns ``[..., d]``.
    """
    a, b = _promote(a, b)
    return _lerp(a, b, _fraction(t, a))


def angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle between ``a`` and ``b`` about the origin, in radians, per row: ``[..., d] -> [...]``.

    Computed as ``2 atan2(|â - b̂|, |â + b̂|)``, accurate near 0 and pi (``acos`` of the cosine is not).
    A zero vector gives angle 0.
    """
    a, b = _promote(a, b)
    ua = a / a.norm(dim=-1, keepdim=True).clamp_min(TINY_NORM)
    ub = b / b.norm(dim=-1, keepdim=True).clamp_min(TINY_NORM)
    return 2 * torch.atan2((ua - ub).norm(dim=-1), (ua + ub).norm(dim=-1))


def slerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation per row: the direction moves along the great circle from ``a`` to ``b``
    (a fraction ``t`` of the angle), the norm moves linearly from ``|a|`` to ``|b|``.

    a, b: ``[..., d]``; t: scalar, or broadcastable to ``a.shape[:-1]``. Returns ``[..., d]``. When ``|a| = |b|`` the norm is
    kept exactly; the result is a combination ``c_a a + c_b b`` (so any linear constraint both
    endpoints satisfy, such as zero mean, holds along the path); it is exactly ``a`` at ``t = 0`` and
    exactly ``b`` at ``t = 1``. Rows whose angle is below :data:`SMALL_ANGLE`, or near pi (no unique
    great circle), or with a zero endpoint, fall back to :func:`lerp` (no NaN).
    """
    a, b = _promote(a, b)
    t = _fraction(t, a)
    ra = a.norm(dim=-1, keepdim=True)
    rb = b.norm(dim=-1, keepdim=True)
    omega = angle(a, b).unsqueeze(-1)
    sin_omega = torch.sin(omega)
    spherical = (omega > SMALL_ANGLE) & (sin_omega > SMALL_ANGLE) & (ra > TINY_NORM) & (rb > TINY_NORM)
    safe_sin = torch.where(spherical, sin_omega, torch.ones_like(sin_omega))
    radius = (1 - t) * ra + t * rb  # exact endpoints: (1-0) ra + 0 rb == ra
    ca = torch.sin((1 - t) * omega) / safe_sin * (radius / ra.clamp_min(TINY_NORM))
    cb = torch.sin(t * omega) / safe_sin * (radius / rb.clamp_min(TINY_NORM))
    return torch.where(spherical, ca * a + cb * b, _lerp(a, b, t))


def normalise_like_layernorm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``xhat``: ``x`` normalised over its last axis as ``nn.LayerNorm(eps=eps)`` does before its affine map.

    x: ``[..., d]`` (the state before the final LayerNorm). Returns float32 ``[..., d]`` with zero
    mean and norm ``sqrt(d) * sqrt(var / (var + eps))`` (``sqrt(d)`` up to eps).
    """
    x = x.float()
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def layernorm_slerp(
    xhat_a: torch.Tensor, xhat_b: torch.Tensor, t: float | torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor
) -> torch.Tensor:
    """The LayerNorm output ``gamma * slerp(xhat_a, xhat_b, t) + beta``: ``[..., d]``.

    xhat_a, xhat_b: normalised pre-LayerNorm states ``[..., d]`` (see :func:`normalise_like_layernorm`);
    gamma, beta: the final LayerNorm's weight and bias ``[d]``. The slerped ``xhat`` keeps zero
    mean and (for endpoints of equal norm) the norm ``sqrt(d)``, so the result lies on the same
    ellipsoid as real encoder outputs. ``t = 0`` and ``t = 1`` give ``gamma * xhat_a + beta`` and
    ``gamma * xhat_b + beta``.
    """
    xhat = slerp(xhat_a, xhat_b, t)
    return gamma.to(xhat.dtype) * xhat + beta.to(xhat.dtype)


def centered_slerp(h_a: torch.Tensor, h_b: torch.Tensor, t: float | torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Slerp about ``centre``: ``centre + slerp(h_a - centre, h_b - centre, t)``: ``[..., d]``.

    The unit directions about the centre move along the great circle; the distance to the centre
    moves linearly. centre: ``[d]`` or broadcastable to ``h_a`` (e.g. one centre per token position).
    """
    h_a, h_b = _promote(h_a, h_b)
    centre = centre.to(h_a.dtype)
    return centre + slerp(h_a - centre, h_b - centre, t)


def layernorm_angle(xhat_a: torch.Tensor, xhat_b: torch.Tensor) -> torch.Tensor:
    """Angle (radians) between two encoder outputs in the ``layernorm`` geometry (between their ``xhat``): ``[...]``."""
    return angle(xhat_a, xhat_b)


def centered_angle(h_a: torch.Tensor, h_b: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Angle (radians) between two encoder outputs seen from ``centre`` (the ``centered`` geometry): ``[...]``."""
    h_a, h_b = _promote(h_a, h_b)
    centre = centre.to(h_a.dtype)
    return angle(h_a - centre, h_b - centre)
