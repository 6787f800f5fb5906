"""Batch norm in float64 torch: the reference the kernels are tested against, and the backend
the launchers use for CPU tensors when Triton runs no kernels there (tritonbn/_runtime.py).

``batch_norm_reference`` is the whole forward, keeping autograd history (for tests). ``moments``, ``forward_apply``, ``backward_sums`` and
``backward_apply`` are the same computation cut at the launchers' steps, so a synchronized call
exchanges the same per-channel summaries whichever backend runs.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import activations
from .options import BackwardArgs, ForwardArgs, Options

__all__ = ["batch_norm_reference", "fit", "moments", "forward_apply", "backward_sums",
           "backward_apply", "overflow", "invertible_weight", "floored_gamma", "recovered_input"]


def _channel_shape(x: torch.Tensor) -> list[int]:
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _per_channel(t: Optional[torch.Tensor], default: float, c: int, device) -> torch.Tensor:
    if t is None:
        return torch.full((c,), default, dtype=torch.float64, device=device)
    return t.detach().double().reshape(-1)


def invertible_weight(weight: Optional[torch.Tensor], o: Options) -> Optional[torch.Tensor]:
    """gamma as the kernels use it: with ``Options.invertible`` |gamma| is at least eps (its
    sign kept, + for 0), as in kernels/common.py's load_affine."""
    if weight is None or not o.invertible:
        return weight
    return floored_gamma(weight.detach().double(), o.eps)


def floored_gamma(w: torch.Tensor, eps: float) -> torch.Tensor:
    """``w`` with every |w| < eps raised to eps, its sign kept (+ for 0)."""
    floor = torch.where(w < 0, -eps, eps).to(w)
    return torch.where(w.abs() < eps, floor, w)


def recovered_input(a: BackwardArgs, o: Options) -> torch.Tensor:
    """x in float64 from the output y = act(gamma * (x_hat * r + d) + beta + residual) that
    in-place activated batch norm saves instead of it (``Options.invertible``)."""
    y = a.input.double()
    shape = _channel_shape(y)
    c = y.shape[1]
    w = _per_channel(invertible_weight(a.weight, o), 1.0, c, y.device)
    b = _per_channel(a.bias, 0.0, c, y.device)
    r, d = renorm_factors(a)
    if o.activation == "leaky_relu":
        z = torch.where(y > 0, y, y / o.negative_slope)
    elif o.activation == "elu":
        # no lower than log(eps of the stored dtype), as the kernels (activations.invert)
        floor = torch.finfo(a.input.dtype).eps
        z = torch.where(y > 0, y, torch.log((1 + y / o.negative_slope).clamp(min=floor)))
    else:
        z = y
    if a.residual is not None:
        z = z - a.residual.double()
    if isinstance(r, torch.Tensor):
        r, d = r.view(shape), d.view(shape)
    x_hat = ((z - b.view(shape)) / w.view(shape) - d) / r
    return x_hat / a.save_invstd.double().view(shape) + a.save_mean.double().view(shape)


def fit(v: torch.Tensor, dtype: torch.dtype, saturate: bool) -> torch.Tensor:
    """v (float64) cast to dtype; with ``saturate`` finite values that would become inf are
    clamped to the dtype's largest finite value (NaN and inf stay), as the kernels' stores do."""
    out = v.to(dtype)
    if saturate and dtype.is_floating_point:
        lim = torch.finfo(dtype).max
        over = torch.isinf(out) & torch.isfinite(v)
        out = torch.where(over, torch.where(v > 0, lim, -lim).to(dtype), out)
    return out


def overflow(y: torch.Tensor, dtype: torch.dtype):
    """The kernels' fused counters: per channel, finite values whose cast to dtype is infinite,
    and the largest |y| (NaN ignored)."""
    dims = _reduce_dims(y)
    over = torch.isinf(y.to(dtype)) & torch.isfinite(y)
    return over.sum(dims), torch.nan_to_num(y.abs(), nan=0.0).amax(dims)


