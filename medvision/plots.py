"""The one way medvision gets a headless matplotlib (an optional dependency: the ``report`` / ``train`` extras)."""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
