// duplex browser client: mic -> 16 kHz PCM16 binary frames; agent audio frames -> playback
// worklet; barge-in stops playback at once and reports the played position. Plain ES module.
// Translate mode: a toggle switches the session to simultaneous translation, with subtitles.
// Test hooks: window.duplexLog (received events), window.duplex (state, counters, send()).

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const log = [];
window.duplexLog = log;

const state = {
  ws: null,
  session: null,
  lastSeq: 0,
  status: "connecting",
  serverState: "listening",
  audioFrames: 0,
  audioFramesByTurn: {},
  turns: {}, // agent turn -> {headers: [], pushed, done, total, played, interrupted, doneSent}
  interrupted: new Set(),
  userTurns: {}, // user turn -> element
  agentTurns: {}, // agent turn -> element
  sentSamples: 0,
  sentTimes: [], // [streamSample, performance.now()] for latency
  waitingSince: null, // local time the user's turn ended
  latency: {},
  micStarted: false,
  configured: false, // mic frames wait until the session has our audio settings
  pendingFrames: [],
  errors: [],
  mode: "chat", // the session's mode as the server last confirmed it
  subtitles: { source: "", target: "", hypothesis: "" }, // translate mode: the current sentence
  typedSent: 0, // translate mode: characters of the text box already sent as source words
};
window.duplex = { state, send, startAudio };

// ---- connection ------------------------------------------------------------------------
function wsUrl(resume) {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const q = new URLSearchParams();
  if (params.get("token")) q.set("token", params.get("token"));
  if (resume && state.session) {
    q.set("session_id", state.session.id);
    q.set("resume_token", state.session.resume_token);
    q.set("last_seq", String(state.lastSeq));
  } else {
    // name the new session: a proxy hashing on session_id (deploy/nginx) then sends the
    // resume to the replica that holds it
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    q.set("session_id", Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join(""));
  }
  const qs = q.toString();
  return `${proto}//${location.host}/ws${qs ? "?" + qs : ""}`;
}

function connect(resume = false) {
  const ws = new WebSocket(wsUrl(resume));
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  ws.onopen = () => setStatus("connected");
  state.configured = false;
  ws.onmessage = (e) => (typeof e.data === "string" ? onEvent(JSON.parse(e.data)) : onAudio(e.data));
  ws.onclose = (e) => {
    setStatus(`disconnected (${e.code})`);
    note("system", `connection closed (${e.code}${e.reason ? ": " + e.reason : ""})`);
    if (e.code !== 1000 && e.code !== 1001 && e.code !== 1008 && state.session && !state.noResume) {
      setTimeout(() => connect(true), 1000); // resume the same session
    }
  };
}

function send(obj) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(obj));
}