def moments(x: torch.Tensor) -> torch.Tensor:
    """(3, C) float64: count, mean and M2 (sum of squared deviations) per channel."""
    x = x.double()
    c = x.shape[1]
    count = x.numel() // c if c else 0
    if count == 0:
        return x.new_zeros((3, c))
    mean = x.mean(_reduce_dims(x))
    m2 = ((x - mean.view(_channel_shape(x))) ** 2).sum(_reduce_dims(x))
    return torch.stack([mean.new_full((c,), float(count)), mean, m2])


def merge(part: torch.Tensor):
    """(3, K, C) partial moments -> count, mean, M2 per channel, merged in order (Chan)."""
    part = part.double()
    n, mean, m2 = part[0, 0], part[1, 0], part[2, 0]
    for k in range(1, part.shape[1]):
        nb, mb, qb = part[0, k], part[1, k], part[2, k]
        total = n + nb
        w = torch.where(total > 0, nb / total.clamp(min=1.0), torch.zeros_like(nb))
        delta = mb - mean
        mean, m2, n = mean + delta * w, m2 + qb + delta * delta * n * w, total
    return n, mean, m2


def _running_weight(a: ForwardArgs, o: Options, counts: Optional[torch.Tensor], c: int, device):
    if not o.cumulative:
        return torch.full((c,), float(o.momentum), dtype=torch.float64, device=device)
    seen = counts if counts is not None else a.batches
    return 1.0 / (seen.double().reshape(-1).expand(c) + 1.0)


class ForwardResult(NamedTuple):
    y: torch.Tensor                     # float64 act(z)
    mean: torch.Tensor                  # float64 (C,)
    invstd: torch.Tensor
    rd: torch.Tensor                    # (2, C) renorm r, d, or (0,)
    new_mean: Optional[torch.Tensor]    # float64 running statistics after the step
    new_var: Optional[torch.Tensor]
    new_count: Optional[torch.Tensor]  # per-channel batch counts after the step


def forward_apply(a: ForwardArgs, o: Options, part: Optional[torch.Tensor],
                  running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                  running_count: Optional[torch.Tensor]) -> ForwardResult:
    """Normalize with the merged partial moments (training) or the running statistics (eval),
    and compute what the step does to the running statistics, as the kernels do."""
    x = a.input.double()
    c, device = x.shape[1], x.device
    new_mean = new_var = new_count = None
    rd = x.new_zeros((0,))
    if o.training:
        count, mean, m2 = merge(part)
        var = m2 / count.clamp(min=1.0)
        invstd = torch.rsqrt(var + o.eps)
        r = d = None
        if o.renorming:
            rmax, dmax = o.renorm
            warm = o.warmup_steps > 0 and int(a.batches) < o.warmup_steps
            rmax, dmax = (1.0, 0.0) if warm else (rmax, dmax)
            sigma = torch.sqrt(running_var.double() + o.eps)
            r = (torch.sqrt(var.detach() + o.eps) / sigma).clamp(1.0 / rmax, rmax)
            d = ((mean.detach() - running_mean.double()) / sigma).clamp(-dmax, dmax)
            rd = torch.stack([r, d])
        if running_mean is not None:
            old_mean, old_var = running_mean.double(), running_var.double()
            weight = _running_weight(a, o, running_count, c, device)
            unbiased = m2 / (count - 1).clamp(min=1.0)
            new_mean = (1 - weight) * old_mean + weight * mean.detach()
            new_var = (1 - weight) * old_var + weight * unbiased.detach()
            ok = torch.ones(c, dtype=torch.bool, device=device)
            if o.skip_nonfinite:
                ok = torch.isfinite(mean) & torch.isfinite(unbiased)
                new_mean = torch.where(ok, new_mean, old_mean)
                new_var = torch.where(ok, new_var, old_var)
            if o.cumulative and running_count is not None:
                new_count = running_count + ok.to(running_count.dtype)
    else:
        mean = running_mean.double()
        invstd = torch.rsqrt(running_var.double() + o.eps)
        r = d = None
    z = _preactivation(x, mean, invstd, invertible_weight(a.weight, o), a.bias, r, d,
                       a.residual)
    y = activations.apply(z, o.activation, o.negative_slope)
    return ForwardResult(y, mean, invstd, rd, new_mean, new_var, new_count)


