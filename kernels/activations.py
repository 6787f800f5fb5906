"""Activations fused after batch norm (and the residual add), with their derivatives.

Each activation is a compile-time code, so a kernel specialized for one carries no branches for
the others. Derivatives are taken at the pre-activation z, which the backward kernels recompute
from x and the saved float32 statistics instead of saving z.
"""
import triton
import triton.language as tl

# Host and device agree on these codes; the host maps user-facing names onto them.
ACTIVATIONS = {
    None: 0,
    "relu": 1,
    "relu6": 2,
    "leaky_relu": 3,
    "silu": 4,
    "gelu": 5,           # exact: z * Phi(z)
    "gelu_tanh": 6,      # tanh approximation, torch's approximate="tanh"
    "hardswish": 7,
    "sigmoid": 8,
    "tanh": 9,
    "elu": 10,           # slope is alpha
}

# The activations in-place activated batch norm can invert: y = act(z) determines z.
INVERTIBLE = (None, "leaky_relu", "elu")

# The constants below are literals, not module-level tl.constexpr globals: Triton re-checks every
# global a kernel reads on each launch (~0.5 us apiece), literals cost nothing.
#   0.7071067811865476 = 1 / sqrt(2)      0.3989422804014327 = 1 / sqrt(2 pi)
#   0.7978845608028654 = sqrt(2 / pi)     0.044715 = the tanh-GELU cubic coefficient


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _tanh(z):
    # 1 - 2 / (exp(2z) + 1): saturates cleanly to +-1 where exp overflows or underflows
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)


@triton.jit
def activate(z, ACT: tl.constexpr, slope):
    """act(z) for the activation code ACT; ``slope`` is leaky_relu's negative slope."""
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = tl.minimum(tl.maximum(z, 0.0), 6.0)
    elif ACT == 3:
        z = tl.where(z > 0, z, z * slope)
    elif ACT == 4:
        z = z * _sigmoid(z)
    elif ACT == 5:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 6:
        z = 0.5 * z * (1.0 + _tanh((z + z * z * z * 0.044715) * 0.7978845608028654))
    elif ACT == 7:
        z = z * tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0
    elif ACT == 8:
        z = _sigmoid(z)
    elif ACT == 9:
        z = _tanh(z)
    elif ACT == 10:
        z = tl.where(z > 0, z, slope * (tl.exp(tl.minimum(z, 0.0)) - 1.0))
    return z


@triton.jit
def activate_grad(z, ACT: tl.constexpr, slope):
    """d act / dz at z (torch's conventions at the kinks: relu'(0) = 0, relu6'(6) = 0)."""
    if ACT == 1:
        g = tl.where(z > 0, 1.0, 0.0)
    elif ACT == 2:
        g = tl.where((z > 0) & (z < 6.0), 1.0, 0.0)
    elif ACT == 3:
        g = tl.where(z > 0, 1.0, slope)
    elif ACT == 4:
        s = _sigmoid(z)
        g = s * (1.0 + z * (1.0 - s))
    elif ACT == 5:
        g = (0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
             + z * tl.exp(-0.5 * z * z) * 0.3989422804014327)
    elif ACT == 6:
        t = _tanh((z + z * z * z * 0.044715) * 0.7978845608028654)
        g = (0.5 * (1.0 + t)
             + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + z * z * 0.134145))
    elif ACT == 7:
        g = tl.where(z < -3.0, 0.0, tl.where(z > 3.0, 1.0, z / 3.0 + 0.5))
    elif ACT == 8:
        s = _sigmoid(z)
        g = s * (1.0 - s)
    elif ACT == 9:
        t = _tanh(z)
        g = 1.0 - t * t
    elif ACT == 10:
        g = tl.where(z > 0, 1.0, slope * tl.exp(tl.minimum(z, 0.0)))
    else:
        g = tl.full(z.shape, 1.0, z.dtype)
    return g


@triton.jit
def resolution(PTR):
    """The eps of the dtype PTR points to: how finely a stored value near 1 (or -alpha, for
    an ELU output in units of alpha) is resolved."""
    if PTR.dtype.element_ty == tl.float16:
        eps = 9.765625e-04              # 2^-10
    elif PTR.dtype.element_ty == tl.bfloat16:
        eps = 7.8125e-03                # 2^-7
    elif PTR.dtype.element_ty == tl.float32:
        eps = 1.1920928955078125e-07    # 2^-23
    else:
        eps = 2.220446049250313e-16     # 2^-52
    return eps


@triton.jit
def invert(y, ACT: tl.constexpr, slope, floor):
    """z from y = act(z) for an invertible activation (INVERTIBLE; leaky_relu's slope > 0).
    ELU's inverse log(1 + y / alpha) is taken no lower than log(floor), ``floor`` the eps of
    the dtype y was stored in (``resolution``): further below, exp(z) has no digits left in
    the stored y, and z is lost, not just inaccurate (about -6.9 in float16, -4.9 in
    bfloat16, -15.9 in float32)."""
    if ACT == 3:
        z = tl.where(y > 0, y, y / slope)
    elif ACT == 10:
        z = tl.where(y > 0, y, tl.log(tl.maximum(1.0 + y / slope, floor)))
    else:
        z = y
    return z


@triton.jit
def activate_grad_at_output(y, ACT: tl.constexpr, slope):
    """d act / dz from y = act(z) alone, for the invertible activations."""
    if ACT == 3:
        g = tl.where(y > 0, 1.0, slope)
    elif ACT == 10:
        g = tl.where(y > 0, 1.0, y + slope)
    else:
        g = tl.full(y.shape, 1.0, y.dtype)
    return g
