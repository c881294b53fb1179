"""What the 3 x 3 Dehnen label grid alone says about its held-out labels (issue #12).

A conditional flow trained on the grid nodes must interpolate p(x, v | γ, a/r_a) between them. This
script asks how well the classical interpolators of the *exact* node densities do at the study's
held-out labels, as a yardstick for the flow's held-out KL (``studies/dehnen_interpolation*``):

* bilinear / biquadratic (Lagrange) interpolation of log p across the nodes: infinite KL, because
  the nodes' supports differ (a star bound in one γ-model is unbound in a shallower one, where
  log p = −inf), reported as the fraction of held-out stars outside some node's support;
* the bilinear *mixture* of the four neighbouring node densities, Σ w_ij p_ij (what a model that
  only smooths across labels, e.g. with large label noise, tends to): its KL(p || mixture).

KL(p || q) = E_p[log p − log q] over 2·10^5 exact stars at each held-out label (truncated at
r < 100a as the study's mocks; p normalised by M(< 100a)).

    PYTHONPATH=. python scripts/dehnen_interpolation_floor.py [--n 200000]
"""
from __future__ import annotations

import argparse

import numpy as np

from tfgalflow.atomic import write_json
from tfgalflow.dehnen import Dehnen
from tfgalflow.mocks import sample_dehnen

GAMMAS, RA_INVERSES = (0.5, 1.0, 1.5), (0.0, 0.5, 1.0)
HELD_OUT = ((0.75, 0.25), (1.25, 0.75))
R_MAX = 100.0


def linear_weights(nodes: tuple, t: float) -> np.ndarray:
    """Hat-function weights of t on the sorted nodes (two non-zero)."""
    nodes = np.asarray(nodes)
    i = int(np.clip(np.searchsorted(nodes, t) - 1, 0, len(nodes) - 2))
    f = (t - nodes[i]) / (nodes[i + 1] - nodes[i])
    w = np.zeros(len(nodes))
    w[i], w[i + 1] = 1.0 - f, f
    return w


def log_p(gamma: float, ra_inverse: float, x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """log of the truncated mock's normalised density f / M(< R_MAX) at (x, v)."""
    model = Dehnen(gamma=gamma, ra_inverse=ra_inverse)
    return model.log_df(x, v) - np.log(model.enclosed_mass(R_MAX))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="studies/dehnen_interpolation_floor.json")
    ap.add_argument("--n", type=int, default=200_000)
    args = ap.parse_args()
    rows = []
    for g, k in HELD_OUT:
        cat = sample_dehnen(args.n, g, k, seed=3, r_max=R_MAX)
        lp = log_p(g, k, cat.pos, cat.vel)
        nodes = {(gi, ki): log_p(gi, ki, cat.pos, cat.vel) for gi in GAMMAS for ki in RA_INVERSES}
        outside = np.any([~np.isfinite(v) for v in nodes.values()], axis=0)
        wg, wk = linear_weights(GAMMAS, g), linear_weights(RA_INVERSES, k)
        parts = [np.log(wg[i] * wk[j]) + nodes[(gi, ki)] for i, gi in enumerate(GAMMAS)
                 for j, ki in enumerate(RA_INVERSES) if wg[i] * wk[j] > 0]
        mixture = np.logaddexp.reduce(parts, axis=0)
        d = lp - mixture
        rows.append({"label": [g, k],
                     "fraction_outside_some_node_support": float(outside.mean()),
                     "kl_log_interpolation": float("inf") if outside.any() else None,
                     "kl_bilinear_mixture": float(d.mean()),
                     "kl_bilinear_mixture_stderr": float(d.std() / np.sqrt(d.size))})
        print(rows[-1], flush=True)
    write_json(args.out, {"n_stars": args.n, "held_out": rows,
                          "definition": "KL(p || q) = E_p[log p - log q] over exact stars at "
                                        "the held-out label; q interpolates the exact node "
                                        "densities of the 3 x 3 grid"})


if __name__ == "__main__":
    main()