def _preactivation(x, mean, invstd, weight, bias, r, d, residual):
    shape = _channel_shape(x)
    z = (x - mean.view(shape)) * invstd.view(shape)
    if r is not None:
        z = z * r.view(shape) + d.view(shape)
    if weight is not None:
        z = z * weight.double().reshape(shape)
    if bias is not None:
        z = z + bias.double().reshape(shape)
    if residual is not None:
        z = z + residual.double()
    return z


def renorm_factors(a: BackwardArgs):
    """Renorm's saved (r, d) in float64, or (1, 0)."""
    if a.save_rd is not None and a.save_rd.numel():
        return a.save_rd[0].double(), a.save_rd[1].double()
    return 1.0, 0.0


def _backward_terms(a: BackwardArgs, o: Options):
    """(x_hat, dz, gamma * r * invstd) of the backward, float64."""
    x = recovered_input(a, o) if o.invertible else a.input.double()
    dy = a.grad_output.double()
    c = x.shape[1]
    shape = _channel_shape(x)
    w = _per_channel(invertible_weight(a.weight, o), 1.0, c, x.device)
    b = _per_channel(a.bias, 0.0, c, x.device)
    r, d = renorm_factors(a)
    invstd = a.save_invstd.double()
    xhat = (x - a.save_mean.double().view(shape)) * invstd.view(shape)
    if o.activation is None:
        dz = dy
    else:
        z = (w * r).view(shape) * xhat + (b + w * d).view(shape)
        if a.residual is not None:
            z = z + a.residual.double()
        dz = dy * activations.derivative(z, o.activation, o.negative_slope)
    return xhat, dz, (w * r * invstd).view(shape)


def backward_sums(a: BackwardArgs, o: Options) -> torch.Tensor:
    """(2, C) float64: sum(dz) and sum(dz * x_hat) per channel."""
    xhat, dz, _ = _backward_terms(a, o)
    dims = _reduce_dims(xhat)
    return torch.stack([dz.sum(dims), (dz * xhat).sum(dims)])


def backward_apply(a: BackwardArgs, o: Options, means: torch.Tensor):
    """(grad_input, grad_residual) in float64 from the per-channel means of dz and dz * x_hat
    (over every process's batch when synchronized); grad_residual is dz."""
    xhat, dz, k = _backward_terms(a, o)
    shape = _channel_shape(xhat)
    if o.training:
        dx = k * (dz - means[0].view(shape) - xhat * means[1].view(shape))
    else:
        dx = k * dz
    return dx, dz


# ---------------------------------------------------------------- the whole op, for tests

def batch_norm_reference(input, running_mean, running_var, weight=None, bias=None,
                         training=False, momentum=0.1, eps=1e-5, *, residual=None,
                         activation=None, slope=0.01, renorm=None, skip_nonfinite=False,
                         running_count=None, saturate=False):
    """Batch norm in float64: y = act(BN(x) + residual). Returns (y, mean, invstd), float64;
    y keeps autograd history (renorm's r and d are constants, as in the kernels).

    In training the running statistics are updated in place, torch's way: with the unbiased
    batch variance and ``running = (1 - momentum) * running + momentum * batch``
    (``running_count``: per-channel weights 1 / (count + 1), incremented). ``renorm=(rmax,
    dmax)``: Batch Renormalization against the running statistics of before the update.
    """
    o = Options(training=training, momentum=None if running_count is not None else momentum,
                eps=eps, activation=activation, negative_slope=slope, renorm=renorm,
                saturate=saturate, skip_nonfinite=skip_nonfinite)
    a = ForwardArgs(input, weight, bias, residual, running_mean, running_var,
                    running_count=running_count)
    flat = [None if t is None else t.detach().reshape(-1) for t in (running_mean, running_var)]
    part = moments(input).unsqueeze(1) if training else None
    out = forward_apply(a, o, part, *flat, running_count)
    empty = input.numel() == 0
    if out.new_mean is not None and not empty:
        with torch.no_grad():
            running_mean.copy_(fit(out.new_mean, running_mean.dtype, saturate)
                               .view_as(running_mean))
            running_var.copy_(fit(out.new_var, running_var.dtype, saturate).view_as(running_var))
            if out.new_count is not None:
                running_count.copy_(out.new_count)
    return out.y, out.mean, out.invstd
