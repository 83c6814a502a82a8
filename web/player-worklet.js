// Agent audio playback: a queue of segments played back to back. "stop" silences at once and
// reports exactly how far the current turn was played (in source samples of that turn), which
// the page sends as conversation.item.truncate; "pause"/"resume" hold the queue.

class PlayerProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.queue = []; // {turn, data: Float32Array, srcStart, srcLen, read}
    this.paused = false;
    this.quanta = 0;
    this.lastTurn = null;
    this.lastPos = 0; // source samples of lastTurn played so far
    this.wasPlaying = false;
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  onMessage(m) {
    if (m.cmd === "push") {
      this.queue.push({ turn: m.turn, data: m.data, srcStart: m.srcStart, srcLen: m.srcLen, read: 0 });
    } else if (m.cmd === "stop") {
      const turn = m.turn;
      const pos = this.lastTurn === turn ? this.lastPos : 0;
      this.queue = this.queue.filter((s) => turn !== undefined && turn !== null && s.turn !== turn);
      if (turn === undefined || turn === null) this.queue = [];
      this.port.postMessage({ type: "stopped", turn, pos, reqId: m.reqId });
      this.wasPlaying = this.queue.length > 0;
    } else if (m.cmd === "pause") {
      this.paused = true;
      this.report();
    } else if (m.cmd === "resume") {
      this.paused = false;
    }
  }

  report(type = "pos") {
    if (this.lastTurn !== null) this.port.postMessage({ type, turn: this.lastTurn, pos: this.lastPos });
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    const n = out.length;
    let written = 0;
    if (!this.paused) {
      while (written < n && this.queue.length) {
        const seg = this.queue[0];
        if (this.lastTurn !== seg.turn) {
          if (this.lastTurn !== null) this.report("ended_turn");
          this.lastTurn = seg.turn;
        }
        const take = Math.min(n - written, seg.data.length - seg.read);
        out.set(seg.data.subarray(seg.read, seg.read + take), written);
        seg.read += take;
        written += take;
        this.lastPos = seg.srcStart + Math.round((seg.read / seg.data.length) * seg.srcLen);
        if (seg.read >= seg.data.length) this.queue.shift();
      }
    }
    for (let i = written; i < n; i++) out[i] = 0;
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    const playing = written > 0;
    if (playing) {
      if (++this.quanta % 8 === 0) this.report();
    } else if (this.wasPlaying && !this.paused) {
      this.report("drained");
    }
    this.wasPlaying = playing || (this.paused && this.queue.length > 0);
    return true;
  }
}

registerProcessor("duplex-player", PlayerProcessor);
