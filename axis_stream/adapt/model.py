"""Stage 2's model: every basis matrix becomes ``W_fixed + U_N diag(Lambda) V_N^T`` with only Lambda trainable.

The basis stores each merged task matrix as ``U diag(s) V^T``. Stage 2 trains the top-N singular
values (``Lambda``) and freezes everything else (paper section 3.3, SPEC section 5). The frozen rest
of the spectrum, ``U_r diag(s_r) V_r^T``, never changes, so it is added once, in place, into the base
weight: ``W_fixed = theta_pre + U_r diag(s_r) V_r^T``. That keeps exactly one dense copy of every
base matrix. The averaged non-matrix deltas are added in place the same way.

Why materialise ``W`` once per step instead of a low-rank side path ``x W^T + ((x V) * Lambda) U^T``:
open_clip's attention hands ``in_proj_weight`` straight to ``F.multi_head_attention_forward``, so a
side path would mean rewriting attention for every architecture. Building ``W = W_fixed + (U * Lambda)
V^T`` for each matrix once per forward and handing the dict to ``torch.func.functional_call`` works for
any ``nn.Module`` whose matrices are named by patterns, adds one ``m x n x N`` matmul per matrix (a few
percent of a ViT forward), and the module itself keeps running its own fast kernels.

Where N exceeds the stored rank K, U and V are completed with orthonormal directions (seeded by the
job's seed and the matrix name, so a job can be rebuilt exactly) and the extra singular values start
at 0: what a full SVD of the dense merged matrix would give.

Lambda starts at ``start_scale * s``: 1.0 is the paper's merged start; a smaller value keeps the
merged directions but starts them weaker, which helps where interference between sources makes the
merged model worse than the base. Only Lambda is scaled; the frozen rest keeps ``s``. ``"auto"``
(``adapt.start``) builds the model at the merged start and lets the recipe score the candidate starts
on validation; ``set_start`` moves Lambda to any ``scale * s``, per matrix where ``scale`` is a mapping.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from axis_stream.core.stage1 import Factors, k_for
from axis_stream.core.svd import work_dtype
from axis_stream.errors import AxisError


class AdaptError(AxisError):
    """Stage 2 cannot run with these inputs; the message names the input and the reason."""


def check_fraction(n_fraction: Any) -> float:
    """``n_fraction`` as a float in (0, 1], or an ``AdaptError`` saying what is wrong with it."""
    if isinstance(n_fraction, bool) or not isinstance(n_fraction, (int, float)) or not 0 < n_fraction <= 1:
        raise AdaptError(f"n_fraction must be a number in (0, 1] (the trained fraction of min(m, n) "
                         f"singular values per matrix, e.g. 0.1), got {n_fraction!r}")
    return float(n_fraction)


AUTO = "auto"
"""``start_scale = "auto"``: score the candidate starts on validation and start from the best (``adapt.start``)."""


def check_start_scale(start_scale: Any) -> float | str:
    """``start_scale`` as ``"auto"`` or a finite float >= 0, or an ``AdaptError`` saying what is wrong with it."""
    if start_scale == AUTO:
        return AUTO
    if (isinstance(start_scale, bool) or not isinstance(start_scale, (int, float))
            or not math.isfinite(start_scale) or start_scale < 0):
        raise AdaptError(f"start_scale must be a finite number >= 0 or \"auto\" (Lambda starts at start_scale * s; "
                         f"1.0 is the paper's merged start, e.g. 0.3 starts weaker; auto scores a few starts on "
                         f"validation), got {start_scale!r}")
    return float(start_scale)


def complete_orthonormal(Q: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``Q [m, r]`` (orthonormal columns) extended to ``n`` orthonormal columns; the first ``r`` stay as they are.

    The new columns are Gaussian directions with ``Q`` projected out, orthonormalised by a QR, then
    projected once more (the QR's rounding lets a little of ``Q`` back in) and re-orthonormalised.
    """
    m, r = Q.shape
    if n <= r:
        return Q[:, :n]
    if n > m:
        raise AdaptError(f"cannot complete {r} directions in R^{m} to {n} orthonormal ones")
    dtype = work_dtype(Q)
    q = Q.to("cpu", dtype)
    extra = torch.randn(m, n - r, generator=generator, dtype=dtype)
    for _ in range(2):
        extra = torch.linalg.qr(extra - q @ (q.mT @ extra)).Q
    return torch.cat([Q, extra.to(Q.device, Q.dtype)], dim=1)


def completion_generator(seed: int, name: str) -> torch.Generator:
    """The generator for one matrix's completion: depends only on the job seed and the parameter name."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))


class Spectrum(nn.Module):
    """One matrix's trainable top-N spectrum: ``delta = U diag(lam) V^T``, reshaped to the parameter."""

    def __init__(self, U: Tensor, lam: Tensor, V: Tensor, shape: torch.Size, s: Tensor | None = None):
        super().__init__()
        self.register_buffer("U", U.contiguous())
        self.register_buffer("V", V.contiguous())
        self.register_buffer("s", (lam if s is None else s).detach().clone(), persistent=False)  # Lambda at scale 1
        self.lam = nn.Parameter(lam.clone())
        self.shape = shape

    def delta(self) -> Tensor:
        return ((self.U * self.lam) @ self.V.mT).reshape(self.shape)


