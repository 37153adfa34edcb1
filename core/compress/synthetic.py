"""DistilDP's private-data-free middle (Flemings & Annavaram 2024, §3):

* :func:`release_control_histogram`: the Gaussian mechanism on the control-code counts —
  the only thing besides the DP teacher that is computed from private rows;
* :func:`sample_control_codes`: control codes drawn from the released (noisy) histogram;
* :func:`generate_synthetic`: batched sampling from the DP teacher, prompted with the
  control-code prefix in the training format (``"[code]"``, see
  :func:`core.data.format_causal_text`); top-k 50, top-p 0.9, no repeated 2-grams;
* :class:`SyntheticSet`: the synthetic texts — the only data type the student trainer
  accepts, so no private row can reach the student by construction.

Everything after the histogram release is post-processing of DP outputs (the DP teacher's
weights, the noisy histogram) and costs no ε.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from core.data import format_causal_text

TOP_K, TOP_P, NO_REPEAT_NGRAM_SIZE = 50, 0.9, 2  # the paper's sampling settings
GENERATION_BATCH_SIZE = 32  # DESIGN §8: 236 tokens/s at batch 32 vs 131 at batch 8


@dataclass(frozen=True)
class NoisyHistogram:
    """A DP release of control-code counts (safe to log, store and show).

    Attributes:
        codes: the control-code domain, sorted (the dataset's control-code set: its schema,
            as stored with the dataset; only the counts are private).
        noisy_counts: count + N(0, (σ·Δ)²) per code, clipped at 0 (post-processing).
        probabilities: ``noisy_counts`` normalised to sum 1 (uniform if all are 0).
        noise_multiplier: σ of the Gaussian mechanism (noise std / sensitivity).
        sensitivity: Δ, the L2 sensitivity of the count vector (1: add/remove one row,
            one code per row).
    """

    codes: list[str]
    noisy_counts: list[float]
    probabilities: list[float]
    noise_multiplier: float
    sensitivity: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NoisyHistogram:
        return cls(**data)


def release_control_histogram(
    rows: Sequence[dict],
    *,
    noise_multiplier: float,
    sensitivity: float = 1.0,
    generator: torch.Generator | None = None,
) -> NoisyHistogram:
    """The Gaussian mechanism on the control-code histogram (Dwork & Roth 2014, Thm A.1).

        ñ_c = max(0, n_c + N(0, (σ·Δ)²)),  p_c = ñ_c / Σ_c' ñ_c'

    The raw counts n_c exist only inside this function: they are never returned, logged
    or stored. The caller must have charged the release (``hooks.before_step``) before
    calling it.

    Args:
        rows: private rows with a ``control`` key (one code per row ⇒ Δ = 1).
        noise_multiplier: σ from the plan's "histogram" phase.
        sensitivity: Δ (L2) of the count vector.
        generator: noise RNG; None → seeded from OS entropy (production: a known seed
            would reveal the noise).

    Returns:
        The noisy histogram over the sorted set of codes (empty when no row has a code).
    """
    counts: dict[str, int] = {}
    for row in rows:
        code = row.get("control")
        if code:
            counts[code] = counts.get(code, 0) + 1
    codes = sorted(counts)
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    raw = torch.tensor([counts[c] for c in codes], dtype=torch.float64)
    del counts
    noise = torch.normal(
        0.0, noise_multiplier * sensitivity, size=(len(codes),), generator=generator,
        dtype=torch.float64,
    )  # fmt: skip
    noisy = (raw + noise).clamp(min=0.0)  # clipping is post-processing
    del raw
    total = float(noisy.sum())
    probs = (noisy / total) if total > 0 else torch.full_like(noisy, 1.0 / max(len(codes), 1))
    return NoisyHistogram(
        codes=codes,
        noisy_counts=[round(float(x), 4) for x in noisy],
        probabilities=[float(x) for x in probs],
        noise_multiplier=float(noise_multiplier),
        sensitivity=float(sensitivity),
    )


def sample_control_codes(
    histogram: NoisyHistogram, num_samples: int, *, generator: torch.Generator
) -> list[str]:
    """``num_samples`` codes drawn i.i.d. from ``histogram.probabilities`` (post-processing)."""
    probs = torch.tensor(histogram.probabilities, dtype=torch.float64)
    picks = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
    return [histogram.codes[i] for i in picks.tolist()]


@dataclass(frozen=True)
class SyntheticSet:
    """Texts sampled from the DP teacher: the student's whole training set.

    Attributes:
        rows: ``{"text", "control"}`` dicts; ``format_causal_text(row)`` gives the training
            string in the teacher's format (``"[code] text"``).
    """

    rows: tuple[dict, ...]

    def __len__(self) -> int:
        return len(self.rows)

    def texts(self) -> list[str]:
        """The training strings, control-code prefix included."""
        return [format_causal_text(r) for r in self.rows]

    def save_jsonl(self, path: Path) -> None:
        """Write one JSON object per line (atomically: temp file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in self.rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(path)

    @classmethod
    def load_jsonl(cls, path: Path) -> SyntheticSet:
        with open(path, encoding="utf-8") as f:
            return cls(tuple(json.loads(line) for line in f if line.strip()))


def control_prompt(control: str | None) -> str:
    """The generation prompt for ``control``: the training prefix without its text.

    ``format_causal_text`` writes ``"[code] text"``; the prompt is ``"[code]"`` (no trailing
    space: the space belongs to the first generated token, as in training tokenisation).
    """
    return format_causal_text({"control": control, "text": ""}).rstrip() if control else ""


@torch.no_grad()
def generate_synthetic(
    model: Any,
    tokenizer: Any,
    *,
    controls: Sequence[str | None],
    max_new_tokens: int,
    batch_size: int = GENERATION_BATCH_SIZE,
    seed: int = 0,
    device: str = "cpu",
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> SyntheticSet:
    """One synthetic text per entry of ``controls``, sampled from ``model``.

    Sampling: top-k 50, top-p 0.9, ``no_repeat_ngram_size`` 2, at most ``max_new_tokens``
    new tokens, stopping at EOS. Prompts are left-padded in batches of ``batch_size``
    (rows of one batch share a code count, not necessarily a code). A row without a code
    is prompted with the BOS (or EOS) token alone.

    Args:
        model: the DP teacher (causal LM); put in eval mode.
        tokenizer: its tokenizer (padding side restored afterwards).
        controls: the code of each sample (from :func:`sample_control_codes`), or None.
        max_new_tokens: generated tokens per sample at most.
        batch_size: prompts per ``generate`` call.
        seed: seed of the sampling RNG (public: the teacher is already DP).
        device: where the model runs.
        on_progress: called after every batch with ``{"done", "total", "seconds",
            "tokens_per_second"}`` (no text: synthetic text stays in the job's work dir).
    """
    model.eval()
    start_id = (
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else (tokenizer.eos_token_id)
    )
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    rows: list[dict] = []
    started, new_tokens = time.monotonic(), 0
    try:
        with torch.random.fork_rng(devices=[] if device == "cpu" else [device]):
            torch.manual_seed(seed)
            for s in range(0, len(controls), batch_size):
                batch_codes = list(controls[s : s + batch_size])
                prompts = [_prompt_ids(tokenizer, c, start_id) for c in batch_codes]
                width = max(len(p) for p in prompts)
                pad = tokenizer.pad_token_id
                ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
                out = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device),
                    do_sample=True, top_k=TOP_K, top_p=TOP_P,
                    no_repeat_ngram_size=NO_REPEAT_NGRAM_SIZE, max_new_tokens=max_new_tokens,
                    pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                )  # fmt: skip
                generated = out[:, width:].cpu()  # [b, ≤ max_new_tokens]
                new_tokens += int((generated != pad).sum())
                for code, tokens in zip(batch_codes, generated, strict=True):
                    text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
                    rows.append({"control": code, "text": text})
                if on_progress is not None:
                    seconds = time.monotonic() - started
                    on_progress({
                        "done": len(rows), "total": len(controls), "seconds": round(seconds, 2),
                        "tokens_per_second": round(new_tokens / seconds, 1) if seconds else None,
                    })  # fmt: skip
    finally:
        tokenizer.padding_side = padding_side
    return SyntheticSet(tuple(rows))


def _prompt_ids(tokenizer: Any, control: str | None, start_id: int | None) -> list[int]:
    prompt = control_prompt(control)
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []
    if not ids or (tokenizer.bos_token_id is not None and _adds_bos(tokenizer)):
        ids = [start_id, *ids] if start_id is not None else ids
    if not ids:
        raise ValueError("the tokenizer has no BOS/EOS token to start an unprompted sample")
    return ids


def _adds_bos(tokenizer: Any) -> bool:
    """Whether training tokenisation (``tokenizer(text)``) starts rows with BOS."""
    probe = tokenizer("a")["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id
