"""``duplex eval run``: play every scenario to every policy, in parallel, and summarise.

On the simulated clocks (:mod:`.simulated`) the unit of work is a chunk of scenarios: a worker
loads the models once per chunk, plays each scenario to the served pipeline with every policy,
writes one JSONL timeline per episode and returns the episodes' metrics. Chunks run in a local process pool
(default), in this process (``workers <= 1``), or as Ray tasks (``ray_address``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .metrics import EpisodeMetrics, MetricsConfig, episode_metrics, summarize
from .scenario import load_scenario, render_user_audio, resolve_cues

__all__ = ["CLOCKS", "PolicySpec", "RunSpec", "git_commit", "interleave_by_category", "parse_policy", "read_timeline",
           "rebuild_summary", "run_chunk", "run_eval", "timeline_path", "write_summary", "write_timeline"]

log = logging.getLogger(__name__)

# measured: the real server in real time (default); ideal / replay-measured: the same pipeline on a virtual clock.
CLOCKS = ("measured", "ideal", "replay-measured")


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """``label`` names the policy in results: ``eou`` or ``eou:short_gap_ms=300``."""

    label: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    type: str = "policy_spec"


def parse_policy(text: str) -> PolicySpec:
    """``NAME`` or ``NAME:key=value,key=value`` (values parsed as JSON when they parse)."""
    from duplex.policies import make_policy

    name, _, rest = text.partition(":")
    params: dict[str, Any] = {}
    for part in filter(None, rest.split(",")):
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"bad policy parameter {part!r} in {text!r}: use key=value")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    make_policy(name, **params)  # fail early on unknown names and parameters
    return PolicySpec(text, name, params)


@dataclass(frozen=True, slots=True)
class RunSpec:
    """Everything a worker needs. ``asr``/``tts``/``vad`` = "fake"/"energy" use the test fakes.
    ``clock``: one of :data:`CLOCKS`; ``server_url``: with the measured clock, a running server to
    use instead of starting one."""

    out_dir: str
    policies: tuple[PolicySpec, ...]
    clock: str = "measured"
    seed: int = 0
    model: str | None = None
    device: str = "cpu"
    dtype: str = "auto"
    asr: str = "tiny.en"
    vad: str = "webrtc"
    tts: str = "piper"
    max_reply_tokens: int = 48
    temperature: float = 0.0
    instructions: str | None = None
    threads: int = 1
    server_url: str | None = None
    type: str = "run_spec"


@dataclass(slots=True)
class _Resources:
    models: Any  # simulated.SimModels
    voices: Any


def _load(spec: RunSpec) -> _Resources:
    """The models of the simulated clocks, as ``duplex serve`` would load them for this spec."""
    import torch

    from duplex.audio import WebRtcVad, load_tts, load_whisper
    from duplex.engine.models import load_model
    from duplex.engine.template import TurnTemplate

    from .simulated import SimModels
    from .voices import VoiceBank

    torch.set_num_threads(max(1, spec.threads))
    lm = load_model(spec.model, device=spec.device, dtype=spec.dtype)
    if spec.asr == "fake":
        from duplex.audio.fakes import FakeWhisper

        whisper: Any = FakeWhisper()
    else:
        whisper = load_whisper(spec.asr, cpu_threads=max(1, spec.threads))
    if spec.vad == "energy":
        from duplex.audio.fakes import EnergyVad

        vad_factory: Any = EnergyVad
    else:
        vad_factory = WebRtcVad
    if spec.tts == "fake":
        from duplex.audio.fakes import FakeTts

        tts: Any = FakeTts()
    else:
        tts = load_tts(spec.tts)
    models = SimModels(lm, TurnTemplate.from_tokenizer(lm.tokenizer), tts, whisper, vad_factory)
    return _Resources(models, VoiceBank())


def timeline_path(out_dir: str, label: str, scenario_id: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in label)
    return Path(out_dir) / "episodes" / safe / f"{scenario_id}.jsonl"


def write_timeline(path: Path, records: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, default=float) + "\n")


def read_timeline(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _run_scenarios(spec: RunSpec, res: _Resources, paths: list[str],
                   on_episode: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    from .simulated import SimConfig, simulate_episode

    config = SimConfig(clock=spec.clock, seed=spec.seed, max_reply_tokens=spec.max_reply_tokens,
                       instructions=spec.instructions, temperature=spec.temperature)
    out = []
    for path in paths:
        scenario = load_scenario(path)
        user = render_user_audio(scenario, res.voices)
        cues = resolve_cues(scenario, user)
        for p in spec.policies:
            t0 = time.perf_counter()
            result = asyncio.run(simulate_episode(scenario, user, cues, p.name, p.params, res.models, config,
                                                  label=p.label))
            records = [dict(r, policy=p.label, policy_name=p.name) if r.get("type") == "episode" else r
                       for r in result.records]
            write_timeline(timeline_path(spec.out_dir, p.label, scenario.id), records)
            m = episode_metrics(records)
            out.append({**m.to_dict(), **result.stats, "wall_s": time.perf_counter() - t0})
            if on_episode is not None:
                on_episode()
    return out


def run_chunk(spec: RunSpec, paths: list[str]) -> list[dict[str, Any]]:
    """Worker entry point (process pool or Ray task): load models, replay ``paths``."""
    logging.basicConfig(level=logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar per chunk load would bury the run's own bar
    except ImportError:  # pragma: no cover - transformers is a core dependency
        pass
    return _run_scenarios(spec, _load(spec), paths)


def git_commit(start: str | Path = ".") -> str | None:
    """The checked-out commit, read from ``.git`` files (no git process)."""
    here = Path(start).resolve()
    for d in [here, *here.parents]:
        git = d / ".git"
        if git.is_file():  # a worktree: "gitdir: PATH"
            git = Path(git.read_text().split(":", 1)[1].strip())
        if not git.is_dir():
            continue
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        common = Path((git / "commondir").read_text().strip()) if (git / "commondir").exists() else git
        common = common if common.is_absolute() else (git / common).resolve()
        for base in (git, common):
            if (base / ref).exists():
                return (base / ref).read_text().strip()
            packed = base / "packed-refs"
            if packed.exists():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
        return None
    return None


def _ray_chunks(spec: RunSpec, chunks: list[list[str]], address: str, bar: Any) -> list[dict[str, Any]]:
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("--ray needs the 'ray' package: pip install 'ray>=2.9'") from exc
    started = False
    if not ray.is_initialized():
        if address == "auto":
            try:
                ray.init(address="auto", logging_level=logging.WARNING)
            except ConnectionError:
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
        started = True
    try:
        task = ray.remote(num_cpus=max(1, spec.threads))(run_chunk)
        pending = {task.remote(spec, c): len(c) for c in chunks}
        out: list[dict[str, Any]] = []
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                out.extend(ray.get(ref))
                bar.update(pending.pop(ref) * len(spec.policies))
        return out
    finally:
        if started:
            ray.shutdown()


def interleave_by_category(paths: list[str]) -> list[str]:
    """Round-robin over categories, so a run cut short still covers every category evenly."""
    groups: dict[str, list[str]] = {}
    for p in paths:
        with open(p, encoding="utf-8") as f:
            groups.setdefault(str(json.load(f).get("category")), []).append(p)
    lists = [groups[k] for k in sorted(groups)]
    return [x[i] for i in range(max((len(x) for x in lists), default=0)) for x in lists if i < len(x)]


def rebuild_summary(run_dir: str | Path) -> dict[str, Any]:
    """Recompute episodes.jsonl and summary.json from the timelines on disk (e.g. after changing the
    metrics, or for a run that was cut short); keeps the old summary's metadata where there is one."""
    run = Path(run_dir)
    rows, headers = [], {}
    for path in sorted(run.glob("episodes/*/*.jsonl")):
        records = read_timeline(path)
        if not records or records[-1].get("type") != "episode_end":
            continue  # an episode still being written
        head = records[0]
        headers[head["policy"]] = head
        compute = records[-1].get("compute_s", {})
        rows.append({**episode_metrics(records).to_dict(), "engine_compute_s": compute.get("engine", 0.0),
                     "tts_compute_s": compute.get("tts", 0.0), "asr_compute_s": compute.get("asr", 0.0)})
    if not rows:
        raise FileNotFoundError(f"no finished episode timelines under {run}/episodes")
    old = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    head = next(iter(headers.values()))
    policies = tuple(PolicySpec(label, h.get("policy_name", label.partition(":")[0]), {})
                     for label, h in sorted(headers.items()))
    spec = RunSpec(out_dir=str(run), policies=policies, clock=head.get("clock", "ideal"), seed=head.get("seed", 0),
                   max_reply_tokens=head.get("max_reply_tokens", 48))
    meta = {k: v for k, v in old.get("meta", {}).items() if k in ("scenarios_dir", "wall_s", "workers", "ray")}
    meta.update(n_episodes=len(rows), rebuilt_from_timelines=True, git_commit=git_commit(Path(__file__).parent))
    rows.sort(key=lambda r: (r["policy"], r["scenario"]))
    summary = write_summary(spec, rows, meta)
    for label, h in headers.items():  # the parameters the episodes actually ran with
        summary["policies"][label] = {"name": h.get("policy_name", label), "params": h.get("policy_params", {})}
    if "meta" in old:
        summary["meta"] = {**old["meta"], **summary["meta"], **meta}
    (run / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n", encoding="utf-8")
    return summary


def run_eval(spec: RunSpec, scenarios_dir: str | Path, workers: int = 1, ray_address: str | None = None,
             progress: bool = False, report: bool = True) -> dict[str, Any]:
    """Replay all scenarios in ``scenarios_dir`` with every policy; write timelines, episodes.jsonl,
    summary.json (and report.html); return the summary."""
    from tqdm import tqdm

    if spec.clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {spec.clock!r}")
    paths = interleave_by_category(sorted(str(p) for p in Path(scenarios_dir).glob("*.json")
                                          if p.name != "summary.json"))
    if not paths:
        raise FileNotFoundError(f"no scenario *.json files in {scenarios_dir}")
    Path(spec.out_dir).mkdir(parents=True, exist_ok=True)
    n_eps = len(paths) * len(spec.policies)
    t0 = time.perf_counter()
    bar = tqdm(total=n_eps, desc=f"episodes ({spec.clock} clock)", unit="ep", disable=not progress)
    try:
        if spec.clock == "measured":
            if workers > 1 or ray_address:
                log.warning("--clock measured runs episodes one at a time in real time (parallel episodes would "
                            "compete for the cores being measured); ignoring --workers/--ray")
                workers, ray_address = 1, None
            from .measured import run_measured

            rows = asyncio.run(run_measured(spec, paths, on_episode=lambda: bar.update(1)))
        elif ray_address:
            size = max(1, min(4, math.ceil(len(paths) / max(1, workers, os.cpu_count() or 1))))
            chunks = [paths[i:i + size] for i in range(0, len(paths), size)]
            rows = _ray_chunks(spec, chunks, ray_address, bar)
        elif workers <= 1:
            import torch

            threads = torch.get_num_threads()
            try:
                rows = _run_scenarios(spec, _load(spec), paths, on_episode=lambda: bar.update(1))
            finally:
                torch.set_num_threads(threads)  # _load set this process's threads for the run
        else:
            size = max(1, min(4, math.ceil(len(paths) / workers)))
            chunks = [paths[i:i + size] for i in range(0, len(paths), size)]
            import multiprocessing

            rows = []
            with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(run_chunk, spec, c): len(c) for c in chunks}
                for fut in as_completed(futures):
                    rows.extend(fut.result())
                    bar.update(futures[fut] * len(spec.policies))
    finally:
        bar.close()
    wall_s = time.perf_counter() - t0
    rows.sort(key=lambda r: (r["policy"], r["scenario"]))
    meta = {"scenarios_dir": str(scenarios_dir), "n_scenarios": len(paths), "wall_s": wall_s,
            "workers": workers, "ray": ray_address, "git_commit": git_commit(Path(__file__).parent)}
    summary = write_summary(spec, rows, meta)
    if report:
        from .report import write_report

        write_report(spec.out_dir)
    return summary


