#!/bin/bash
# GPU checks on a CUDA machine with no network (how bench/results/*-cuda-h100.json were made):
# run from the repo root with .devcarry/ holding wheels of soxr and pytest-asyncio (whl/), the packaged
# tokenizer (cache/models/SmolLM2-135M-Instruct-tokenizer) and the default model's config.json (smol/).
# The decode/TTFT benches use random weights of the default architecture: the GPU machine cannot fetch
# the packaged weights, and speed does not depend on the values.
export PYTHONUNBUFFERED=1
R=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .devcarry/whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/dup . > $OUT/install.log 2>&1 || tail -5 $OUT/install.log
export PYTHONPATH=/tmp/dup:/tmp/site DUPLEX_CACHE=$R/.devcarry/cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch,transformers;print('torch',torch.__version__,'transformers',transformers.__version__,torch.cuda.get_device_name())"
mkdir -p /tmp/t && cp -r tests /tmp/t/ && cd /tmp/t
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider -o asyncio_mode=auto -o asyncio_default_fixture_loop_scope=function tests/test_cuda.py 2>&1 | tee $OUT/test_cuda.log | tail -25
cd $R
python3 - <<'PY'
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
import torch
torch.manual_seed(0)
cfg = AutoConfig.from_pretrained('.devcarry/smol')
AutoModelForCausalLM.from_config(cfg).save_pretrained('/tmp/smol-random')
AutoTokenizer.from_pretrained('.devcarry/cache/models/SmolLM2-135M-Instruct-tokenizer').save_pretrained('/tmp/smol-random')
print('random-weight SmolLM2-135M written')
PY
timeout ${DECODE_TIMEOUT:-150} python3 - <<'PY' > $OUT/decode-cuda.json 2> $OUT/decode-cuda.err
import json, sys
from duplex.bench.engine import bench_decode
r = bench_decode('/tmp/smol-random', device='cuda', variants=(('float32', None), ('bfloat16', None)), tokens=64)
r['weights'] = 'random init, SmolLM2-135M-Instruct architecture (no network on the GPU machine)'
print(json.dumps(r, indent=1))
PY
tail -3 $OUT/decode-cuda.err; cat $OUT/decode-cuda.json | head -30
timeout 120 python3 - <<'PY' > $OUT/ttft-cuda.json 2> $OUT/ttft-cuda.err
import json
from duplex.bench.engine import bench_ttft
r = bench_ttft('/tmp/smol-random', device='cuda', dtype='bfloat16')
r['weights'] = 'random init, SmolLM2-135M-Instruct architecture'
print(json.dumps(r, indent=1))
PY
tail -3 $OUT/ttft-cuda.err; head -40 $OUT/ttft-cuda.json
