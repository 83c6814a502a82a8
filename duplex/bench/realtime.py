"""``duplex bench realtime``: the served path, spoken to in real time, measured from outside.

``duplex serve`` runs as its own process (or any server at ``--url``); a browser-like client
(:mod:`.loopback`) speaks the eval's scenarios to it over ``/ws`` at real time and plays the
agent's audio on a virtual speaker. Every figure comes from the client's timeline:

- end of the user's speech (the scenario's truth) -> first agent audio played / first text delta,
  with the stages in between as the client saw them (``speech_stopped``, last committed words,
  ``transcription.completed``, first text delta, first audio received, first audio played);
- barge-in: user onset -> ``response.interrupted`` and -> audio stopped;
- the Full-Duplex-Bench TORs and latencies, scored by :mod:`duplex.eval.metrics` on the same
  records as ``duplex eval run --clock measured``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from duplex.eval.metrics import EpisodeMetrics, agent_outputs, episode_metrics, summarize

from .loopback import LoopbackConfig, run_episode
from .servers import ServeOptions, serve_subprocess

__all__ = ["STAGES", "TARGETS", "RealtimeConfig", "bench_realtime", "episode_latencies", "format_summary",
           "prepare_scenarios", "summarize_realtime"]

log = logging.getLogger(__name__)

# Targets for the served path on the default models (seconds after the true end of user speech).
TARGETS = {"first_audio_p50_s": 0.6, "first_audio_p95_s": 1.0, "first_text_p50_s": 0.4}
# Barge-in targets (issue 11): seconds after the user's onset, or after the interruption ends.
BARGEIN_TARGETS = {"onset_to_paused_p50_s": 0.3, "onset_to_paused_p95_s": 0.4, "interruption_reply_p50_s": 1.0}
BARGEIN_RATE_TARGETS = {"backchannel_resumed_rate": 0.9, "tor_interruption": 0.95}
STAGES = ("speech_stopped", "last_committed_words", "transcription_completed", "first_text_delta",
          "first_audio_received", "first_audio_played")
DEFINITIONS = {
    "clock": "client monotonic clock; 0 = the first microphone sample; server events at their receive time",
    "end_of_speech": "the scenario's true end of the user's utterance (end_of_turn cue: last voiced 10 ms frame)",
    "first_audio_played": "the virtual speaker starts the reply's first audio frame (at arrival when idle)",
    "reply": "the first agent turn created after the utterance's onset; one that starts playing before the end "
             "of speech (e.g. into a pause) counts as early and is no latency sample",
    "stages_s": "each event's receive time minus the end of speech, over on-time replies: speech_stopped = "
                "input_audio_buffer.speech_stopped; last_committed_words = the last committed "
                "input_audio_transcription.delta of the turn; transcription_completed = "
                "input_audio_transcription.completed; first_text_delta = response.output_text.delta; "
                "first_audio_received / first_audio_played = the reply's first audio frame",
    "bargein": "interruption and backchannel cues where agent audio was playing at the user's onset: onset -> "
               "response.output_audio.paused received (the client holds playback there); onset -> "
               "response.interrupted received; onset -> audio stopped; resumed = the pause ended in "
               "response.output_audio.resumed with no interruption; interruption reply = end of the "
               "interrupting utterance -> first word of the next agent turn played",
    "full_duplex_bench": "duplex.eval.metrics on the same timeline (means; latencies where TOR = 1)",
}
_BACKGROUND_QUESTIONS = (
    "Tell me about the history of tea.", "What makes a good breakfast?", "How do airplanes stay up?",
    "Describe a walk through a forest.", "Why do cats purr?", "What is your favourite season and why?",
)


@dataclass(frozen=True, slots=True)
class RealtimeConfig:
    """``url``: a running server (else ``duplex serve`` is started with the model options).
    ``n``: scenarios per category (LibriVox: clips). ``policy``: NAME or NAME:key=value,..."""

    url: str | None = None
    scenarios: str | None = None
    n: int = 3
    seed: int = 0
    speech: str = "synthetic"  # synthetic | librivox
    background_talker: bool = False
    policy: str | None = None
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    quantize: str | None = None
    auth_token: str | None = None
    warmup: bool = True
    out: str | None = None
    serve_args: tuple[str, ...] = ()  # more ``duplex serve`` flags for an A/B, e.g. ("--overlap-layout", "interleave")
    type: str = "realtime_config"


# ---- scenarios -------------------------------------------------------------------------------
def _cache_root() -> Path:
    from duplex.engine.models import cache_dir

    return cache_dir() / "bench" / "realtime"


def _librivox_scenarios(out: Path, n: int, lead_s: float = 0.5, tail_s: float = 8.0) -> list[Path]:
    """Turn-taking scenarios whose question is a real LibriVox recording (pocketsphinx-testdata)."""
    from duplex.audio import read_wav
    from duplex.audio.commands import librivox_samples
    from duplex.eval.scenario import AudioItem, Cue, Scenario, save_scenario, voiced_bounds_s

    clips = librivox_samples()
    if not clips:
        raise FileNotFoundError("no LibriVox clips found: install the Debian package pocketsphinx-testdata")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (wav, ref) in enumerate(clips[:max(1, n)]):
        audio = read_wav(wav)
        # The clips are cut tight and carry room noise above -40 dB: take the speech span at -26 dB
        # (5 % of the peak RMS), or the file's end would count as the end of speech.
        on, off = voiced_bounds_s(audio, threshold_db=-26.0)
        cue = Cue("end_of_turn", t=round(lead_s + off, 3), start=round(lead_s + on, 3), item=0)
        s = Scenario(id=f"librivox-{i:04d}", category="turn_taking", items=(AudioItem(lead_s, str(wav), ref),),
                     cues=(cue,), duration_s=round(lead_s + len(audio) / 16_000 + tail_s, 2),
                     meta={"source": "pocketsphinx-testdata librivox", "wav": wav.name})
        path = out / f"{s.id}.json"
        save_scenario(s, path)
        paths.append(path)
    return paths


def prepare_scenarios(cfg: RealtimeConfig) -> list[Path]:
    """Scenario files to play, in round-robin category order: up to ``n`` per category from
    ``cfg.scenarios``, else rendered once into the cache (Piper + flite voices, or LibriVox)."""
    from duplex.eval.runner import interleave_by_category

    if cfg.scenarios:
        paths = sorted(p for p in Path(cfg.scenarios).glob("*.json") if p.name not in ("summary.json", "manifest.json"))
        if not paths:
            raise FileNotFoundError(f"no scenario *.json files in {cfg.scenarios}")
    else:
        target = _cache_root() / f"{cfg.speech}-n{cfg.n}-seed{cfg.seed}"
        marker = target / ".complete"
        if not marker.exists():
            log.warning("rendering %s scenarios into %s (once)", cfg.speech, target)
            if cfg.speech == "librivox":
                _librivox_scenarios(target, cfg.n)
            else:
                from duplex.eval.make import make_scenarios

                make_scenarios(target, cfg.n, seed=cfg.seed, progress=True)
            marker.write_text("ok\n")
        paths = sorted(p for p in target.glob("*.json"))
    ordered = interleave_by_category([str(p) for p in paths])
    counts: dict[str, int] = {}
    out = []
    for p in ordered:
        category = json.loads(Path(p).read_text(encoding="utf-8")).get("category", "?")
        if counts.get(category, 0) < cfg.n:
            counts[category] = counts.get(category, 0) + 1
            out.append(Path(p))
    return out


# ---- per-episode analysis --------------------------------------------------------------------
def _server_events(records: list[dict[str, Any]], kind: str) -> list[tuple[float, dict[str, Any]]]:
    return [(r["t"], r["event"]) for r in records
            if r.get("type") == "server_event" and r["event"].get("type") == kind]


def _first(items: list[tuple[float, dict[str, Any]]], lo: float, turn: int | None = None) -> float | None:
    return next((t for t, ev in items if t >= lo and (turn is None or ev.get("turn") == turn)), None)


def episode_latencies(records: list[dict[str, Any]], window_s: float = 10.0) -> dict[str, Any]:
    """From one loopback timeline: each end-of-turn cue's reply with its stage times, and each
    barge-in (interruption/backchannel cue while agent audio played) with its stop times. Times
    are seconds after the cue (the true end of speech, or the user's onset for barge-ins)."""
    cues = [r for r in records if r.get("type") == "cue"]
    created = sorted((r["t"], r["turn"]) for r in records if r.get("type") == "turn_started"
                     and r.get("speaker") == "agent")
    stopped = _server_events(records, "input_audio_buffer.speech_stopped")
    words = [(t, ev) for t, ev in _server_events(records, "conversation.item.input_audio_transcription.delta")
             if ev.get("committed")]
    completed = _server_events(records, "conversation.item.input_audio_transcription.completed")
    text = _server_events(records, "response.output_text.delta")
    audio_rx = _server_events(records, "response.output_audio.delta")
    said: dict[int, str] = {}
    for _, ev in text:
        said[int(ev["turn"])] = said.get(int(ev["turn"]), "") + str(ev.get("delta", ""))
    played: dict[int, float] = {}
    for r in records:
        if r.get("type") == "agent_audio":
            played[r["turn"]] = min(played.get(r["turn"], r["t"]), r["t"])
    outputs = {o.turn: o for o in agent_outputs(records)}
    replies = []
    for c in (c for c in cues if c.get("kind") == "end_of_turn"):
        t_end = float(c["t"])
        start = float(c["start"]) if c.get("start") is not None else t_end
        turn = next((k for t, k in created if start <= t <= t_end + window_s), None)
        reply: dict[str, Any] = {"cue_t": t_end, "turn": turn}
        t_done = _first(completed, t_end)
        if turn is not None:
            t_created = next(t for t, k in created if k == turn)
            last_words = [t for t, _ in words if start <= t <= (t_done if t_done is not None else t_created)]
            stamps = {
                "speech_stopped": _first(stopped, t_end),
                "last_committed_words": last_words[-1] if last_words else None,
                "transcription_completed": t_done,
                "first_text_delta": _first(text, start, turn),
                "first_audio_received": _first(audio_rx, start, turn),
                "first_audio_played": played.get(turn),
            }
            reply["stages_s"] = {k: None if v is None else round(v - t_end, 4) for k, v in stamps.items()}
            out = outputs.get(turn)
            if out is not None and out.first_word_t is not None:
                reply["first_word_s"] = round(out.first_word_t - t_end, 4)
            reply["reply"] = said.get(turn, "").strip()  # generated text (may run past what was played)
        heard = next((ev.get("transcript", "") for t, ev in completed if t >= t_end), None)
        reply["heard"] = heard
        replies.append(reply)
    bargeins = []
    halted = {r["turn"]: r["t"] for r in records if r.get("type") == "agent_audio_halted"}
    interrupted = [(r["t"], r["turn"]) for r in records if r.get("type") == "interrupted"]
    paused = [(r["t"], r.get("turn")) for r in records if r.get("type") == "playback_paused"]
    resumed = [(r["t"], r.get("turn")) for r in records if r.get("type") == "playback_resumed"]
    for c in (c for c in cues if c.get("kind") in ("interruption", "backchannel")):
        playing = next((o for o in outputs.values() if o.playing_at(c["t"])), None)
        if playing is None:
            continue  # the agent was not speaking at the cue: not applicable
        hi = float(c["end"] if c.get("end") is not None else c["t"]) + window_s
        t_int = next((t for t, k in interrupted if k == playing.turn and c["t"] <= t <= hi), None)
        t_halt = halted.get(playing.turn)
        t_halt = t_halt if t_halt is not None and c["t"] <= t_halt <= hi else None
        t_pause = next((t for t, k in paused if k == playing.turn and c["t"] <= t <= hi), None)
        t_resume = next((t for t, k in resumed if k == playing.turn and t_pause is not None and t >= t_pause), None)
        end = float(c["end"] if c.get("end") is not None else c["t"])
        reply_out = next((o for o in sorted(outputs.values(), key=lambda o: o.turn) if o.turn > playing.turn
                          and o.first_word_t is not None and o.first_word_t >= c["t"]), None)
        reply_t = None if reply_out is None else reply_out.first_word_t
        said_by_user = next((r.get("text", "") for r in records if r.get("type") == "user_speech"
                             and abs(float(r["t"]) - float(c["t"])) < 1e-3), "")
        bargeins.append({"kind": c["kind"], "cue_t": c["t"], "turn": playing.turn,
                         "to_paused_s": None if t_pause is None else round(t_pause - c["t"], 4),
                         "resumed": t_resume is not None and t_int is None,
                         "to_interrupted_s": None if t_int is None else round(t_int - c["t"], 4),
                         "to_audio_stopped_s": None if t_halt is None else round(t_halt - c["t"], 4),
                         "reply_after_end_s": None if reply_t is None else round(max(0.0, reply_t - end), 4),
                         **_addressed(said_by_user, said.get(reply_out.turn, "") if reply_out else None)})
    return {"replies": replies, "bargeins": bargeins}


_FUNCTION_WORDS = frozenset(
    "about actually again also another asked back been could does excuse from have instead just know like more "
    "please really said should some sorry talk tell than that them then there they this tomorrow want what when "
    "where which with would your".split())


def _content_words(text: str) -> set[str]:
    words = ("".join(ch for ch in w.lower() if ch.isalnum()) for w in text.split())
    return {w for w in words if len(w) >= 4 and w not in _FUNCTION_WORDS}


def _addressed(user_text: str, reply_text: str | None) -> dict[str, Any]:
    """Does the reply after an interruption use the interruption's content words ("Oslo",
    "submarines")? A crude but checkable sign that the agent read what it was told."""
    if reply_text is None:
        return {"interruption_text": user_text, "reply_text": None, "reply_uses_its_words": None}
    wanted = _content_words(user_text)
    used = sorted(wanted & _content_words(reply_text))
    return {"interruption_text": user_text, "reply_text": reply_text.strip(),
            "reply_uses_its_words": bool(used) if wanted else None, "words_used": used}


# ---- aggregation -----------------------------------------------------------------------------
def _stats(values: list[float], with_max: bool = True) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"p50": None, "p95": None, **({"max": None} if with_max else {}), "n": 0}
    out = {"p50": round(float(np.percentile(vals, 50)), 3), "p95": round(float(np.percentile(vals, 95)), 3)}
    if with_max:
        out["max"] = round(max(vals), 3)
    return {**out, "n": len(vals)}


