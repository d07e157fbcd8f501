"""The pointing game's geometry, on heatmaps whose answer is known."""

import numpy as np

from medvision.heatmap import chance_rate, peak_xy, pointing_hit


def test_peak_and_hit():
    heat = np.zeros((4, 4))
    heat[1, 2] = 5.0  # the cell at rows 32..64, columns 64..96 of a 128 px input
    x, y, slack = peak_xy(heat, 128)
    assert (x, y) == (80.0, 48.0) and slack == np.hypot(32, 32) / 2
    assert pointing_hit(heat, 128, [(80.0, 48.0, 1.0)])
    assert pointing_hit(heat, 128, [(80.0 + 20, 48.0, 3.0)])  # within radius + half a cell diagonal
    assert not pointing_hit(heat, 128, [(10.0, 120.0, 5.0)])


def test_chance_rate_is_the_covered_fraction_of_the_breast():
    fg = np.zeros((100, 100), bool)
    fg[:, :50] = True
    # a lesion far from the breast cannot be hit by chance; one covering it always is
    assert chance_rate(fg, (100, 100), [(90.0, 50.0, 2.0)]) == 0.0
    assert chance_rate(fg, (100, 100), [(25.0, 50.0, 200.0)]) == 1.0
    rate = chance_rate(fg, (100, 100), [(25.0, 50.0, 10.0)])
    assert abs(rate - np.pi * (10 + np.hypot(1, 1) / 2) ** 2 / 5000) < 0.01