def write_summary(spec: RunSpec, rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    from duplex.policies import make_policy
    from duplex.voice.config import voice_policy_params

    out = Path(spec.out_dir)
    with open(out / "episodes.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, default=float) + "\n")
    fields = set(EpisodeMetrics.__dataclass_fields__)
    table = summarize([EpisodeMetrics(**{k: v for k, v in r.items() if k in fields}) for r in rows])
    # every clock runs a bare policy name with the served voice parameters (measured, simulated)
    policies = {p.label: {"name": p.name, "params": make_policy(
        p.name, **(dict(p.params) or voice_policy_params(p.name))).params()} for p in spec.policies}
    compute = {k: sum(r.get(k, 0.0) for r in rows) for k in ("engine_compute_s", "tts_compute_s", "wall_s")}
    summary = {
        "meta": {**meta, "model": spec.model or "SmolLM2-135M-Instruct (packaged)", "asr": spec.asr,
                 "vad": spec.vad, "tts": spec.tts, "clock": spec.clock, "seed": spec.seed,
                 "max_reply_tokens": spec.max_reply_tokens, "temperature": spec.temperature,
                 "device": spec.device, "dtype": spec.dtype, "threads_per_worker": spec.threads,
                 "metrics": asdict(MetricsConfig()), "compute_s": compute,
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "policies": policies,
        "rows": [{"policy": k, **v} for k, v in table.items()],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n", encoding="utf-8")
    return summary
