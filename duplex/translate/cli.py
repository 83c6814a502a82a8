"""``duplex translate``: live translation of stdin text; ``run``/``eval`` on a test set (text, or speech
with ``--source-audio``); ``score`` an instances.log; ``render-speech`` a test set's source to WAVs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

from duplex.translate.prompt import LAYOUTS
from duplex.translate.plot import LATENCIES

__all__ = ["add_translate_parser"]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--translate-model", "--model", dest="translate_model", default=None,
                   help="HF causal LM id or local path (default: the packaged Gemma 3 270M, converted once)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--quantize", default="auto", help="auto (int8 on CPU where fastest) | none | int8")
    p.add_argument("--source-language", default="en")
    p.add_argument("--target-language", default="es")
    p.add_argument("--layout", default="reencode", choices=list(LAYOUTS),
                   help="cache layout: reencode (target re-encoded after each new source word) | interleaved "
                        "(source and target chunks alternate in one cache, nothing re-encoded)")


def _load(args: argparse.Namespace) -> Any:
    from duplex.translate.models import load_translate_model

    print(f"loading translation model {args.translate_model or 'gemma3-270m (packaged)'} ...", file=sys.stderr)
    quantize = None if args.quantize == "none" else args.quantize
    return load_translate_model(args.translate_model, device=args.device, dtype=args.dtype, quantize=quantize)


def _command_line() -> str:
    return " ".join(["duplex", *sys.argv[1:]])


def _run_info(args: argparse.Namespace, lm: Any, load_start: float) -> dict[str, Any]:
    """What a results file records about how it was made (command, model, machine, load)."""
    import torch

    return {
        "command": _command_line(),
        "model": lm.name, "dtype": str(lm.dtype).replace("torch.", ""), "quantization": lm.quantization,
        "device": str(lm.device), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average_1m": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
        "language_pair": f"{args.source_language}-{args.target_language}",
        "latency_unit": "source words (AL, LAAL, AP, DAL); *_CA_ms: computation-aware, ms, source words "
                        f"arriving every {args.word_interval_ms:g} ms",
        "word_interval_ms": args.word_interval_ms,
        "layout": args.layout,
    }


def _policy_spec(args: argparse.Namespace) -> str:
    """``--policy wait-k --k 3`` -> ``wait-k:k=3`` (checked before the model loads)."""
    from duplex.translate.session import TranslateConfig

    TranslateConfig(args.source_language, args.target_language, policy=args.policy, k=args.k,
                    layout=args.layout).validate()
    return f"{args.policy}:k={args.k}" if args.policy in ("wait-k", "waitk") else args.policy


def _cmd_run(args: argparse.Namespace) -> int:
    import torch

    from duplex.translate.evaluate import (
        model_stats,
        read_lines,
        score_sentences,
        stats_delta,
        translate_corpus,
    )
    from duplex.translate.prompt import make_prompt
    from duplex.translate.translator import SimulTranslator

    try:
        spec = _policy_spec(args)
        sources = read_lines(args.src)
        references: list[str | None] = list(read_lines(args.ref)) if args.ref else [None] * len(sources)
    except (OSError, ValueError) as exc:
        print(f"duplex translate run: {exc}", file=sys.stderr)
        return 2
    if len(references) != len(sources):
        print(f"duplex translate run: {args.src} has {len(sources)} sentences but {args.ref} has "
              f"{len(references)}", file=sys.stderr)
        return 2
    if args.limit:
        sources, references = sources[:args.limit], references[:args.limit]
    if args.threads:
        torch.set_num_threads(args.threads)
    wavs = None
    if args.source_audio:
        from duplex.translate.speech import source_wavs

        try:
            wavs = source_wavs(args.source_audio, len(sources))
        except ValueError as exc:
            print(f"duplex translate run: {exc}", file=sys.stderr)
            return 2
    lm = _load(args)
    model = SimulTranslator(lm, make_prompt(args.source_language, args.target_language), layout=args.layout)
    if wavs is not None:
        return _run_speech(args, lm, model, spec, wavs, references)
    load_start = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    before = model_stats(model)
    with _sentence_bar(len(sources), spec) as on_sentence:
        sentences = translate_corpus(model, sources, references, spec, word_interval_ms=args.word_interval_ms,
                                     on_sentence=on_sentence)
    return _write_run(args, sentences, {**_run_info(args, lm, load_start), "policy": spec,
                                        **score_sentences(sentences, wall_s=time.perf_counter() - t0),
                                        **stats_delta(before, model_stats(model), sentences)})


@contextlib.contextmanager
def _sentence_bar(total: int, spec: str) -> Iterator[Callable[[Any], None]]:
    """A progress bar on stderr; yields the per-sentence callback that advances it."""
    from tqdm import tqdm

    with tqdm(total=total, desc=spec, unit="sentence", file=sys.stderr, dynamic_ncols=True) as bar:
        def on_sentence(res: Any) -> None:
            bar.set_postfix_str(res.prediction[:40], refresh=False)
            bar.update(1)

        yield on_sentence


def _write_run(args: argparse.Namespace, sentences: list[Any], result: dict[str, Any]) -> int:
    """``translate run``'s outputs: DIR/instances.log (SimulEval's format) and DIR/scores.json."""
    from duplex.translate.instances import write_instances

    out = Path(args.out)
    write_instances(out / "instances.log", (r.to_log() for r in sentences))
    result["test_set"] = {"src": str(args.src), "ref": str(args.ref) if args.ref else None,
                          "sentences": len(sentences)}
    text = json.dumps(result, indent=2, ensure_ascii=False)
    (out / "scores.json").write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"wrote {out / 'instances.log'} and {out / 'scores.json'}", file=sys.stderr)
    return 0


def _speech_info(args: argparse.Namespace) -> dict[str, Any]:
    """What a speech-source results file adds to :func:`_run_info`: the ASR and the time axis."""
    return {"source_audio": str(args.source_audio), "asr_model": args.asr_model or "tiny.en (packaged)",
            "asr": "the voice pipeline's speech input (WebRTC VAD + streaming whisper, LocalAgreement-2), "
                   f"fed {args.chunk_ms} ms frames",
            "latency_unit": "ms of source audio (StreamLAAL, LAAL, AL, DAL; AP: ratio); *_CA: computation-aware "
                            "(audio arrival + measured VAD, whisper and translation compute)"}


def _speech_factory(args: argparse.Namespace) -> Any:
    from duplex.translate import speech

    print(f"loading ASR {args.asr_model or 'tiny.en (packaged)'} ...", file=sys.stderr)
    return speech.speech_input_factory(args.asr_model, threads=args.threads)


def _run_speech(args: argparse.Namespace, lm: Any, model: Any, spec: str, wavs: list[Path],
                references: list[str | None]) -> int:
    """``translate run --source-audio``: the WAVs through the voice pipeline's ASR, then the policy."""

    from duplex.translate.speech import score_speech_sentences, translate_speech_corpus

    factory = _speech_factory(args)
    load_start = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    with _sentence_bar(len(wavs), spec) as on_sentence:
        sentences = translate_speech_corpus(model, wavs, references, spec, factory, chunk_ms=args.chunk_ms,
                                            on_sentence=on_sentence)
    info = _run_info(args, lm, load_start)
    info.pop("word_interval_ms")
    return _write_run(args, sentences, {**info, **_speech_info(args), "policy": spec,
                                        **score_speech_sentences(sentences, wall_s=time.perf_counter() - t0)})


