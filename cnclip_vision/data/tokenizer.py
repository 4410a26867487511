"""Chinese-CLIP tokenizer: Google BERT WordPiece over the 21128-token Chinese vocabulary.

Output equals the original ``cn_clip.clip.tokenize``: ``[CLS] + wordpieces[:context_length - 2] + [SEP]``,
zero-padded. Texts are encoded in batches by the Rust tokenizer behind transformers' ``BertTokenizerFast``.
That tokenizer disagrees with the original Python tokenizer on a few rare characters (private-use
characters, Greek capital sigma, CJK Extension E, marks and punctuation newer than its Unicode tables);
texts that contain any character outside a set checked to agree go through an exact port of the
original algorithm instead, so every text gets the original ids.
"""

from __future__ import annotations

import functools
import itertools
import logging
import re
import unicodedata
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import BatchEncoding, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_CONTEXT_LENGTH",
    "VOCAB_PATH",
    "Tokenizer",
    "find_truncated",
    "get_tokenizer",
    "normalize_quotes",
    "tokenize",
]

logger = logging.getLogger(__name__)

VOCAB_PATH: Path = Path(__file__).resolve().parent / "vocab.txt"
DEFAULT_CONTEXT_LENGTH = 52
_MAX_CHARS_PER_WORD = 200  # the original's WordpieceTokenizer; the Rust default is 100

# Curly quotes are [UNK] in the vocab; the training text had them mapped to ASCII quotes.
_QUOTES = str.maketrans({"“": '"', "”": '"', "„": '"', "‟": '"', "‘": "'", "’": "'"})
_HAS_QUOTE = re.compile("[“”„‟‘’]").search

# Characters on which the Rust tokenizer gives the original's result (checked character by character
# in tests/test_tokenizer.py, so a newer Unicode in Python or tokenizers shows up there): Latin, Greek except
# capital sigma (the original lower-cases it to final "ς" by context), Cyrillic, general punctuation and
# symbols, CJK radicals, symbols, kana, Hangul, ideographs (BMP, Extension A/B, compatibility), full-width
# forms, emoji, tag characters.
_FAST_CHARS = re.compile(
    "[\x00-\u03a2\u03a4-\u052f\u1e00-\u1eff\u2000-\u2bff\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff"
    "\ufe00-\ufe6f\uff00-\uffef\U0001f000-\U0001faff\U00020000-\U0002a6df\U000e0000-\U000e007f]*"
)
_CHINESE_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def normalize_quotes(text: str) -> str:
    """Map curly quotes (“ ” „ ‟ and ‘ ’) to ASCII ``"`` and ``'``, as in the training data."""
    return text.translate(_QUOTES) if _HAS_QUOTE(text) else text  # translate() is slow on CJK text


def _is_punctuation(char: str) -> bool:
    cp = ord(char)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _basic_tokenize(text: str) -> list[str]:
    """The original BasicTokenizer (lower-casing, accent stripping, CJK and punctuation splits)."""
    chars = []
    for char in text:
        cp, cat = ord(char), unicodedata.category(char)
        if cp == 0 or cp == 0xFFFD or (cat in ("Cc", "Cf") and char not in "\t\n\r"):
            continue
        if char in " \t\n\r" or cat == "Zs":
            chars.append(" ")
        elif any(lo <= cp <= hi for lo, hi in _CHINESE_RANGES):
            chars.append(f" {char} ")
        else:
            chars.append(char)
    tokens: list[str] = []
    for word in "".join(chars).split():
        word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
        current = ""
        for char in word:
            if _is_punctuation(char):
                tokens += [current, char] if current else [char]
                current = ""
            else:
                current += char
        if current:
            tokens.append(current)
    return " ".join(tokens).split()


def _wordpiece_ids(word: str, vocab: dict[str, int], unk_id: int) -> list[int]:
    """The original greedy longest-match-first WordPiece of one word."""
    if len(word) > _MAX_CHARS_PER_WORD:
        return [unk_id]
    ids, start = [], 0
    while start < len(word):
        for end in range(len(word), start, -1):
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in vocab:
                ids.append(vocab[piece])
                start = end
                break
        else:
            return [unk_id]
    return ids


