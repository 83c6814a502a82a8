"""A robot control loop on top of duplex: type (or say) commands; "stop" interrupts at once.

    duplex serve --tts none &            # or with voice, and talk in the browser at the same time
    python examples/robot.py --url ws://127.0.0.1:8765/ws

Each line you type goes to the agent; its streamed reply is printed as it arrives. Typing
"stop" (or a transcript of the user saying "stop") calls ``interrupt()`` immediately, without
waiting for the policy — the kind of hard override a robot needs.
"""

from __future__ import annotations

import argparse
import logging
import queue
import sys
import threading

from duplex.serving.client import SyncDuplexClient

log = logging.getLogger("robot")

STOP_WORDS = frozenset({"stop", "halt", "freeze"})


def _is_stop(text: str) -> bool:
    return any(w.strip(".,!?").lower() in STOP_WORDS for w in text.split()[:2])


def _stdin_lines(out: queue.Queue[str | None]) -> None:
    for line in sys.stdin:
        out.put(line.strip())
    out.put(None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8765/ws")
    parser.add_argument("--auth-token", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    commands: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_stdin_lines, args=(commands,), daemon=True).start()
    with SyncDuplexClient(args.url, args.auth_token) as robot:
        log.info("connected (session %s). Type a command; 'stop' interrupts; Ctrl-D quits.", robot.session["id"])
        while True:
            # 1. the control loop tick: handle operator input without blocking
            try:
                line = commands.get(timeout=0.05)
            except queue.Empty:
                line = ""
            if line is None:
                break
            if line and _is_stop(line):
                robot.interrupt()  # immediate: response.cancel, no policy in the way
                log.info("[robot] STOP sent")
            elif line:
                robot.say(line)
            # 2. react to what the agent and the user's voice did since the last tick
            for event in robot.poll_events():
                kind = event.get("type")
                if kind == "response.output_text.delta":
                    sys.stdout.write(event["delta"])
                    sys.stdout.flush()
                elif kind == "response.done":
                    sys.stdout.write("\n")
                elif kind == "response.output_audio.paused":
                    # someone spoke over the agent: hold speech *and* motion until the server decides
                    log.info("\n[robot] paused at %s ms (holding the gesture)", event.get("audio_end_ms"))
                elif kind == "response.output_audio.resumed":
                    log.info("[robot] resumed (it was only a backchannel)")
                elif kind == "response.interrupted":
                    log.info("\n[robot] agent interrupted; kept: %r", event.get("kept_text"))
                elif kind == "conversation.item.input_audio_transcription.delta" and _is_stop(event.get("text", "")):
                    robot.interrupt()  # the user *said* stop
                elif kind == "error":
                    log.info("[robot] error %s: %s", event.get("code"), event.get("message"))
                elif kind == "connection.closed":
                    return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
