#!/bin/bash
# bench server on a CUDA machine with no network (how bench/results/server-cuda-h200.json was made): run
# from the repo root with .devcarry/ as for scripts/gpu_check.sh, plus wheels of numpy, websockets and
# psutil in whl/ (installed only where the machine lacks them). Random weights of the default
# architecture: every reply runs to max_reply_tokens, which is what a throughput sweep wants.
export PYTHONUNBUFFERED=1
R=$PWD
for pkg in numpy websockets psutil pytest_asyncio soxr; do
  python3 -c "import $pkg" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .devcarry/whl/${pkg}-*.whl
done
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/dup . > $OUT/install.log 2>&1 || tail -5 $OUT/install.log
export PYTHONPATH=/tmp/dup:/tmp/site DUPLEX_CACHE=$R/.devcarry/cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch,transformers,websockets,numpy;print('torch',torch.__version__,'transformers',transformers.__version__,'websockets',websockets.__version__,torch.cuda.get_device_name())"
python3 - <<'PY'
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
import torch
torch.manual_seed(0)
cfg = AutoConfig.from_pretrained('.devcarry/smol')
AutoModelForCausalLM.from_config(cfg).save_pretrained('/tmp/smol-random')
AutoTokenizer.from_pretrained('.devcarry/cache/models/SmolLM2-135M-Instruct-tokenizer').save_pretrained('/tmp/smol-random')
print('random-weight SmolLM2-135M written')
PY
cd /tmp  # not the checkout: its duplex/ would shadow the installed package (audio/ maps to duplex.audio)
timeout ${SERVER_TIMEOUT:-420} python3 - <<'PY' > $OUT/server-cuda.json 2> $OUT/server-cuda.err
import asyncio, json, subprocess
from duplex.bench.server import ServerBenchConfig, bench_server
cfg = ServerBenchConfig(model='/tmp/smol-random', device='cuda', dtype='bfloat16', quantize=None,
                        sessions=(1, 2, 4, 8, 16), max_tokens=48, rounds=2, schedulers=('batched', 'fifo'), serve_configs=('text',),
                        prefill_kb=16.0, prefill_talkers=4)
r = asyncio.run(bench_server(cfg))
r['weights'] = 'random init, SmolLM2-135M-Instruct architecture (no network on the GPU machine): every reply runs to max_reply_tokens'
r['gpu'] = subprocess.run(['nvidia-smi', '--query-gpu=name', '--format=csv,noheader'], capture_output=True, text=True).stdout.strip()
r['command'] = 'bash .devcarry/gpu_server.sh (bench_server(ServerBenchConfig(model=random SmolLM2-135M, device=cuda, dtype=bfloat16, sessions=1,2,4,8,16, rounds=2, schedulers=batched,fifo, prefill_kb=16)))'
print(json.dumps(r, indent=1))
PY
tail -25 $OUT/server-cuda.err; python3 -c "
import json; d=json.load(open('$OUT/server-cuda.json'))
for m in d['modes']:
  print(m['scheduler'], m['decode_baseline'], m.get('targets'))
  for l in m['levels']: print(' ', l)
  print(' prefill', m.get('prefill'))
"
