"""``duplex bench soak``: N clients for T minutes against one ``duplex serve``, text-only.

Half the clients (at least one) are **well-behaved talkers**: they type a question, read the
streamed reply promptly and think for a moment. The others take turns at what hostile and unlucky
clients do: cancel the reply (``response.cancel``), type over the agent (a barge-in), drop the
connection mid-reply and resume it (``?session_id=…&resume_token=…&last_seq=N``), read slowly,
and flood (``session.update`` messages far beyond the rate limit, each of which must be answered).

Measured: the server's RSS over time (``/proc/PID/status`` VmRSS, plotted), the sessions it holds
(``/healthz``), error events by code, lost events (every client keeps the ``seq`` of every event
of its session across connections: text-only sessions send JSON only, which is never dropped, so a
gap is a loss), and the talkers' first-text latency (typed text sent -> first
``response.output_text.delta``) against an idle baseline: one talker alone, at the start of the
same run.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import platform
import random
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from duplex.bench.servers import (
    ServeOptions,
    read_rss_kib,
    serve_process,
    server_health,
)
from duplex.bench.soak_report import SeqLedger, percentile, plot_rss, rss_stats, targets
from duplex.bench.ticks import summarize_tick_log
from duplex.serving.client import DuplexClient, DuplexClientError, ResumeError

__all__ = ["SoakConfig", "bench_soak", "read_rss_kib", "run_kind"]

log = logging.getLogger(__name__)

QUESTIONS = ["What is the capital of France?", "Name three colors of the rainbow.", "Why is the sky blue?",
             "How many legs does a spider have?", "What do bees make?", "Who wrote Hamlet?",
             "What is the largest ocean?", "Tell me a fact about the moon."]
ACTIONS = ("resume", "flood", "cancel", "type_over", "slow_read")  # chaos client k starts at ACTIONS[k]
GUARD_S = 120.0  # one step of a client waits at most this long (a stall is counted, not fatal)


@dataclass(frozen=True, slots=True)
class SoakConfig:
    """``url`` None: start ``duplex serve`` (text-only) and sample its RSS; with ``url``, RSS needs
    ``server_pid``. ``warmup_s`` None: 10 % of the run, at least 30 s, at most 5 minutes."""

    clients: int = 8
    minutes: float = 30.0
    url: str | None = None
    server_pid: int | None = None
    auth_token: str | None = None
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    quantize: str | None = None
    warmup_s: float | None = None
    sample_s: float = 2.0
    max_reply_tokens: int = 32
    idle_trials: int = 20  # per idle baseline: with 6 its p95 was all but the slowest of them
    flood_messages: int = 600
    slow_read_s: float = 0.2
    seed: int = 0
    out: str | None = None
    serve_args: tuple[str, ...] = ()  # more ``duplex serve`` flags (recorded in the JSON)
    type: str = "soak_config"

    @property
    def warmup(self) -> float:
        if self.warmup_s is not None:
            return self.warmup_s
        return min(300.0, max(30.0, 0.1 * self.minutes * 60))


@dataclass(slots=True)
class _Stats:
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    actions: collections.Counter[str] = field(default_factory=collections.Counter)
    closes: collections.Counter[str] = field(default_factory=collections.Counter)  # unexpected, by code
    stalls: collections.Counter[str] = field(default_factory=collections.Counter)
    first_text_ms: list[float] = field(default_factory=list)  # well-behaved talkers, under load
    idle_first_text_ms: list[float] = field(default_factory=list)
    idle_end_first_text_ms: list[float] = field(default_factory=list)  # the same, once the soak is over
    lost: int = 0
    duplicates: int = 0
    sessions: int = 0
    events: int = 0
    turns: int = 0
    resumes: int = 0
    resumes_failed: collections.Counter[str] = field(default_factory=collections.Counter)
    replayed: int = 0
    replay_incomplete: int = 0
    flood_sent: int = 0
    flood_answered: int = 0


class _Closed(Exception):
    """The connection ended while the client waited for something."""


class _SoakClient:
    """One soak client: a DuplexClient plus the seq ledger of its current session."""

    def __init__(self, cfg: SoakConfig, stats: _Stats, index: int, talker: bool) -> None:
        self.cfg, self.stats, self.index, self.talker = cfg, stats, index, talker
        self.rng = random.Random(cfg.seed * 1000 + index)
        self.client: DuplexClient | None = None
        self.ledger = SeqLedger()
        self.url = cfg.url or ""
        self.done_turn = -1  # the latest agent turn whose response.done was read
        self.offset = 0  # where in ACTIONS this (chaos) client starts

    # ---- connection -----------------------------------------------------------------------
    async def open(self) -> None:
        # a chaos client queues few events, so its slow reading reaches the socket
        self.client = DuplexClient(self.url, self.cfg.auth_token, max_queue=4096 if self.talker else 8)
        await self.client.connect()
        self.ledger = SeqLedger()
        self.ledger.see((self.client.opened or {}).get("seq"))  # session.created, read by connect()
        self.done_turn = -1
        self.stats.sessions += 1
        await self.client.update_session(max_output_tokens=self.cfg.max_reply_tokens)
        await self.until(lambda e: e["type"] == "session.updated")

    def settle(self) -> None:
        """Fold this session's ledger into the totals (at its end)."""
        self.stats.lost += len(self.ledger.missing())
        self.stats.duplicates += self.ledger.duplicates
        self.ledger = SeqLedger()

    async def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()
            self.settle()
            self.client = None

    async def reopen(self) -> None:
        await self.close()
        await self.open()

    # ---- events ---------------------------------------------------------------------------
    def _account(self, ev: dict[str, Any]) -> None:
        self.stats.events += 1
        self.ledger.see(ev.get("seq"))
        if ev["type"] == "error":
            self.stats.errors[str(ev.get("code"))] += 1
        elif ev["type"] == "response.done":
            self.stats.turns += 1
            self.done_turn = max(self.done_turn, int(ev.get("turn", -1)))

    async def until(self, pred: Callable[[dict[str, Any]], bool], slow_s: float = 0.0,
                    on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Read (and account) events until ``pred``; a close raises :class:`_Closed`."""
        assert self.client is not None
        deadline = time.monotonic() + GUARD_S
        while True:
            if slow_s:
                await asyncio.sleep(slow_s)
            ev = await self.client.next_event(max(0.1, deadline - time.monotonic()))
            self._account(ev)
            if on_event is not None:
                on_event(ev)
            if ev["type"] == "connection.closed":
                raise _Closed(str(ev.get("code")))
            if pred(ev):
                return ev

    async def ask(self, question: str | None = None) -> tuple[int, float | None]:
        """Send a question (a random one by default); wait for the reply's first text (or its
        end). Returns (turn, ms); ms None: the reply ended without text (then ``self.done_turn``
        is that turn)."""
        assert self.client is not None
        t0 = time.perf_counter()
        await self.client.send_text(question or self.rng.choice(QUESTIONS))
        ev = await self.until(lambda e: e["type"] in ("response.output_text.delta", "response.done"))
        ms = (time.perf_counter() - t0) * 1000 if ev["type"] == "response.output_text.delta" else None
        return int(ev.get("turn", -1)), ms

    async def done(self, turn: int, slow_s: float = 0.0) -> None:
        """Read until agent turn ``turn`` (or a later one) is done; at once if it already is."""
        if self.done_turn >= turn:
            return
        await self.until(lambda e: e["type"] == "response.done" and e.get("turn", -1) >= turn, slow_s)

    # ---- behaviours -----------------------------------------------------------------------
    async def talk(self, record: list[float] | None, question: str | None = None) -> None:
        turn, ms = await self.ask(question)
        if ms is not None and record is not None:
            record.append(ms)
        await self.done(turn)

    async def act(self, action: str) -> None:
        assert self.client is not None
        self.stats.actions[action] += 1
        if action == "flood":
            await self._flood()
            return
        turn, _ = await self.ask()
        if action == "cancel":
            await self.client.interrupt()
            await self.done(turn)
        elif action == "type_over":
            await self.client.send_text("Wait, tell me something else instead.")
            await self.done(turn + 1)
        elif action == "slow_read":
            await self.done(turn, slow_s=self.cfg.slow_read_s)
        elif action == "resume":
            await self._drop_and_resume()
            await self.done(turn)

    async def _drop_and_resume(self) -> None:
        assert self.client is not None
        self.client.abort()  # a network loss: the session stays, detached
        with contextlib.suppress(_Closed):
            await self.until(lambda e: False)  # take what was already read, up to connection.closed
        await asyncio.sleep(self.rng.uniform(0.2, 1.5))  # the agent keeps talking meanwhile
        try:
            await self.client.resume()
        except ResumeError as exc:
            self.stats.resumes_failed[exc.reason] += 1
            raise _Closed(f"resume_{exc.reason}") from exc
        self.stats.resumes += 1
        opened = self.client.opened or {}
        self.stats.replayed += int(opened.get("replayed", 0))
        self.stats.replay_incomplete += 0 if opened.get("replay_complete", True) else 1

    async def _flood(self) -> None:
        """``flood_messages`` cheap updates as fast as the socket takes them: the server paces its
        reading (rate_limited notices) and must answer every one (``session.updated``)."""
        assert self.client is not None
        n, answered = self.cfg.flood_messages, [0]

        def count(ev: dict[str, Any]) -> None:
            answered[0] += ev["type"] == "session.updated"

        async def send() -> None:
            assert self.client is not None
            for i in range(n):
                await self.client.update_session(temperature=0.5 + (i % 2) * 0.2)

        sender = asyncio.ensure_future(send())
        try:
            await self.until(lambda e: answered[0] >= n, on_event=count)
            await sender
        finally:
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
            self.stats.flood_sent += n
            self.stats.flood_answered += answered[0]


async def _client_loop(c: _SoakClient, stop: asyncio.Event, record: list[float] | None) -> None:
    """Run one client's behaviour until ``stop``; every failure is counted and the client
    starts a new session rather than ending the run."""
    rounds = 0
    while not stop.is_set():
        try:
            if c.client is None:
                await c.open()
            if c.talker:
                await c.talk(record)
                await asyncio.sleep(c.rng.uniform(0.5, 2.0))  # reading the answer, thinking
            else:
                await c.act(ACTIONS[(rounds + c.offset) % len(ACTIONS)])
                await asyncio.sleep(c.rng.uniform(0.2, 1.0))
            rounds += 1
        except _Closed as exc:
            c.stats.closes[str(exc)] += 1
            await c.close()
        except (asyncio.TimeoutError, TimeoutError):
            c.stats.stalls["timeout"] += 1
            await c.close()
        except DuplexClientError as exc:
            c.stats.stalls[type(exc).__name__] += 1
            log.warning("client %d: %s", c.index, exc)
            await c.close()
            await asyncio.sleep(1.0)
    await c.close()


class _Sampler:
    """RSS and sessions held, every ``sample_s``, from the start of the run."""

    def __init__(self, pid: int | None, url: str, every_s: float, t0: float) -> None:
        self.pid, self.url, self.every_s, self.t0 = pid, url, every_s, t0
        self.rss: list[tuple[float, int]] = []
        self.sessions: list[tuple[float, int]] = []
        self.soak_start_s = 0.0  # when the soak clients started (after the idle baseline)

    def sample(self) -> None:
        t = round(time.monotonic() - self.t0, 2)
        if self.pid is not None and (kib := read_rss_kib(self.pid)) is not None:
            self.rss.append((t, kib))
        health = server_health(self.url)
        if health is not None:
            self.sessions.append((t, int(health.get("sessions", -1))))

    async def run(self) -> None:
        while True:
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(self.every_s)


def _progress(msg: str) -> None:
    print(f"[bench soak] {msg}", file=sys.stderr, flush=True)


@contextlib.asynccontextmanager
async def _server(cfg: SoakConfig) -> AsyncIterator[tuple[str, int | None, dict[str, Any]]]:
    if cfg.url:
        yield cfg.url, cfg.server_pid, {"url": cfg.url, "started_by_bench": False, "pid": cfg.server_pid}
        return
    options = ServeOptions(model=cfg.model, device=cfg.device, dtype=cfg.dtype, quantize=cfg.quantize, tts="none",
                           asr_model="none", auth_token=cfg.auth_token,
                           extra_args=("--max-sessions", str(2 * cfg.clients + 4), *cfg.serve_args))
    t0 = time.monotonic()
    async with serve_process(options) as served:
        info = {"url": served.url, "started_by_bench": True, "pid": served.pid,
                "startup_s": round(time.monotonic() - t0, 1),
                "argv": options.argv(served.port)[1:], "log": str(served.log_path)}
        yield served.url, served.pid, info


async def _idle_baseline(cfg: SoakConfig, url: str, stats: _Stats, record: list[float]) -> None:
    """One talker alone: every question once unscored (a fresh server builds its buffers for each
    new prompt length on first use: the idle figure must not carry that), then ``idle_trials``
    measured ones."""
    c = _SoakClient(cfg, stats, index=-1, talker=True)
    c.url = url
    await c.open()
    try:
        for question in QUESTIONS:
            await c.talk(None, question)
        for _ in range(cfg.idle_trials):
            await c.talk(record)
            await asyncio.sleep(0.3)
    finally:
        await c.close()


def _ms(values: list[float]) -> dict[str, Any]:
    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 1)

    return {"p50": r(percentile(values, 0.5)), "p95": r(percentile(values, 0.95)),
            "max": r(max(values) if values else None), "n": len(values)}


def _machine() -> dict[str, Any]:
    from duplex.eval.runner import git_commit

    return {"cpu_count": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()],
            "nice": os.nice(0), "platform": platform.platform(), "python": platform.python_version(),
            "git_commit": git_commit(Path(__file__).parent)}


def run_kind(cfg: SoakConfig) -> str:
    if cfg.minutes >= 30 and cfg.clients >= 8:
        return "target run (30 minutes, 8 clients)"
    return (f"SMOKE RUN ONLY: {cfg.minutes:g} minutes with {cfg.clients} clients, not the 30-minute, "
            "8-client target run; the figures validate the bench and show trends, not the targets")


async def bench_soak(cfg: SoakConfig) -> dict[str, Any]:
    """Run the soak; return the JSON result (and write the plot next to ``cfg.out`` if given)."""
    machine = _machine()
    stats = _Stats()
    t_start = time.monotonic()
    _progress(f"starting: {cfg.clients} clients for {cfg.minutes:g} min ({run_kind(cfg).split(':')[0]})")
    async with _server(cfg) as (url, pid, server_info):
        sampler = _Sampler(pid, url, cfg.sample_s, time.monotonic())
        sampling = asyncio.ensure_future(sampler.run())
        try:
            _progress(f"server {url} (pid {pid}); idle baseline: {cfg.idle_trials} questions, one client")
            await _idle_baseline(cfg, url, stats, stats.idle_first_text_ms)
            _progress(f"idle first text p50 {percentile(stats.idle_first_text_ms, 0.5) or 0:.0f} ms; "
                      f"soak for {cfg.minutes:g} min")
            n_talkers = max(1, cfg.clients // 2)
            clients = [_SoakClient(cfg, stats, i, talker=i < n_talkers) for i in range(cfg.clients)]
            for c in clients:
                c.url, c.offset = url, c.index - n_talkers
            stop = asyncio.Event()
            engine_start = ((await asyncio.to_thread(server_health, url)) or {}).get("engine") or {}
            t_soak, pc_soak = time.monotonic(), time.perf_counter()
            sampler.soak_start_s = round(t_soak - sampler.t0, 2)
            tasks = [asyncio.ensure_future(_client_loop(c, stop, stats.first_text_ms)) for c in clients]
            try:
                while (left := cfg.minutes * 60 - (time.monotonic() - t_soak)) > 0:
                    await asyncio.sleep(min(10.0, left))
                    rss = sampler.rss[-1][1] / 1024 if sampler.rss else float("nan")
                    held = sampler.sessions[-1][1] if sampler.sessions else -1
                    _progress(f"{(time.monotonic() - t_soak) / 60:5.1f}/{cfg.minutes:g} min  rss {rss:.0f} MiB  "
                              f"sessions {held}  turns {stats.turns}  resumes {stats.resumes}  "
                              f"errors {dict(stats.errors)}  lost {stats.lost}")
            finally:
                stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)
            soak_s, pc_soak_end = time.monotonic() - t_soak, time.perf_counter()
            health_end = (await asyncio.to_thread(server_health, url)) or {}
            engine_end = health_end.get("engine") or {}
            engine = {k: v - engine_start.get(k, 0) for k, v in engine_end.items() if k != "max_rows"}
            await asyncio.sleep(1.0)
            await asyncio.to_thread(sampler.sample)  # after every client closed
            held_after = sampler.sessions[-1][1] if sampler.sessions else None
            # idle again at the end: this shared machine's speed drifts over half an hour (its
            # neighbours), so the idle value is given from both ends of the run
            _progress("idle baseline again, after the soak")
            await _idle_baseline(cfg, url, stats, stats.idle_end_first_text_ms)
        finally:
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling
    result = _result(cfg, stats, sampler, server_info, machine, soak_s, time.monotonic() - t_start, held_after)
    # how the engine spent the soak (the server's /healthz counters; empty for an older server)
    result["engine_during_soak"] = engine
    result["server_kernels"] = health_end.get("kernels") or {}  # what ran the forwards (Engine.describe)
    result["server_code"] = health_end.get("code") or {}  # which code served (its package and commit)
    tick_log = os.environ.get("DUPLEX_TICK_LOG", "").strip()
    if tick_log and Path(tick_log).is_file():  # the server (started with this environment) logged its ticks
        _progress(f"reading the tick log {tick_log}")
        result["tick_log"] = {"path": tick_log, **summarize_tick_log(tick_log, since=pc_soak, until=pc_soak_end)}
    return result


def _result(cfg: SoakConfig, stats: _Stats, sampler: _Sampler, server_info: dict[str, Any],
            machine: dict[str, Any], soak_s: float, wall_s: float, held_after: int | None) -> dict[str, Any]:
    rss = rss_stats(sampler.rss, sampler.soak_start_s + cfg.warmup)
    idle, loaded = _ms(stats.idle_first_text_ms), _ms(stats.first_text_ms)
    idle_end = _ms(stats.idle_end_first_text_ms)
    ratio_start = round(loaded["p95"] / idle["p95"], 2) if loaded["p95"] and idle["p95"] else None
    ratio_end = round(loaded["p95"] / idle_end["p95"], 2) if loaded["p95"] and idle_end["p95"] else None
    # the target's measure: against the faster idle of the two ends (the stricter ratio). The
    # shared host's speed drifts: one slow spell during 6 idle questions at the start once made
    # that idle p95 150 ms against 60 after the soak, and the ratio "met" at 1.61x, not 4.05x
    ratio = max((r for r in (ratio_start, ratio_end) if r is not None), default=None)
    internal = stats.errors.get("internal_error", 0)
    result: dict[str, Any] = {
        "benchmark": "soak",
        "run_kind": run_kind(cfg),
        "what": "N clients for T minutes against duplex serve (text-only): talkers, cancel, type-over barge-in, "
                "drop + resume with last_seq, slow reading, floods past the rate limit",
        "config": {**{k: v for k, v in asdict(cfg).items() if k not in ("type", "auth_token")},
                   "warmup_effective_s": cfg.warmup},
        "machine": {**machine, "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "server": server_info,
        "wall_s": round(wall_s, 1), "soak_s": round(soak_s, 1),
        "definitions": {
            "rss": "VmRSS of the server process from /proc/PID/status every sample_s (t = seconds since the first "
                   "sample; the idle baseline runs first, the soak clients start at soak_start_s); warm-up ends "
                   "at soak_start_s + config.warmup_effective_s (rss.warmup_s); growth = median of the last tenth of the "
                   "post-warm-up samples vs the median of their first tenth",
            "lost_events": "per session, over all its connections: seq numbers up to the highest received that "
                           "never arrived (text-only sessions send JSON only, which is never dropped)",
            "first_text": "input_text sent -> first response.output_text.delta of the reply, client clock; "
                          "well-behaved = the talker clients during the soak; idle = one talker alone at the start "
                          "(idle_after_soak: the same once every soak client has closed; each after every question once "
                          "unscored); p95_ratio, the target's measure, is against the faster of the two idle p95 "
                          "values (the stricter ratio: the shared host's speed drifts)",
            "roles": f"{max(1, cfg.clients // 2)} talkers (well-behaved), the rest rotate through {list(ACTIONS)}",
        },
        "rss": {**{k: v for k, v in asdict(rss).items() if k != "type"}, "soak_start_s": sampler.soak_start_s,
                "samples": sampler.rss},
        "sessions_held": {"samples": sampler.sessions,
                          "after_all_clients_closed": held_after},
        "errors_by_code": dict(sorted(stats.errors.items())),
        "internal_errors": internal,
        "lost_events": stats.lost, "duplicate_events": stats.duplicates,
        "unexpected_closes": dict(stats.closes), "stalls": dict(stats.stalls),
        "first_text_ms": {"idle": idle, "idle_after_soak": idle_end, "well_behaved_under_load": loaded,
                          "p95_ratio": ratio, "p95_ratio_vs_idle_at_start": ratio_start,
                          "p95_ratio_vs_idle_after_soak": ratio_end},
        "counts": {"sessions": stats.sessions, "events": stats.events, "agent_turns": stats.turns,
                   "actions": dict(stats.actions), "resumes": stats.resumes,
                   "resumes_failed": dict(stats.resumes_failed), "replayed_events": stats.replayed,
                   "replay_incomplete": stats.replay_incomplete, "flood_messages_sent": stats.flood_sent,
                   "flood_messages_answered": stats.flood_answered},
        "targets": targets(soak_s / 60, cfg.clients, rss, internal, stats.lost, ratio),
    }
    if cfg.out:
        png = Path(cfg.out).with_suffix(".png")
        if sampler.rss:
            plot_rss(sampler.rss, sampler.sessions, rss, png,
                     f"duplex bench soak: {cfg.clients} clients, {soak_s / 60:.1f} min ({run_kind(cfg).split(':')[0]})")
            result["plot"] = png.name
    return result
