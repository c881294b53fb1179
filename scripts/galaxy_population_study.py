"""Issue #16 study: the galaxy_population task with and without the noise labels (ablation).

    python scripts/galaxy_population_study.py run --arm noise     # task with the 8 latent labels
    python scripts/galaxy_population_study.py run --arm physical  # the 5 physical labels only
    python scripts/galaxy_population_study.py run --arm noise --lr 3e-4   # into OUT/noise_lr3e-4
    python scripts/galaxy_population_study.py run --arm physical --galaxies 200  # same stars
    python scripts/galaxy_population_study.py run --arm physical --members 1   # one flow
    python scripts/galaxy_population_study.py run --arm physical --stars-per-galaxy 20000
    python scripts/galaxy_population_study.py run --arm noise --label-lasso 0.1  # group lasso
    python scripts/galaxy_population_study.py run --arm noise --label-lasso 0.03 --seed 1  # draw 1
    python scripts/galaxy_population_study.py diagnose --variant zeroed   # latents set to 0
    python scripts/galaxy_population_study.py summary             # studies/.../summary.json

Each arm is ``tfgalflow.tasks.run_task("galaxy_population", OUT/ARM, ...)`` with the reduced
settings below (CPU budget: 2 shared cores, ~20 min for both arms run side by side); the
summary puts the held-out figures side by side with the issue's targets, including the
ablation target: noise labels worsen the held-out log-density error by <= 0.05 nat.
"""

import argparse
import json
from pathlib import Path

from tfgalflow.atomic import write_json
from tfgalflow.tasks import run_task

OUT = Path(__file__).resolve().parent.parent / "studies" / "galaxy_population"
#: reduced from ~2e4 stars per galaxy (CPU-bound): ~4e3 stars per galaxy, 60 galaxies, 5 held out
TASK = {"stars_per_galaxy": 4000, "flow_samples": 100000, "truth_samples": 400000,
        "test_events": 5000, "seed": 0}
TRAIN = {"epochs": 30, "batch_size": 512, "lr": 1e-3}
#: ensemble members of the task's default model
MEMBERS = 4


def arm_dir(arm: str, lr: float, galaxies: int, epochs: int, members: int = MEMBERS,
            stars: int = TASK["stars_per_galaxy"], label_noise: float = 0.0,
            label_lasso: float = 0.0, seed: int = 0) -> str:
    name = arm if lr == TRAIN["lr"] else f"{arm}_lr{lr:g}"
    name = name if not label_noise else f"{name}_labelnoise{label_noise:g}"
    name = name if not label_lasso else f"{name}_lasso{label_lasso:g}"
    name = name if stars == TASK["stars_per_galaxy"] else f"{name}_{stars}stars"
    name = name if galaxies == 60 else f"{name}_{galaxies}gal"
    name = name if members == MEMBERS else f"{name}_{members}member"
    name = name if seed == 0 else f"{name}_seed{seed}"
    return name if epochs == TRAIN["epochs"] else f"{name}_{epochs}ep"


