"""GPU A/B of the decode step (how bench/results/decode-cuda-h100-ab.json was made): run from the repo
root with .devcarry/ as for scripts/gpu_check.sh. Random weights of the default architecture."""
import os, time, torch, statistics
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from duplex.engine.models import load_model
from duplex.engine.sequence import SharedSequence, Speaker
from duplex.engine.template import TurnTemplate
from duplex.engine.sampling import Sampler, SamplingConfig
from duplex.engine.fast_decode import fast_decoder, DecodeRow
torch.manual_seed(0)
cfg = AutoConfig.from_pretrained('.devcarry/smol')
AutoModelForCausalLM.from_config(cfg).save_pretrained('/tmp/smol-random')
AutoTokenizer.from_pretrained('.devcarry/cache/models/SmolLM2-135M-Instruct-tokenizer').save_pretrained('/tmp/smol-random')
def med(f, n=30):
    for _ in range(5): f()
    ts = []
    for _ in range(n):
        torch.cuda.synchronize(); t = time.perf_counter(); f(); torch.cuda.synchronize(); ts.append((time.perf_counter()-t)*1000)
    return round(statistics.median(ts), 2)
import json
rows = []
for fast in ("1", "0"):
    os.environ["DUPLEX_FAST_DECODE"] = fast
    for dt in ("float32", "bfloat16"):
        lm = load_model('/tmp/smol-random', device="cuda", dtype=dt, quantize=None)
        seq = SharedSequence(lm, TurnTemplate.from_tokenizer(lm.tokenizer))
        seq.add_message(Speaker.USER, "Tell me a long story about a lighthouse keeper.")
        seq.begin_turn(Speaker.AGENT)
        s = Sampler(SamplingConfig())
        r = {"fast": fast, "dtype": dt, "step": med(lambda: seq.step(s))}
        logits = seq.logits
        r["sample"] = med(lambda: s(logits))
        dec = fast_decoder(lm.model)
        if dec is not None:
            cache = seq._cache if hasattr(seq, "_cache") else None
            from duplex.engine.kv import new_kv_cache
            c = new_kv_cache(lm.model.config)
            with torch.inference_mode():
                lm.model(input_ids=torch.tensor([list(range(100, 200))], device="cuda"), past_key_values=c, use_cache=True)
            pos = [100]
            def fwd():
                dec.forward([DecodeRow(c, [5], pos[0])]); pos[0] += 1
            r["lean_forward"] = med(fwd)
        print(r, flush=True); rows.append(r)
        del lm, seq
print(json.dumps({"benchmark": "decode-cuda-ab", "what": "median ms of SharedSequence.step, the sampler alone, and one FastDecoder.forward row, per dtype, with the lean forward on (DUPLEX_FAST_DECODE=1) and off (0), random weights of the default architecture", "rows": rows}))
