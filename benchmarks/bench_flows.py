"""tfgalflow.model.Flow vs plain eager TFP vs PyTorch nflows: one MAF, one mock, one run, one table.

The same architecture in every implementation -- 8 masked affine autoregressive layers with reverse
permutations between them, MADE networks of 2 x 64 hidden units (ReLU), standard-normal base, Adam
(lr 1e-3) on batches of 2048 -- fitted to the same exact isotropic Hernquist mock (6D positions and
velocities, G = M = a = 1, r < 20 a), and timed on the same points:

    tfgalflow       tfgalflow.model.Flow as the package runs it: Flow.adapt, Flow.compile + one Keras
                    ``fit`` epoch per timed call (training.train's path, jit_compile=False is its
                    default), the traced ``log_prob`` / ``grad_log_prob`` / ``sample`` public methods;
    tfgalflow XLA   the same with ``Flow(..., jit_compile=True)`` and ``compile(..., jit_compile=True)``
                    (the package never XLA-compiles sampling, so that row re-measures the same code);
    TFP eager       the same TFP bijector chain (``tfgalflow.flows.build_bijector``, identical initial
                    weights) in a ``tfd.TransformedDistribution``, no tf.function: GradientTape + Adam;
    nflows          nflows 0.14 (PyTorch): MaskedAffineAutoregressiveTransform x 8 + ReversePermutation,
                    hidden_features=64, num_blocks=1, use_residual_blocks=False (= 2 hidden layers of 64;
                    see benchmarks/_nflows_model.py for why not nflows' default residual blocks).

All compute log p in physical units (the rescaler's Jacobian included). Metrics: training samples/s
(optimizer steps on batches of 2048), log_prob points/s, sampling points/s, ∂ log p/∂x points/s. Each
timed call runs once as warm-up (tracing, XLA compilation; reported as "first call"), then rounds call
every implementation once, in an order rotated each round. The machine is shared: a call counts only if
other processes used at most ``--quiet`` cores while it ran (their threads' run time from
/proc/*/task/*/schedstat), because under load torch's OpenMP threads slow down many-fold while TF's pool
barely does; rounds go on until each implementation has ``--repeats`` quiet calls (if the ``--budget``
runs out first, the verdict is "inconclusive"). Figures are medians over the quiet calls (spread =
(max - min) / median); ratios are against nflows timed in the same rounds.
Thread counts are fixed (``--threads``, default 2 = the machine's cores) for TF intra/inter-op and torch
intra/inter-op, and printed. Two package-side variants are timed in the same rounds (XLA training with
``steps_per_execution``; XLA-compiled sampling).
A "dense floor" -- only the 24 matmuls + bias + ReLU of the 8 MADEs, XLA-compiled in TF and plain in
torch -- bounds the log_prob speed any implementation can reach on this CPU in float32.

    .venv/bin/python benchmarks/bench_flows.py            # ~5-8 min on 2 cores
    .venv/bin/python benchmarks/bench_flows.py --quick    # ~1 min smoke run (fewer, smaller calls)

Needs the ``bench`` extra: ``pip install torch==2.13.0`` (CPU wheel) then ``pip install nflows``.
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
UNITS = {"train": "samples/s", "log_prob": "points/s", "sample": "points/s", "grad": "points/s"}
LABELS = {"train": "train", "log_prob": "log_prob", "sample": "sample", "grad": "grad log p"}
IMPLS = ("tfgalflow", "tfgalflow XLA", "TFP eager", "nflows")
#: Share of the timing budget (--budget seconds) each metric may use for extra rounds on a busy machine.
BUDGET_SHARE = {"train": 0.55, "log_prob": 0.15, "grad": 0.15, "sample": 0.15}
R_MAX = 20.0        # radial truncation of the mock in units of a (as scripts/train_shipped_model.py)


# ---- data -------------------------------------------------------------------------------------

def hernquist_mock(n: int, seed: int) -> tuple[np.ndarray, str]:
    """Exact isotropic Hernquist draws [n, 6] (G = M = a = 1, r < R_MAX) and where they came from.

    Uses ``tfgalflow.mocks.sample_hernquist`` when the package has it. Otherwise (temporary, until
    mocks.py lands) the same exact sampler inline: r by inverting M(<r)/M = r^2/(r+1)^2 on r < R_MAX;
    q = |v|/v_esc by rejection from the proposal p(q) ∝ q^2 with acceptance f(Ψ(1-q^2))/f(Ψ) (f(E)
    increases with E, Hernquist 1990 eq. 17); isotropic directions for x and v.
    """
    from tfgalflow.hernquist import Hernquist

    model = Hernquist()
    try:
        from tfgalflow.mocks import sample_hernquist
    except ImportError:
        pass
    else:
        cat = sample_hernquist(n, kind="iso", seed=seed, model=model, r_max=R_MAX)
        return np.asarray(cat.phase_space, np.float64), "tfgalflow.mocks.sample_hernquist"
    rng = np.random.default_rng(seed)
    s = np.sqrt(rng.uniform(0.0, (R_MAX / (R_MAX + 1.0)) ** 2, n))
    r = s / (1.0 - s)
    psi = model.relative_potential(r)
    q = np.empty(n)
    todo = np.arange(n)
    while todo.size:
        trial = rng.uniform(size=todo.size) ** (1.0 / 3.0)
        accept = rng.uniform(size=todo.size) * model.f_iso(psi[todo]) < model.f_iso(psi[todo] * (1 - trial**2))
        q[todo[accept]] = trial[accept]
        todo = todo[~accept]

    def directions() -> np.ndarray:
        u = rng.normal(size=(n, 3))
        return u / np.linalg.norm(u, axis=1, keepdims=True)

    w = np.concatenate([r[:, None] * directions(), (q * np.sqrt(2.0 * psi))[:, None] * directions()], axis=1)
    return w, "inline exact sampler (tfgalflow.mocks not available yet)"


# ---- timing -----------------------------------------------------------------------------------

def others_cpu_seconds() -> float:
    """CPU seconds run so far by every thread of every *other* process (/proc/*/task/*/schedstat, ns).

    Nanosecond resolution, unlike /proc/stat's 10 ms ticks, so single calls of ~20 ms can be judged.
    Threads that start and end between two reads are missed (an underestimate).
    """
    own = str(os.getpid())
    total = 0
    for proc in os.scandir("/proc"):
        if not proc.name.isdigit() or proc.name == own:
            continue
        try:
            for task in os.scandir(f"/proc/{proc.name}/task"):
                with open(f"/proc/{proc.name}/task/{task.name}/schedstat") as f:
                    total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total * 1e-9


def interleaved(fns: dict[str, Callable[[int], Any]], repeats: int, budget: float, quiet: float
                ) -> tuple[dict, dict, dict]:
    """Time each fn(round) round-robin, marking the calls during which the machine was quiet.

    Call 0 of each fn is the warm-up (tracing, compilation), reported separately. Then rounds call
    every fn once, in an order rotated by one per round. A call is *quiet* if other processes used at
    most ``quiet`` cores while it ran: under load torch's OpenMP threads slow down many-fold (spinning
    at barriers for a stolen core) while TF's thread pool barely does, which would fake large speed-ups.
    Rounds go on until every fn has ``repeats`` quiet calls -- at least ``repeats`` rounds, at most
    4 x repeats, and no new round after ``budget`` seconds.

    Returns first-call seconds {name: s}, per-round seconds {name: [s | nan if not quiet]} (all calls,
    quiet or not, if some fn has fewer than min(3, repeats) quiet ones: then stats["reliable"] is False)
    and statistics.
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
    rounds = {name: [t if (c or not reliable) else math.nan for t, c in zip(took[name], calm[name])]
              for name in names}
    stats = {"rounds": n_rounds, "fewest_quiet": fewest, "reliable": reliable,
             "quiet_share": float(np.mean(np.asarray(others) <= quiet)), "others": statistics.median(others)}
    return first, rounds, stats


