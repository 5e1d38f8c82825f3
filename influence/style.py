"""One look for every figure of the reproduction and the benchmarks: seaborn's theme.

The original release's notebooks drew their figures with seaborn; :func:`apply_style` sets
its "whitegrid" style in the "paper" context with the colour-blind palette, once, for every
figure a script makes afterwards (:func:`influence.experiment.run` calls it before ``main``).
"""
from __future__ import annotations

PALETTE = "colorblind"


def apply_style(context: str = "paper", font_scale: float = 1.0) -> None:
    """seaborn's theme for the figures that follow (matplotlib's rcParams)."""
    import seaborn as sns

    sns.set_theme(context=context, style="whitegrid", palette=PALETTE, font_scale=font_scale,
                  rc={"figure.dpi": 100, "savefig.dpi": 150, "axes.titlesize": "medium", "image.cmap": "viridis"})


def colors(n: int) -> list:
    """``n`` colours of the shared palette."""
    import seaborn as sns

    return sns.color_palette(PALETTE, n)
