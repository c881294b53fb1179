r"""Where the galaxy_population summary errors come from: members, shared bias, unseen labels.

For a finished ``tfgalflow task run galaxy_population --out DIR`` this scores the paired summary
errors (half-mass radius, σ_v, [Fe/H] gradient: ``paired_relative_errors``, the task's target
quantities) three ways, on exact stars of each galaxy:

* each ensemble member alone and the ensemble, on the held-out galaxies. Write e_k for member k's
  signed relative error of a summary; their mean ē is the error all members share (data,
  architecture, the galaxies trained on) and their spread s = std_k(e_k) the part that averaging
  members removes. The ensemble's density is the mean of the members' (``Ensemble``), so to first
  order in the e_k its summary error is ē plus a K-member residue of size ~ s/√K:
  rms(K)² ≈ ē² + s²/K;
* the ensemble on galaxies it was trained on (``--training`` of them, drawn with a fixed seed):
  if these errors are as large as the held-out ones the limit is the fit itself (capacity, stars
  per galaxy), if much smaller it is learning the labels → stars map between the training
  galaxies (the number of galaxies). Beside it, the same summaries of each training galaxy's own
  catalogue: a flow that fits its stars reproduces their sampling error too.

    python scripts/galaxy_population_decomposition.py runs/gp_seed1 \
        --out studies/galaxy_population/decomposition/seed1.json
    python scripts/galaxy_population_decomposition.py DIR --training 10 --truth-samples 200000

``--members 0`` scores only the named finished members on the held-out galaxies (no ensemble, no
training galaxies): a first look at a setting while its other members still train. Worth it only
for errors the members share (a galaxy whose gradient all members miss alike); a member's own
scatter (6-9 % on a poorly measured gradient) says nothing of the setting.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from tfgalflow import galaxies as gal
from tfgalflow.atomic import write_json
from tfgalflow.coordinates import wrap
from tfgalflow.tasks import get_task
from tfgalflow.tasks.galaxy_population import (SUMMARY_KEYS, galaxy_summaries,
                                              paired_relative_errors)
from tfgalflow.training import load_run, read_run_config
from tfgalflow.training.fit import load_member


def paired(task, model, gid: int, n: int, rng: np.random.Generator) -> dict:
    """Signed paired relative errors and their standard errors of ``model`` at galaxy ``gid``."""
    pop = task.population()
    k = pop.index(gid)
    theta, lab, r_c = task.params[gid], pop.labels[k], float(pop.r_cut[k])
    truth = task.exact_stars(theta, n, r_c, rng)
    log_ratio = (task.model_log_prob(model, truth, lab)
                 - gal.log_prob(truth, np.tile(theta, (n, 1)), r_cut=r_c))
    p = paired_relative_errors(truth, log_ratio, theta[1])
    data = galaxy_summaries(pop.stars[k], theta[1])
    return {"error": p.relative_error, "stderr": p.stderr,
            "kl": float(-np.mean(log_ratio)),
            # the galaxy's own (cleaned) catalogue against the same exact stars: the sampling
            # error of the stars a training galaxy's flow was fitted to
            "data_error": {key: data[key] / p.reference[key] - 1.0 for key in SUMMARY_KEYS},
            "data_stars": len(pop.stars[k])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task_dir", type=Path, help="a finished task run (task.json, run/)")
    ap.add_argument("--training", type=int, default=10,
                    help="training galaxies to score the ensemble on (default 10)")
    ap.add_argument("--truth-samples", type=int, default=200_000,
                    help="exact stars per galaxy (default 2e5)")
    ap.add_argument("--members", default=None,
                    help="score only these finished members, e.g. 0,1 (held-out galaxies only)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = ap.parse_args()

    recorded = json.loads((args.task_dir / "task.json").read_text())
    task = get_task(recorded["task"], recorded["config"])
    run_dir = args.task_dir / "run"
    run = read_run_config(run_dir)
    coords = run.get("train", {}).get("coordinates", "cartesian")
    if args.members:            # named members of a run that may still be training: no ensemble
        ensemble = None
        members = [wrap(coords, load_member(run_dir, run, int(k)))
                   for k in args.members.split(",")]
    else:
        ensemble = load_run(run_dir)
        base = getattr(ensemble, "base", ensemble)
        members = [wrap(coords, flow) for flow in getattr(base, "members", None) or [base]]
    rng = np.random.default_rng(2026)

    held = {}
    for gid in task.heldout_ids:
        if gid not in task.population().ids:
            continue
        per_member = [paired(task, m, int(gid), args.truth_samples, rng) for m in members]
        e = {key: [m["error"][key] for m in per_member] for key in SUMMARY_KEYS}
        held[int(gid)] = {
            "members": e,
            "members_stderr": {key: [m["stderr"][key] for m in per_member]
                               for key in SUMMARY_KEYS},
            "members_kl": [m["kl"] for m in per_member],
            "shared": {key: float(np.mean(v)) for key, v in e.items()},
            "member_spread": {key: float(np.std(v, ddof=1)) if len(v) > 1 else math.nan
                              for key, v in e.items()},
        }
        line = {key: f"{key} members {' '.join(f'{100 * v:+.2f}' for v in e[key])} %"
                for key in SUMMARY_KEYS}
        if ensemble is not None:
            ens = (per_member[0] if len(members) == 1
                   else paired(task, ensemble, int(gid), args.truth_samples, rng))
            held[int(gid)].update(ensemble=ens["error"], ensemble_stderr=ens["stderr"],
                                  ensemble_kl=ens["kl"])
            line = {key: f"{text}, ensemble {100 * ens['error'][key]:+.2f} %"
                    for key, text in line.items()}
        kl = " ".join(f"{m['kl']:.4f}" for m in per_member)
        print(f"held-out galaxy {gid}: members' KL {kl} nat; " + "; ".join(line.values()),
              flush=True)
    if ensemble is None:
        if args.out:
            write_json(args.out, {"task_dir": str(args.task_dir), "members": args.members,
                                  "truth_samples": args.truth_samples, "heldout": held})
        return

    train_ids = np.sort(np.random.default_rng(7).choice(task.training_ids(), args.training,
                                                        replace=False))
    trained = {}
    for gid in train_ids:
        ens = paired(task, ensemble, int(gid), args.truth_samples, rng)
        trained[int(gid)] = {"ensemble": ens["error"], "ensemble_stderr": ens["stderr"],
                             "ensemble_kl": ens["kl"], "data": ens["data_error"],
                             "data_stars": ens["data_stars"]}
        print(f"training galaxy {gid} ({ens['data_stars']} stars): " + "; ".join(
            f"{key} {100 * ens['error'][key]:+.2f} % "
            f"(its stars {100 * ens['data_error'][key]:+.2f} %)"
            for key in SUMMARY_KEYS), flush=True)

    def rms(values) -> float:
        return float(math.sqrt(np.mean(np.square(values))))

    summary = {}
    for key in SUMMARY_KEYS:
        shared = [h["shared"][key] for h in held.values()]
        spread = [h["member_spread"][key] for h in held.values()]
        summary[key] = {
            "heldout_ensemble_rms": rms([h["ensemble"][key] for h in held.values()]),
            "heldout_ensemble_max": float(max(abs(h["ensemble"][key]) for h in held.values())),
            "heldout_shared_rms": rms(shared),
            "heldout_member_spread_rms": rms(spread),
            "training_ensemble_rms": rms([t["ensemble"][key] for t in trained.values()]),
            "training_ensemble_max": float(max(abs(t["ensemble"][key])
                                               for t in trained.values())),
            "training_data_rms": rms([t["data"][key] for t in trained.values()]),
            "training_flow_minus_data_rms": rms([t["ensemble"][key] - t["data"][key]
                                                 for t in trained.values()]),
        }
        print(f"{key}: held-out rms {100 * summary[key]['heldout_ensemble_rms']:.2f} % "
              f"(shared {100 * summary[key]['heldout_shared_rms']:.2f} %, member spread "
              f"{100 * summary[key]['heldout_member_spread_rms']:.2f} %); training rms "
              f"{100 * summary[key]['training_ensemble_rms']:.2f} % "
              f"(max {100 * summary[key]['training_ensemble_max']:.2f} %; their stars "
              f"{100 * summary[key]['training_data_rms']:.2f} %, flow - stars "
              f"{100 * summary[key]['training_flow_minus_data_rms']:.2f} %)")
    result = {"task_dir": str(args.task_dir), "truth_samples": args.truth_samples,
              "heldout": held, "training": trained, "summary": summary}
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
