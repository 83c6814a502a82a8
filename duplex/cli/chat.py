"""``duplex chat``: full-duplex text chat in the terminal.

The reply streams while you type; pressing Enter during a reply is a barge-in: the reply stops at
what was shown and the model sees it was cut off. Slash commands: /policy NAME, /reset, /quit.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TextIO

from duplex.engine.worker import Engine
from duplex.policies import available_policies
from duplex.session.core import DEFAULT_INSTRUCTIONS, Session, SessionConfig
from duplex.session.events import TextInput, UpdateSession
from duplex.tasks import cancel_and_wait

__all__ = ["run_chat"]

HELP = "Type and press Enter. Enter while the agent replies interrupts it. /policy NAME, /reset, /quit"


class _Printer:
    """Renders session events; the status line is a bracketed line on state changes."""

    def __init__(self, out: TextIO, policy: str) -> None:
        self.out = out
        self.policy = policy
        self.mid_line = False

    def status(self, state: str) -> None:
        self._newline()
        self.out.write(f"\x1b[2m[{state} · policy={self.policy}]\x1b[0m\n" if self.out.isatty()
                       else f"[{state} · policy={self.policy}]\n")
        self.out.flush()

    def agent(self, text: str) -> None:
        if not self.mid_line:
            self.out.write("agent> ")
            text = text.lstrip()
        self.out.write(text)
        self.out.flush()
        self.mid_line = True

    def line(self, text: str) -> None:
        self._newline()
        self.out.write(text + "\n")
        self.out.flush()

    def _newline(self) -> None:
        if self.mid_line:
            self.out.write("\n")
            self.mid_line = False


async def _stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _render(session: Session, printer: _Printer) -> None:
    async for ev in session.events():
        if ev.type == "agent_text_delta":
            printer.agent(ev.text)  # type: ignore[union-attr]
        elif ev.type == "state_changed":
            printer.status(ev.state)  # type: ignore[union-attr]
        elif ev.type == "interrupted":
            printer.line(f"  (interrupted; kept: {ev.kept_text!r})")  # type: ignore[union-attr]
        elif ev.type == "error":
            printer.line(f"  error [{ev.code}]: {ev.message}")  # type: ignore[union-attr]


async def run_chat(args: argparse.Namespace) -> int:
    print(f"loading model {args.model or 'default'} ...", file=sys.stderr)
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype,
                         quantize=None if args.quantize == "none" else args.quantize)
    config = SessionConfig(policy=args.policy, instructions=args.instructions or DEFAULT_INSTRUCTIONS)
    printer = _Printer(sys.stdout, args.policy)
    printer.line(HELP)
    reader = await _stdin_lines()
    session = Session(engine, config)
    await session.start()
    render = asyncio.create_task(_render(session, printer))
    try:
        while True:
            raw = await reader.readline()
            if not raw:
                break
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            if line.startswith("/"):
                cmd, _, arg = line[1:].partition(" ")
                if cmd in ("quit", "exit", "q"):
                    break
                if cmd == "policy":
                    if arg.strip() not in available_policies():
                        printer.line(f"  policies: {', '.join(available_policies())}")
                        continue
                    printer.policy = arg.strip()
                    session.submit(UpdateSession(policy=arg.strip()))
                    printer.line(f"  policy -> {arg.strip()}")
                elif cmd == "reset":
                    await session.close()
                    render.cancel()
                    session = Session(engine, config)
                    await session.start()
                    render = asyncio.create_task(_render(session, printer))
                    printer.line("  (conversation reset)")
                else:
                    printer.line(f"  unknown command /{cmd}. {HELP}")
                continue
            if line.strip():
                session.submit(TextInput(line, final=True))
    finally:
        await session.close()
        await cancel_and_wait(render, what="renderer")
        engine.close()
    return 0