// ---- incoming events -------------------------------------------------------------------
function onEvent(ev) {
  const now = performance.now();
  log.push({ type: ev.type, t: now, turn: ev.turn });
  if (typeof ev.seq === "number" && ev.seq > state.lastSeq) state.lastSeq = ev.seq;
  switch (ev.type) {
    case "session.created":
    case "session.resumed":
      state.session = ev.session;
      setStatus(`connected · session ${ev.session.id}`);
      showMode(ev.session.mode || "chat");
      if (ev.type === "session.created") configureSession();
      else {
        state.configured = true;
        flushFrames();
      }
      break;
    case "session.updated":
      state.session = { ...state.session, ...ev.session };
      state.configured = true;
      showMode(ev.session.mode || "chat");
      flushFrames();
      break;
    case "translation.updated":
      subtitle({ source: ev.source, target: ev.target, hypothesis: ev.hypothesis });
      break;
    case "state.changed":
      state.serverState = ev.state;
      showState();
      break;
    case "input_audio_buffer.speech_started":
      setIndicator("listening");
      break;
    case "input_audio_buffer.speech_stopped":
      state.waitingSince = captureTime(ev.audio_end_ms) ?? now;
      setIndicator("thinking");
      break;
    case "response.backchannel":
      note("backchannel", `agent: ${ev.text}`);
      break;
    case "response.output_audio.paused":
      // The user spoke over the agent: hold playback (keep the buffer) until the server decides.
      if (!state.interrupted.has(ev.turn)) player.pause();
      break;
    case "response.output_audio.resumed":
      // Only a backchannel: play on from the very sample where it paused.
      if (!state.interrupted.has(ev.turn)) player.resume();
      break;
    case "conversation.item.input_audio_transcription.delta":
      userText(ev.turn, ev.committed_text, ev.tentative_text);
      if (state.mode === "translate") subtitle({ source: [ev.committed_text, ev.tentative_text].filter(Boolean).join(" ") });
      break;
    case "conversation.item.input_audio_transcription.completed":
      userText(ev.turn, ev.transcript, "");
      break;
    case "response.created":
      state.turns[ev.turn] = state.turns[ev.turn] || newTurn();
      agentEl(ev.turn);
      if (state.mode === "translate") subtitle({ source: "", target: "", hypothesis: "" }); // a new sentence
      break;
    case "response.output_text.delta":
      if (!state.interrupted.has(ev.turn)) {
        agentEl(ev.turn).querySelector(".text").textContent += ev.delta;
        firstOutput("text");
        if (state.mode === "translate") subtitle({ target: (state.subtitles.target + ev.delta).trim() });
      }
      break;
    case "response.output_audio.done": {
      const t = (state.turns[ev.turn] = state.turns[ev.turn] || newTurn());
      t.done = true;
      t.total = ev.samples;
      t.rate = ev.sample_rate_hz || t.rate;
      maybeFinishTurn(ev.turn);
      break;
    }
    case "response.interrupted":
      onInterrupted(ev);
      break;
    case "response.done": {
      const el = agentEl(ev.turn);
      el.querySelector(".text").textContent = ev.text;
      if (ev.reason === "interrupted" || ev.reason === "cancelled") el.classList.add("interrupted");
      if (state.mode === "translate") subtitle({ target: ev.text.trim(), hypothesis: "" });
      break;
    }
    case "audio.dropped":
      note("system", `network too slow: ${ev.frames} audio frame(s) dropped`);
      break;
    case "error":
      state.errors.push(ev.code);
      note("error", `${ev.code}: ${ev.message}`);
      if (ev.param?.startsWith("session.")) showMode(state.mode); // refused: the toggle shows the real mode
      break;
    case "session.closed":
      state.noResume = true;
      break;
  }
}

function configureSession() {
  const s = state.session;
  const update = { input_audio_format: { encoding: "pcm16", sample_rate_hz: 16000, channels: 1 } };
  if (s.audio_output_available && params.get("audio") !== "0") update.output_modalities = ["text", "audio"];
  send({ type: "session.update", session: update });
}

// ---- translate mode: toggle + subtitles ---------------------------------------------------
// The server confirms target words append-only (response.output_text.delta); translation.updated
// adds the unconfirmed guess, shown dimmed after them. ?src=en&tgt=es&policy=wait-k&k=3 override.
function setTranslate(on) {
  const update = { mode: on ? "translate" : "chat" };
  if (on) {
    update.source_language = params.get("src") || "en";
    update.target_language = params.get("tgt") || "es";
    update.policy = params.get("policy") || "wait-k";
    update.k = Number(params.get("k") || 3);
  }
  send({ type: "session.update", session: update });
}

function showMode(mode) {
  state.mode = mode;
  $("translate").checked = mode === "translate";
  $("subtitles").hidden = mode !== "translate";
  $("text").placeholder = mode === "translate"
    ? "Type the source (each word is sent as you type it; Enter ends the sentence)"
    : "Type a message (Enter sends; interrupts the agent)";
  state.typedSent = 0;
}

