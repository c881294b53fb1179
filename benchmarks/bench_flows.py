"""tfgalflow.model.Flow vs plain eager TFP vs PyTorch nflows vs FlowJAX: one MAF, one mock, one
run, one table.

The same architecture in every implementation -- 8 masked affine autoregressive layers with reverse
permutations between them, MADE networks of 2 x 64 hidden units (ReLU), standard-normal base, Adam
(lr 1e-3) on batches of 2048 -- fitted to the same exact isotropic Hernquist mock (6D positions and
velocities, G = M = a = 1, r < 20 a), and timed on the same points:

    tfgalflow       tfgalflow.model.Flow as the package runs it by default: Flow.adapt,
                    Flow.compile + one Keras ``fit`` epoch per timed call, with TrainConfig's
                    default jit_compile and steps_per_call (training.train's path), the public
                    ``log_prob`` / ``grad_log_prob`` / ``sample`` methods (by default XLA-compiled
                    on power-of-two row buckets: ``tfgalflow.density.row_bucket``);
    tfgalflow plain the same public methods with ``Flow(..., jit_compile=False)``: the plain
                    graphs (the default before XLA inference; "before" of the per-call table);
    tfgalflow XLA   training only: ``TrainConfig(jit_compile=True, steps_per_call=K)``:
                    ``compile(..., jit_compile=True)`` fed stacks of K batches [K, 2048, 6]
                    (K optimizer steps per compiled call, as training.train feeds them);
    TFP eager       the same TFP bijector chain (``tfgalflow.flows.build_bijector``, identical
                    initial weights) in a ``tfd.TransformedDistribution``, no tf.function:
                    GradientTape + Adam;
    nflows          nflows 0.14 (PyTorch): MaskedAffineAutoregressiveTransform x 8 +
                    ReversePermutation, hidden_features=64, num_blocks=1,
                    use_residual_blocks=False (= 2 hidden layers of 64; see
                    benchmarks/_nflows_model.py for why not nflows' default residual blocks);
    FlowJAX         FlowJAX 19 (JAX + Equinox): ``masked_autoregressive_flow`` (affine,
                    nn_width=64, nn_depth=2, flow_layers=8) + ``fit_to_data`` (Adam, batch 2048)
                    + ``eqx.filter_jit`` of log_prob / grad / sample: its user path;
    FlowJAX best    the same trained flow through plain ``jax.jit`` of partitioned arrays,
                    ``vmap(grad)`` for the gradient (benchmarks/_flowjax_model.py).

All compute log p in physical units (the rescaler's Jacobian included). Metrics: training samples/s
(optimizer steps on batches of 2048), log_prob points/s, sampling points/s, ∂ log p/∂x points/s.
Each timed call runs once as warm-up (tracing, XLA compilation; reported as "first call"), then
rounds call every implementation once, in an order rotated each round. The machine is shared: a
call counts only if other processes used at most ``--quiet`` cores while it ran
(their threads' run time from /proc/*/task/*/schedstat), because under load torch's OpenMP threads
slow down many-fold while TF's pool barely does; rounds go on until each implementation has
``--repeats`` quiet calls (if the ``--budget`` runs out first, the verdict is "inconclusive").
Figures are medians over the quiet calls (spread = (max - min) / median). Speed-ups over nflows:
the ratio of medians decides met / not met; beside it the paired ratio
(median over rounds of the within-round ratio, which cancels slow drifts that no process list
shows, e.g. host-level noise) and the ratio of the fastest calls.
Thread counts are fixed (``--threads``, default 2 = the machine's cores) for TF intra/inter-op and
torch intra/inter-op, and printed; JAX's CPU client runs one intra-op thread per core of the
process' CPU affinity (printed), and ``--threads 1`` sets
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`` for it.
Speed-ups over FlowJAX are checked against the targets of the XLA-inference issue at the bulk sizes
(training >= 2x FlowJAX's user path; log_prob, grad, sample >= 1x its best path), and the
per-call table compares the per-point cost at 2048 points with that at the bulk size (target:
within 2x for tfgalflow's default path; medians decide, the ratio of the fastest calls is printed
beside them: short calls suffer most from preemption on a shared machine). A package-side
variant is timed in the same rounds: XLA training with Keras' own ``steps_per_execution`` (one
batch per step function, the loop outside XLA) instead of stacks.
A "dense floor" -- only the 24 matmuls + bias + ReLU of the 8 MADEs, XLA-compiled in TF and plain
in torch -- bounds the log_prob speed a dense-matmul implementation can reach on this CPU in
float32; its training twin (the same matmuls forward and backward plus Adam, the same stacks of
steps per XLA call; a variant of the train row) bounds the training speed the same way. Every
implementation trains the same number of steps on the same batches; the
held-out -log p printed at the end checks that (tfgalflow and eager TFP start from identical
weights and must agree).

    .venv/bin/python benchmarks/bench_flows.py                # ~2 min on a quiet 2-core machine,
                                                              # <= ~9 busy
    .venv/bin/python benchmarks/bench_flows.py --quick        # ~45 s smoke run
                                                              # (fewer, smaller calls)
    .venv/bin/python benchmarks/bench_flows.py --kind spline  # the same for 8-bin spline MAFs
                                                              # (no targets)

Needs the ``bench`` extra: ``pip install torch==2.13.0`` (CPU wheel) then ``pip install nflows``
for the nflows column, ``pip install jax flowjax`` (CPU) for the FlowJAX columns; a column whose
packages are missing is skipped with a line saying so.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from typing import Any, Callable

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

#: Targets of the performance issue: tfgalflow throughput / nflows throughput.
TARGETS = {"train": 2.0, "log_prob": 8.0, "sample": 5.0, "grad": 3.0}
#: Targets of the XLA-inference issue at bulk sizes: (FlowJAX column, tfgalflow / it at least).
FLOWJAX_TARGETS = {"train": ("FlowJAX", 2.0), "log_prob": ("FlowJAX best", 1.0),
                   "sample": ("FlowJAX best", 1.0), "grad": ("FlowJAX best", 1.0)}
#: Target of the per-call table: per-point cost at one batch / at the bulk size, at most.
SMALL_CALL_TARGET = 2.0
UNITS = {"train": "samples/s", "log_prob": "points/s", "sample": "points/s", "grad": "points/s"}
LABELS = {"train": "train", "log_prob": "log_prob", "sample": "sample", "grad": "grad log p"}
IMPLS = ("tfgalflow", "tfgalflow plain", "tfgalflow XLA", "TFP eager", "nflows", "FlowJAX",
         "FlowJAX best")
# radial truncation of the mock in units of a (as scripts/train_shipped_model.py)
R_MAX = 20.0


# ---- data -------------------------------------------------------------------------------------

def hernquist_mock(n: int, seed: int) -> np.ndarray:
    """Exact isotropic Hernquist draws [n, 6] (x, v; G = M = a = 1, r < R_MAX):
    ``mocks.sample_hernquist``."""
    from tfgalflow.mocks import sample_hernquist

    return np.asarray(
        sample_hernquist(n, kind="iso", seed=seed, r_max=R_MAX).phase_space, np.float64
    )


# ---- timing -----------------------------------------------------------------------------------

def others_cpu_seconds() -> float:
    """CPU seconds of other processes so far (niced jobs counted too):
    ``_timing.others_cpu_seconds``."""
    from _timing import others_cpu_seconds as seconds
    return seconds(skip_niced=False)


def interleaved(fns: dict[str, Callable[[int], Any]], repeats: int, budget: float, quiet: float
                ) -> tuple[dict, dict, dict]:
    """Time each fn(round) round-robin, marking the calls during which the machine was quiet.

    Call 0 of each fn is the warm-up (tracing, compilation), reported separately. Then rounds call
    every fn once, in an order rotated by one per round. A call is *quiet* if other processes used
    at most ``quiet`` cores while it ran: under load torch's OpenMP threads slow down many-fold
    (spinning at barriers for a stolen core) while TF's thread pool barely does, which would fake
    large speed-ups. Rounds go on until every fn has ``repeats`` quiet calls -- at least
    ``repeats`` rounds, at most 4 x repeats, and no new round after ``budget`` seconds.

    Returns first-call seconds {name: s}, per-round seconds {name: [s | nan if not quiet]}
    (all calls, quiet or not, if some fn has fewer than min(3, repeats) quiet ones: then
    stats["reliable"] is False) and statistics.
    """
    names = list(fns)
    first = {}
    for name in names:
        t0 = time.perf_counter()
        fns[name](0)
        first[name] = time.perf_counter() - t0
    took: dict[str, list[float]] = {name: [] for name in names}
    calm: dict[str, list[bool]] = {name: [] for name in names}
    others = []
    deadline = time.perf_counter() + budget
    n_rounds = 0
    while min(sum(c) for c in calm.values()) < repeats and (n_rounds < repeats or (
            time.perf_counter() < deadline and n_rounds < 4 * repeats)):
        n_rounds += 1
        k = n_rounds % len(names)
        for name in names[k:] + names[:k]:
            c0 = others_cpu_seconds()
            t0 = time.perf_counter()
            fns[name](n_rounds)
            seconds = time.perf_counter() - t0
            others.append((others_cpu_seconds() - c0) / seconds)
            took[name].append(seconds)
            calm[name].append(others[-1] <= quiet)
    fewest = min(sum(c) for c in calm.values())
    reliable = fewest >= min(3, repeats)
    rounds = {
        name: [t if (c or not reliable) else math.nan for t, c in zip(took[name], calm[name])]
        for name in names
    }
    stats = {
        "rounds": n_rounds,
        "fewest_quiet": fewest,
        "reliable": reliable,
        "quiet_share": float(np.mean(np.asarray(others) <= quiet)),
        "others": statistics.median(others),
    }
    return first, rounds, stats


class Timing:
    """Throughput of one fn from its per-round seconds (nan = left out): median, best and
    spread."""

    def __init__(self, seconds: list[float], points: int, first: float):
        self.seconds = np.asarray(seconds)
        kept = self.seconds[np.isfinite(self.seconds)]
        self.rate = points / float(np.median(kept))
        self.best = points / float(kept.min())
        self.spread = float((kept.max() - kept.min()) / np.median(kept))
        self.first = first

    def paired_ratio(self, other: "Timing") -> float:
        """Median over the rounds where both were kept of (other's seconds / this one's): the
        speed-up over ``other`` with slow drifts of the machine (shared by both calls of a round)
        cancelled."""
        both = np.isfinite(self.seconds) & np.isfinite(other.seconds)
        return (
            float(np.median(other.seconds[both] / self.seconds[both])) if both.any() else math.nan
        )


def load() -> str:
    return "load avg (1/5/15 min) " + " / ".join(f"{v:.2f}" for v in os.getloadavg())


# ---- the implementations ----------------------------------------------------------------------

class TfgalflowBench:
    """tfgalflow.model.Flow through its public API (Keras fit for training)."""

    def __init__(
        self, cfg, x_train: np.ndarray, lr: float, jit: bool, steps_per_execution: int = 1
    ):
        import tf_keras as keras
        from tfgalflow.model import Flow

        self.flow = Flow(cfg, jit_compile=jit)
        self.flow.adapt(x_train)
        self.flow.compile(
            keras.optimizers.Adam(lr), jit_compile=jit, steps_per_execution=steps_per_execution
        )

    def train(self, dataset) -> float:
        history = self.flow.fit(dataset, epochs=1, verbose=0)
        return history.history["loss"][-1]

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        return self.flow.log_prob(x).numpy()

    def grad(self, x: np.ndarray) -> np.ndarray:
        return self.flow.grad_log_prob(x).numpy()

    def sample(self, n: int, seed: int) -> np.ndarray:
        return self.flow.sample(n, seed=seed).numpy()

    def plain_twin(self) -> "_Lazy":
        """The same public methods on a ``Flow(..., jit_compile=False)`` copy (the plain graphs),
        made with this flow's weights when first used (i.e. after training)."""
        made: list = []

        def make():
            if not made:
                from tfgalflow.model import Flow
                twin = TfgalflowBench.__new__(TfgalflowBench)
                twin.flow = Flow(self.flow.config, jit_compile=False)
                twin.flow.set_weights(self.flow.get_weights())
                made.append(twin)
            return made[0]
        return _Lazy(make)

    def xla_sampler(self) -> Callable[[int, int], np.ndarray]:
        """Variant: the public ``sample_stateless`` inside a ``tf.function(jit_compile=True)``
        (the package compiles log_prob/grad with XLA but never sampling)."""
        import tensorflow as tf

        fn = tf.function(
            lambda n, seed: self.flow.sample_stateless(n, seed),
            jit_compile=True,
            input_signature=[tf.TensorSpec([], tf.int32), tf.TensorSpec([2], tf.int64)],
        )
        return lambda n, seed: fn(
            tf.constant(n, tf.int32), tf.constant([seed, 0], tf.int64)
        ).numpy()


