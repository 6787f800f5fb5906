"""The float64 torch reference: one implementation shared by tests, benchmarks and profilers.

It is also the documented CPU path: a CPU tensor with the Triton interpreter off
(TRITON_INTERPRET unset) is computed here, in float64, and cast back to the input dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["batch_norm_reference", "batch_norm_reference_backward", "activation_reference",
           "activation_grad_reference", "fit_reference"]


def activation_reference(z: torch.Tensor, name: str | None, slope: float = 0.01) -> torch.Tensor:
    """torch's own activation for each name tritonbn fuses."""
    if not name:
        return z
    return {
        "relu": F.relu, "relu6": F.relu6, "silu": F.silu, "hardswish": F.hardswish,
        "sigmoid": torch.sigmoid, "tanh": torch.tanh, "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "leaky_relu": lambda t: F.leaky_relu(t, slope),
    }[name](z)


def _channel_shape(x: torch.Tensor) -> list[int]:
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def fit_reference(v: torch.Tensor, dtype: torch.dtype, saturate: bool) -> torch.Tensor:
    """v (float64) cast to dtype; with ``saturate`` finite values that would become inf are
    clamped to the dtype's largest finite value (NaN and inf stay)."""
    out = v.to(dtype)
    if saturate:
        lim = torch.finfo(dtype).max
        over = torch.isinf(out) & torch.isfinite(v)
        out = torch.where(over, torch.where(v > 0, lim, -lim).to(dtype), out)
    return out


def batch_norm_reference(input, running_mean, running_var, weight=None, bias=None,
                         training=False, momentum=0.1, eps=1e-5, *, residual=None,
                         activation=None, slope=0.01, renorm=None, renorm_rd=None,
                         skip_nonfinite=False, running_count=None, saturate=False):
    """Batch norm in float64: y = act(BN(x) + residual). Returns (y, mean, invstd), float64;
    y keeps autograd history.

    In training the running statistics are updated in place, torch's way: with the unbiased
    batch variance and ``running = (1 - momentum) * running + momentum * batch``.
    ``renorm=(rmax, dmax)``: Batch Renormalization, with r = sigma_B / sigma and
    d = (mean_B - running_mean) / sigma for sigma = sqrt(running_var + eps) taken before the
    update, clipped and treated as constants; ``renorm_rd`` supplies (r, d) instead.
    """
    x = input.double()
    shape = _channel_shape(x)
    count = x.numel() // x.shape[1] if x.shape[1] else 0
    r = d = None
    if training:
        if count == 0:
            mean = x.new_zeros(x.shape[1])
            var = x.new_zeros(x.shape[1])
        else:
            mean = x.mean(_reduce_dims(x))
            var = x.var(_reduce_dims(x), unbiased=False)
        if renorm_rd is not None:
            r, d = (t.double().reshape(-1) for t in renorm_rd)
        elif renorm is not None:
            rmax, dmax = renorm
            sigma = torch.sqrt(running_var.detach().double().reshape(-1) + eps)
            r = (torch.sqrt(var.detach() + eps) / sigma).clamp(1.0 / rmax, rmax)
            d = ((mean.detach() - running_mean.detach().double().reshape(-1)) / sigma).clamp(-dmax, dmax)
        if running_mean is not None and count > 0:
            with torch.no_grad():
                unbiased = var.detach() * count / max(count - 1, 1)
                old_mean = running_mean.double().reshape(-1)
                old_var = running_var.double().reshape(-1)
                w = momentum if running_count is None else 1.0 / (running_count.double() + 1)
                new_mean = (1 - w) * old_mean + w * mean.detach()
                new_var = (1 - w) * old_var + w * unbiased
                ok = torch.ones_like(new_mean, dtype=torch.bool)
                if skip_nonfinite:
                    ok = torch.isfinite(mean.detach()) & torch.isfinite(unbiased)
                    new_mean, new_var = torch.where(ok, new_mean, old_mean), torch.where(ok, new_var, old_var)
                if running_count is not None:
                    running_count.add_(ok.to(running_count.dtype))
                running_mean.copy_(fit_reference(new_mean, running_mean.dtype, saturate).view_as(running_mean))
                running_var.copy_(fit_reference(new_var, running_var.dtype, saturate).view_as(running_var))
    else:
        mean = running_mean.detach().double().reshape(-1)
        var = running_var.detach().double().reshape(-1)
    invstd = torch.rsqrt(var + eps)
    y = (x - mean.view(shape)) * invstd.view(shape)
    if r is not None:
        y = y * r.view(shape) + d.view(shape)
    if weight is not None:
        y = y * weight.double().reshape(shape)
    if bias is not None:
        y = y + bias.double().reshape(shape)
    if residual is not None:
        y = y + residual.double()
    return activation_reference(y, activation, slope), mean, invstd


def activation_grad_reference(z: torch.Tensor, name: str | None, slope: float = 0.01) -> torch.Tensor:
    """d act / dz in closed form (torch's conventions at the kinks)."""
    if not name:
        return torch.ones_like(z)
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "relu6":
        return ((z > 0) & (z < 6)).to(z.dtype)
    if name == "leaky_relu":
        return torch.where(z > 0, 1.0, slope).to(z.dtype)
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if name == "gelu":
        return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    if name == "gelu_tanh":
        k = math.sqrt(2 / math.pi)
        t = torch.tanh(k * (z + 0.044715 * z ** 3))
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * k * (1 + 3 * 0.044715 * z * z)
    if name == "hardswish":
        return torch.where(z < -3, 0.0, torch.where(z > 3, 1.0, z / 3 + 0.5)).to(z.dtype)
    if name == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1 - s)
    if name == "tanh":
        return 1 - torch.tanh(z) ** 2
    raise ValueError(f"unknown activation {name!r}")


def batch_norm_reference_backward(grad_out, input, weight, bias, mean, invstd, training, *,
                                  residual=None, activation=None, slope=0.01, renorm_rd=None):
    """(grad_input, grad_weight, grad_bias, grad_residual) in float64 from the saved statistics,
    in closed form (it runs inside a custom op, where autograd is off). grad_residual is None
    without a residual."""
    x, dy = input.double(), grad_out.double()
    shape, dims = _channel_shape(x), _reduce_dims(x)
    count = max(x.numel() // x.shape[1], 1) if x.shape[1] else 1
    ones = torch.ones(x.shape[1], dtype=torch.float64, device=x.device)
    w = weight.double().reshape(-1) if weight is not None else ones
    b = bias.double().reshape(-1) if bias is not None else ones * 0
    r, d = ((t.double().reshape(-1) for t in renorm_rd) if renorm_rd is not None else (ones, ones * 0))
    invstd = invstd.double()
    xhat = (x - mean.double().view(shape)) * invstd.view(shape)
    z = (w * r).view(shape) * xhat + (b + w * d).view(shape)
    if residual is not None:
        z = z + residual.double()
    dz = dy * activation_grad_reference(z, activation, slope)
    sum_dz, sum_dz_xhat = dz.sum(dims), (dz * xhat).sum(dims)
    k = (w * r * invstd).view(shape)
    if training:
        dx = k * (dz - (sum_dz / count).view(shape) - xhat * (sum_dz_xhat / count).view(shape))
    else:
        dx = k * dz
    return dx, r * sum_dz_xhat + d * sum_dz, sum_dz, dz if residual is not None else None
