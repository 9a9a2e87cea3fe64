"""Figures for the reports: matplotlib on its file-only backend, each figure turned into PNG
bytes and closed."""

from __future__ import annotations

import io


def pyplot():
    """`matplotlib.pyplot`, drawing to files only (no display is needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig) -> bytes:
    """The figure as PNG bytes (100 dpi); the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    pyplot().close(fig)
    return buffer.getvalue()