class EagerTFPBench:
    """The same TFP bijector chain in a TransformedDistribution, run eagerly (no tf.function)."""

    def __init__(self, cfg, shift: np.ndarray, scale: np.ndarray, lr: float):
        import tensorflow as tf
        import tensorflow_probability as tfp
        import tf_keras as keras
        from tfgalflow.flows import build_bijector

        tfd = tfp.distributions
        self.tf = tf
        self.chain = build_bijector(cfg)
        self.dist = tfd.TransformedDistribution(
            tfd.Sample(tfd.Normal(0.0, 1.0), [cfg.dim]), self.chain
        )
        self.shift = tf.constant(shift, tf.float32)
        self.scale = tf.constant(scale, tf.float32)
        self.log_jacobian = -float(np.sum(np.log(scale)))
        self.dist.log_prob(tf.zeros([1, cfg.dim]))          # creates the MADE variables
        self.variables = self.chain.trainable_variables
        self.optimizer = keras.optimizers.Adam(lr)

    def _log_prob(self, x):
        return self.dist.log_prob((x - self.shift) / self.scale) + self.log_jacobian

    def train(self, batches: np.ndarray) -> float:
        loss = None
        for batch in batches:
            with self.tf.GradientTape() as tape:
                loss = -self.tf.reduce_mean(self._log_prob(self.tf.constant(batch)))
            grads = tape.gradient(loss, self.variables)
            self.optimizer.apply_gradients(zip(grads, self.variables))
        return float(loss)

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        return self._log_prob(self.tf.constant(x)).numpy()

    def grad(self, x: np.ndarray) -> np.ndarray:
        xt = self.tf.constant(x)
        with self.tf.GradientTape() as tape:
            tape.watch(xt)
            lp = self._log_prob(xt)
        return tape.gradient(lp, xt).numpy()

    def sample(self, n: int, seed: int) -> np.ndarray:
        return (self.dist.sample(n, seed=seed) * self.scale + self.shift).numpy()


