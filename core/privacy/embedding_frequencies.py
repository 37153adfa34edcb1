"""PUBLIC embedding-row rankings for FEST (DESIGN §2, §5 rule 6).

FEST trains only the top-k rows of the word embedding by frequency. The ranking must not be
computed from the private rows (that would need a DP top-k release, a ledgered phase that is
not implemented here), so it comes from one of:

1. ``embedding.fest_public_rows`` in the job spec: row ids ranked by the user from data they
   declare public (e.g. token counts on a public corpus; :func:`rank_rows_by_public_corpus`
   computes such a ranking — the bench does it on WikiText-2, which is public data but is
   not shipped to production workers).
2. Otherwise :func:`rank_rows_by_tokenizer_order`, a proxy read from the tokenizer alone.
   Honest caveats:

   * byte-level BPE (SmolLM2, tiny:llama): ids follow merge order, and a merge is learned
     when its pair is frequent in the tokenizer's training corpus — a reasonable proxy.
   * WordPiece (BERT, MiniLM): ids are **not** frequency-ordered. bert-base-uncased puts
     [PAD], ~1,000 ``[unusedN]`` slots, [UNK]/[CLS]/[SEP]/[MASK] and ~1,000 single
     characters (most of them rare scripts) first; whole words follow in roughly
     descending corpus frequency ("the", "of", "and", …) and ``##`` pieces are interleaved.
     We put the special tokens first (every encoded row has [CLS]/[SEP]), drop the
     ``[unused…]`` slots and single non-ASCII characters to the end, and keep id order
     otherwise. It is a heuristic; pass ``fest_public_rows`` for a real public ranking.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any


def rank_rows_by_tokenizer_order(tokenizer: Any, *, num_rows: int) -> list[int]:
    """All row ids ``< num_rows``, most-likely-frequent first, from the tokenizer alone.

    Args:
        tokenizer: an HF tokenizer.
        num_rows: V, rows of the embedding matrix (may exceed ``len(tokenizer)``).

    Returns:
        A permutation of ``range(num_rows)``: special tokens, then ids in order, then the
        demoted ids (``[unused…]`` slots, single non-ASCII characters, ids past the vocab).
    """
    special = [i for i in dict.fromkeys(tokenizer.all_special_ids) if 0 <= i < num_rows]
    seen = set(special)
    vocab = tokenizer.convert_ids_to_tokens(list(range(min(num_rows, len(tokenizer)))))
    first, demoted = [], []
    for i in range(num_rows):
        if i in seen:
            continue
        token = vocab[i] if i < len(vocab) else None
        rare = token is None or token.startswith("[unused") or (
            len(token) == 1 and not token.isascii()
        )
        (demoted if rare else first).append(i)
    return special + first + demoted


def rank_rows_by_public_corpus(
    tokenizer: Any, texts: Iterable[str], *, num_rows: int, max_rows: int | None = None
) -> list[int]:
    """Row ids ranked by token counts on PUBLIC ``texts`` (ties and unseen rows by id).

    Special tokens the tokenizer adds to every row come first. Never call this on private rows.
    """
    counts: Counter[int] = Counter()
    for text in texts:
        counts.update(tokenizer(text, add_special_tokens=True)["input_ids"])
    ranked = [i for i, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if i < num_rows]
    special = [i for i in dict.fromkeys(tokenizer.all_special_ids) if 0 <= i < num_rows]
    ranked = list(dict.fromkeys(special + ranked))
    return ranked[:max_rows] if max_rows is not None else ranked


def fest_rows(
    *, public_rows: list[int] | None, tokenizer: Any, num_rows: int, top_k: int
) -> tuple[list[int], str]:
    """The fixed trainable rows of FEST and where their ranking came from.

    Args:
        public_rows: ``embedding.fest_public_rows`` (ranked, most frequent first) or None.
        tokenizer: the model's tokenizer (for the proxy).
        num_rows: V.
        top_k: k; the first k distinct valid ids of the ranking are kept.

    Raises:
        ValueError: a public row id ≥ V.
    """
    if public_rows is not None:
        bad = [i for i in public_rows if i >= num_rows]
        if bad:
            raise ValueError(
                f"embedding.fest_public_rows has ids {bad[:5]} ≥ the vocabulary size {num_rows}"
            )
        return list(dict.fromkeys(public_rows))[:top_k], "spec:fest_public_rows"
    return rank_rows_by_tokenizer_order(tokenizer, num_rows=num_rows)[:top_k], "tokenizer_order"