function subtitle(change) {
  Object.assign(state.subtitles, change);
  const s = state.subtitles;
  $("sub-source").textContent = s.source;
  $("sub-target").querySelector(".text").textContent = s.target;
  $("sub-target").querySelector(".tentative").textContent = s.hypothesis ? (s.target ? " " : "") + s.hypothesis : "";
}

function sendTypedWords() {
  // translate mode: every word is a source word once the space after it is typed (sent words stay
  // sent, like spoken ones; edits before them are not sent again)
  const value = $("text").value;
  const end = value.lastIndexOf(" ") + 1;
  if (end > state.typedSent) {
    send({ type: "input_text", text: value.slice(state.typedSent, end), final: false });
    state.typedSent = end;
  }
}

// ---- transcripts ----------------------------------------------------------------------
function bubble(cls) {
  const el = document.createElement("div");
  el.className = `msg ${cls}`;
  el.innerHTML = '<span class="who"></span><span class="text"></span><span class="tentative"></span>';
  el.querySelector(".who").textContent = cls === "user" ? "you" : cls === "agent" ? "agent" : "";
  $("log").appendChild(el);
  $("log").scrollTop = $("log").scrollHeight;
  return el;
}

function userText(turn, committed, tentative) {
  const el = (state.userTurns[turn] = state.userTurns[turn] || bubble("user"));
  el.querySelector(".text").textContent = committed;
  el.querySelector(".tentative").textContent = tentative ? (committed ? " " : "") + tentative : "";
}

function agentEl(turn) {
  return (state.agentTurns[turn] = state.agentTurns[turn] || bubble("agent"));
}

function note(kind, text) {
  const el = bubble(kind);
  el.querySelector(".text").textContent = text;
}

// ---- state + latency ------------------------------------------------------------------
function setStatus(text) {
  state.status = text;
  $("status").textContent = text;
}

function setIndicator(name) {
  $("state").textContent = name;
  $("state").className = `state ${name}`;
}

function showState() {
  const s = state.serverState;
  if (s === "speaking" && state.waitingSince !== null) setIndicator("thinking");
  else setIndicator(s === "speaking" || isPlaying() ? "speaking" : s);
}

function firstOutput(kind) {
  if (state.waitingSince === null) return;
  const ms = Math.round(performance.now() - state.waitingSince);
  if (state.latency[kind] === undefined) state.latency[kind] = ms;
  $("latency")
    .textContent = `latency: text ${state.latency.text ?? "–"} ms · audio ${state.latency.audio ?? "–"} ms`;
  if (kind === "audio" || !state.session?.output_modalities?.includes("audio")) {
    state.waitingSince = null;
    setIndicator("speaking");
  }
}

function captureTime(audioMs) {
  // local time the mic captured stream position audioMs (end of the user's speech)
  const sample = (audioMs / 1000) * 16000;
  for (const [end, t] of state.sentTimes) if (end >= sample) return t - ((end - sample) / 16000) * 1000;
  return null;
}

// ---- agent audio ----------------------------------------------------------------------
function newTurn() {
  return { headers: [], pushed: 0, done: false, total: 0, played: 0, rate: 0, interrupted: false, doneSent: false };
}

const player = {
  ctx: null,
  node: null,
  paused: false,
  pending: new Map(),
  reqId: 0,
  async init(rate) {
    try {
      this.ctx = new AudioContext({ sampleRate: rate, latencyHint: "interactive" });
    } catch {
      this.ctx = new AudioContext({ latencyHint: "interactive" });
    }
    await this.ctx.audioWorklet.addModule("player-worklet.js");
    this.node = new AudioWorkletNode(this.ctx, "duplex-player", { numberOfInputs: 0, outputChannelCount: [1] });
    this.node.connect(this.ctx.destination);
    this.node.port.onmessage = (e) => onPlayer(e.data);
    if (this.ctx.state !== "running") await this.ctx.resume().catch(() => {});
  },
  push(turn, pcm16, header) {
    const src = new Float32Array(pcm16.length);
    for (let i = 0; i < pcm16.length; i++) src[i] = pcm16[i] / 32768;
    const data = resample(src, header.sample_rate_hz, this.ctx.sampleRate);
    this.node.port.postMessage(
      { cmd: "push", turn, data, srcStart: header.sample_offset, srcLen: pcm16.length }, [data.buffer]);
  },
  stop(turn) {
    return new Promise((resolve) => {
      if (!this.node) return resolve({ pos: 0 });
      const reqId = ++this.reqId;
      this.pending.set(reqId, resolve);
      this.node.port.postMessage({ cmd: "stop", turn, reqId });
      this.paused = false;
      this.node.port.postMessage({ cmd: "resume" });
    });
  },
  pause() {
    if (this.node) this.node.port.postMessage({ cmd: "pause" });
    this.paused = true;
  },
  resume() {
    if (this.node) this.node.port.postMessage({ cmd: "resume" });
    this.paused = false;
  },
};