def _check_texts(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"texts must be a str or a list/tuple of str, got {type(texts).__name__}")
    if not texts:
        raise ValueError("texts is empty: pass at least one string")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__} ({text!r:.50})")
    return list(texts)


def _check_context_length(context_length: int) -> None:
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
        raise ValueError(f"context_length must be an int >= 2 (room for [CLS] and [SEP]), got {context_length!r}")


class Tokenizer:
    """Callable like a Hugging Face tokenizer; ids equal the original Chinese-CLIP tokenizer.

    ``tokenizer(texts)`` returns a ``BatchEncoding`` with int64 ``input_ids`` and ``attention_mask``,
    padded to the longest text (``padding="longest"``) or to ``context_length`` (``"max_length"``).
    Padding length does not change the text features when the attention mask is applied.
    """

    def __init__(self, vocab_path: str | PathLike[str] | None = None) -> None:
        self.vocab_path = Path(vocab_path) if vocab_path is not None else VOCAB_PATH
        if not self.vocab_path.is_file():
            raise FileNotFoundError(f"vocabulary file not found: {self.vocab_path}")

    @functools.cached_property
    def hf_tokenizer(self) -> PreTrainedTokenizerBase:
        """The underlying transformers ``BertTokenizerFast`` (built on first use)."""
        from transformers import BertTokenizerFast  # type: ignore[attr-defined]  # transformers 5 exports it lazily, invisible to mypy

        # transformers 5: ``vocab_file=`` is silently ignored (tiny default vocab); ``vocab=`` reads the file.
        tok = BertTokenizerFast(vocab=str(self.vocab_path), do_lower_case=True, tokenize_chinese_chars=True)
        tok.backend_tokenizer.model.max_input_chars_per_word = _MAX_CHARS_PER_WORD
        # A literal "[MASK]" in a text is "[", "mask", "]" in the original, never the special token.
        tok.backend_tokenizer.encode_special_tokens = True
        if tok.vocab_size != len(self.vocab) or tok.convert_tokens_to_ids("[CLS]") != self.vocab["[CLS]"]:
            raise RuntimeError(f"transformers did not load the vocabulary {self.vocab_path}")  # pragma: no cover
        return tok

    @functools.cached_property
    def vocab(self) -> dict[str, int]:
        """Token -> id, one token per line of the vocabulary file."""
        lines = self.vocab_path.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return {token: i for i, token in enumerate(lines)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def pad_token_id(self) -> int:
        return self.vocab["[PAD]"]

    @property
    def unk_token_id(self) -> int:
        return self.vocab["[UNK]"]

    @property
    def cls_token_id(self) -> int:
        return self.vocab["[CLS]"]

    @property
    def sep_token_id(self) -> int:
        return self.vocab["[SEP]"]

    @property
    def mask_token_id(self) -> int:
        return self.vocab["[MASK]"]

    def wordpiece_ids(self, texts: str | Sequence[str]) -> list[list[int]]:
        """Word-piece ids of each text, without [CLS]/[SEP] and without truncation."""
        texts = [normalize_quotes(t) for t in _check_texts(texts)]
        ids: list[list[int]] = [[] for _ in texts]
        fast = [i for i, text in enumerate(texts) if _FAST_CHARS.fullmatch(text)]
        if fast:
            backend = self.hf_tokenizer.backend_tokenizer
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # no offsets: faster
            for i, encoding in zip(fast, encode([texts[i] for i in fast], add_special_tokens=False)):
                ids[i] = encoding.ids
        if len(fast) < len(texts):  # rare characters: the exact Python port of the original
            vocab, unk, fast_set = self.vocab, self.unk_token_id, set(fast)
            for i, text in enumerate(texts):
                if i not in fast_set:
                    ids[i] = [p for word in _basic_tokenize(text) for p in _wordpiece_ids(word, vocab, unk)]
        return ids

    def find_truncated(
        self, texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH
    ) -> list[tuple[int, str]]:
        """``(index, text)`` of the texts longer than ``context_length - 2`` word pieces."""
        _check_context_length(context_length)
        texts = _check_texts(texts)
        lengths = [len(ids) for ids in self.wordpiece_ids(texts)]
        return [(i, texts[i]) for i, n in enumerate(lengths) if n > context_length - 2]

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        padding: Literal["longest", "max_length"] = "longest",
        return_tensors: Literal["pt", "np"] | None = "pt",
        warn_truncation: bool = True,
    ) -> BatchEncoding:
        """Tokenize ``texts`` into ``input_ids`` and ``attention_mask`` (int64, ``[N, L]``).

        ``L`` is the longest text plus [CLS]/[SEP] (capped at ``context_length``) for
        ``padding="longest"``, else ``context_length``. Texts longer than ``context_length - 2`` word
        pieces are cut (as in the original); with ``warn_truncation`` a warning names each one.
        """
        from transformers import BatchEncoding

        _check_context_length(context_length)
        if padding not in ("longest", "max_length"):
            raise ValueError(f'padding must be "longest" or "max_length", got {padding!r}')
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f'return_tensors must be "pt", "np" or None, got {return_tensors!r}')
        texts = _check_texts(texts)
        pieces = self.wordpiece_ids(texts)
        keep = context_length - 2
        if warn_truncation:
            for i, ids in enumerate(pieces):
                if len(ids) > keep:
                    logger.warning(
                        "text %d is %d word pieces, over context_length=%d; it is truncated to %r: %r",
                        i,
                        len(ids),
                        context_length,
                        self.decode(ids[:keep]),
                        texts[i],
                    )
        n = len(pieces)
        lengths = np.fromiter((min(len(ids), keep) for ids in pieces), dtype=np.int64, count=n)
        length = context_length if padding == "max_length" else int(lengths.max()) + 2
        columns = np.arange(length)
        input_ids = np.full((n, length), self.pad_token_id, dtype=np.int64)
        input_ids[:, 0] = self.cls_token_id
        body = (columns >= 1) & (columns <= lengths[:, None])
        input_ids[body] = np.fromiter(itertools.chain.from_iterable(ids[:keep] for ids in pieces), np.int64)
        input_ids[np.arange(n), lengths + 1] = self.sep_token_id
        attention_mask = (columns < lengths[:, None] + 2).astype(np.int64)
        data: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if return_tensors == "pt":
            data = {k: torch.from_numpy(v) for k, v in data.items()}
        elif return_tensors is None:
            data = {k: v.tolist() for k, v in data.items()}
        return BatchEncoding(data)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Ids back to text (word pieces joined; lower-cased, accents stripped)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        text = self.hf_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if not isinstance(text, str):  # decode gives a list only for a batch of id lists
            raise TypeError(f"expected a flat sequence of token ids, got {type(text).__name__} from decode")
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_path={str(self.vocab_path)!r})"


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(vocab_path: Path) -> Tokenizer:
    return Tokenizer(vocab_path)


def get_tokenizer(vocab_path: str | PathLike[str] | None = None) -> Tokenizer:
    """The shared :class:`Tokenizer` for ``vocab_path`` (default: the packaged vocabulary)."""
    return _cached_tokenizer(Path(vocab_path).resolve() if vocab_path is not None else VOCAB_PATH)


def tokenize(texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.Tensor:
    """``[N, context_length]`` int64 ids, exactly the original ``cn_clip.clip.tokenize`` output."""
    return get_tokenizer()(texts, context_length=context_length, padding="max_length")["input_ids"]


def find_truncated(texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> list[tuple[int, str]]:
    """``(index, text)`` of the texts that ``tokenize`` truncates at ``context_length``."""
    return get_tokenizer().find_truncated(texts, context_length)