class DenseFloor:
    """Only the dense layers of the MADEs (D -> hidden -> params x D, ReLU) on [N, D]: a bound on
    log_prob time.

    Masked or not, a dense layer costs the same matmul, so an implementation that evaluates the
    MADEs as dense float32 matmuls (TFP, nflows, tfgalflow) cannot beat this on this CPU; its
    throughput over nflows' bounds the reachable log_prob ratio. (Only skipping the masked
    zeros -- about half the weights -- with block-sparse products by MADE degree could go below
    it.)
    """

    def __init__(
        self, dim: int, layers: int, hidden: tuple, params: int, framework: str, seed: int = 0
    ):
        rng = np.random.default_rng(seed)
        widths = [dim, *hidden, params * dim]
        self.dim = dim
        self.flops_per_point = 2 * layers * sum(a * b for a, b in zip(widths[:-1], widths[1:]))
        params = [
            [(rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32), np.zeros(b, np.float32)]
            for _ in range(layers)
            for a, b in zip(widths[:-1], widths[1:])
        ]
        n_dense = len(widths) - 1
        if framework == "tf":
            import tensorflow as tf
            weights = [[tf.constant(w), tf.constant(b)] for w, b in params]

            @tf.function(
                jit_compile=True, input_signature=[tf.TensorSpec([None, dim], tf.float32)]
            )
            def floor(x):
                h = x
                for i, (w, b) in enumerate(weights):
                    h = tf.matmul(x if i % n_dense == 0 else h, w) + b
                    if i % n_dense == n_dense - 1:
                        x = x - h[:, :dim]
                    else:
                        h = tf.nn.relu(h)
                return x

            self.run = lambda x: floor(x).numpy()
            self.train = _dense_train_floor(params, dim, n_dense)
        else:
            import torch
            weights = [[torch.from_numpy(w.T.copy()), torch.from_numpy(b)] for w, b in params]

            def floor(x):
                with torch.no_grad():
                    x = torch.from_numpy(x)
                    h = x
                    for i, (w, b) in enumerate(weights):
                        h = torch.nn.functional.linear(x if i % n_dense == 0 else h, w, b)
                        if i % n_dense == n_dense - 1:
                            x = x - h[:, :dim]
                        else:
                            h = torch.relu(h)
                    return x.numpy()

            self.run = floor