function resample(x, from, to) {
  if (!from || from === to) return x;
  const n = Math.max(1, Math.round((x.length * to) / from));
  const y = new Float32Array(n);
  const r = from / to;
  for (let i = 0; i < n; i++) {
    const p = i * r;
    const j = Math.floor(p);
    const f = p - j;
    y[i] = (x[j] ?? 0) * (1 - f) + (x[j + 1] ?? x[j] ?? 0) * f;
  }
  return y;
}

function isPlaying() {
  return Object.values(state.turns).some((t) => !t.interrupted && !t.doneSent && t.pushed > t.played);
}

async function onAudio(buf) {
  const view = new DataView(buf);
  const n = view.getUint32(0, true);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 4, n)));
  const pcm = new Int16Array(buf.slice(4 + n));
  log.push({ type: "response.output_audio.delta", t: performance.now(), turn: header.turn });
  if (header.seq > state.lastSeq) state.lastSeq = header.seq;
  if (header.type === "response.backchannel.audio") {
    // the agent's own "mm-hm" while the user talks: no turn, no marks, just play it
    if (!player.node) await player.init(header.sample_rate_hz);
    player.push(-1, pcm, { ...header, sample_offset: 0 });
    return;
  }
  state.audioFrames += 1;
  state.audioFramesByTurn[header.turn] = (state.audioFramesByTurn[header.turn] || 0) + 1;
  if (state.interrupted.has(header.turn)) return;
  const t = (state.turns[header.turn] = state.turns[header.turn] || newTurn());
  t.headers.push(header);
  t.rate = header.sample_rate_hz;
  t.pushed = header.sample_offset + header.samples;
  if (!player.node) await player.init(header.sample_rate_hz);
  player.push(header.turn, pcm, header);
  firstOutput("audio");
}

function heardTokens(t, pos) {
  // first token not yet fully heard (same rule as TtsChunk.token_at on the server)
  let heard = 0;
  for (const h of t.headers) {
    if (pos >= h.sample_offset + h.samples) {
      heard = h.token_end;
      continue;
    }
    if (pos < h.sample_offset) break;
    const rel = pos - h.sample_offset;
    const ends = h.token_offsets_samples.slice(1);
    let k = 0;
    while (k < ends.length && ends[k] <= rel) k++;
    heard = h.token_start + k;
    break;
  }
  return heard;
}

function ms(t, samples) {
  return t.rate ? Math.round((1000 * samples) / t.rate) : 0;
}

let lastMark = 0;
function onPlayer(m) {
  if (m.type === "stopped") {
    const resolve = player.pending.get(m.reqId);
    player.pending.delete(m.reqId);
    if (resolve) resolve(m);
    return;
  }
  const t = state.turns[m.turn];
  if (!t || t.interrupted) return;
  t.played = Math.max(t.played, m.pos);
  const now = performance.now();
  if (m.type === "pos" && now - lastMark > 250) {
    lastMark = now;
    send({ type: "playback.mark", turn: m.turn, audio_end_ms: ms(t, t.played), heard_tokens: heardTokens(t, t.played) });
  }
  if (m.type === "drained" || m.type === "ended_turn") maybeFinishTurn(m.turn);
  showState();
}