class MethodCall(nn.Module):
    """Calls one method of the wrapped module, so ``functional_call`` can run e.g. ``encode_image``."""

    def __init__(self, module: nn.Module, method: str):
        super().__init__()
        self.module = module
        self.method = method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.module, self.method)(*args, **kwargs)


class FunctionalModel(nn.Module):
    """A frozen ``base`` run with the weights ``weights()`` returns, through ``functional_call``.

    Stage 2's ``SVDAdapted`` and the baselines' models share this surface, so one head, training loop
    and evaluation serve them all.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base.requires_grad_(False)
        self._methods: dict[str, MethodCall] = {}

    def weights(self) -> dict[str, Tensor]:
        """The base parameters this model replaces, by name, differentiable in its trainables."""
        raise NotImplementedError

    def call(self, method: str, *args: Any, weights: Mapping[str, Tensor] | None = None, **kwargs: Any) -> Any:
        """Run ``base.<method>(*args, **kwargs)`` with the weights materialised once for this call.

        ``weights`` (from ``weights()``) lets several calls share one materialisation, e.g. in evaluation.
        """
        if method not in self._methods:
            self._methods[method] = MethodCall(self.base, method)
        weights = self.weights() if weights is None else weights
        return functional_call(self._methods[method], {f"module.{k}": w for k, w in weights.items()}, args, kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.call("forward", *args, **kwargs)


class SVDAdapted(FunctionalModel):
    """``base`` with each matrix in ``factors`` re-parametrised by its top-N singular values (Stage 2).

    Takes ownership of ``base``: its matrix weights become ``W_fixed`` and its non-matrix parameters
    get ``means`` added, in place; every base parameter is frozen. ``factors`` are in matrix form
    (conv weights flattened to ``(out, in*kh*kw)``) and keyed by parameter name; a name missing from
    ``means`` is an all-zero delta. Only ``lambdas`` (one ``Spectrum.lam`` per matrix) are trainable;
    they start at ``start_scale`` times the top-N singular values (1.0: the merged model itself;
    ``"auto"`` builds at 1.0 for the recipe to score). ``calibration`` is the basis's factor per matrix
    (``BasisSnapshot.calibration``, a missing name is 1.0); it only says where the calibrated start is.
    """

    def __init__(self, base: nn.Module, factors: Mapping[str, Factors], means: Mapping[str, Tensor],
                 n_fraction: float, *, seed: int = 0, start_scale: float | str = 1.0,
                 calibration: Mapping[str, float] | None = None):
        super().__init__(base)
        n_fraction = check_fraction(n_fraction)
        start_scale = check_start_scale(start_scale)
        if not factors:
            raise AdaptError("the basis has no matrices: fold at least one checkpoint before adapting")
        params = dict(base.named_parameters())
        tensors = base.state_dict(keep_vars=True)
        _check_compatible(params, tensors, factors, means)
        self.n_fraction = n_fraction
        self.start_scale = start_scale
        self.seed = seed
        self.names = [name for name in params if name in factors]  # the module's own order
        self.calibration = {name: float((calibration or {}).get(name, 1.0)) for name in self.names}
        self.spectra = nn.ModuleList()
        with torch.no_grad():
            for name, mean in means.items():
                tensors[name].add_(mean.to(tensors[name].dtype))
            for name in self.names:
                self.spectra.append(self._fold(name, params[name], factors[name]))

    def _fold(self, name: str, param: Tensor, f: Factors) -> Spectrum:
        """Add the frozen rest of ``f`` into ``param``; return the trainable top-N part, at ``start_scale * s``."""
        shape = _matrix_shape(param)
        n = k_for(shape, self.n_fraction)
        U, s, V = _descending(f, param)
        if f.rank > n:
            param.view(shape).add_((U[:, n:] * s[n:]) @ V[:, n:].mT)
        gen = completion_generator(self.seed, name)
        U_n = complete_orthonormal(U, n, gen)
        V_n = complete_orthonormal(V, n, gen)
        top = torch.cat([s[:n], s.new_zeros(max(0, n - f.rank))])
        scale = 1.0 if self.start_scale == AUTO else self.start_scale
        lam = torch.cat([s[:n] * scale, s.new_zeros(max(0, n - f.rank))])
        return Spectrum(U_n, lam, V_n, param.shape, top)

    # --- what training and evaluation use ---

    def weights(self) -> dict[str, Tensor]:
        """The current matrices ``W_fixed + U_N diag(Lambda) V_N^T``, differentiable in Lambda.

        Built in the parameters' own precision even under autocast: Lambda's gradient is a sum over
        every entry of a matrix, which half precision would blur.
        """
        device_type = self.spectra[0].lam.device.type
        with torch.autocast(device_type, enabled=False):
            return {name: self.base.get_parameter(name) + sp.delta() for name, sp in zip(self.names, self.spectra)}

    # --- Lambda in and out, and the merged weights ---

    def trainable_count(self) -> int:
        return sum(sp.lam.numel() for sp in self.spectra)

    def set_start(self, scale: float | Mapping[str, float]) -> None:
        """Set Lambda to ``scale * s``: one factor for every matrix, or one per matrix name (a missing
        name is 1.0). Only Lambda moves; the frozen rest keeps ``s``, completed directions stay 0."""
        with torch.no_grad():
            for name, sp in zip(self.names, self.spectra):
                c = float(scale.get(name, 1.0)) if isinstance(scale, Mapping) else float(scale)
                sp.lam.copy_(sp.s * c)

    def lambdas(self) -> dict[str, Tensor]:
        """The trained values keyed by parameter name (what ``lambda.safetensors`` holds)."""
        return {name: sp.lam.detach().clone() for name, sp in zip(self.names, self.spectra)}

    def load_lambdas(self, values: Mapping[str, Tensor], source: str = "lambda file") -> None:
        """Set Lambda from ``values``; names and sizes must be exactly this model's."""
        missing = sorted(set(self.names) - set(values))
        extra = sorted(set(values) - set(self.names))
        if missing or extra:
            raise AdaptError(f"{source}: matrices do not match the model (missing {missing[:3]}, "
                             f"unexpected {extra[:3]}); was it trained with another basis or n_fraction?")
        with torch.no_grad():
            for name, sp in zip(self.names, self.spectra):
                v = values[name]
                if v.shape != sp.lam.shape:
                    raise AdaptError(f"{source}: {name} has {v.numel()} values, the model trains "
                                     f"{sp.lam.numel()}; was it trained with another n_fraction?")
                sp.lam.copy_(v)

    def delta_factors(self, factors: Mapping[str, Factors]) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """Per matrix its whole change over the base as ``(U, sigma, V)``, ``U diag(sigma) V^T``: the trained
        top-N and the frozen rest of ``factors`` (the ones this model was built from); rank max(N, K)."""
        out = {}
        with torch.no_grad():
            for name, sp in zip(self.names, self.spectra):
                U, s, V = _descending(factors[name], sp.U)
                n = sp.lam.numel()
                out[name] = (torch.cat([sp.U, U[:, n:]], 1), torch.cat([sp.lam.detach(), s[n:]]),
                             torch.cat([sp.V, V[:, n:]], 1))
        return out

    def merged_state_dict(self) -> dict[str, Tensor]:
        """The full adapted weights in the base module's own state-dict layout (detached copies)."""
        with torch.no_grad():
            weights = self.weights()
            return {name: weights.get(name, t).detach().clone().contiguous()
                    for name, t in self.base.state_dict().items()}