def _rate(flags: list[bool | None]) -> dict[str, Any]:
    known = [f for f in flags if f is not None]
    return {"rate": round(sum(known) / len(known), 4) if known else None, "n": len(known)}


def summarize_realtime(episodes: list[dict[str, Any]], label: str) -> dict[str, Any]:
    """Aggregate per-episode ``episode_latencies`` + eval metrics into the benchmark's figures."""
    replies = [r for e in episodes for r in e["latencies"]["replies"]]
    answered = [r for r in replies if r.get("stages_s")]
    # A reply that started playing before the user finished (e.g. into a pause) is no latency sample.
    early = [r for r in answered if (r["stages_s"].get("first_audio_played") or 0.0) < 0]
    on_time = [r for r in answered if r not in early]

    def stage(name: str) -> list[float]:
        return [r["stages_s"][name] for r in on_time if r["stages_s"].get(name) is not None]

    first_audio = stage("first_audio_played")
    first_text = [v for v in stage("first_text_delta") if v >= 0]
    all_bargeins = [b for e in episodes for b in e["latencies"]["bargeins"]]
    interruptions = [b for b in all_bargeins if b["kind"] == "interruption"]
    backchannels = [b for b in all_bargeins if b["kind"] == "backchannel"]
    rows = summarize([EpisodeMetrics(**e["metrics"]) for e in episodes]).get(label, {})
    fdb_keys = ("tor_pause", "tor_backchannel", "tor_turn_taking", "tor_interruption", "turn_taking_latency_s",
                "stop_latency_s", "response_latency_s", "yield_rate", "false_interruption_rate", "overlap_s")
    fdb: dict[str, Any] = {k: None if rows.get(k) is None else round(float(rows[k]), 4) for k in fdb_keys}
    fdb["valid_cues"] = {c: f"{rows.get(f'n_{c}', 0)}/{rows.get(f'n_{c}_total', 0)}"
                         for c in ("pause", "backchannel", "turn_taking", "interruption")}
    fa, ft = _stats(first_audio), _stats(first_text)
    values = {"first_audio_p50_s": fa["p50"], "first_audio_p95_s": fa["p95"], "first_text_p50_s": ft["p50"]}
    targets = {k: {"target": v, "value": values[k], "met": values[k] is not None and values[k] <= v}
               for k, v in TARGETS.items()}
    paused_s = _stats([b.get("to_paused_s") for b in all_bargeins], False)
    reply_s = _stats([b.get("reply_after_end_s") for b in interruptions], False)
    resumed_rate = (sum(1 for b in backchannels if b.get("resumed")) / len(backchannels)) if backchannels else None
    b_values = {"onset_to_paused_p50_s": paused_s["p50"], "onset_to_paused_p95_s": paused_s["p95"],
                "interruption_reply_p50_s": reply_s["p50"]}
    bargein_targets = {k: {"target": v, "value": b_values[k], "met": b_values[k] is not None and b_values[k] <= v}
                       for k, v in BARGEIN_TARGETS.items()}
    rate_values = {"backchannel_resumed_rate": resumed_rate, "tor_interruption": fdb.get("tor_interruption")}
    bargein_targets.update({k: {"target": v, "value": rate_values[k],
                                "met": rate_values[k] is not None and rate_values[k] >= v}
                            for k, v in BARGEIN_RATE_TARGETS.items()})
    return {
        "end_of_speech_to_first_audio_played_s": fa,
        "end_of_speech_to_first_text_delta_s": ft,
        "replies": {"end_of_turn_cues": len(replies), "answered": len(answered), "early": len(early),
                    "no_audio": sum(1 for r in answered if r["stages_s"].get("first_audio_played") is None)},
        "bargein": {
            "user_onset_to_paused_s": paused_s,
            "backchannel_resumed": f"{sum(1 for b in backchannels if b.get('resumed'))}/{len(backchannels)}",
            "backchannel_resumed_rate": None if resumed_rate is None else round(resumed_rate, 4),
            "interruption_end_to_reply_s": reply_s,
            "interruption_reply_uses_its_words": _rate([b.get("reply_uses_its_words") for b in interruptions]),
            "targets": bargein_targets,
            "user_onset_to_response_interrupted_s": _stats([b["to_interrupted_s"] for b in interruptions], False),
            "user_onset_to_audio_stopped_s": _stats([b["to_audio_stopped_s"] for b in interruptions], False),
            "applicable": len(interruptions),
            "not_interrupted": sum(1 for b in interruptions if b["to_interrupted_s"] is None),
        },
        "full_duplex_bench": fdb,
        "stages_s": {s: _stats(stage(s), False) for s in STAGES},
        "targets": targets,
        "targets_met": all(t["met"] for t in targets.values()),
    }