class Timing:
    """Throughput of one fn from its per-round seconds (nan = left out): median, best and spread."""

    def __init__(self, seconds: list[float], points: int, first: float):
        self.seconds = np.asarray(seconds)
        kept = self.seconds[np.isfinite(self.seconds)]
        self.rate = points / float(np.median(kept))
        self.best = points / float(kept.min())
        self.spread = float((kept.max() - kept.min()) / np.median(kept))
        self.first = first

    def paired_ratio(self, other: "Timing") -> float:
        """Median over the rounds where both were kept of (other's seconds / this one's): the speed-up
        over ``other`` with slow drifts of the machine (shared by both calls of a round) cancelled."""
        both = np.isfinite(self.seconds) & np.isfinite(other.seconds)
        return float(np.median(other.seconds[both] / self.seconds[both])) if both.any() else math.nan


def load() -> str:
    return "load avg (1/5/15 min) " + " / ".join(f"{v:.2f}" for v in os.getloadavg())


# ---- the implementations ----------------------------------------------------------------------

class TfgalflowBench:
    """tfgalflow.model.Flow through its public API (Keras fit for training)."""

    def __init__(self, cfg, x_train: np.ndarray, lr: float, jit: bool, steps_per_execution: int = 1):
        import tf_keras as keras
        from tfgalflow.model import Flow

        self.flow = Flow(cfg, jit_compile=jit)
        self.flow.adapt(x_train)
        self.flow.compile(keras.optimizers.Adam(lr), jit_compile=jit, steps_per_execution=steps_per_execution)

    def train(self, dataset) -> float:
        history = self.flow.fit(dataset, epochs=1, verbose=0)
        return history.history["loss"][-1]

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        return self.flow.log_prob(x).numpy()

    def grad(self, x: np.ndarray) -> np.ndarray:
        return self.flow.grad_log_prob(x).numpy()

    def sample(self, n: int, seed: int) -> np.ndarray:
        return self.flow.sample(n, seed=seed).numpy()

    def xla_sampler(self) -> Callable[[int, int], np.ndarray]:
        """Variant: the public ``sample_stateless`` inside a ``tf.function(jit_compile=True)`` (the package
        compiles log_prob/grad with XLA but never sampling)."""
        import tensorflow as tf

        fn = tf.function(lambda n, seed: self.flow.sample_stateless(n, seed), jit_compile=True,
                         input_signature=[tf.TensorSpec([], tf.int32), tf.TensorSpec([2], tf.int64)])
        return lambda n, seed: fn(tf.constant(n, tf.int32), tf.constant([seed, 0], tf.int64)).numpy()


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
        self.dist = tfd.TransformedDistribution(tfd.Sample(tfd.Normal(0.0, 1.0), [cfg.dim]), self.chain)
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
    """Only the dense layers of the 8 MADEs (D->64->64->2D, ReLU) on [N, D]: a lower bound on log_prob time.

    Masked or not, a dense layer costs the same matmul, so no implementation of this architecture can
    evaluate log_prob faster in float32 on this CPU; its throughput over nflows' bounds the reachable ratio.
    """

    def __init__(self, dim: int, layers: int, hidden: tuple, framework: str, seed: int = 0):
        rng = np.random.default_rng(seed)
        widths = [dim, *hidden, 2 * dim]
        self.dim = dim
        self.flops_per_point = 2 * layers * sum(a * b for a, b in zip(widths[:-1], widths[1:]))
        params = [[(rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32), np.zeros(b, np.float32)]
                  for _ in range(layers) for a, b in zip(widths[:-1], widths[1:])]
        n_dense = len(widths) - 1
        if framework == "tf":
            import tensorflow as tf
            weights = [[tf.constant(w), tf.constant(b)] for w, b in params]

            @tf.function(jit_compile=True, input_signature=[tf.TensorSpec([None, dim], tf.float32)])
            def floor(x):
                for i, (w, b) in enumerate(weights):
                    h = tf.matmul(x if i % n_dense == 0 else h, w) + b
                    if i % n_dense == n_dense - 1:
                        x = x - h[:, :dim]
                    else:
                        h = tf.nn.relu(h)
                return x

            self.run = lambda x: floor(x).numpy()
        else:
            import torch
            weights = [[torch.from_numpy(w.T.copy()), torch.from_numpy(b)] for w, b in params]

            def floor(x):
                with torch.no_grad():
                    x = torch.from_numpy(x)
                    for i, (w, b) in enumerate(weights):
                        h = torch.nn.functional.linear(x if i % n_dense == 0 else h, w, b)
                        if i % n_dense == n_dense - 1:
                            x = x - h[:, :dim]
                        else:
                            h = torch.relu(h)
                    return x.numpy()

            self.run = floor


