"""duplex: a language model that listens while it speaks (full-duplex streaming agent)."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