# ---- background load -------------------------------------------------------------------------
async def _background_talker(url: str, token: str | None, stop: asyncio.Event, stats: dict[str, Any]) -> None:
    """A second session that keeps a typed conversation going (new connection every 10 turns, so
    its context stays small): the measured session shares the engine with it."""
    from duplex.serving.client import DuplexClient

    ttft: list[float] = stats.setdefault("ttft_s", [])
    i = 0
    while not stop.is_set():
        async with DuplexClient(url, token) as client:
            for _ in range(10):
                if stop.is_set():
                    break
                t_send = time.monotonic()
                await client.send_text(_BACKGROUND_QUESTIONS[i % len(_BACKGROUND_QUESTIONS)])
                i += 1
                first = None
                async for ev in client.events():
                    if ev["type"] == "response.output_text.delta" and first is None:
                        first = time.monotonic()
                        ttft.append(first - t_send)
                    elif ev["type"] in ("response.done", "connection.closed"):
                        stats["turns"] = stats.get("turns", 0) + 1
                        break
                await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def _background(url: str, token: str | None, enabled: bool) -> AsyncIterator[dict[str, Any]]:
    stats: dict[str, Any] = {"enabled": enabled}
    if not enabled:
        yield stats
        return
    stop = asyncio.Event()
    task = asyncio.create_task(_background_talker(url, token, stop, stats), name="bench-background-talker")
    try:
        yield stats
    finally:
        stop.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        stats["ttft_s"] = _stats(stats.get("ttft_s", []))