# ---- the benchmark ----------------------------------------------------------------------------

def configure_threads(threads: int):
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    import torch
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(threads)
    return tf, torch


def fmt_rate(v: float) -> str:
    return f"{v / 1e6:.3f} M" if v >= 1e5 else f"{v / 1e3:.1f} k"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="~1 minute smoke run: fewer and smaller calls")
    p.add_argument("--repeats", type=int, help="timed rounds per metric (default 7; --quick 3)")
    p.add_argument("--steps", type=int, help="optimizer steps per timed training call (default 25; --quick 4)")
    p.add_argument("--n-eval", type=int, help="points per log_prob / grad call (default 20480; --quick 8192)")
    p.add_argument("--n-sample", type=int, help="points per sample call (default 16384; --quick 4096)")
    p.add_argument("--batch", type=int, default=2048, help="training batch size (issue: 2048)")
    p.add_argument("--threads", type=int, default=2, help="TF intra/inter-op and torch threads (default 2)")
    p.add_argument("--budget", type=float, help="seconds of timed rounds, all metrics (default 420; --quick 20)")
    p.add_argument("--quiet", type=float, default=0.1,
                   help="a call counts if other processes used at most this many cores meanwhile (0.1)")
    p.add_argument("--no-eager", action="store_true", help="skip the (slow) plain eager TFP column")
    args = p.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    steps = args.steps or (4 if args.quick else 25)
    n_eval = args.n_eval or (8192 if args.quick else 20480)
    n_sample = args.n_sample or (4096 if args.quick else 16384)
    budget = args.budget if args.budget is not None else (20.0 if args.quick else 420.0)
    lr, seed = 1e-3, 0
    t_start = time.perf_counter()
    print(f"bench_flows: {load()} at start")

    tf, torch = configure_threads(args.threads)
    from _nflows_model import NflowsBench, dense_shapes
    from tfgalflow.flows import FlowConfig
    import nflows

    cfg = FlowConfig(dim=6, layers=8, hidden=(64, 64), kind="affine", seed=seed)
    print(f"TensorFlow {tf.__version__} (intra-op {tf.config.threading.get_intra_op_parallelism_threads()}, "
          f"inter-op {tf.config.threading.get_inter_op_parallelism_threads()} threads); torch {torch.__version__} "
          f"(intra-op {torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()} threads); "
          f"nflows {getattr(nflows, '__version__', '0.14')}; cores {os.cpu_count()}")

    # data: train rows for the batches, held-out rows for evaluation
    n_batches = (4 * repeats + 1) * steps          # warm-up + the most rounds interleaved() may run
    n_train = 32 * args.batch
    w, source = hernquist_mock(n_train + n_eval, seed=1)
    x_train, x_eval = w[:n_train].astype(np.float32), w[n_train:].astype(np.float32)
    order = np.concatenate([np.random.default_rng(2).permutation(n_train)
                            for _ in range(-(-n_batches * args.batch // n_train))])
    batches = x_train[order[:n_batches * args.batch]].reshape(n_batches, args.batch, cfg.dim)
    print(f"data: {n_train} + {n_eval} held-out 6D points of the isotropic Hernquist model (r < {R_MAX:g} a) "
          f"from {source}")
    print(f"model: {cfg.layers} affine MAF layers, MADE hidden {cfg.hidden}, reverse permutations, batch "
          f"{args.batch}; timed calls: {steps} train steps, log_prob/grad on {n_eval} points, {n_sample} "
          f"samples; 1 warm-up + {repeats} quiet rounds per metric")

    impls: dict[str, Any] = {
        "tfgalflow": TfgalflowBench(cfg, x_train, lr, jit=False),
        "tfgalflow XLA": TfgalflowBench(cfg, x_train, lr, jit=True),
    }
    flow = impls["tfgalflow"].flow
    shift, scale = flow.x_shift.numpy(), flow.x_scale.numpy()
    if not args.no_eager:
        impls["TFP eager"] = EagerTFPBench(cfg, shift, scale, lr)
    impls["nflows"] = NflowsBench(cfg.dim, cfg.layers, cfg.hidden, shift, scale, lr, seed)
    shapes = dense_shapes(impls["nflows"].flow)[:3]
    made = flow.bijector.bijectors[0].transform.network
    tfp_shapes = [tuple(v.shape) for v in made.trainable_variables if len(v.shape) == 2]
    print(f"dense shapes per MADE: nflows {shapes}, tfgalflow/TFP {tfp_shapes}")

    # consistency: same seed -> same initial weights, so tfgalflow and eager TFP agree before training
    probe = x_eval[:1024]
    if "TFP eager" in impls:
        diff = np.max(np.abs(impls["tfgalflow"].log_prob(probe) - impls["TFP eager"].log_prob(probe)))
        print(f"check: max |log p_tfgalflow - log p_TFP eager| at initialisation = {diff:.2e} (same weights)")

    datasets = [tf.data.Dataset.from_tensor_slices(batches[r * steps:(r + 1) * steps])
                for r in range(4 * repeats + 1)]

    def train_fn(name):
        impl = impls[name]
        if name.startswith("tfgalflow"):
            return lambda r: impl.train(datasets[r])
        return lambda r: impl.train(batches[r * steps:(r + 1) * steps])

    def sample_fn(name):
        impl = impls[name]
        if name == "nflows":
            return lambda r: impl.sample(n_sample)
        return lambda r: impl.sample(n_sample, seed=100 + r)

    # variants: package-side changes, timed in the same rounds (reported below the main table)
    spe = TfgalflowBench(cfg, x_train, lr, jit=True, steps_per_execution=steps)
    xla_sample = impls["tfgalflow XLA"].xla_sampler()
    variants = {"train": {"XLA + steps_per_execution": lambda r: spe.train(datasets[r])},
                "sample": {"XLA-compiled sample_stateless": lambda r: xla_sample(n_sample, 100 + r)}}
    floors = {"floor TF XLA": DenseFloor(cfg.dim, cfg.layers, cfg.hidden, "tf"),
              "floor torch": DenseFloor(cfg.dim, cfg.layers, cfg.hidden, "torch")}
    metrics = {
        "train": ({**{name: train_fn(name) for name in impls}, **variants["train"]}, steps * args.batch),
        "log_prob": ({**{name: (lambda r, i=impl: i.log_prob(x_eval)) for name, impl in impls.items()},
                      **{name: (lambda r, f=f: f.run(x_eval)) for name, f in floors.items()}}, n_eval),
        "grad": ({name: (lambda r, i=impl: i.grad(x_eval)) for name, impl in impls.items()}, n_eval),
        "sample": ({**{name: sample_fn(name) for name in impls}, **variants["sample"]}, n_sample),
    }
    results: dict[str, dict] = {}
    rounds: dict[str, dict] = {}
    for metric, (fns, points) in metrics.items():
        t0 = time.perf_counter()
        first, times, rounds[metric] = interleaved(fns, repeats, BUDGET_SHARE[metric] * budget, args.quiet)
        results[metric] = {name: Timing(t, points, first[name]) for name, t in times.items()}
        st = rounds[metric]
        print(f"  timed {metric:<8} in {time.perf_counter() - t0:6.1f} s: {st['rounds']} rounds, "
              f"{st['quiet_share']:.0%} of calls quiet (others <= {args.quiet:g} cores; median others "
              f"{st['others']:.2f}), >= {st['fewest_quiet']} quiet calls each"
              + ("" if st["reliable"] else " -- too few: all calls used, verdict inconclusive") + f"; {load()}")

    # ---- report -------------------------------------------------------------------------------
    names = [n for n in IMPLS if n in impls]
    print(f"\nThroughput (median over the quiet calls; ± = (max - min)/median; first call = warm-up incl. "
          f"tracing/XLA)")
    print(f"{'operation':<12}{'unit':<11}" + "".join(f"{n:>20}" for n in names))
    for metric in ("train", "log_prob", "sample", "grad"):
        row = results[metric]
        print(f"{LABELS[metric]:<12}{UNITS[metric]:<11}"
              + "".join(f"{fmt_rate(row[n].rate) + f' ±{row[n].spread:.0%}':>20}" for n in names))
    print(f"{'first call':<12}{'s (train)':<11}" + "".join(f"{results['train'][n].first:>20.2f}" for n in names))
    for metric in ("log_prob", "sample", "grad"):
        print(f"{'':<12}{'s (' + metric + ')':<11}" + "".join(f"{results[metric][n].first:>20.2f}" for n in names))

    print("\nSpeed-up over nflows, against the issue's targets. median = ratio of the medians (decides met / not"
          " met); paired = median over rounds of the ratio within a round; best = ratio of the fastest calls")
    ratio_names = [n for n in names if n != "nflows"]
    print(f"{'operation':<12}{'target':<8}{'':<8}" + "".join(f"{n:>22}" for n in ratio_names))
    for metric in ("train", "log_prob", "sample", "grad"):
        row, base = results[metric], results[metric]["nflows"]
        cells = {"median": [], "paired": [], "best": []}
        for n in ratio_names:
            ratio = row[n].rate / base.rate
            verdict = ""
            if n.startswith("tfgalflow"):
                verdict = (" met" if ratio >= TARGETS[metric] else " not met") if rounds[metric]["reliable"] \
                    else " inconclusive"
            cells["median"].append(f"{ratio:.2f}x{verdict}")
            cells["paired"].append(f"{row[n].paired_ratio(base):.2f}x")
            cells["best"].append(f"{row[n].best / base.best:.2f}x")
        target = f">= {TARGETS[metric]:g}x"
        for i, (kind, texts) in enumerate(cells.items()):
            print(f"{LABELS[metric] if i == 0 else '':<12}{target if i == 0 else '':<8}{kind:<8}"
                  + "".join(f"{c:>22}" for c in texts))

    print("\nVariants (package-side changes; same rounds as the table)")
    for metric, group in variants.items():
        reference = "tfgalflow XLA"
        for name in group:
            t = results[metric][name]
            print(f"  {LABELS[metric]:<8}{name:<32}{fmt_rate(t.rate):>10} {UNITS[metric]} ±{t.spread:.0%}: "
                  f"{t.paired_ratio(results[metric][reference]):.2f}x {reference} (paired), "
                  f"{t.rate / results[metric]['nflows'].rate:.2f}x nflows; first call {t.first:.2f} s")

    lp = results["log_prob"]
    flops = floors["floor TF XLA"].flops_per_point
    print(f"\nDense floor for log_prob ({flops} flop/point: the MADE matmuls alone, no masks/affine/permutations):")
    for name in ("floor TF XLA", "floor torch", "tfgalflow", "tfgalflow XLA", "nflows"):
        rate = lp[name].rate
        print(f"  {name:<15}{fmt_rate(rate):>10} points/s = {rate * flops / 1e9:6.1f} GFLOP/s"
              + (f"  ({rate / lp['nflows'].rate:.2f}x nflows)" if name.startswith("floor") else ""))
    best = max(lp["floor TF XLA"].rate, lp["floor torch"].rate)
    print(f"  -> in float32 on this CPU no implementation exceeds ~{best / lp['nflows'].rate:.1f}x nflows on log_prob"
          f" (target {TARGETS['log_prob']:g}x)")

    # sanity: every implementation trained the same number of steps on the same batches
    print(f"\nHeld-out mean -log p (physical units) after {(rounds['train']['rounds'] + 1) * steps} steps on the same batches "
          f"(tfgalflow and TFP eager start from identical weights):")
    print("  " + ", ".join(f"{n} {-np.mean(impls[n].log_prob(x_eval)):.4f}" for n in names))
    print(f"\n{load()} at end; total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
