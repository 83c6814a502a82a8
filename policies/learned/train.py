"""Training for the learned turn policy: logged episodes -> labelled ticks -> model -> weights.

Data: the timelines of ``duplex eval run``. On the virtual clocks the session logs a
``policy_decided`` record (observation + action) at every decision; on the measured clock a
``duplex serve --log-decisions`` sends the same as ``policy.decided`` events, so the served path
itself (its real ASR timing and compute) can be the training data. A *listening tick* is one
where the agent is silent, the user has said something and is silent too: the moments where a
turn policy decides between listening and speaking. Its label comes from the scenario's cues:
1 once the user's turn is over (at or after the ``end_of_turn`` cue), 0 before it, e.g. inside an
annotated mid-sentence ``pause``. Only ticks before the logged agent's first turn are used: up to
then the observations do not depend on the policy that was logged (the user's input schedule is
the same for every policy), so any policy can be replayed on them exactly (:func:`simulate`).
One more stretch is policy-independent: after the agent yielded to an interruption (every policy
shares the barge-in rules) until its next turn. Those ticks form an episode of their own (category
``after_interruption``), labelled by the interruption cue's end: without them the model had never
seen a user who just cut the agent off, and waited out its cap there.

Split: by voice AND by sentence. Episodes whose voice is a test voice form the test split;
training keeps the others, minus every episode that shares a sentence with the test split.
Only the test split is reported.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..base import Observation, Policy, Speak
from .features import FEATURE_NAMES, turn_features
from .model import TurnModel

__all__ = ["LoggedEpisode", "Simulated", "TrainConfig", "build_rows", "choose_threshold", "cross_validate", "fit_model",
           "held_out_report", "load_episodes", "simulate", "split_episodes", "tick_label", "train_policy"]

_OBS_FIELDS = {f.name for f in dataclasses.fields(Observation)}


@dataclass(frozen=True, slots=True)
class LoggedEpisode:
    """One logged episode, reduced to what training needs."""

    path: str
    scenario: str
    category: str
    voice: str | None
    sentences: tuple[str, ...]
    eot_t: float | None  # the first end_of_turn cue: when the user's (first) turn ends
    pauses: tuple[tuple[float, float], ...]  # annotated mid-turn pauses (start, end)
    ticks: tuple[tuple[float, Observation], ...]  # listening ticks before the logged agent's first turn
    type: str = "logged_episode"


@dataclass(frozen=True, slots=True)
class TrainConfig:
    hidden: int = 0  # 0: logistic regression; N: one tanh layer of N units
    epochs: int = 400
    lr: float = 0.05
    weight_decay: float = 1e-3
    seed: int = 0
    max_gap_ms: float = 2000.0  # speak after this much silence whatever the model says
    early_penalty_s: float = 5.0  # threshold choice: one early take-over costs as much as 5 s of latency
    drop_audio: float = 0.15  # share of ticks repeated without audio features (they may arrive late)
    test_voices: tuple[str, ...] = ("flite:slt", "flite:awb")
    type: str = "train_config"


def _norm(text: str) -> str:
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())


def _decisions(records: list[dict[str, Any]]) -> Iterable[tuple[float, dict[str, Any]]]:
    """(time, observation) of every logged decision: the session's own ``policy_decided`` records
    (virtual clocks), or the ``policy.decided`` events a ``duplex serve --log-decisions`` sent to the
    measured-clock client (timed on the client's clock, as the cues are)."""
    for r in records:
        if r["type"] == "policy_decided":
            yield float(r["t"]), r["observation"]
        elif r["type"] == "server_event" and r.get("event", {}).get("type") == "policy.decided":
            yield float(r["t"]), r["event"]["observation"]


def load_episodes(run_dirs: Iterable[str | Path]) -> list[LoggedEpisode]:
    """Every finished timeline with logged decisions under ``RUN/episodes/*/*.jsonl``."""
    out = []
    for run in run_dirs:
        for path in sorted(Path(run).glob("episodes/*/*.jsonl")):
            with open(path, encoding="utf-8") as f:
                records = [json.loads(line) for line in f if line.strip()]
            if not records or records[-1].get("type") != "episode_end":
                continue
            head = records[0]
            cues = [r for r in records if r["type"] == "cue"]
            eots = sorted(c["t"] for c in cues if c["kind"] == "end_of_turn")
            agent_starts = sorted(r["t"] for r in records if r["type"] == "turn_started" and r.get("speaker") == "agent")
            agent_start = agent_starts[0] if agent_starts else math.inf
            cut = next((c for c in cues if c["kind"] == "interruption" and c.get("end") is not None), None)
            # after the agent yielded to an interruption, until its next turn: the user who just cut it off
            after_cut = (cut["t"], next((t for t in agent_starts if t > cut["t"]), math.inf)) if cut else None
            ticks, cut_ticks = [], []
            for t, logged in _decisions(records):
                obs = Observation(**{k: v for k, v in logged.items() if k in _OBS_FIELDS})
                if not obs.turn_open:
                    continue
                if t < agent_start:
                    ticks.append((t, obs))
                elif after_cut is not None and after_cut[0] <= t < after_cut[1] and obs.after_interruption:
                    cut_ticks.append((t, obs))
            common = dict(voice=head.get("voice"), sentences=tuple(sorted(
                {_norm(r["text"]) for r in records if r["type"] == "user_speech" and r.get("text")})))
            if ticks:
                out.append(LoggedEpisode(
                    path=str(path), scenario=str(head.get("scenario")), category=str(head.get("category")),
                    eot_t=eots[0] if eots else None,
                    pauses=tuple((c["t"], c["end"]) for c in cues if c["kind"] == "pause" and c.get("end") is not None),
                    ticks=tuple(ticks), **common))
            if cut_ticks and cut is not None:  # its own episode: the interrupting words end at the cue's end
                out.append(LoggedEpisode(
                    path=f"{path}#after-interruption", scenario=f"{head.get('scenario')}#after-interruption",
                    category="after_interruption", eot_t=float(cut["end"]), pauses=(), ticks=tuple(cut_ticks),
                    **common))
    return out


def tick_label(ep: LoggedEpisode, t: float) -> int | None:
    """1: the user's turn is over at ``t``; 0: it is not (a pause, a gap before the end); None:
    no end of turn is annotated."""
    if ep.eot_t is None:
        return None
    if any(a <= t < b for a, b in ep.pauses):
        return 0
    return int(t >= ep.eot_t)


def split_episodes(episodes: list[LoggedEpisode], test_voices: Iterable[str]
                   ) -> tuple[list[LoggedEpisode], list[LoggedEpisode], int]:
    """(train, test, dropped): test = a test voice; train = no test voice and no test sentence."""
    voices = set(test_voices)
    test = [e for e in episodes if e.voice in voices]
    held = {s for e in test for s in e.sentences}
    train = [e for e in episodes if e.voice not in voices and not held.intersection(e.sentences)]
    return train, test, len(episodes) - len(train) - len(test)


_AUDIO_FIELDS = ("audio_eot_prob", "pitch_slope_st_s", "pitch_end_st", "energy_slope_db_s", "speech_s", "vad_mean_1s",
                 "vad_mean")


def build_rows(episodes: list[LoggedEpisode], drop_audio: float = 0.0,
               rng: random.Random | None = None) -> tuple[list[list[float]], list[int]]:
    """Feature rows and labels of every labelled tick. ``drop_audio``: also add this share of the
    ticks again without their audio features (served, they can arrive after the end of speech)."""
    xs, ys = [], []
    rng = rng or random.Random(0)
    for ep in episodes:
        for t, obs in ep.ticks:
            y = tick_label(ep, t)
            if y is None:
                continue
            xs.append(turn_features(obs))
            ys.append(y)
            if drop_audio and obs.audio_eot_prob is not None and rng.random() < drop_audio:
                xs.append(turn_features(dataclasses.replace(obs, **{k: None for k in _AUDIO_FIELDS})))
                ys.append(y)
    return xs, ys


def fit_model(xs: list[list[float]], ys: list[int], config: TrainConfig) -> TurnModel:
    """Class-balanced logistic regression (or a one-hidden-layer tanh MLP) in torch."""
    import torch

    if not xs or len(set(ys)) < 2:
        raise ValueError(f"need listening ticks of both labels to train; got {len(ys)} ticks, labels {sorted(set(ys))}")
    torch.manual_seed(config.seed)
    x = torch.tensor(xs, dtype=torch.float32)
    y = torch.tensor(ys, dtype=torch.float32)
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-3)
    xn = (x - mean) / std
    d = x.shape[1]
    net = (torch.nn.Sequential(torch.nn.Linear(d, config.hidden), torch.nn.Tanh(), torch.nn.Linear(config.hidden, 1))
           if config.hidden else torch.nn.Sequential(torch.nn.Linear(d, 1)))
    pos = float(y.sum())
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(ys) - pos) / max(pos, 1.0)))
    opt = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    for _ in range(config.epochs):
        opt.zero_grad()
        loss = loss_fn(net(xn).squeeze(-1), y)
        loss.backward()
        opt.step()
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    layers = tuple((tuple(tuple(float(v) for v in row) for row in m.weight.detach().tolist()),
                    tuple(float(v) for v in m.bias.detach().tolist())) for m in linears)
    return TurnModel(FEATURE_NAMES, tuple(mean.tolist()), tuple(std.tolist()), layers, threshold=0.5,
                     max_gap_ms=config.max_gap_ms, meta={"hidden": config.hidden, "epochs": config.epochs,
                                                         "final_loss": float(loss.detach())})


