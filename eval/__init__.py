"""duplex.eval: scenarios, virtual-clock replay, Full-Duplex-Bench metrics and reports.

Submodules are imported on use (``duplex.eval.runner``, ``duplex.eval.metrics``, ...) so that
``duplex --help`` stays fast.
"""

from __future__ import annotations

__all__: list[str] = []
