"""The ``duplex`` command line: serve, chat, talk, transcribe, client, bench, eval."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["main"]


def _print_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, indent=2))


def _cmd_bench_realtime(args: argparse.Namespace) -> int:
    from pathlib import Path

    from duplex.bench.realtime import RealtimeConfig, bench_realtime, format_summary

    cfg = RealtimeConfig(url=args.url, scenarios=args.scenarios, n=args.n, seed=args.seed, speech=args.speech,
                         background_talker=args.background_talker, policy=args.policy, model=args.model,
                         device=args.device, dtype=args.dtype, quantize=args.quantize, auth_token=args.auth_token,
                         warmup=not args.no_warmup, out=args.out,
                         serve_args=tuple(a for item in args.serve_arg or () for a in item.split()))
    result = asyncio.run(bench_realtime(cfg))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.json:
        _print_json(result)
    else:
        print(format_summary(result))
    return 0


def _cmd_bench_openai(args: argparse.Namespace) -> int:
    from pathlib import Path

    from duplex.bench.openai import bench_openai

    result = asyncio.run(bench_openai(n=args.n, model=args.model, url=args.url, auth_token=args.auth_token))
    for path in (args.out, args.json if isinstance(args.json, str) else None):
        if path:
            Path(path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    _print_json(result)
    return 0


def _cmd_bench_soak(args: argparse.Namespace) -> int:
    from pathlib import Path

    from duplex.bench.soak import SoakConfig, bench_soak

    out = args.json if isinstance(args.json, str) else None
    cfg = SoakConfig(clients=args.clients, minutes=args.minutes, url=args.url, server_pid=args.server_pid,
                     auth_token=args.auth_token, model=args.model, device=args.device, dtype=args.dtype,
                     quantize=args.quantize, warmup_s=args.warmup_s, seed=args.seed, out=out,
                     serve_args=tuple(a for item in args.serve_arg or () for a in item.split()))
    result = asyncio.run(bench_soak(cfg))
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    _print_json(result)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from duplex.bench import engine as bench

    what = args.what
    if what == "realtime":
        return _cmd_bench_realtime(args)
    if what == "soak":
        return _cmd_bench_soak(args)
    if what == "openai":
        return _cmd_bench_openai(args)
    if what == "decode":
        variants = (("bfloat16", "int8"),) if args.int8_only else bench._VARIANTS
        result = bench.bench_decode(args.model, device=args.device, tokens=args.tokens, variants=variants)
    elif what == "ttft":
        result = bench.bench_ttft(args.model, device=args.device, dtype=args.dtype)
    elif what == "bargein":
        from duplex.bench.bargein import bench_bargein

        result = asyncio.run(bench_bargein(args.model, device=args.device, dtype=args.dtype, trials=args.trials))
    elif what == "asr":
        from duplex.audio.commands import bench_asr
        from duplex.translate.speech import default_speech_dir

        result = bench_asr(sentences_dir=default_speech_dir("piper:joe"))
    elif what == "tts":
        from duplex.audio.commands import bench_tts

        result = bench_tts()
    elif what == "server":
        from duplex.bench.server import bench_server_cli

        result = bench_server_cli(args)
    elif what == "translate":
        from duplex.bench.translate import bench_translate_cli

        result = bench_translate_cli(args)
    else:  # pragma: no cover - argparse restricts choices
        raise SystemExit(f"unknown benchmark {what}")
    if isinstance(args.json, str) and what not in ("server", "translate"):  # these write their own file
        from pathlib import Path

        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    _print_json(result)
    return 0


def _cmd_transcribe(args: argparse.Namespace) -> int:
    from duplex.audio.commands import transcribe_file

    transcribe_file(args.file, model=args.asr_model)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from duplex.cli.chat import run_chat

    return asyncio.run(run_chat(args))


def _cmd_serve(args: argparse.Namespace) -> int:
    from duplex.cli.serve import run_server

    return asyncio.run(run_server(args))


def _cmd_talk(args: argparse.Namespace) -> int:
    from duplex.voice.talk import run_talk

    return asyncio.run(run_talk(args))


def _cmd_client(args: argparse.Namespace) -> int:
    from duplex.serving.client import run_client_cli

    return asyncio.run(run_client_cli(args))


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model id or local path (default: packaged SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--quantize", default="auto", help="auto (int8 on CPU) | none | int8")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duplex", description="A full-duplex streaming agent.")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.set_defaults(func=fn)
        return p

    p = add("chat", _cmd_chat, "full-duplex text chat in the terminal")
    _add_model_args(p)
    p.add_argument("--policy", default="silence")
    p.add_argument("--instructions", default=None)

    p = add("serve", _cmd_serve, "WebSocket server + browser voice chat")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--policy", default=None, help="turn policy (default: duplex.voice.config.VOICE_POLICY)")
    p.add_argument("--auth-token", default=None, help="require this token (or env DUPLEX_AUTH_TOKEN)")
    p.add_argument("--allowed-origin", action="append", default=None, metavar="ORIGIN",
                   help="also accept WebSocket handshakes from this browser origin (repeatable; '*' = any). "
                        "Always accepted: same origin, localhost/127.0.0.1, and clients that send no Origin")
    p.add_argument("--max-sessions", type=int, default=None,
                   help="sessions held at once, detached ones included (default: 4 per core, 1 per 256 MiB RAM)")
    p.add_argument("--max-kv-mb", type=float, default=None,
                   help="KV memory budget for all sessions, each counted at its context window (default: half the "
                        "RAM; 0: none); a session over it is refused with server_busy naming max_kv_mb")
    p.add_argument("--max-detached-sessions", type=int, default=None,
                   help="detached sessions kept for resume (default: half of --max-sessions; oldest closed first)")
    p.add_argument("--vad-min-silence-ms", type=int, default=None,
                   help="VAD hangover before speech_stopped (default: duplex.voice.config.VAD_MIN_SILENCE_MS)")
    p.add_argument("--speculate-after-silence-ms", type=float, default=None,
                   help="start the final ASR pass this far into a pause (default: duplex.voice.config)")
    p.add_argument("--voice-option", action="append", default=None, metavar="KEY=VALUE",
                   help="set any VoiceConfig field (duplex/voice/config.py), e.g. hold_decode_for_first_audio=false")
    p.add_argument("--log-decisions", action="store_true",
                   help="send every policy decision (policy.decided: the observation, with the turn audio features, "
                        "and the action, every tick) to the client: the learned policy's served-path training data; "
                        "heavy, for evaluation runs")
    p.add_argument("--context-tokens", type=int, default=None,
                   help="a conversation's KV window: past it the oldest turns are evicted down to half "
                        "(default: duplex.engine.sequence.SequenceConfig, 4096); bounds memory per session")
    p.add_argument("--max-instructions-chars", type=int, default=None,
                   help="longest instructions a session.update may carry, in characters (default: "
                        "duplex.session.config.SessionConfig, 8000); their tokens must also fit a quarter of "
                        "--context-tokens, and a longer update gets instructions_too_long naming the limit")
    p.add_argument("--scheduler", choices=["batched", "chunked", "fifo"], default=None,
                   help="engine scheduler (default: $DUPLEX_SCHEDULER or batched): batched = one forward per "
                        "tick over all sessions; chunked = the same fair order, one forward per session; "
                        "fifo = one session's job at a time (the old worker, for A/B runs)")
    p.add_argument("--overlap-layout", choices=["hold", "interleave"], default=None,
                   help="user words heard while the agent generates: wait outside the cache until it stops "
                        "(hold, default) or enter it at once inside the agent's turn (interleave)")
    p.add_argument("--tts", default=None, help="piper | espeak-ng | flite | none")
    p.add_argument("--asr-model", default=None, help="tiny.en (default) | base | path | none")
    p.add_argument("--instructions", default=None)
    p.add_argument("--translate-model", default=None,
                   help="model for session.update {mode: translate} (default: the packaged Gemma 3 270M; "
                        "any HF causal LM id or path); loaded on the first translate session")

    p = add("talk", _cmd_talk, "local voice chat with microphone and speaker")
    _add_model_args(p)
    p.add_argument("--policy", default=None, help="turn policy (default: duplex.voice.config.VOICE_POLICY)")
    p.add_argument("--headphones", action="store_true", help="no echo: allow barge-in while the agent speaks")
    p.add_argument("--tts", default=None)

    p = add("transcribe", _cmd_transcribe, "stream a WAV file through the ASR")
    p.add_argument("file")
    p.add_argument("--asr-model", default=None)

    p = add("client", _cmd_client, "connect to a duplex server")
    p.add_argument("--url", default="ws://127.0.0.1:8765/ws")
    p.add_argument("--auth-token", default=None)
    p.add_argument("--text", default=None, help="send one message, print the reply, exit")

    p = add("bench", _cmd_bench, "benchmarks (JSON on stdout)")
    p.add_argument("what", choices=["decode", "ttft", "bargein", "asr", "tts", "server", "realtime", "openai", "soak",
                                      "translate"],
                   help="openai: first SSE chunk of /v1/chat/completions vs the first /ws text delta (--n trials)")
    _add_model_args(p)
    p.add_argument("--json", nargs="?", const=True, default=False, metavar="FILE",
                   help="JSON output (always on except for realtime, which prints a summary without it); "
                        "with FILE it is also written there")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--int8-only", action="store_true",
                   help="bench decode: only the int8 format (the served one), with its batched-rows part")
    p.add_argument("--trials", type=int, default=20)
    r = p.add_argument_group("realtime", "duplex bench realtime: a browser-like client speaks scenarios to the "
                                         "served agent over /ws in real time")
    r.add_argument("--url", default=None, help="a running server (ws://HOST:PORT/ws); default: start duplex serve")
    r.add_argument("--scenarios", default=None, help="scenario directory (default: render into the cache)")
    r.add_argument("--n", type=int, default=3, help="scenarios per category (LibriVox: clips)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--speech", choices=["synthetic", "librivox"], default="synthetic",
                   help="synthetic: Piper/flite scenarios of all four categories; librivox: real LibriVox "
                        "recordings (pocketsphinx-testdata) as turn-taking questions")
    r.add_argument("--background-talker", action="store_true",
                   help="a second session keeps a typed conversation going all the time (latency under load)")
    r.add_argument("--policy", default=None, help="NAME or NAME:key=value,... (default: the server's)")
    r.add_argument("--out", default=None, help="also write the JSON here (and timelines to OUT.timelines/)")
    r.add_argument("--auth-token", default=None, help="the server's --auth-token")
    r.add_argument("--no-warmup", action="store_true", help="skip the unscored warm-up episode")
    r.add_argument("--serve-arg", action="append", default=None, metavar="FLAGS",
                   help="extra flags for the duplex serve the bench starts (realtime and soak), e.g. "
                        "--serve-arg='--overlap-layout interleave'")
    from duplex.bench.server import add_server_bench_args

    add_server_bench_args(p)
    from duplex.bench.translate import add_translate_bench_args

    add_translate_bench_args(p)
    s = p.add_argument_group("soak", "duplex bench soak: N text clients for T minutes that talk, interrupt, drop and "
                                     "resume, read slowly and flood (--url, --auth-token, --seed above apply; "
                                     "--json FILE also writes the JSON there and the RSS plot next to it)")
    s.add_argument("--clients", type=int, default=8)
    s.add_argument("--minutes", type=float, default=30.0)
    s.add_argument("--server-pid", type=int, default=None, help="with --url: the server's pid, to sample its RSS")
    s.add_argument("--warmup-s", type=float, default=None,
                   help="RSS growth is measured from this long after the soak clients start "
                        "(default: 10%% of the run, 30 s to 5 min)")

    try:
        from duplex.eval.cli import add_eval_parser
    except ImportError:
        pass
    else:
        add_eval_parser(sub)
    from duplex.cli.policy import add_policy_parser

    add_policy_parser(sub)
    from duplex.translate.cli import add_translate_parser

    add_translate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI reports, tracebacks only with -v
        if args.verbose:
            raise
        from duplex.engine.models import ModelNotFoundError

        prefix = "model error" if isinstance(exc, ModelNotFoundError) else type(exc).__name__
        print(f"duplex: {prefix}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
