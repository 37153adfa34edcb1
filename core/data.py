"""Private rows → token ids → Poisson-sampled, length-sorted physical batches.

Sampling follows Opacus ``UniformWithReplacementSampler`` (what ``DPDataLoader`` uses):
at every logical step each of the N rows is included independently with probability q
(``torch.rand(N) < q``), so the logical batch size is Binomial(N, q) with mean q·N; no
shuffling sampler, no ``drop_last``, empty batches are possible (they still get noise).
The sampler's ``torch.Generator`` state is part of every checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from core.errors import InvalidRequest
from core.recipe_api import DatasetView

IGNORE_INDEX = -100  # label value that cross-entropy skips (padding in causal LM)


def format_causal_text(row: dict) -> str:
    """Causal-LM training text: ``"[control] text"`` when the row has a control code."""
    control = row.get("control")
    return f"[{control}] {row['text']}" if control else row["text"]


@dataclass
class EncodedDataset:
    """Tokenised rows of one :class:`DatasetView`.

    Attributes:
        input_ids: one list of token ids per row, each at most ``max_seq_length`` long.
        labels: class id per row (classification) or None (causal LM: labels = inputs).
        pad_token_id: id used to pad ``input_ids``.
        uses_token_type_ids: True for BERT-family models (Opacus needs them batch-shaped).
    """

    input_ids: list[list[int]]
    labels: list[int] | None
    pad_token_id: int
    uses_token_type_ids: bool

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """A right-padded batch with tight padding (to the longest selected row).

        Returns:
            ``input_ids``, ``attention_mask``, ``position_ids`` (and ``token_type_ids``),
            each int64 [B, T], contiguous and batch-shaped (DESIGN section 8: Opacus + HF
            need explicit ones); ``labels`` int64 [B] (classification) or [B, T] with
            padding set to -100 (causal LM).
        """
        rows = [self.input_ids[i] for i in indices]
        width = max((len(r) for r in rows), default=1)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[b, : len(r)] = 1
        batch = {
            "input_ids": ids.contiguous(),
            "attention_mask": mask.contiguous(),
            "position_ids": torch.arange(width).expand(len(rows), width).contiguous(),
        }
        if self.uses_token_type_ids:
            batch["token_type_ids"] = torch.zeros_like(ids).contiguous()
        if self.labels is None:
            batch["labels"] = ids.masked_fill(mask == 0, IGNORE_INDEX)
        else:
            batch["labels"] = torch.tensor([self.labels[i] for i in indices], dtype=torch.long)
        return batch


def encode_dataset(
    view: DatasetView,
    tokenizer: Any,
    *,
    task: str,
    max_seq_length: int,
    labels: list[str] | None = None,
    uses_token_type_ids: bool = False,
) -> EncodedDataset:
    """Tokenise ``view.rows`` with truncation to ``max_seq_length`` tokens.

    Args:
        view: rows ``{"text", "label", "control"}``.
        tokenizer: an HF tokenizer (pad token set).
        task: "classification" or "causal_lm".
        max_seq_length: maximum tokens per row, special tokens included.
        labels: label names in model id order; default ``view.labels`` (pass the training
            set's labels when encoding an eval set).
        uses_token_type_ids: emit ``token_type_ids`` (BERT family).

    Raises:
        InvalidRequest: a row's label is not among ``labels``.
    """
    if task == "causal_lm":
        texts = [format_causal_text(r) for r in view.rows]
        eos = tokenizer.eos_token_id
        enc = tokenizer(texts, truncation=True, max_length=max_seq_length - (eos is not None))
        ids = [list(x) + ([eos] if eos is not None else []) for x in enc["input_ids"]]
        label_ids = None
    else:
        names = list(labels if labels is not None else view.labels)
        index = {name: i for i, name in enumerate(names)}
        unknown = sorted({str(r["label"]) for r in view.rows if r["label"] not in index})
        if unknown:
            raise InvalidRequest(
                f"dataset {view.id}: labels {unknown[:5]} are not among the model's labels "
                f"{names[:10]}",
                param="eval_dataset_id",
            )
        enc = tokenizer([r["text"] for r in view.rows], truncation=True, max_length=max_seq_length)
        ids = [list(x) for x in enc["input_ids"]]
        label_ids = [index[r["label"]] for r in view.rows]
    return EncodedDataset(ids, label_ids, int(tokenizer.pad_token_id), uses_token_type_ids)


class PoissonSampler:
    """Poisson subsampling with rate q (Opacus ``UniformWithReplacementSampler`` semantics).

    Args:
        num_samples: N, rows in the private dataset.
        sample_rate: q = expected batch / N, from the privacy plan.
        seed: seed of the sampler's own ``torch.Generator`` (CPU).
    """

    def __init__(self, *, num_samples: int, sample_rate: float, seed: int):
        if not 0 < sample_rate <= 1:
            raise InvalidRequest(f"sample rate q={sample_rate} must be in (0, 1]")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def sample(self) -> list[int]:
        """Row indices of one logical batch: each row in with probability q."""
        mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
        return mask.nonzero(as_tuple=True)[0].tolist()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


def split_physical(
    indices: Sequence[int], lengths: Sequence[int], physical_batch_size: int
) -> list[list[int]]:
    """Split a logical batch into physical chunks of similar length (tight padding).

    Sorting only reorders rows inside one logical batch: which rows are in it (the
    Poisson draw) is unchanged, so privacy accounting is unaffected (DESIGN section 8).
    """
    ordered = sorted(indices, key=lambda i: lengths[i], reverse=True)
    return [
        ordered[s : s + physical_batch_size] for s in range(0, len(ordered), physical_batch_size)
    ]


def iter_eval_batches(dataset: EncodedDataset, batch_size: int) -> Iterator[dict]:
    """Every row exactly once, length-sorted, for evaluation (no sampling)."""
    yield from (
        dataset.collate(chunk)
        for chunk in split_physical(range(len(dataset)), dataset.lengths, batch_size)
    )
