"""Every plot and rendered page of tlextract, by name: ``tx.plots.plot_sweep(sweep, path)``.

Rendering imports matplotlib (about a second), so each name loads its module when first used:
``import tlextract`` and the command line start without it. ``pole_means`` gives the colour
scale of the token views (a trait's average pos and neg projection at a layer).
"""

import importlib
from typing import Any

_WHERE = {
    "build_report": "tlextract.report.summary",
    "plot_autosteer": "tlextract.report.autosteer_view",
    "plot_intervals": "tlextract.report.trust",
    "plot_heatmap": "tlextract.report.monitor_view",
    "plot_metrics": "tlextract.report.figures",
    "plot_projections": "tlextract.report.figures",
    "plot_sweep": "tlextract.report.sweep_view",
    "pole_means": "tlextract.steering.sweep",
    "sweep_table": "tlextract.report.sweep_view",
    "token_html": "tlextract.report.monitor_view",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'tlextract.plots' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
