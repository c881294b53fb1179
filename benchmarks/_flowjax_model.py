"""FlowJAX (JAX + Equinox) side of benchmarks/bench_flows.py: the same 8-layer 2 x 64 affine MAF.

Two ways to run one trained FlowJAX flow:

    user path   what FlowJAX's documentation shows: ``flowjax.flows.masked_autoregressive_flow``
                (affine transformer, nn_width=64, nn_depth=2, flow_layers=8, N(0, I) base),
                ``flowjax.train.fit_to_data`` (Adam, batch 2048), and ``eqx.filter_jit`` of
                ``flow.log_prob``, of ``jax.grad`` of the summed log p, and of ``flow.sample``;
    best path   the same flow split once into arrays and static structure
                (``eqx.partition``), so each call is a plain ``jax.jit`` of a function of
                (arrays, x) -- no per-call pytree flattening or filtering of the whole flow --
                with the rescaling folded in, the gradient as ``vmap(grad)`` of the one-row log p,
                and sampling from a key array with a static row count (one compilation per n, as
                FlowJAX's own ``sample`` does).

log p is in physical units: the data are standardised with the same shift and scale as tfgalflow's
rescaler and log p gets the same Jacobian, -Σ_j log σ_j. JAX runs on the CPU in float32; buffer
donation is not implemented for CPU, so neither path donates.
"""
from __future__ import annotations

from typing import Any

import numpy as np


class FlowjaxBench:
    """One FlowJAX MAF (the issue's architecture), trained and evaluated through its public API."""

    def __init__(self, dim: int, layers: int, hidden: tuple, shift: np.ndarray,
                 scale: np.ndarray, lr: float, batch: int, seed: int = 0):
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import optax
        from flowjax.distributions import Normal
        from flowjax.flows import masked_autoregressive_flow

        if len(set(hidden)) != 1:
            raise ValueError(f"FlowJAX MADEs have equal hidden widths; got {hidden}")
        self.jax, self.jnp, self.eqx = jax, jnp, eqx
        self.flow = masked_autoregressive_flow(
            jax.random.key(seed), base_dist=Normal(jnp.zeros(dim)), flow_layers=layers,
            nn_width=hidden[0], nn_depth=len(hidden))
        self.batch = batch
        self.shift = jnp.asarray(shift, jnp.float32)
        self.scale = jnp.asarray(scale, jnp.float32)
        self.log_jacobian = -float(np.sum(np.log(scale)))
        # one optimizer object for every fit_to_data call: fit_to_data's jitted step takes it as
        # a static argument, so a new optax.adam per call would recompile the step each time
        self.optimizer = optax.adam(lr)
        from flowjax.train.losses import MaximumLikelihoodLoss
        self.loss = MaximumLikelihoodLoss()
        self.key = jax.random.key(seed + 1)
        self._user_functions()

    # -- user path ------------------------------------------------------------------------------
    def _user_functions(self) -> None:
        eqx, jax = self.eqx, self.jax
        shift, scale, log_jacobian = self.shift, self.scale, self.log_jacobian

        def log_prob(flow, x):
            return flow.log_prob((x - shift) / scale) + log_jacobian

        self._user_log_prob = eqx.filter_jit(log_prob)
        self._user_grad = eqx.filter_jit(jax.grad(lambda x, flow: log_prob(flow, x).sum()))
        self._user_sample = eqx.filter_jit(
            lambda flow, key, n: flow.sample(key, (n,)) * scale + shift)
        self._best = None

    def train(self, batches: np.ndarray) -> float:
        """One ``fit_to_data`` epoch: S optimizer steps on the S batches [S, B, D].

        ``fit_to_data`` always holds out a validation share (it divides by the validation batch
        count), so it gets the S batches plus the first one again as the held-out batch
        (val_prop = 1/(S+1)): it trains on S·B rows (in its own shuffled order) and evaluates one
        batch, as a user's epoch does.
        """
        from flowjax.train import fit_to_data

        batches = np.asarray(batches)
        rows = np.concatenate([batches.reshape(-1, batches.shape[-1]), batches[0]])
        x = (rows - np.asarray(self.shift)) / np.asarray(self.scale)
        self.key, key = self.jax.random.split(self.key)
        self.flow, losses = fit_to_data(
            key, self.flow, x, optimizer=self.optimizer, loss_fn=self.loss, max_epochs=1,
            batch_size=self.batch, val_prop=1.0 / (len(batches) + 1), return_best=False,
            show_progress=False)
        self._best = None                                      # the arrays changed
        return float(losses["train"][-1])

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._user_log_prob(self.flow, x))

    def grad(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._user_grad(x, self.flow))

    def sample(self, n: int, seed: int) -> np.ndarray:
        return np.asarray(self._user_sample(self.flow, self.jax.random.key(seed), n))

    # -- best path ------------------------------------------------------------------------------
    def best(self) -> "FlowjaxBest":
        """The best path for the current weights (rebuilt after training)."""
        if self._best is None:
            self._best = FlowjaxBest(self)
        return self._best


class FlowjaxBest:
    """Plain ``jax.jit`` functions of (arrays, inputs) over a partitioned flow."""

    def __init__(self, bench: FlowjaxBench):
        eqx, jax = bench.eqx, bench.jax
        params, static = eqx.partition(bench.flow, eqx.is_array)
        shift, scale, log_jacobian = bench.shift, bench.scale, bench.log_jacobian
        self.params, self.jax = params, jax

        def one_log_prob(p, x):                       # x [D] -> scalar
            flow = eqx.combine(p, static)
            return flow._log_prob((x - shift) / scale) + log_jacobian   # one row, no vectorize

        self._log_prob = jax.jit(jax.vmap(one_log_prob, in_axes=(None, 0)))
        self._grad = jax.jit(jax.vmap(jax.grad(one_log_prob, argnums=1), in_axes=(None, 0)))

        def sample(p, key, n):
            flow = eqx.combine(p, static)
            keys = jax.random.split(key, n)
            return jax.vmap(flow._sample)(keys) * scale + shift

        self._sample = jax.jit(sample, static_argnums=2)

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._log_prob(self.params, x))

    def grad(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._grad(self.params, x))

    def sample(self, n: int, seed: int) -> np.ndarray:
        return np.asarray(self._sample(self.params, self.jax.random.key(seed), n))


def flowjax_versions() -> dict[str, Any]:
    """{package: version} of JAX, jaxlib, Equinox and FlowJAX."""
    from importlib.metadata import version
    return {name: version(name) for name in ("jax", "jaxlib", "equinox", "flowjax")}