function maybeFinishTurn(turn) {
  const t = state.turns[turn];
  if (!t || t.doneSent || t.interrupted || !t.done) return;
  if (t.played < t.pushed && player.node) return; // still playing; "drained" will call again
  t.doneSent = true;
  const last = t.headers.length ? t.headers[t.headers.length - 1].token_end : 0;
  send({ type: "playback.mark", turn, audio_end_ms: ms(t, t.total), heard_tokens: last, done: true });
  showState();
}

async function onInterrupted(ev) {
  state.interrupted.add(ev.turn);
  const t = state.turns[ev.turn];
  const el = agentEl(ev.turn);
  el.classList.add("interrupted");
  setIndicator("interrupted");
  if (t && !t.doneSent) {
    t.interrupted = true;
    const stopped = await player.stop(ev.turn); // silence now, learn the exact played position
    const pos = Math.max(t.played, stopped.turn === ev.turn ? stopped.pos : 0);
    send({ type: "conversation.item.truncate", item_id: ev.item_id, turn: ev.turn, content_index: 0,
           audio_end_ms: ms(t, pos) });
  } else if (!t) {
    send({ type: "conversation.item.truncate", item_id: ev.item_id, turn: ev.turn, content_index: 0, audio_end_ms: 0 });
  }
}

// ---- microphone -----------------------------------------------------------------------
async function startAudio() {
  if (state.micStarted) return;
  state.micStarted = true;
  $("start").disabled = true;
  try {
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
    const ctx = new AudioContext({ latencyHint: "interactive" });
    await ctx.audioWorklet.addModule("mic-worklet.js");
    const source = ctx.createMediaStreamSource(stream);
    const node = new AudioWorkletNode(ctx, "duplex-mic", { numberOfOutputs: 0 });
    node.port.onmessage = (e) => {
      const frame = e.data;
      state.sentSamples += frame.byteLength / 2;
      state.sentTimes.push([state.sentSamples, performance.now()]);
      if (state.sentTimes.length > 3000) state.sentTimes.splice(0, 1000);
      if ($("mute").checked) return;
      state.pendingFrames.push(frame);
      if (state.pendingFrames.length > 500) state.pendingFrames.shift(); // keep the last 10 s
      flushFrames();
    };
    source.connect(node);
    if (ctx.state !== "running") await ctx.resume().catch(() => {});
    state.micRate = ctx.sampleRate;
    log.push({ type: "mic.started", t: performance.now(), rate: ctx.sampleRate });
    if (!player.node && state.session?.output_audio_format?.sample_rate_hz) {
      await player.init(state.session.output_audio_format.sample_rate_hz);
    }
    $("start").textContent = "mic on";
  } catch (err) {
    state.micStarted = false;
    $("start").disabled = false;
    note("error", `microphone: ${err.message || err}`);
  }
}

function flushFrames() {
  if (!state.configured || !state.ws || state.ws.readyState !== WebSocket.OPEN) return;
  while (state.pendingFrames.length) state.ws.send(state.pendingFrames.shift());
}

// ---- typed input ----------------------------------------------------------------------
$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  if (state.mode === "translate") {
    send({ type: "input_text", text: $("text").value.slice(state.typedSent), final: true }); // ends the sentence
    $("text").value = "";
    state.typedSent = 0;
    return;
  }
  const text = $("text").value.trim();
  if (!text) return;
  send({ type: "input_text", text });
  $("text").value = "";
  state.waitingSince = performance.now();
  setIndicator("thinking");
});
$("text").addEventListener("input", () => {
  if (state.mode === "translate") sendTypedWords();
});
$("translate").addEventListener("change", (e) => setTranslate(e.target.checked));
$("stop").addEventListener("click", () => send({ type: "response.cancel" }));
$("start").addEventListener("click", () => startAudio());

connect();
if (params.get("autostart") === "1") startAudio();
