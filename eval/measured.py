"""``duplex eval run --clock measured``: every episode through the real server, in real time.

The same browser-like client as ``duplex bench realtime`` (:mod:`duplex.bench.loopback`) plays
each scenario over ``/ws`` and records what a listener would have heard; the records go through
the same :mod:`.metrics`. The server is ``duplex serve`` in its own process, or, when the run asks
for the test fakes (``--asr-model fake``, ``--tts fake``, ``--vad energy``), an in-process
:class:`~duplex.serving.server.DuplexServer` with them. Each episode gets a fresh session with
its policy set by ``session.update``. Episodes run one after another: each takes its scenario's
duration in wall time, and parallel episodes would compete for the cores they measure.

The policies take turns going first (:func:`policy_order`): one server serves every episode, and
what a scenario's first episode leaves behind helps the next ones. The TTS cache is the one that
measured: the reply's first word ("Vitamin", "Yuki's") is synthesised once and is a lookup for every
later policy, one TTS call off its first audio. With a fixed order the first policy listed paid it on
every scenario.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from duplex.voice.config import voice_policy_params

from .metrics import episode_metrics
from .scenario import load_scenario, render_user_audio, resolve_cues

__all__ = ["policy_order", "run_measured", "uses_fakes"]

log = logging.getLogger(__name__)


def uses_fakes(spec: Any) -> bool:
    """The test stand-ins exist only in-process (``duplex serve`` loads the real models)."""
    return spec.asr == "fake" or spec.tts == "fake" or spec.vad == "energy"


def policy_order(policies: list[Any], scenario_index: int) -> list[Any]:
    """The order scenario ``scenario_index`` runs the policies in: rotated by one per scenario, so
    each policy goes first (and meets the server's caches cold) equally often."""
    k = scenario_index % len(policies) if policies else 0
    return list(policies[k:]) + list(policies[:k])


@contextlib.asynccontextmanager
async def _served(spec: Any) -> AsyncIterator[str]:
    import asyncio

    if getattr(spec, "server_url", None):
        yield spec.server_url
        return
    if not uses_fakes(spec):
        from duplex.bench.servers import ServeOptions, serve_subprocess

        options = ServeOptions(model=spec.model, device=spec.device, dtype=spec.dtype, tts=spec.tts,
                               asr_model=spec.asr, policy=spec.policies[0].name)
        async with serve_subprocess(options, log_dir=Path(spec.out_dir)) as url:
            yield url
        return
    from duplex.audio import WebRtcVad, load_tts, load_whisper
    from duplex.audio.fakes import EnergyVad, FakeTts, FakeWhisper
    from duplex.bench.servers import in_process_server
    from duplex.engine.models import load_model
    from duplex.engine.worker import Engine
    from duplex.session.core import SessionConfig

    lm = await asyncio.to_thread(load_model, spec.model, spec.device, spec.dtype)
    engine = Engine(lm, threads=max(1, spec.threads))
    tts = FakeTts() if spec.tts == "fake" else await asyncio.to_thread(load_tts, spec.tts)
    asr = FakeWhisper() if spec.asr == "fake" else await asyncio.to_thread(load_whisper, spec.asr)
    first = spec.policies[0]
    config = SessionConfig(policy=first.name, policy_params=dict(first.params) or voice_policy_params(first.name))
    try:
        async with in_process_server(engine, config=config, tts=tts, asr=asr,
                                     vad_factory=EnergyVad if spec.vad == "energy" else WebRtcVad) as url:
            yield url
    finally:
        engine.close()


async def run_measured(spec: Any, paths: list[str], on_episode: Callable[[], None] | None = None,
                       warmup: bool | None = None) -> list[dict[str, Any]]:
    """Play every scenario with every policy against one server; write each timeline; return the
    per-episode rows (metrics + client statistics + wall time) like the simulated clocks do."""
    from duplex.bench.loopback import LoopbackConfig, run_episode

    from .runner import timeline_path, write_timeline
    from .voices import VoiceBank

    voices = VoiceBank()
    rows: list[dict[str, Any]] = []
    warmup = (not uses_fakes(spec) and not getattr(spec, "server_url", None)) if warmup is None else warmup
    async with _served(spec) as url:
        for i, path in enumerate(paths):
            scenario = load_scenario(path)
            user = render_user_audio(scenario, voices)
            cues = resolve_cues(scenario, user)
            for p in policy_order(spec.policies, i):
                # a bare policy name runs with the parameters `duplex serve` gives it
                config = LoopbackConfig(policy=p.name, policy_params=dict(p.params) or voice_policy_params(p.name),
                                        max_reply_tokens=spec.max_reply_tokens, temperature=spec.temperature,
                                        instructions=spec.instructions or scenario.instructions)
                if warmup and i == 0 and p is spec.policies[0]:  # scenario 0 runs them in the listed order
                    log.warning("warm-up episode %s (not scored) ...", scenario.id)
                    await run_episode(url, scenario, user, cues, config, p.label)
                t0 = time.perf_counter()
                result = await run_episode(url, scenario, user, cues, config, p.label)
                records = [dict(r, policy=p.label, policy_name=p.name, seed=spec.seed)
                           if r.get("type") == "episode" else r for r in result.records]
                write_timeline(timeline_path(spec.out_dir, p.label, scenario.id), records)
                m = episode_metrics(records)
                rows.append({**m.to_dict(), **{f"client_{k}": v for k, v in result.stats.items()},
                             "wall_s": time.perf_counter() - t0})
                if on_episode is not None:
                    on_episode()
    return rows