def _cmd_render_speech(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from duplex.eval.voices import available_voices
    from duplex.translate.evaluate import DATA_DIR, read_lines
    from duplex.translate.speech import default_speech_dir, render_speech

    src = Path(args.src) if args.src else DATA_DIR / "translate_en.txt"
    try:
        sources = read_lines(src)
    except OSError as exc:
        print(f"duplex translate render-speech: {exc}", file=sys.stderr)
        return 2
    if args.voice not in available_voices():
        print(f"duplex translate render-speech: voice {args.voice!r} is not available here "
              f"(available: {', '.join(available_voices()) or 'none'})", file=sys.stderr)
        return 2
    if args.limit:
        sources = sources[:args.limit]
    out = Path(args.out) if args.out else default_speech_dir(args.voice)
    with tqdm(total=len(sources), desc=f"render {args.voice}", unit="sentence", file=sys.stderr,
              dynamic_ncols=True) as bar:
        render_speech(sources, args.voice, out, overwrite=args.overwrite, on_sentence=lambda i, p: bar.update(1))
    print(out)
    print(f"wrote {len(sources)} WAVs ({out}/0000.wav ...) and {out / 'manifest.json'}", file=sys.stderr)
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from duplex.translate.instances import score_instances

    try:
        scores = score_instances(args.instances, word_interval_ms=args.word_interval_ms)
    except (OSError, ValueError) as exc:
        print(f"duplex translate score: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(scores, indent=2, ensure_ascii=False))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from duplex.translate.evaluate import DEFAULT_POLICIES, evaluate, load_test_set
    from duplex.translate.prompt import make_prompt
    from duplex.translate.translator import SimulTranslator

    if args.threads:
        torch.set_num_threads(args.threads)
    sources, refs = load_test_set(args.src, args.ref)
    if args.limit:
        sources, refs = sources[:args.limit], refs[:args.limit]
    if args.source_audio:
        from duplex.translate.speech import source_wavs

        try:
            source_wavs(args.source_audio, len(sources))
        except ValueError as exc:
            print(f"duplex translate eval: {exc}", file=sys.stderr)
            return 2
    lm = _load(args)
    model = SimulTranslator(lm, make_prompt(args.source_language, args.target_language), layout=args.layout)
    policies = args.policies or list(DEFAULT_POLICIES)
    t0 = time.perf_counter()
    load_start = round(os.getloadavg()[0], 2)

    def progress(line: str) -> None:
        print(f"{time.perf_counter() - t0:7.1f}s {line}", file=sys.stderr, flush=True)

    if args.source_audio:
        from duplex.translate.speech import evaluate_speech, source_wavs

        scores = evaluate_speech(model, source_wavs(args.source_audio, len(sources)), refs, policies,
                                 _speech_factory(args), progress=progress, instances_dir=args.instances)
    else:
        scores = evaluate(model, sources, refs, policies, word_interval_ms=args.word_interval_ms, progress=progress,
                          instances_dir=args.instances)

    result = {
        **_run_info(args, lm, load_start), **(_speech_info(args) if args.source_audio else {}),
        "test_set": {"src": str(args.src or "eval/data/translate_en.txt"),
                     "ref": str(args.ref or "eval/data/translate_es.txt"), "sentences": len(sources),
                     "source_words": sum(len(s.split()) for s in sources)},
        "policies": scores,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    for entry in scores.values():
        entry["command"] = result["command"]
    if args.merge and args.json and Path(args.json).exists():
        # several runs (e.g. policies in parallel processes) into one file; each policy keeps its command
        old = json.loads(Path(args.json).read_text(encoding="utf-8"))
        result["policies"] = {**old.get("policies", {}), **scores}
        result["wall_s"] = round(max(result["wall_s"], old.get("wall_s", 0.0)), 1)
    text = json.dumps(result, indent=2, ensure_ascii=False)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


async def _live(args: argparse.Namespace) -> int:
    from duplex.engine.worker import Engine
    from duplex.session.events import AgentTextDelta, TextInput, TurnEnded
    from duplex.translate.session import TranslateConfig, TranslateSession

    config = TranslateConfig(source_language=args.source_language, target_language=args.target_language,
                             policy=args.policy, k=args.k, layout=args.layout)
    config.validate()
    engine = Engine(await asyncio.get_running_loop().run_in_executor(None, _load, args))
    session = TranslateSession(engine, config)
    await session.start()
    lines = [args.text] if args.text else None

    async def feed() -> None:
        loop = asyncio.get_running_loop()
        while True:
            line = lines.pop(0) if lines else (None if lines is not None else
                                               await loop.run_in_executor(None, sys.stdin.readline))
            if not line:
                break
            for word in line.split():
                session.submit(TextInput(word + " ", final=False))
            session.submit(TextInput("", final=True))
        session.submit(TextInput("", final=True))

    feeder = asyncio.create_task(feed())
    try:
        async for ev in session.events():
            if isinstance(ev, AgentTextDelta):
                print(ev.text, end="", flush=True)
            elif isinstance(ev, TurnEnded) and ev.speaker == "agent":
                print(flush=True)
            if feeder.done() and session.idle:
                break
    finally:
        feeder.cancel()
        await session.close()
        engine.close()
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from duplex.translate.evaluate import markdown_table

    print(markdown_table(json.loads(Path(args.file).read_text(encoding="utf-8"))))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from duplex.translate.plot import plot_quality_latency

    try:
        points = plot_quality_latency(args.files, args.out, latency=args.latency, labels=args.labels,
                                      title=args.title)
    except ValueError as exc:
        print(f"duplex translate plot: {exc}", file=sys.stderr)
        return 2
    for p in points:
        print(f"{p.series}\t{p.policy}\t{p.latency_key}={p.latency:.3f}\tBLEU={p.bleu:.2f}\tchrF={p.chrf:.2f}")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _cmd_translate(args: argparse.Namespace) -> int:
    if getattr(args, "translate_command", None) == "run":
        return _cmd_run(args)
    if getattr(args, "translate_command", None) == "score":
        return _cmd_score(args)
    if getattr(args, "translate_command", None) == "plot":
        return _cmd_plot(args)
    if getattr(args, "translate_command", None) == "eval":
        return _cmd_eval(args)
    if getattr(args, "translate_command", None) == "report":
        return _cmd_report(args)
    if getattr(args, "translate_command", None) == "render-speech":
        return _cmd_render_speech(args)
    return asyncio.run(_live(args))


def _add_speech_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source-audio", default=None, metavar="DIR",
                   help="speech source: DIR/0000.wav for source line 0, 0001.wav for line 1, ... (`translate "
                        "render-speech` writes them); latency in ms of audio, with StreamLAAL")
    p.add_argument("--asr-model", default=None,
                   help="whisper for --source-audio: tiny.en (packaged, default) | base | a CTranslate2 model dir")
    p.add_argument("--chunk-ms", type=int, default=20, help="--source-audio: audio frames fed to the ASR (ms)")


def add_translate_parser(sub: Any) -> None:
    p = sub.add_parser("translate", help="simultaneous translation: live (stdin / --text) or `translate eval`")
    p.set_defaults(func=_cmd_translate, translate_command=None)
    _add_model_args(p)
    p.add_argument("--policy", default="wait-k", help="wait-k | local-agreement | retranslate | offline")
    p.add_argument("--k", type=int, default=3, help="wait-k: source words read before the first target word")
    p.add_argument("--text", default=None, help="translate this sentence and exit (default: stdin lines)")
    tsub = p.add_subparsers(dest="translate_command")
    e = tsub.add_parser("eval", help="BLEU/chrF + SimulEval AL/LAAL/AP/DAL per policy (JSON on stdout)")
    e.set_defaults(func=_cmd_translate)
    _add_model_args(e)
    e.add_argument("--src", default=None, help="source sentences, one per line (default: eval/data/translate_en.txt)")
    e.add_argument("--ref", default=None, help="references, one per line (default: eval/data/translate_es.txt)")
    e.add_argument("--policies", nargs="+", default=None,
                   help="policy specs (default: wait-k:k=1 wait-k:k=3 wait-k:k=5 local-agreement retranslate offline)")
    e.add_argument("--limit", type=int, default=None, help="first N sentences only")
    e.add_argument("--word-interval-ms", type=float, default=300.0,
                   help="computation-aware latency: one source word arrives every this many ms")
    e.add_argument("--json", default=None, metavar="FILE", help="also write the JSON here")
    e.add_argument("--merge", action="store_true", help="merge these policies into the existing --json FILE")
    e.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (on a shared, loaded machine 1 thread decoded 10x faster than 2)")
    e.add_argument("--instances", default=None, metavar="DIR",
                   help="write SimulEval-style DIR/<policy>/instances.log")
    _add_speech_args(e)
    run = tsub.add_parser("run", help="translate a test set with one policy: DIR/instances.log (SimulEval's "
                          "format) and DIR/scores.json")
    run.set_defaults(func=_cmd_translate)
    _add_model_args(run)
    run.add_argument("--src", required=True, help="source sentences, one per line")
    run.add_argument("--ref", default=None, help="references, one per line (BLEU/chrF and |Y| for AL/AP)")
    run.add_argument("--policy", default="wait-k", help="wait-k | local-agreement | retranslate | offline")
    run.add_argument("--k", type=int, default=3, help="wait-k: source words read before the first target word")
    run.add_argument("--out", required=True, metavar="DIR", help="writes DIR/instances.log and DIR/scores.json")
    run.add_argument("--limit", type=int, default=None, help="first N sentences only")
    run.add_argument("--word-interval-ms", type=float, default=300.0,
                     help="computation-aware latency: one source word arrives every this many ms")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (and whisper's, for speech)")
    _add_speech_args(run)
    sc = tsub.add_parser("score", help="corpus AL/LAAL/AP/DAL (+ computation-aware, BLEU, chrF) of an "
                         "instances.log, as JSON")
    sc.set_defaults(func=_cmd_translate)
    sc.add_argument("instances", metavar="PATH/instances.log")
    sc.add_argument("--word-interval-ms", type=float, default=300.0,
                    help="source word duration for elapsed times when the log has no source_duration_ms")
    rs = tsub.add_parser("render-speech", help="synthesize a test set's source lines to DIR/0000.wav ... "
                         "(16 kHz) for --source-audio")
    rs.set_defaults(func=_cmd_translate)
    rs.add_argument("--src", default=None, help="source sentences, one per line (default: eval/data/translate_en.txt)")
    rs.add_argument("--voice", default="piper:joe", help="piper:joe | flite:kal | flite:slt | flite:rms | flite:awb")
    rs.add_argument("--out", default=None, metavar="DIR",
                    help="default: ~/.cache/duplex/translate/speech-<voice> (not in the repository)")
    rs.add_argument("--limit", type=int, default=None, help="first N sentences only")
    rs.add_argument("--overwrite", action="store_true", help="render again WAVs that already exist")
    r = tsub.add_parser("report", help="the README table (markdown) from an eval JSON")
    r.set_defaults(func=_cmd_translate)
    r.add_argument("file")
    pl = tsub.add_parser("plot", help="BLEU and chrF against LAAL (PNG, matplotlib) from eval JSON files")
    pl.set_defaults(func=_cmd_translate)
    pl.add_argument("files", nargs="+", help="eval JSON files (`translate eval --json`); one series each")
    pl.add_argument("--out", required=True, metavar="PNG")
    pl.add_argument("--latency", nargs="+", default=["LAAL"], choices=list(LATENCIES),
                    help="x axis, one for all files or one per file: LAAL in source words (default), or a "
                         "computation-aware / speech latency in ms (plotted in s); each key gets its own column")
    pl.add_argument("--labels", nargs="+", default=None, help="series names, one per file (default: file stems)")
    pl.add_argument("--title", default=None)