@dataclass(frozen=True, slots=True)
class Simulated:
    """A policy replayed on one episode's listening ticks: when it would have taken the turn."""

    decided_t: float | None  # None: not within the logged ticks
    early: bool  # before the user's turn was over (e.g. inside the pause)
    latency_s: float | None  # decided_t - end of turn, when not early
    type: str = "simulated"


def simulate(ep: LoggedEpisode, speaks: Callable[[Observation], bool]) -> Simulated:
    for t, obs in ep.ticks:
        if speaks(obs):
            early = ep.eot_t is None or tick_label(ep, t) == 0
            return Simulated(t, early, None if early or ep.eot_t is None else max(0.0, t - ep.eot_t))
    return Simulated(None, False, None)


def _model_speaks(model: TurnModel, threshold: float) -> Callable[[Observation], bool]:
    def speaks(obs: Observation) -> bool:
        assert obs.silence_s is not None
        return obs.silence_s * 1000 >= model.max_gap_ms or model.probability(turn_features(obs)) >= threshold
    return speaks


def _policy_speaks(policy: Policy) -> Callable[[Observation], bool]:
    return lambda obs: isinstance(policy.decide(obs), Speak)


def _score(sims: list[Simulated], early_penalty_s: float) -> float:
    lat = [s.latency_s for s in sims if s.latency_s is not None]
    late = sum(1 for s in sims if s.decided_t is None and not s.early)
    early = sum(1 for s in sims if s.early)
    return (sum(lat) + early_penalty_s * (early + late)) / max(1, len(sims))


