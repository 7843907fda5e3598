"""The knee of a sampled curve: the point farthest from the chord (Kneedle's normalised form).

The points are sorted by x, both axes are rescaled to [0, 1] (x optionally in log scale, for
learning rates), and the knee is the interior point of largest perpendicular distance to the
straight line joining the first and last points (the "maximum distance to the chord" method,
equivalent to Kneedle's difference curve for a curve normalised this way). It works for rising
and falling, concave and convex curves alike; below 3 finite points there is no knee.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def knee_index(x: Sequence[float], y: Sequence[float], log_x: bool = False) -> int | None:
    """Index (into the given order) of the knee point, or None (fewer than 3 usable points, or a flat curve)."""
    pts = [(float(a), float(b), i) for i, (a, b) in enumerate(zip(x, y))
           if math.isfinite(float(a)) and math.isfinite(float(b)) and (not log_x or float(a) > 0)]
    if len(pts) < 3:
        return None
    pts.sort()
    xs = [math.log10(p[0]) if log_x else p[0] for p in pts]
    ys = [p[1] for p in pts]
    x_span, y_span = xs[-1] - xs[0], max(ys) - min(ys)
    if x_span <= 0 or y_span <= 0:
        return None
    u = [(a - xs[0]) / x_span for a in xs]
    v = [(b - min(ys)) / y_span for b in ys]
    dx, dy = u[-1] - u[0], v[-1] - v[0]
    length = math.hypot(dx, dy)
    best, best_d = None, 0.0
    for k in range(1, len(pts) - 1):
        d = abs(dy * (u[k] - u[0]) - dx * (v[k] - v[0])) / length
        if d > best_d:
            best, best_d = k, d
    return pts[best][2] if best is not None else None
