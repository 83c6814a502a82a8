"""GPU A/B of the decode step (how bench/results/decode-cuda-h100-ab.json was made): run from the
repo root with .devcarry/ as for scripts/gpu_check.sh. Random weights of the default architecture
(the GPU machine has no network). Per dtype, with the lean forward on and off: the median ms of
SharedSequence.step, of the sampler alone, and of one FastDecoder.forward row."""

import json
import os
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from duplex.engine.fast_decode import DecodeRow, fast_decoder
from duplex.engine.kv import new_kv_cache
from duplex.engine.models import load_model
from duplex.engine.sampling import Sampler, SamplingConfig
from duplex.engine.sequence import SharedSequence, Speaker
from duplex.engine.template import TurnTemplate

MODEL = "/tmp/smol-random"


def median_ms(fn, n: int = 30) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 2)


def main() -> None:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(".devcarry/smol")).save_pretrained(MODEL)
    AutoTokenizer.from_pretrained(".devcarry/cache/models/SmolLM2-135M-Instruct-tokenizer").save_pretrained(MODEL)
    rows = []
    for fast in ("1", "0"):
        os.environ["DUPLEX_FAST_DECODE"] = fast  # read when a loaded model's decoder is first asked for
        for dtype in ("float32", "bfloat16"):
            lm = load_model(MODEL, device="cuda", dtype=dtype, quantize=None)
            seq = SharedSequence(lm, TurnTemplate.from_tokenizer(lm.tokenizer))
            seq.add_message(Speaker.USER, "Tell me a long story about a lighthouse keeper.")
            seq.begin_turn(Speaker.AGENT)
            sampler = Sampler(SamplingConfig())
            row = {"fast": fast, "dtype": dtype, "step": median_ms(lambda: seq.step(sampler))}
            logits = seq.logits
            row["sample"] = median_ms(lambda: sampler(logits))
            decoder = fast_decoder(lm.model)
            if decoder is not None:
                cache = new_kv_cache(lm.model.config)
                with torch.inference_mode():
                    lm.model(input_ids=torch.tensor([list(range(100, 200))], device="cuda"), past_key_values=cache,
                             use_cache=True)
                pos = [100]

                def one_row() -> None:
                    decoder.forward([DecodeRow(cache, [5], pos[0])])
                    pos[0] += 1

                row["lean_forward"] = median_ms(one_row)
            print(row, flush=True)
            rows.append(row)
            lm = seq = decoder = None  # free this model before the next loads
    print(json.dumps({"benchmark": "decode-cuda-ab", "what": __doc__.split("\n\n")[0], "rows": rows}))


if __name__ == "__main__":
    main()