def _dense_train_floor(params: list, dim: int, n_dense: int) -> Callable[[Any], float]:
    """The training counterpart of the dense floor: per step the same matmuls forward, their
    backward pass and an Adam update of every weight and bias (hand-written, inside the XLA
    program), K steps per call in a ``tf.while_loop`` as tfgalflow's stacks; the loss is
    mean |z|² / 2 of the shift-only chain (no masks, no log-scale terms, no permutations, no
    Jacobian). A dense float32 MAF trainer cannot take its steps faster on this CPU.
    Returns train(dataset of [K, B, D] stacks) -> last loss.
    """
    import tensorflow as tf
    weights = [tf.Variable(a) for pair in params for a in pair]
    moments = [(tf.Variable(tf.zeros_like(w)), tf.Variable(tf.zeros_like(w))) for w in weights]
    lr, b1, b2, eps = 1e-3, 0.9, 0.999, 1e-7

    def forward(x):
        h = x
        for i in range(len(weights) // 2):
            h = tf.matmul(x if i % n_dense == 0 else h, weights[2 * i]) + weights[2 * i + 1]
            if i % n_dense == n_dense - 1:
                x = x - h[:, :dim]
            else:
                h = tf.nn.relu(h)
        return 0.5 * tf.reduce_mean(tf.reduce_sum(x * x, axis=1))

    @tf.function(jit_compile=True)
    def steps(stack):
        def body(k, loss):
            with tf.GradientTape() as tape:
                loss = forward(stack[k])
            for w, g, (m, v) in zip(weights, tape.gradient(loss, weights), moments):
                m.assign(b1 * m + (1 - b1) * g)
                v.assign(b2 * v + (1 - b2) * g * g)
                w.assign_sub(lr * m / (tf.sqrt(v) + eps))
            return k + 1, loss
        return tf.while_loop(lambda k, loss: k < tf.shape(stack)[0], body,
                             (tf.constant(0), tf.constant(0.0)), parallel_iterations=1)[1]

    def train(dataset) -> float:
        loss = 0.0
        for stack in dataset:
            loss = float(steps(tf.cast(stack, tf.float32)))
        return loss

    return train


# ---- the benchmark ----------------------------------------------------------------------------

def configure_threads(threads: int):
    """TF and torch thread pools (torch None when it is not installed)."""
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    try:
        import torch
    except ImportError:
        return tf, None
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(threads)
    return tf, torch


def configure_jax(threads: int) -> str | None:
    """Pin JAX's CPU threads (before importing it) and describe them; None without jax/flowjax.

    XLA's CPU client sizes its intra-op pool from the process' CPU affinity; only one thread can
    be forced through flags (``--xla_cpu_multi_thread_eigen=false
    intra_op_parallelism_threads=1``).
    """
    if threads == 1:
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        import flowjax  # noqa: F401
        import jax
    except ImportError as exc:
        print(f"FlowJAX columns skipped: {exc} (pip install jax flowjax)")
        return None
    from _flowjax_model import flowjax_versions
    cores = len(os.sched_getaffinity(0))
    pool = 1 if threads == 1 else cores
    note = "" if pool == threads else f" (cannot pin JAX to {threads}: XLA uses the affinity)"
    versions = ", ".join(f"{k} {v}" for k, v in flowjax_versions().items())
    return (f"{versions} on {jax.default_backend()}; XLA intra-op threads {pool}{note}; "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


def label(key: tuple[str, int]) -> str:
    metric, points = key
    return (
        f"{LABELS[metric]} ({points // 2048} x 2048)"
        if metric == "train"
        else f"{LABELS[metric]} {points}"
    )


def fmt_rate(v: float) -> str:
    return f"{v / 1e6:.3f} M" if v >= 1e5 else f"{v / 1e3:.1f} k"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="~1 minute smoke run: fewer and smaller calls"
    )
    p.add_argument("--repeats", type=int, help="timed rounds per metric (default 7; --quick 3)")
    p.add_argument(
        "--steps", type=int, help="optimizer steps per timed training call (default 32; --quick 8)"
    )
    p.add_argument(
        "--steps-per-call",
        type=int,
        default=16,
        help="K of the 'tfgalflow XLA' row: optimizer steps per compiled call (default 16)",
    )
    p.add_argument(
        "--n-eval", type=int, help="points per log_prob / grad call (default 20480; --quick 8192)"
    )
    p.add_argument(
        "--n-sample", type=int, help="points per sample call (default 16384; --quick 4096)"
    )
    p.add_argument("--batch", type=int, default=2048, help="training batch size (issue: 2048)")
    p.add_argument(
        "--threads", type=int, default=2, help="TF intra/inter-op and torch threads (default 2)"
    )
    p.add_argument(
        "--budget",
        type=float,
        help="seconds of timed rounds, all metrics (default 420; --quick 20)",
    )
    p.add_argument(
        "--quiet",
        type=float,
        default=0.1,
        help="a call counts if other processes used at most this many cores meanwhile (0.1)",
    )
    p.add_argument(
        "--kind",
        choices=["affine", "spline"],
        default="affine",
        help="affine MAF (the issue's comparison, default) or rational-quadratic spline MAF "
        "(8 bins)",
    )
    p.add_argument(
        "--no-eager", action="store_true", help="skip the (slow) plain eager TFP column"
    )
    args = p.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    steps = args.steps or (8 if args.quick else 32)
    n_eval = args.n_eval or (8192 if args.quick else 20480)
    n_sample = args.n_sample or (4096 if args.quick else 16384)
    budget = args.budget if args.budget is not None else (20.0 if args.quick else 420.0)
    lr, seed = 1e-3, 0
    t_start = time.perf_counter()
    print(f"bench_flows: {load()} at start")

    jax_info = configure_jax(args.threads) if args.kind == "affine" else None
    tf, torch = configure_threads(args.threads)
    from tfgalflow.flows import FlowConfig
    nflows = None
    if torch is not None:
        try:
            import nflows
        except ImportError:
            pass
    if nflows is None:
        print("nflows column skipped: torch / nflows not installed (the bench extra: "
              "pip install torch==2.13.0 nflows)")
    if jax_info is None and args.kind != "affine":
        print("FlowJAX columns skipped: the spline comparison has no FlowJAX counterpart here")

    cfg = FlowConfig(dim=6, layers=8, hidden=(64, 64), kind=args.kind, seed=seed)
    torch_text = (
        f"torch {torch.__version__} (intra-op {torch.get_num_threads()}, inter-op "
        f"{torch.get_num_interop_threads()} threads); nflows "
        f"{getattr(nflows, '__version__', '0.14')}; " if nflows is not None else ""
    )
    print(
        f"TensorFlow {tf.__version__} (intra-op "
        f"{tf.config.threading.get_intra_op_parallelism_threads()}, "
        f"inter-op {tf.config.threading.get_inter_op_parallelism_threads()} threads); "
        f"{torch_text}cores {os.cpu_count()}"
    )
    if jax_info:
        print(f"JAX: {jax_info}")

    # data: train rows for the batches, held-out rows for evaluation
    # warm-up + the most rounds interleaved() may run
    n_batches = (4 * repeats + 1) * steps
    n_train = 32 * args.batch
    w = hernquist_mock(n_train + n_eval, seed=1)
    x_train, x_eval = w[:n_train].astype(np.float32), w[n_train:].astype(np.float32)
    order = np.concatenate([np.random.default_rng(2).permutation(n_train)
                            for _ in range(-(-n_batches * args.batch // n_train))])
    batches = x_train[order[:n_batches * args.batch]].reshape(n_batches, args.batch, cfg.dim)
    print(
        f"data: {n_train} + {n_eval} held-out 6D points of the isotropic Hernquist model (r < "
        f"{R_MAX:g} a) "
        f"from tfgalflow.mocks.sample_hernquist"
    )
    print(
        f"model: {cfg.layers} {cfg.kind} MAF layers, MADE hidden {cfg.hidden}, reverse "
        "permutations, batch "
        f"{args.batch}; timed calls: {steps} train steps, log_prob/grad on {args.batch} and "
        f"{n_eval} points, "
        f"{args.batch} and {n_sample} samples; 1 warm-up + {repeats} quiet calls each"
    )

    from tfgalflow.training import TrainConfig
    defaults = TrainConfig()
    impls: dict[str, Any] = {
        "tfgalflow": TfgalflowBench(cfg, x_train, lr, jit=defaults.jit_compile),
        "tfgalflow XLA": TfgalflowBench(cfg, x_train, lr, jit=True),
    }
    # the plain-graph public methods (Flow(jit_compile=False)) on the default flow's weights
    plain = impls["tfgalflow"].plain_twin()
    stack = {"tfgalflow": defaults.steps_per_call, "tfgalflow XLA": args.steps_per_call}
    print(
        f"training: 'tfgalflow' = TrainConfig defaults (jit_compile={defaults.jit_compile}, "
        "steps_per_call="
        f"{defaults.steps_per_call}); 'tfgalflow XLA' = jit_compile=True, "
        f"steps_per_call={args.steps_per_call}"
    )
    flow = impls["tfgalflow"].flow
    shift, scale = flow.x_shift.numpy(), flow.x_scale.numpy()
    if not args.no_eager:
        impls["TFP eager"] = EagerTFPBench(cfg, shift, scale, lr)
    made = flow.bijector.bijectors[0].transform.network
    tfp_shapes = [tuple(v.shape) for v in made.trainable_variables if len(v.shape) == 2]
    if nflows is not None:
        from _nflows_model import NflowsBench, dense_shapes
        impls["nflows"] = NflowsBench(
            cfg.dim,
            cfg.layers,
            cfg.hidden,
            shift,
            scale,
            lr,
            cfg.kind,
            cfg.bins,
            cfg.spline_range,
            seed,
        )
        print(f"dense shapes per MADE: nflows {dense_shapes(impls['nflows'].flow)[:3]}, "
              f"tfgalflow/TFP {tfp_shapes}")
    if jax_info:
        from _flowjax_model import FlowjaxBench
        impls["FlowJAX"] = FlowjaxBench(cfg.dim, cfg.layers, cfg.hidden, shift, scale, lr,
                                        args.batch, seed)
        leaves = [leaf.shape for leaf in impls["FlowJAX"].jax.tree_util.tree_leaves(
            impls["FlowJAX"].flow) if len(getattr(leaf, "shape", ())) == 3]
        print(f"FlowJAX stacked MADE weights (layers first): {leaves[:3]}")

    # consistency: same seed -> same initial weights, so tfgalflow and eager TFP agree before
    # training
    probe = x_eval[:1024]
    if "TFP eager" in impls:
        diff = np.max(
            np.abs(impls["tfgalflow"].log_prob(probe) - impls["TFP eager"].log_prob(probe))
        )
        print(
            f"check: max |log p_tfgalflow - log p_TFP eager| at initialisation = {diff:.2e} (same "
            "weights)"
        )

    datasets = [tf.data.Dataset.from_tensor_slices(batches[r * steps:(r + 1) * steps])
                for r in range(4 * repeats + 1)]

    def stacked(k: int) -> list:
        """The same batches as stacks [k, B, D] (what training.train feeds with
        steps_per_call = k)."""
        return datasets if k == 1 else [d.batch(k) for d in datasets]

    def train_fn(name):
        impl = impls[name]
        if name.startswith("tfgalflow"):
            feeds = stacked(stack[name])
            return lambda r: impl.train(feeds[r])
        return lambda r: impl.train(batches[r * steps:(r + 1) * steps])

    # evaluated implementations: "tfgalflow XLA" trains differently but evaluates like the
    # default, so it is left out of the evaluation groups; FlowJAX best = the trained FlowJAX flow
    # through its best path (rebuilt after training)
    evaluated: dict[str, Any] = {"tfgalflow": impls["tfgalflow"], "tfgalflow plain": plain}
    evaluated.update({k: v for k, v in impls.items() if not k.startswith("tfgalflow")})
    if "FlowJAX" in impls:
        evaluated["FlowJAX best"] = _Lazy(impls["FlowJAX"].best)

    # groups timed together: (metric, points per call) -> {name: fn(round)}; evaluation at one
    # batch (per-call overheads count) and in bulk (throughput)
    sizes = {
        "log_prob": (args.batch, n_eval),
        "grad": (args.batch, n_eval),
        "sample": (args.batch, n_sample),
    }
    evaluators = {
        "log_prob": lambda impl, n: (lambda r: impl.log_prob(x_eval[:n])),
        "grad": lambda impl, n: (lambda r: impl.grad(x_eval[:n])),
        "sample": lambda impl, n: ((lambda r: impl.sample(n)) if impl is impls.get("nflows")
                                   else (lambda r: impl.sample(n, seed=100 + r))),
    }
    groups: dict[tuple[str, int], dict[str, Callable]] = {
        ("train", steps * args.batch): {name: train_fn(name) for name in impls}}
    for metric in ("log_prob", "sample", "grad"):
        for n in sizes[metric]:
            groups[(metric, n)] = {
                name: evaluators[metric](impl, n) for name, impl in evaluated.items()
            }

    # variants (package-side changes) and the dense floor, timed in the same rounds as their group
    spe = TfgalflowBench(cfg, x_train, lr, jit=True, steps_per_execution=steps)
    variants = {
        ("train", steps * args.batch): {
            "XLA + Keras steps_per_execution": lambda r: spe.train(datasets[r])
        },
    }
    floors = {"floor TF XLA": DenseFloor(cfg.dim, cfg.layers, cfg.hidden, cfg.params_per_dim,
                                         "tf")}
    feeds = stacked(stack["tfgalflow"])
    variants[("train", steps * args.batch)]["dense floor (matmuls + Adam)"] = (
        lambda r: floors["floor TF XLA"].train(feeds[r]))
    if torch is not None:
        floors["floor torch"] = DenseFloor(cfg.dim, cfg.layers, cfg.hidden, cfg.params_per_dim,
                                           "torch")
    for key, fns in variants.items():
        groups[key].update(fns)
    for n in sizes["log_prob"]:
        groups[("log_prob", n)].update(
            {name: (lambda r, f=f, n=n: f.run(x_eval[:n])) for name, f in floors.items()}
        )

    results: dict[tuple[str, int], dict[str, Timing]] = {}
    rounds: dict[tuple[str, int], dict] = {}
    n_eval_groups = len(groups) - 1
    for key, fns in groups.items():
        metric, points = key
        share = 0.4 if metric == "train" else 0.6 / n_eval_groups
        t0 = time.perf_counter()
        first, times, rounds[key] = interleaved(fns, repeats, share * budget, args.quiet)
        results[key] = {name: Timing(t, points, first[name]) for name, t in times.items()}
        st = rounds[key]
        print(
            f"  timed {label(key):<18} in {time.perf_counter() - t0:5.1f} s: {st['rounds']} "
            "rounds, "
            f"{st['quiet_share']:.0%} of calls quiet (others <= {args.quiet:g} cores; median "
            "others "
            f"{st['others']:.2f}), >= {st['fewest_quiet']} quiet calls each"
            + ("" if st["reliable"] else " -- too few: all calls used, verdict inconclusive")
            + f"; {load()}"
        )

    report(results, rounds, variants, floors, sizes, cfg, names=[
        n for n in IMPLS if any(n in row for row in results.values())])

    # sanity: every implementation trained the same number of steps on the same batches
    train_rounds = rounds[("train", steps * args.batch)]["rounds"]
    print(
        f"\nHeld-out mean -log p (physical units) after {(train_rounds + 1) * steps} steps on the "
        "same batches "
        f"(tfgalflow and TFP eager start from identical weights):"
    )
    print("  " + ", ".join(f"{n} {-np.mean(impl.log_prob(x_eval)):.4f}"
                           for n, impl in evaluated.items()))
    print(f"\n{load()} at end; total {time.perf_counter() - t_start:.0f} s")


def _cell(row: dict, name: str, text: Callable[["Timing"], str]) -> str:
    return text(row[name]) if name in row else "-"


def report(results: dict, rounds: dict, variants: dict, floors: dict, sizes: dict, cfg,
           names: list[str]) -> None:
    """Print the throughput table, first calls, speed-ups (nflows, FlowJAX), the per-call table,
    the variants and the dense floor."""
    print("\nThroughput (median over the quiet calls; ± = (max - min)/median)")
    print(f"{'operation':<20}{'unit':<11}" + "".join(f"{n:>17}" for n in names))
    for key, row in results.items():
        print(f"{label(key):<20}{UNITS[key[0]]:<11}" + "".join(
            f"{_cell(row, n, lambda t: fmt_rate(t.rate) + f' ±{t.spread:.0%}'):>17}"
            for n in names))
    print("First call (s: warm-up incl. tracing / XLA compilation)")
    for key, row in results.items():
        print(f"{label(key):<31}" + "".join(
            f"{_cell(row, n, lambda t: f'{t.first:.2f}'):>17}" for n in names))

    tf_names = [n for n in names if n.startswith("tfgalflow")]
    for base_name in ("nflows", "FlowJAX", "FlowJAX best"):
        if base_name not in names:
            continue
        print(
            f"\nSpeed-up over {base_name} (median = ratio of the medians, decides met / not met; "
            "paired = median over rounds of the within-round ratio; best = ratio of the fastest "
            "calls)"
        )
        print(f"{'operation':<20}{'target':<8}{'':<8}" + "".join(f"{n:>24}" for n in tf_names))
        for key, row in results.items():
            if base_name not in row:
                continue
            metric, points = key
            base = row[base_name]
            if base_name == "nflows":
                goal = TARGETS[metric] if cfg.kind == "affine" else None
            else:
                flowjax_name, ratio_goal = FLOWJAX_TARGETS[metric]
                bulk = points == max(sizes[metric]) if metric in sizes else True
                goal = ratio_goal if flowjax_name == base_name and bulk else None
            cells: dict[str, list[str]] = {"median": [], "paired": [], "best": []}
            for n in tf_names:
                if n not in row:
                    for texts in cells.values():
                        texts.append("-")
                    continue
                ratio = row[n].rate / base.rate
                verdict = ""
                if goal is not None:
                    verdict = ((" met" if ratio >= goal else " not met")
                               if rounds[key]["reliable"] else " inconclusive")
                cells["median"].append(f"{ratio:.2f}x{verdict}")
                cells["paired"].append(f"{row[n].paired_ratio(base):.2f}x")
                cells["best"].append(f"{row[n].best / base.best:.2f}x")
            target = f">= {goal:g}x" if goal is not None else ""
            for i, (kind, texts) in enumerate(cells.items()):
                print(f"{label(key) if i == 0 else '':<20}{target if i == 0 else '':<8}{kind:<8}"
                      + "".join(f"{c:>24}" for c in texts))

    print(
        f"\nPer-call cost: µs per point at one batch vs at the bulk size (medians; target for "
        f"tfgalflow: at most {SMALL_CALL_TARGET:g}x the bulk cost per point)"
    )
    print(f"{'operation':<12}{'':<14}" + "".join(f"{n:>17}" for n in names))
    for metric in ("log_prob", "grad", "sample"):
        small, bulk = (results[(metric, n)] for n in sizes[metric])
        lines = {f"{min(sizes[metric])} pts": small, f"{max(sizes[metric])} pts": bulk}
        for i, (what, row) in enumerate(lines.items()):
            print(f"{LABELS[metric] if i == 0 else '':<12}{what:<14}" + "".join(
                f"{_cell(row, n, lambda t: f'{1e6 / t.rate:.3f}'):>17}" for n in names))
        cells = []
        for n in names:
            if n not in small or n not in bulk:
                cells.append("-")
                continue
            ratio = bulk[n].rate / small[n].rate
            verdict = ""
            if n == "tfgalflow":
                reliable = rounds[(metric, min(sizes[metric]))]["reliable"] and \
                    rounds[(metric, max(sizes[metric]))]["reliable"]
                verdict = ((" met" if ratio <= SMALL_CALL_TARGET else " not met")
                           if reliable else " inconcl.")
            cells.append(f"{ratio:.2f}x{verdict}")
        print(f"{'':<12}{'small / bulk':<14}" + "".join(f"{c:>17}" for c in cells))
        # the same ratio from the fastest call of each size: a call's cost when it was not
        # preempted (a 3 ms call that loses one scheduler slice to another process doubles)
        fastest = [f"{bulk[n].best / small[n].best:.2f}x" if n in small and n in bulk else "-"
                   for n in names]
        print(f"{'':<12}{'  fastest':<14}" + "".join(f"{c:>17}" for c in fastest))

    print("\nVariants (timed in the same rounds as their operation)")
    for key, group in variants.items():
        reference = results[key]["tfgalflow XLA"]
        for name in group:
            t = results[key][name]
            versus = "".join(f", {t.rate / results[key][base].rate:.2f}x {base}"
                             for base in ("nflows", "FlowJAX") if base in results[key])
            print(
                f"  {label(key):<18}{name:<35}{fmt_rate(t.rate):>9} {UNITS[key[0]]} "
                f"±{t.spread:.0%}: "
                f"{t.paired_ratio(reference):.2f}x tfgalflow XLA (paired){versus}; "
                f"first call {t.first:.2f} s"
            )

    flops = floors["floor TF XLA"].flops_per_point
    print(
        f"\nDense floor for log_prob ({flops} flop/point: the MADE matmuls alone, no "
        "masks/affine/permutations)"
    )
    for n in sizes["log_prob"]:
        lp = results[("log_prob", n)]
        floor = max(lp[name].rate for name in floors)
        shown = [name for name in (*floors, "tfgalflow", "nflows", "FlowJAX best") if name in lp]
        print(
            f"  {n} points: "
            + ", ".join(
                f"{name} {fmt_rate(lp[name].rate)}/s = {lp[name].rate * flops / 1e9:.0f} GFLOP/s"
                for name in shown
            )
        )
        print(f"    -> tfgalflow runs at {lp['tfgalflow'].rate / floor:.0%} of the faster floor"
              + (f", which is {floor / lp['nflows'].rate:.1f}x nflows" if "nflows" in lp else ""))


class _Lazy:
    """Attribute reads forwarded to ``make()`` (made on first use: e.g. after training)."""

    def __init__(self, make: Callable[[], Any]):
        self._make = make

    def __getattr__(self, name: str) -> Any:
        return getattr(self._make(), name)


if __name__ == "__main__":
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