def run(arm: str, lr: float, galaxies: int = 60, epochs: int = TRAIN["epochs"],
        members: int = MEMBERS, stars: int = TASK["stars_per_galaxy"],
        label_noise: float = 0.0, label_lasso: float = 0.0, seed: int = 0) -> dict:
    """One arm; with ``galaxies`` != 60 the stars per galaxy shrink to keep the same total;
    ``seed`` is the task's (a new draw of galaxies, held-out five and training).

    The report gains ``label_weight_norms``: per member and label column, the norm of the weights
    through which the column enters the flow (``Flow.label_weight_norms``; 0 = not used).
    """
    from tfgalflow.training import load_run

    overrides = dict(TASK, noise_labels=(arm == "noise"), galaxies=galaxies,
                     stars_per_galaxy=stars * 60 // galaxies, seed=seed)
    out = OUT / arm_dir(arm, lr, galaxies, epochs, members, stars, label_noise, label_lasso,
                        seed)
    report = run_task("galaxy_population", out, overrides,
                      dict(TRAIN, lr=lr, epochs=epochs, members=members,
                           label_noise=label_noise, label_lasso=label_lasso),
                      verbose=2)
    model = load_run(out / "run")
    model = getattr(model, "base", model)          # the flow(s) under the cylindrical wrapper
    flows = model.members or [model]
    report["label_weight_norms"] = {
        name: [round(float(flow.label_weight_norms()[j]), 4) for flow in flows]
        for j, name in enumerate(report["metrics"]["label_names"])}
    write_json(out / "report.json", report)
    return report


def summary() -> dict:
    reports = {p.parent.name: json.loads(p.read_text()) for p in OUT.glob("*/report.json")}
    ablation = {}
    for name in reports:
        if name.startswith("noise"):
            other = "physical" + name[len("noise"):]
            if other in reports:
                noise, phys = (reports[a]["metrics"]["summary"] for a in (name, other))
                worsening = noise["logp_abs_error_mean"] - phys["logp_abs_error_mean"]
                ablation[f"{name} vs {other}"] = {
                    "description": "held-out mean |log q - log p| with noise labels minus "
                                   "without (nat)",
                    "measured": worsening, "threshold": 0.05, "met": bool(worsening <= 0.05),
                    "kl_difference": noise["kl_mean"] - phys["kl_mean"],
                    "lr": reports[name]["train"]["lr"],
                }
    # run/ directories are not kept in the repository: an arm without one keeps its earlier figure
    old = OUT / "summary.json"
    previous = json.loads(old.read_text()).get("final_train_loss", {}) if old.exists() else {}
    out = {
        "settings": {"task": TASK, "train": TRAIN},
        "targets": {arm: reports[arm]["targets"] for arm in reports},
        "ablation": ablation,
        "summary": {arm: reports[arm]["metrics"]["summary"] for arm in reports},
        "final_train_loss": {arm: _last_loss(OUT / arm, previous) for arm in reports},
        "cleaning": next(iter(reports.values()))["metrics"]["cleaning"],
    }
    write_json(OUT / "summary.json", out)
    return out


def diagnose(variant: str) -> dict:
    """8 epochs on the noise arm's training data, as is or with the 8 latent columns zeroed
    (same label width, no latent information): is the failure of the noise arm the latents?"""
    import tempfile

    from tfgalflow.tasks import get_task
    from tfgalflow.training import train

    task = get_task("galaxy_population", **dict(TASK, noise_labels=True))
    x, labels = task.training_data()
    if variant == "zeroed":
        labels[:, 5:] = 0.0
    config = task.train_config().with_overrides(**dict(TRAIN, epochs=8), seed=0,
                                                label_dim=labels.shape[1])
    run_dir = tempfile.mkdtemp()
    train(x, config, run_dir, labels=labels, verbose=0)
    history = _last_loss_rows(Path(run_dir))
    result = {"variant": variant, "epochs": 8, "history": history}
    write_json(OUT / f"noise_diagnostic_{variant}.json", result)
    return result


def _last_loss_rows(run_dir: Path) -> list:
    lines = (run_dir / "member_000" / "history.csv").read_text().split()[1:]
    return [[float(v) for v in line.split(",")] for line in lines]


def _last_loss(arm_out: Path, previous: dict) -> list | None:
    """[loss, val_loss] of member 0's last epoch (from ``previous`` when run/ is gone)."""
    history = arm_out / "run" / "member_000" / "history.csv"
    if not history.exists():
        return previous.get(arm_out.name)
    lines = history.read_text().split()
    return [float(v) for v in lines[-1].split(",")[1:]]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("run", "summary", "diagnose"))
    parser.add_argument("--variant", choices=("as_is", "zeroed"), default="as_is")
    parser.add_argument("--arm", choices=("noise", "physical"), default="noise")
    parser.add_argument("--lr", type=float, default=TRAIN["lr"])
    parser.add_argument("--galaxies", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=TRAIN["epochs"])
    parser.add_argument("--members", type=int, default=MEMBERS)
    parser.add_argument("--stars-per-galaxy", type=int, default=TASK["stars_per_galaxy"],
                        help="stars of a log M* = 10.25 galaxy (the issue's size: 20000)")
    parser.add_argument("--label-noise", type=float, default=0.0,
                        help="TrainConfig.label_noise (σ in standardised label units)")
    parser.add_argument("--label-lasso", type=float, default=0.0,
                        help="TrainConfig.label_lasso (group lasso per label column)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the task's seed: another draw of the galaxies (default 0)")
    args = parser.parse_args()
    if args.what == "diagnose":
        result = diagnose(args.variant)
    else:
        result = (run(args.arm, args.lr, args.galaxies, args.epochs, args.members,
                      args.stars_per_galaxy, args.label_noise, args.label_lasso, args.seed)
                  if args.what == "run"
                  else summary())
    print(json.dumps(result.get("targets", result), indent=1, default=str)[:4000])
