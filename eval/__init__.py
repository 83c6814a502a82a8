"""duplex.eval: scenarios, the served pipeline on a measured or simulated clock, Full-Duplex-Bench metrics and reports.

Submodules are imported on use (``duplex.eval.runner``, ``duplex.eval.metrics``, ...) so that
``duplex --help`` stays fast.
"""

from __future__ import annotations

__all__: list[str] = []
