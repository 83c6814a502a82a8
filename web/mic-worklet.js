// Microphone capture: downmix, downsample to 16 kHz (box filter + linear interpolation),
// convert to PCM16 little-endian and post 20 ms frames to the main thread (transferred buffers).

const TARGET_RATE = 16000;
const FRAME_SAMPLES = 320; // 20 ms at 16 kHz

class MicProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.ratio = sampleRate / TARGET_RATE; // input samples per output sample
    this.pos = 0; // fractional read position into this.pending
    this.pending = new Float32Array(0);
    this.frame = new Int16Array(FRAME_SAMPLES);
    this.fill = 0;
    this.enabled = true;
    this.port.onmessage = (e) => {
      if (e.data && e.data.cmd === "enable") this.enabled = !!e.data.value;
    };
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0 || !this.enabled) return true;
    const n = input[0].length;
    const mono = new Float32Array(n);
    for (let c = 0; c < input.length; c++) {
      const ch = input[c];
      for (let i = 0; i < n; i++) mono[i] += ch[i] / input.length;
    }
    const buf = new Float32Array(this.pending.length + n);
    buf.set(this.pending, 0);
    buf.set(mono, this.pending.length);
    const r = this.ratio;
    let pos = this.pos;
    while (pos + r <= buf.length) {
      let v;
      if (r <= 1.0001) {
        const i = Math.floor(pos);
        const f = pos - i;
        const b = i + 1 < buf.length ? buf[i + 1] : buf[i];
        v = buf[i] * (1 - f) + b * f;
      } else {
        // average the input samples this output sample covers (cheap anti-aliasing)
        const a = Math.floor(pos);
        const b = Math.min(buf.length, Math.floor(pos + r));
        let s = 0;
        for (let i = a; i < b; i++) s += buf[i];
        v = s / Math.max(1, b - a);
      }
      const x = Math.max(-1, Math.min(1, v));
      this.frame[this.fill++] = x < 0 ? x * 32768 : x * 32767;
      if (this.fill === FRAME_SAMPLES) {
        const out = this.frame.buffer;
        this.port.postMessage(out, [out]);
        this.frame = new Int16Array(FRAME_SAMPLES);
        this.fill = 0;
      }
      pos += r;
    }
    const keep = Math.floor(pos);
    this.pending = buf.slice(keep);
    this.pos = pos - keep;
    return true;
  }
}

registerProcessor("duplex-mic", MicProcessor);