def choose_threshold(model: TurnModel, episodes: list[LoggedEpisode], early_penalty_s: float) -> float:
    """The threshold with the best simulated score on ``episodes`` (mean latency + a penalty per
    early take-over); the highest one among ties, to err on the side of waiting."""
    eps = [e for e in episodes if e.eot_t is not None]
    best: tuple[float, float] | None = None
    for i in range(1, 100):
        th = i / 100
        score = _score([simulate(e, _model_speaks(model, th)) for e in eps], early_penalty_s)
        if best is None or score <= best[0] + 1e-9:
            best = (score, th)
    assert best is not None
    return best[1]


def _auc(scores: list[float], labels: list[int]) -> float | None:
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    ranked = sorted((s, y) for s, y in zip(scores, labels))
    rank_sum, i = 0.0, 0
    while i < len(ranked):  # average ranks over ties
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        rank_sum += sum(1 for k in range(i, j) if ranked[k][1]) * (i + j + 1) / 2
        i = j
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def _summary(sims: list[Simulated]) -> dict[str, Any]:
    lat = [s.latency_s for s in sims if s.latency_s is not None]
    return {"n": len(sims), "early": sum(1 for s in sims if s.early),
            "undecided": sum(1 for s in sims if s.decided_t is None and not s.early),
            "latency_mean_s": statistics.fmean(lat) if lat else None,
            "latency_p50_s": statistics.median(lat) if lat else None}


