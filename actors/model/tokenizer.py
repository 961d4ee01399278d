"""Tokenizer loading and draft/target vocabulary checks (data plane).

Speculative decoding compares token ids proposed by a draft with the target's, so both must map
ids to the same strings and agree on special tokens. ``ensure_same_tokenizer`` checks that and
raises ``TokenizerMismatchError`` naming the first difference.

Invariants: ``load_tokenizer`` only reads local files (a directory or a .gguf file); every failure
is a ``ModelLoadError`` subclass naming the path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from actors.model.config import ModelLoadError


class TokenizerLoadError(ModelLoadError):
    """The tokenizer files are missing or unreadable."""


class TokenizerMismatchError(ModelLoadError):
    """Draft and target tokenizers differ (vocabulary or special tokens)."""


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | Path) -> Any:
    """A transformers tokenizer from a model directory or a .gguf file."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise TokenizerLoadError(f"tokenizer path {str(path)!r} does not exist")
    if path.is_dir() and not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise TokenizerLoadError(f"{path}: no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)})")
    try:
        if path.suffix.lower() == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise TokenizerLoadError(f"{path}: cannot load tokenizer: {exc}") from exc


def _special(tok: Any, name: str) -> tuple[str | None, int | None]:
    token = getattr(tok, name, None)
    token_id = getattr(tok, f"{name}_id", None)
    return (None if token is None else str(token)), token_id


def _first_difference(target_vocab: dict[str, int], draft_vocab: dict[str, int]) -> str | None:
    target_by_id = {i: t for t, i in target_vocab.items()}
    draft_by_id = {i: t for t, i in draft_vocab.items()}
    for token_id in sorted(set(target_by_id) | set(draft_by_id)):
        a, b = target_by_id.get(token_id), draft_by_id.get(token_id)
        if a != b:
            return f"token id {token_id} is {a!r} in the target but {b!r} in the draft"
    return None


def ensure_same_tokenizer(target_tok: Any, draft_tok: Any) -> None:
    """Raise ``TokenizerMismatchError`` unless both tokenizers share vocabulary and bos/eos tokens."""
    target_vocab, draft_vocab = target_tok.get_vocab(), draft_tok.get_vocab()
    if len(target_vocab) != len(draft_vocab):
        first = _first_difference(target_vocab, draft_vocab)
        raise TokenizerMismatchError(
            f"vocabulary sizes differ: target has {len(target_vocab)} tokens, draft has {len(draft_vocab)}"
            f" (first difference: {first})"
        )
    for name in ("bos_token", "eos_token"):  # pad/unk do not affect generated ids
        target_special, draft_special = _special(target_tok, name), _special(draft_tok, name)
        if target_special != draft_special:
            raise TokenizerMismatchError(
                f"{name} differs: target {target_special[0]!r} (id {target_special[1]}) vs "
                f"draft {draft_special[0]!r} (id {draft_special[1]})"
            )
    if target_vocab != draft_vocab:
        raise TokenizerMismatchError(f"vocabularies differ: {_first_difference(target_vocab, draft_vocab)}")
