"""Loss curves as a PNG (`modelgrow train --plot`); matplotlib is the optional plot extra."""

from __future__ import annotations

from pathlib import Path

from .checkpoint.atomic import write_file_atomically
from .destination import PLOT_SOFTWARE
from .errors import UsageError


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed",
                         hint="pip install 'modelgrow[plot]'") from None


def plot_curves(report: dict, path: str | Path) -> None:
    """Train and validation loss against steps done, ReLoRA merges marked; PNG, atomically."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    train = report["loss_curve"]
    ax.plot(range(len(train)), train, lw=0.8, alpha=0.8, label="train (per step)")
    if report["val_curve"]:
        xs, ys = zip(*report["val_curve"])
        ax.plot(xs, ys, "o-", lw=1.5, ms=3, label="validation (held out)")
    for i, r in enumerate((report.get("relora") or {}).get("restarts", [])):
        ax.axvline(r["after_step"] + 1, color="grey", ls=":", lw=1, label="ReLoRA merge" if i == 0 else None)
    ax.set_xlabel("steps done")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(f"modelgrow train ({report['mode']}): {Path(report['source']['path']).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        write_file_atomically(path, lambda tmp: fig.savefig(tmp, format="png", metadata={"Software": PLOT_SOFTWARE}),
                              what="the plot")
    finally:
        plt.close(fig)
