"""The PyTorch baseline of ``bench_flows.py``: an nflows masked affine autoregressive flow (MAF).

Architecture matched to ``tfgalflow.flows.build_bijector(FlowConfig(dim, layers, hidden))``:

    L x MaskedAffineAutoregressiveTransform, with a ReversePermutation between consecutive layers,
    standard-normal base; each MADE has len(hidden) hidden layers of the same width with ReLU.

nflows' MADE is ``initial_layer (D -> H)`` + ``num_blocks`` blocks + ``final_layer (H -> 2D)``; its
default (``use_residual_blocks=True, num_blocks=2``) has two *residual* blocks of two H x H layers
each, i.e. 5 hidden layers, not 2. ``use_residual_blocks=False`` uses feed-forward blocks of one
masked H x H layer + ReLU each, so ``num_blocks = len(hidden) - 1`` gives exactly the dense shapes
of TFP's ``AutoregressiveNetwork(hidden_units=hidden)``: for hidden=(64, 64), 6 -> 64 -> 64 -> 12
(ReLU after both hidden layers, linear output), 5 388 weights + biases per layer in both libraries.

Remaining differences (none changes the cost by more than an elementwise op on [N, D]): nflows
parametrises the affine scale as softplus(u) + 1e-3, tfgalflow as exp(3 tanh(u / 3)); nflows
initialises with PyTorch's default (Kaiming-uniform), tfgalflow with seeded Glorot-uniform. For
``kind="spline"`` both use K bins on [-B, B] with identity tails and 3K - 1 MADE outputs per
dimension (nflows' bin search is searchsorted + gather, tfgalflow's a one-hot sum). Data are
standardised with the same per-column mean and standard deviation as ``Flow.adapt``
(done inside the closures below, so every implementation computes log p in physical units).

Directions: nflows' ``transform.forward`` maps data to noise (one MADE pass per layer: log_prob and
its gradient), ``inverse`` maps noise to data (D passes per layer: sampling) -- the same split as
tfgalflow's MAF, so each operation does the same number of network evaluations in both libraries.

Compatibility with torch 2.13.0 (nflows 0.14, Dec 2020): no workaround was needed for this code
path (construction, log_prob, backward, Adam, sample, autograd.grad run without warnings, affine
and spline).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from nflows.distributions.normal import StandardNormal
from nflows.flows.base import Flow
from nflows.transforms.autoregressive import (
    MaskedAffineAutoregressiveTransform,
    MaskedPiecewiseRationalQuadraticAutoregressiveTransform,
)
from nflows.transforms.base import CompositeTransform
from nflows.transforms.permutations import ReversePermutation


def build_maf(dim: int, layers: int, hidden: Sequence[int], kind: str = "affine", bins: int = 8,
              bound: float = 5.0, seed: int = 0) -> Flow:
    """nflows MAF with ``layers`` MADE layers of hidden widths ``hidden`` (all equal), reverse
    permutations between layers, N(0, I) base. kind "affine": MaskedAffineAutoregressiveTransform;
    "spline": MaskedPiecewiseRationalQuadraticAutoregressiveTransform with ``bins`` bins on
    [-bound, bound] and linear (identity) tails, 3 bins - 1 parameters per dimension as tfgalflow's
    spline. Raises ValueError for unequal widths (nflows' MADE has one width for all hidden
    layers)."""
    hidden = tuple(int(h) for h in hidden)
    if not hidden or len(set(hidden)) != 1:
        raise ValueError(f"hidden = {hidden}: nflows' MADE needs >= 1 hidden layers of one width")
    torch.manual_seed(seed)
    made = dict(
        features=dim,
        hidden_features=hidden[0],
        num_blocks=len(hidden) - 1,
        use_residual_blocks=False,
    )
    transforms = []
    for i in range(layers):
        if i:
            transforms.append(ReversePermutation(features=dim))
        if kind == "affine":
            transforms.append(MaskedAffineAutoregressiveTransform(**made))
        else:
            transforms.append(MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
                num_bins=bins, tails="linear", tail_bound=bound, **made))
    return Flow(CompositeTransform(transforms), StandardNormal([dim]))


def dense_shapes(flow: Flow) -> list[tuple[int, int]]:
    """(in, out) of every masked linear layer, in order (to check the architecture against
    TFP's)."""
    return [
        (m.in_features, m.out_features) for m in flow.modules() if isinstance(m, torch.nn.Linear)
    ]


class NflowsBench:
    """Closures timed by bench_flows: train steps, log_prob, sample, grad log p -- in physical
    units.

    ``shift``/``scale`` [D] are the rescaler's mean and standard deviation; log p_x = log p_y - Σ
    log σ.
    """

    def __init__(
        self,
        dim: int,
        layers: int,
        hidden: Sequence[int],
        shift: np.ndarray,
        scale: np.ndarray,
        lr: float,
        kind: str = "affine",
        bins: int = 8,
        bound: float = 5.0,
        seed: int = 0,
    ):
        self.flow = build_maf(dim, layers, hidden, kind, bins, bound, seed)
        self.optimizer = torch.optim.Adam(self.flow.parameters(), lr=lr)
        self.shift = torch.as_tensor(np.asarray(shift, np.float32))
        self.scale = torch.as_tensor(np.asarray(scale, np.float32))
        self.log_jacobian = -float(np.sum(np.log(scale)))

    def _log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.flow.log_prob((x - self.shift) / self.scale) + self.log_jacobian

    def train(self, batches: np.ndarray) -> float:
        """One Adam step per batch of ``batches`` [S, B, D] on -mean log p; returns the last
        loss."""
        self.flow.train()
        loss = torch.zeros(())
        for batch in torch.from_numpy(batches):
            self.optimizer.zero_grad(set_to_none=True)
            loss = -self._log_prob(batch).mean()
            loss.backward()
            self.optimizer.step()
        return float(loss)

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        """log p(x): [N] (no autograd graph)."""
        self.flow.eval()
        with torch.no_grad():
            return self._log_prob(torch.from_numpy(x)).numpy()

    def grad(self, x: np.ndarray) -> np.ndarray:
        """∂ log p / ∂x: [N, D] by autograd (rows independent, so the gradient of the sum)."""
        self.flow.eval()
        xt = torch.from_numpy(x).requires_grad_(True)
        (grad,) = torch.autograd.grad(self._log_prob(xt).sum(), xt)
        return grad.numpy()

    def sample(self, n: int) -> np.ndarray:
        """n draws [n, D] in physical units (nflows' Flow.sample: D passes per layer)."""
        self.flow.eval()
        with torch.no_grad():
            return (self.flow.sample(n) * self.scale + self.shift).numpy()