# ---- the command -----------------------------------------------------------------------------
def _machine() -> dict[str, Any]:
    from duplex.eval.runner import git_commit

    return {"cpu_count": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform(), "python": platform.python_version(),
            "git_commit": git_commit(Path(__file__).parent)}


@contextlib.asynccontextmanager
async def _server(cfg: RealtimeConfig, policy_name: str | None) -> AsyncIterator[dict[str, Any]]:
    if cfg.url:
        yield {"url": cfg.url, "started_by_bench": False}
        return
    options = ServeOptions(model=cfg.model, device=cfg.device, dtype=cfg.dtype, quantize=cfg.quantize,
                           policy=policy_name, auth_token=cfg.auth_token, extra_args=tuple(cfg.serve_args))
    t = time.monotonic()
    log.warning("starting duplex serve (the first start converts the model; this can take a minute) ...")
    async with serve_subprocess(options, log_dir=_cache_root() / "logs") as url:
        yield {"url": url, "started_by_bench": True, "startup_s": round(time.monotonic() - t, 2),
               "options": {k: v for k, v in asdict(options).items()
                           if v is not None and k not in ("type", "auth_token")}}


async def bench_realtime(cfg: RealtimeConfig) -> dict[str, Any]:
    """Run every scenario against the server in real time (sequentially); return the JSON result."""
    from tqdm import tqdm

    from duplex.eval.runner import parse_policy, write_timeline
    from duplex.eval.scenario import load_scenario, render_user_audio, resolve_cues
    from duplex.eval.voices import VoiceBank

    spec = parse_policy(cfg.policy) if cfg.policy else None
    paths = await asyncio.to_thread(prepare_scenarios, cfg)
    send_policy = spec is not None and (cfg.url is not None or bool(spec.params))
    loop_cfg = LoopbackConfig(policy=spec.name if send_policy and spec else None,
                              policy_params=dict(spec.params) if send_policy and spec else None, token=cfg.auth_token)
    label = spec.label if spec else "server-default"
    voices = VoiceBank()
    prepared = []
    for p in paths:
        s = load_scenario(p)
        user = render_user_audio(s, voices)
        prepared.append((s, user, resolve_cues(s, user)))
    machine_start = _machine()
    t_start = time.monotonic()
    episodes: list[dict[str, Any]] = []
    session_policy = None
    async with _server(cfg, spec.name if spec else None) as server:
        url = server["url"]
        if cfg.warmup and prepared:
            s, user, cues = next((x for x in prepared if x[0].category == "turn_taking"), prepared[0])
            log.warning("warm-up episode %s (not counted) ...", s.id)
            await run_episode(url, s, user, cues, loop_cfg, label)
        async with _background(url, cfg.auth_token, cfg.background_talker) as background:
            bar = tqdm(prepared, desc="bench realtime", unit="ep", file=sys.stderr)
            for s, user, cues in bar:
                result = await run_episode(url, s, user, cues, loop_cfg, label)
                records = list(result.records)
                if cfg.out:
                    write_timeline(Path(cfg.out + ".timelines") / f"{s.id}.jsonl", records)
                lat = episode_latencies(records)
                metrics = episode_metrics(records)
                first = next((r["stages_s"]["first_audio_played"] for r in lat["replies"] if r.get("stages_s")), None)
                bar.set_postfix_str(f"{s.id} first audio {first if first is not None else '-'} s")
                episodes.append({"scenario": s.id, "category": s.category, "latencies": lat,
                                 "metrics": metrics.to_dict(), "client": result.stats})
                session_policy = session_policy or next(
                    (r["event"]["session"].get("policy") for r in records if r.get("type") == "server_event"
                     and r["event"].get("type") == "session.updated"), None)
    summary = summarize_realtime(episodes, label)
    return {
        "benchmark": "realtime",
        "what": "browser-like client over /ws at real time: end of user speech (scenario truth) -> first agent "
                "audio played, barge-in, Full-Duplex-Bench TORs (duplex.eval.metrics on the client's timeline)",
        "config": {**{k: v for k, v in asdict(cfg).items() if k not in ("type", "auth_token")},
                   "policy_label": label, "session_policy": session_policy, "scenarios_used": len(prepared)},
        "machine": {**machine_start, "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "server": server,
        "wall_s": round(time.monotonic() - t_start, 1),
        "definitions": DEFINITIONS,
        **summary,
        "background_talker": background,
        "per_episode": [{"scenario": e["scenario"], "category": e["category"], **e["latencies"],
                         "tor": e["metrics"]["tor"], "client": {k: e["client"].get(k) for k in
                                                                ("mic_max_lag_s", "marks", "truncates",
                                                                 "audio_frames")}}
                        for e in episodes],
    }


def format_summary(result: dict[str, Any]) -> str:
    """A few human-readable lines (the CLI prints JSON with ``--json``)."""
    fa, ft = result["end_of_speech_to_first_audio_played_s"], result["end_of_speech_to_first_text_delta_s"]
    b = result["bargein"]
    lines = [f"episodes {len(result['per_episode'])}, wall {result['wall_s']} s, server {result['server']['url']}",
             f"first audio played: p50 {fa['p50']} s  p95 {fa['p95']} s  max {fa['max']} s  (n={fa['n']})",
             f"first text delta:   p50 {ft['p50']} s  p95 {ft['p95']} s  max {ft['max']} s  (n={ft['n']})",
             f"barge-in: -> interrupted p50 {b['user_onset_to_response_interrupted_s']['p50']} s, -> audio stopped "
             f"p50 {b['user_onset_to_audio_stopped_s']['p50']} s (applicable {b['applicable']})",
             f"pause-first: onset -> paused p50 {b['user_onset_to_paused_s']['p50']} s p95 "
             f"{b['user_onset_to_paused_s']['p95']} s; backchannels resumed {b['backchannel_resumed']}; "
             f"interruption end -> reply p50 {b['interruption_end_to_reply_s']['p50']} s",
             "stages p50 (s after end of speech): "
             + ", ".join(f"{k} {v['p50']}" for k, v in result["stages_s"].items()),
             "Full-Duplex-Bench: " + ", ".join(f"{k} {v}" for k, v in result["full_duplex_bench"].items()
                                               if k != "valid_cues"),
             "targets: " + ", ".join(f"{k} {v['value']} <= {v['target']}: {'met' if v['met'] else 'MISSED'}"
                                     for k, v in result["targets"].items()),
             "barge-in targets: " + ", ".join(f"{k} {v['value']} (target {v['target']}): "
                                              f"{'met' if v['met'] else 'MISSED'}"
                                              for k, v in b["targets"].items())]
    return "\n".join(lines)
