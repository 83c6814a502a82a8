"""Shared fixtures: one tiny random model per test run (fast), the real model only when marked."""

from __future__ import annotations

import pytest

from duplex.engine.worker import Engine
from duplex.engine.models import LoadedModel, load_model


@pytest.fixture(scope="session")
def tiny_lm() -> LoadedModel:
    return load_model("tiny", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def real_lm() -> LoadedModel:
    return load_model(None, device="cpu", dtype="float32")


@pytest.fixture()
async def tiny_engine(tiny_lm: LoadedModel):
    engine = Engine(tiny_lm)
    yield engine
    engine.close()
