"""Bitmask-sparse safetensors: an unstructured-pruned model that is smaller on disk.

Self-contained (imports only torch, safetensors and transformers): it is copied into
every sparse model folder, which then loads with::

    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    load_sparse_model = get_class_from_dynamic_module("sparse_format.load_sparse_model", path)
    model = load_sparse_model(path)  # a normal, dense HF model

or is turned back into a plain HF folder with ``python sparse_format.py SRC DST``.

Layout of ``model.sparse.safetensors`` (it replaces ``model.safetensors``, so a plain
``from_pretrained`` fails loudly instead of loading wrong weights): a tensor with n
elements of which k are non-zero is stored as

* ``<name>::mask``: uint8 [⌈n/8⌉], bit i (most significant bit first) = element i ≠ 0;
* ``<name>::values``: the k non-zero values in row-major order, original dtype;

when that is smaller than the dense tensor (k·b + n/8 < n·b bytes, b bytes per value, i.e.
above 1/(8b) sparsity); other tensors are stored dense under their own name. The header
metadata ``dpc_sparse`` lists the encoded tensors with shape and dtype. Decoding is exact.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

DENSE_FILE = "model.safetensors"
SPARSE_FILE = "model.sparse.safetensors"
FORMAT = "dpc-sparse-v1"
_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor (any shape, n elements) → uint8 [⌈n/8⌉], MSB first (like np.packbits)."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)]).view(-1, 8)  # [⌈n/8⌉, 8]
    return (flat * _BITS).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 [⌈n/8⌉] → bool [n] (inverse of :func:`pack_mask`)."""
    return (packed.unsqueeze(1) & _BITS).ne(0).reshape(-1)[:numel]


def encode_sparse(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """Encode each tensor as mask + values where that saves bytes.

    Returns:
        (tensors to write, metadata ``{name: {"shape", "dtype"}}`` of the encoded ones).
    """
    out, encoded = {}, {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        nonzero = t != 0
        k, n, b = int(nonzero.sum()), t.numel(), t.element_size()
        if t.is_floating_point() and k * b + (n + 7) // 8 < n * b:
            out[f"{name}::mask"] = pack_mask(nonzero)
            out[f"{name}::values"] = t[nonzero].contiguous()  # [k], row-major order
            encoded[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        else:
            out[name] = t
    return out, encoded


def decode_sparse(stored: dict[str, torch.Tensor], encoded: dict) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_sparse`: the dense tensors, exactly."""
    dense = {k: v for k, v in stored.items() if "::" not in k}
    for name, info in encoded.items():
        numel = 1
        for d in info["shape"]:
            numel *= d
        mask = unpack_mask(stored[f"{name}::mask"], numel)
        values = stored[f"{name}::values"]
        t = torch.zeros(numel, dtype=getattr(torch, info["dtype"]))
        t[mask] = values
        dense[name] = t.view(info["shape"])
    return dense


def sparsify_folder(folder: str | Path) -> Path:
    """Replace ``folder/model.safetensors`` (as written by ``save_pretrained``) by
    ``model.sparse.safetensors`` and copy this loader into the folder.

    Returns:
        The path of the sparse weights file.
    """
    folder = Path(folder)
    with safe_open(folder / DENSE_FILE, framework="pt") as f:
        metadata = dict(f.metadata() or {})
    stored, encoded = encode_sparse(load_file(folder / DENSE_FILE))
    metadata.update({"format": "pt", "dpc_sparse": json.dumps(encoded), "dpc_format": FORMAT})
    target = folder / SPARSE_FILE
    save_file(stored, target, metadata=metadata)
    shutil.copymode(folder / DENSE_FILE, target)  # same permissions as save_pretrained's
    (folder / DENSE_FILE).unlink()
    shutil.copyfile(Path(__file__), folder / "sparse_format.py")
    return target


def load_dense_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """The dense state dict stored in ``folder/model.sparse.safetensors``."""
    path = Path(folder) / SPARSE_FILE
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("dpc_format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file")
    return decode_sparse(load_file(path), json.loads(metadata["dpc_sparse"]))


def load_sparse_model(folder: str | Path, *, trust_remote_code: bool = True):
    """A dense HF model (eval mode) from a sparse folder: its config and code + the
    decoded weights. ``trust_remote_code`` runs the head code shipped in the folder
    (e.g. ``mean_pooling.py``), as ``from_pretrained`` would with the same flag."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    folder = str(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    model = auto.from_config(config, trust_remote_code=trust_remote_code)
    missing, unexpected = model.load_state_dict(load_dense_state_dict(folder), strict=False)
    tied = {k for k in missing if _is_tied(model, k)}
    if unexpected or set(missing) - tied:
        raise ValueError(f"weights do not match the config: missing {sorted(set(missing) - tied)}"
                         f", unexpected {sorted(unexpected)}")  # fmt: skip
    if tied:
        model.tie_weights()
    return model.eval()


def _is_tied(model, key: str) -> bool:
    out = model.get_output_embeddings()
    return (
        out is not None
        and key.endswith("weight")
        and out.weight is model.get_input_embeddings().weight
        and key.rsplit(".", 1)[0] in {n for n, m in model.named_modules() if m is out}
    )


def densify_folder(src: str | Path, dst: str | Path) -> Path:
    """Write a plain HF folder (``model.safetensors``) next to the config and tokenizer of
    the sparse folder ``src``."""
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(SPARSE_FILE, "sparse_format.py"))
    load_sparse_model(src).save_pretrained(dst, safe_serialization=True)
    return dst


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python sparse_format.py SPARSE_FOLDER DENSE_FOLDER")
    print(densify_folder(sys.argv[1], sys.argv[2]))
