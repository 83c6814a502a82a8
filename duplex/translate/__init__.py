"""Simultaneous translation: policies over a shared sequence, a translate session, SimulEval metrics."""
