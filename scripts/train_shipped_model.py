"""Train, export and document the shipped model: saved_models/hernquist_iso/1.

A 6D affine MAF learns the isotropic Hernquist (1990) distribution function f(x, v) from an exact
mock in model units (G = M = a = 1), radially truncated at R_MAX (so the sampled density is
f(x, v) / M(<R_MAX) inside R_MAX). Everything that defines the run is recorded: the mock
(N, seed, R_MAX), the TrainConfig (in the run's config.json, also stored inside the SavedModel) and
this script.

Accuracy is measured on held-out stars from the same exact sampler (never seen in training):

    Δ(w) = log p_learned(w) − log p_exact(w),   p_exact = f_iso(w) / M(<R_MAX)

mean and spread of Δ, and the Monte-Carlo estimate KL(p_exact || p_learned) = −mean(Δ) ≥ 0 with its
standard error. The report (saved_models/hernquist_iso/training_report.{json,md}, beside the
version directory, where TF Serving ignores it) also gives the final losses against the ideal loss
(the differential entropy of p_exact, estimated on the same stars) and CBE accelerations from the
exported model against the exact Hernquist acceleration -G M x / (r (r + a)^2).

    .venv/bin/python scripts/train_shipped_model.py  # refuses to replace an existing version 1
    .venv/bin/python scripts/train_shipped_model.py --overwrite  # retrain and replace it

Runtime: a few minutes on 2 CPU cores. The run directory goes to runs/hernquist_iso (git-ignored).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from tfgalflow.atomic import write_json, write_text  # noqa: E402
from tfgalflow.export import export_model, load_saved_model, write_models_config  # noqa: E402
from tfgalflow.hernquist import Hernquist  # noqa: E402
from tfgalflow.study import fractional_error  # noqa: E402
from tfgalflow.training import TrainConfig, read_history, read_run_config, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "hernquist_iso"
MOCK_SEED = 2021                # exact sampler seed (train + held-out stars)
N_TRAIN = 150_000
N_HELD_OUT = 20_000
R_MAX = 20.0                    # radial truncation of the mock, in units of a
N_ACCEL_POSITIONS = 64
CONFIG = TrainConfig(
    layers=6,
    hidden=(64, 64),
    kind="affine",
    epochs=150,
    batch_size=512,
    lr=2e-3,
    lr_schedule="cosine",
    validation_split=0.1,
    patience=25,
    checkpoint_every=25,
    seed=0,
    jit_compile=False,
)


def mock(n: int, seed: int) -> np.ndarray:
    """Exact isotropic Hernquist phase space [n, 6] (x, v) in model units, r < R_MAX."""
    from tfgalflow.mocks import sample_hernquist
    return sample_hernquist(n, kind="iso", seed=seed, model=Hernquist(), r_max=R_MAX).phase_space


def accuracy(model, w: np.ndarray) -> dict:
    """Δ = log p_learned − log p_exact on held-out stars; KL(p_exact || p_learned) = −mean Δ."""
    hernquist = Hernquist()
    mass_fraction = float(hernquist.enclosed_mass(R_MAX) / hernquist.M)
    log_exact = hernquist.log_df(w[:, :3], w[:, 3:], "iso") - np.log(mass_fraction)
    log_learned = model.log_prob(w).astype(np.float64)
    delta = log_learned - log_exact
    n = delta.size
    return {
        "n_stars": n,
        "mass_fraction_inside_r_max": mass_fraction,
        "mean_delta": float(delta.mean()),
        "std_delta": float(delta.std(ddof=1)),
        "delta_percentiles_5_50_95": [float(q) for q in np.percentile(delta, [5, 50, 95])],
        "kl_exact_to_learned_nats": float(-delta.mean()),
        "kl_standard_error_nats": float(delta.std(ddof=1) / np.sqrt(n)),
        "entropy_exact_nats": float(-log_exact.mean()),
        "mean_neg_log_prob_learned_nats": float(-log_learned.mean()),
    }


def acceleration_check(model, w: np.ndarray) -> dict | None:
    """Median relative error |a_CBE − a_exact| / |a_exact| at held-out positions, 0.2 < r < 5."""
    if "accelerations" not in model.signatures:
        return None
    r = np.linalg.norm(w[:, :3], axis=1)
    positions = w[(r > 0.2) & (r < 5.0)][:N_ACCEL_POSITIONS, :3]
    result = model.accelerations(positions, seed=1)
    exact = Hernquist().acceleration(positions)
    good = np.isfinite(result["acceleration"]).all(axis=1)
    error = fractional_error(result["acceleration"], exact)
    return {"n_positions": int(len(positions)), "n_finite": int(good.sum()),
            "n_velocities": model.metadata.get("accelerations", {}).get("n_velocities"),
            "median_relative_error": float(np.median(error[good])) if good.any() else None,
            "p90_relative_error": float(np.percentile(error[good], 90)) if good.any() else None}


def markdown(report: dict) -> str:
    acc, fit = report["held_out"], report["training"]
    lines = [
        f"# {NAME} version 1 - training report",
        "",
        f"Isotropic Hernquist DF (G = M = a = 1), exact mock truncated at r < {R_MAX:g} a; "
        f"{N_TRAIN} training stars (10% of them for validation), {N_HELD_OUT} held-out stars, "
        f"mock seed {MOCK_SEED}. Flow: {CONFIG.layers}-layer affine MAF, MADE hidden "
        f"{list(CONFIG.hidden)}, seed {CONFIG.seed}.",
        f"Produced by `scripts/train_shipped_model.py` in {report['seconds']:.0f} s; SavedModel "
        f"{report['saved_model_bytes'] / 2**20:.2f} MiB.",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| epochs run (best epoch) | {fit['epochs_run']} ({fit['best_epoch']}) |",
        f"| final training loss (nats/star) | {fit['final_loss']:.4f} |",
        f"| best validation loss (nats/star) | {fit['best_val_loss']:.4f} |",
        f"| entropy of the exact DF (ideal loss) | {acc['entropy_exact_nats']:.4f} ± "
        f"{acc['std_delta'] / np.sqrt(acc['n_stars']):.4f} |",
        f"| held-out mean Δ = log f_learned − log f_exact | {acc['mean_delta']:+.4f} |",
        f"| held-out spread of Δ (std) | {acc['std_delta']:.4f} |",
        "| Δ percentiles 5 / 50 / 95 | "
        f"{' / '.join(f'{q:+.3f}' for q in acc['delta_percentiles_5_50_95'])} |",
        f"| KL(exact ‖ learned) estimate (nats) | {acc['kl_exact_to_learned_nats']:.4f} ± "
        f"{acc['kl_standard_error_nats']:.4f} |",
    ]
    if report["accelerations"]:
        a = report["accelerations"]
        lines.append(
            f"| CBE |a| relative error, median / 90% ({a['n_finite']} positions, 0.2 < r < 5, "
            f"{a['n_velocities']} velocities) | {a['median_relative_error']:.3f} / "
            f"{a['p90_relative_error']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing saved_models/hernquist_iso/1"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "saved_models", help="model base directory"
    )
    args = parser.parse_args()
    target = args.out / NAME / "1"
    if target.exists() and not args.overwrite:
        sys.exit(f"{target} exists; pass --overwrite to retrain and replace it")
    run_dir = ROOT / "runs" / NAME
    shutil.rmtree(run_dir, ignore_errors=True)

    t0 = time.perf_counter()
    w = mock(N_TRAIN + N_HELD_OUT, MOCK_SEED)
    train_w, held_out = w[:N_TRAIN], w[N_TRAIN:]
    model = train(train_w, CONFIG, run_dir, verbose=2)
    export_model(model, target, run_config=read_run_config(run_dir), overwrite=args.overwrite)
    exported = load_saved_model(target)
    history = read_history(run_dir)
    best = int(np.nanargmin(history["val_loss"]))
    report = {
        "model": NAME,
        "version": 1,
        "mock": {
            "kind": "iso",
            "n_train": N_TRAIN,
            "n_held_out": N_HELD_OUT,
            "seed": MOCK_SEED,
            "r_max": R_MAX,
            "units": "model (G = M = a = 1)",
        },
        "train_config": CONFIG.to_dict(),
        "training": {
            "epochs_run": int(len(history["loss"])),
            "best_epoch": best + 1,
            "final_loss": float(history["loss"][-1]),
            "best_val_loss": float(history["val_loss"][best]),
        },
        "held_out": accuracy(exported, held_out),
        "training_stars": accuracy(exported, train_w[:N_HELD_OUT]),
        "accelerations": acceleration_check(exported, held_out),
        "saved_model_bytes": sum(p.stat().st_size for p in target.rglob("*") if p.is_file()),
    }
    report["seconds"] = time.perf_counter() - t0
    write_json(args.out / NAME / "training_report.json", report)
    write_text(args.out / NAME / "training_report.md", markdown(report))
    write_models_config(args.out, base_path="/models")
    print(markdown(report))
    print(
        f"wrote {target}, {args.out / NAME / 'training_report.md'}, {args.out / 'models.config'}"
    )


if __name__ == "__main__":
    main()