def _descending(f: Factors, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``f``'s U, s, V in descending order of s, on ``like``'s device and dtype."""
    order = torch.sort(f.s, descending=True, stable=True).indices
    return tuple(t.to(like.device, like.dtype) for t in (f.U[:, order], f.s[order], f.V[:, order]))


def _matrix_shape(t: Tensor) -> tuple[int, int]:
    return (int(t.shape[0]), int(t[0].numel()))


def _check_compatible(params: Mapping[str, Tensor], tensors: Mapping[str, Tensor],
                      factors: Mapping[str, Factors], means: Mapping[str, Tensor]) -> None:
    """Every basis entry must name a base parameter of the matching shape, or the basis is for another model."""
    hint = "the basis was built for a different base model"
    for name, f in factors.items():
        if name not in params:
            raise AdaptError(f"basis matrix {name!r} is not a parameter of the base model; {hint}")
        p = params[name]
        if p.dim() < 2:
            raise AdaptError(f"basis matrix {name!r}: the base parameter is {p.dim()}-D; {hint}")
        shape = _matrix_shape(p)
        if f.shape != shape or f.s.shape != (f.rank,) or f.V.shape[1] != f.rank:
            raise AdaptError(f"basis matrix {name!r} has factors for shape {f.shape} (rank {f.rank}), "
                             f"the base parameter is {tuple(p.shape)}; {hint}")
    for name, mean in means.items():
        if name not in tensors or not tensors[name].is_floating_point():
            raise AdaptError(f"basis mean {name!r} is not a floating-point tensor of the base model; {hint}")
        if name in factors:
            raise AdaptError(f"basis parameter {name!r} is both a matrix and an averaged parameter")
        if tuple(mean.shape) != tuple(tensors[name].shape):
            raise AdaptError(f"basis mean {name!r} has shape {tuple(mean.shape)}, the base model's "
                             f"{tuple(tensors[name].shape)}; {hint}")