def held_out_report(model: TurnModel, test: list[LoggedEpisode], baselines: dict[str, Policy]) -> dict[str, Any]:
    """Tick-level quality and, per policy, the simulated decision on every test episode: early
    take-overs (inside a pause or before the end of the turn) and latency from the end of the
    user's voice to the decision on the logs' clock (the VAD hangover and the final ASR pass
    included, the reply's own compute not; served logs also carry the ASR's real compute)."""
    xs, ys = build_rows(test)
    probs = [model.probability(x) for x in xs]
    eps = [e for e in test if e.eot_t is not None]
    out: dict[str, Any] = {
        "ticks": {"n": len(ys), "positive": sum(ys), "auc": _auc(probs, ys),
                  "accuracy": (sum(int((p >= model.threshold) == bool(y)) for p, y in zip(probs, ys)) / len(ys)
                               if ys else None)},
        "episodes": len(eps),
        "policies": {"learned": _summary([simulate(e, _model_speaks(model, model.threshold)) for e in eps])},
        "by_category": {},
    }
    for label, policy in baselines.items():
        out["policies"][label] = _summary([simulate(e, _policy_speaks(policy)) for e in eps])
    for cat in sorted({e.category for e in eps}):
        sub = [e for e in eps if e.category == cat]
        row = {"learned": _summary([simulate(e, _model_speaks(model, model.threshold)) for e in sub])}
        row.update({label: _summary([simulate(e, _policy_speaks(p)) for e in sub]) for label, p in baselines.items()})
        out["by_category"][cat] = row
    return out


def _fit_and_choose_threshold(episodes: list[LoggedEpisode], config: TrainConfig) -> tuple[TurnModel, int]:
    """The model fitted on ``episodes``' labelled ticks, with the threshold chosen on the same
    episodes; and how many ticks it was fitted on."""
    xs, ys = build_rows(episodes, config.drop_audio, random.Random(config.seed))
    model = fit_model(xs, ys, config)
    return dataclasses.replace(model, threshold=choose_threshold(model, episodes, config.early_penalty_s)), len(ys)


def cross_validate(run_dirs: list[str], configs: dict[str, TrainConfig],
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Leave-one-voice-out over the TRAINING split only (the test split stays unseen): per config,
    each training voice in turn is held out, the model is fitted and its threshold chosen on the
    others, and the held-out voice's episodes are replayed. The configs are ranked by the same
    score the threshold minimises (mean latency + ``early_penalty_s`` per early or missed turn),
    so a model choice needs no look at the test split."""
    episodes = load_episodes(run_dirs)
    out: dict[str, Any] = {"configs": {}}
    for name, config in configs.items():
        train, _, _ = split_episodes(episodes, config.test_voices)
        voices = sorted({str(e.voice) for e in train})
        if len(voices) < 2:
            raise ValueError(f"cross-validation needs >= 2 training voices, got {voices}")
        sims: list[Simulated] = []
        for voice in voices:
            model, _ = _fit_and_choose_threshold([e for e in train if e.voice != voice], config)
            sims += [simulate(e, _model_speaks(model, model.threshold)) for e in train
                     if e.voice == voice and e.eot_t is not None]
        row = {**_summary(sims), "score": _score(sims, config.early_penalty_s), "folds": voices,
               "config": dataclasses.asdict(config)}
        out["configs"][name] = row
        if progress:
            progress(f"{name}: score {row['score']:.3f} (early {row['early']}/{row['n']})")
    out["best"] = min(out["configs"], key=lambda k: out["configs"][k]["score"])
    return out


def train_policy(run_dirs: list[str], out_path: str | Path, config: TrainConfig,
                 baselines: dict[str, Policy] | None = None) -> dict[str, Any]:
    """Load, split, fit, pick the threshold on the training split, write the weights; returns the
    held-out report (test split only) plus the split's sizes."""
    episodes = load_episodes(run_dirs)
    train, test, dropped = split_episodes(episodes, config.test_voices)
    if not train:
        raise ValueError(f"no training episodes in {run_dirs} (test voices {config.test_voices}, {len(episodes)} episodes)")
    model, n_ticks = _fit_and_choose_threshold(train, config)
    split = {"train_episodes": len(train), "test_episodes": len(test), "dropped_shared_sentence": dropped,
             "train_ticks": n_ticks, "test_voices": list(config.test_voices),
             "train_voices": sorted({str(e.voice) for e in train})}
    model = dataclasses.replace(model, meta={**model.meta, "split": split, "runs": [str(r) for r in run_dirs]})
    report = {"split": split, "threshold": model.threshold, "max_gap_ms": model.max_gap_ms,
              "test": held_out_report(model, test, baselines or {}) if test else None}
    model = dataclasses.replace(model, meta={**model.meta, "held_out": report["test"]})
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(model.to_dict(), indent=1) + "\n", encoding="utf-8")
    return report
