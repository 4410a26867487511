"""Tokenizer: ids equal the original ``cn_clip`` tokenizer and transformers' ``BertTokenizer``."""

from __future__ import annotations

import hashlib
import logging
import random

import pytest
import torch

from cnclip_vision.data.tokenizer import (
    DEFAULT_CONTEXT_LENGTH,
    VOCAB_PATH,
    Tokenizer,
    find_truncated,
    get_tokenizer,
    normalize_quotes,
    tokenize,
)

VOCAB_MD5 = "3b5b76c4aef48ecf8cb3abaafe960f09"


@pytest.fixture(scope="module")
def original():
    """The original ``cn_clip.clip`` package (the Makefile installs ``cn-clip`` with --no-deps)."""
    import cn_clip.clip

    return cn_clip.clip


@pytest.fixture(scope="module")
def hf_bert():
    """transformers' ``BertTokenizer`` on the same vocab (``vocab=``: ``vocab_file=`` is ignored in v5)."""
    from transformers import BertTokenizer

    return BertTokenizer(vocab=str(VOCAB_PATH), do_lower_case=True, tokenize_chinese_chars=True)


def original_rule(wordpiece_ids: list[int], context_length: int = 52) -> list[int]:
    ids = [101, *wordpiece_ids[: context_length - 2], 102]
    return ids + [0] * (context_length - len(ids))


# ---- the corpus ---------------------------------------------------------------------------------

WORDS_ZH = ["猫", "狗", "电动车", "一只", "在", "沙发上", "睡觉", "红色的", "圆形", "左上角", "电商", "搜索", "机器人"]
WORDS_EN = ["cat", "Dog", "iPhone", "HELLO", "world", "McDonald's", "e-commerce", "unaffable", "Transformer", "GPU"]
FULL_WIDTH = ["ＡＢＣ", "１２３", "，", "。", "！", "？", "：", "；", "（", "）", "［", "］", "～", "＠", "ｈｅｌｌｏ"]
ASCII_PUNCT = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
CJK_PUNCT = list("，。、；：？！（）《》【】…—·「」『』〔〕〈〉﹏") + ["“", "”", "‘", "’", "„", "‟"]
EMOJI = ["😀", "🐱", "🐶", "🚗", "👍🏽", "❤️", "👨‍👩‍👧", "🇨🇳", "🥰", "🫠", "☃"]
ACCENTED = ["café", "naïve", "Ångström", "façade", "jalapeño", "São", "Zürich", "Œuvre", "straße", "İstanbul", "Crème"]
OTHER = ["Привет", "МИР", "ελληνικά", "한국어", "ひらがな", "カタカナ", "½", "℃", "№", "Ⅻ", "①", "㎡", "e\u0301"]
SPACES = [" ", "  ", "\t", "\n", "\r\n", "\u3000", "\u00a0", "\u2003", " \t\n "]
CONTROLS = ["\x00", "\x07", "\x1b", "\x7f", "\u200b", "\u200d", "\ufeff", "\ufffd", "\x85"]
# Where transformers' Rust BertTokenizer differs from the original (our tokenizer follows the original):
RARE = [
    "a\ue000b",
    "\uf8ff",
    "\U000f0000",  # private use: kept by the original, deleted by transformers
    "ΟΔΟΣ",
    "ΑΣ.",  # capital sigma: the original lower-cases with the final-sigma rule
    "a\U0002b820b",  # CJK Extension E: split off as a CJK character only by the original
    "a\u2e43b",
    "a\u0898b",
    "a\U00011070b",
    "a\u1734b",
    "a\u166db",  # newer punctuation / marks than its tables
    "x" * 150,
    "ab" * 99,  # words over 100 characters: the original's limit is 200
    "[MASK]",
    "[CLS]",
    "[PAD]x",
    "[SEP]",
    "[UNK]",  # literals, not special tokens, in the original
]
ORDINARY = [WORDS_ZH, WORDS_EN, FULL_WIDTH, ASCII_PUNCT, CJK_PUNCT, EMOJI, ACCENTED, OTHER, CONTROLS]


def _piece(rng: random.Random, rare: bool) -> str:
    if rare and rng.random() < 0.15:
        return rng.choice(RARE)
    kind = rng.random()
    if kind < 0.35:
        return "".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(rng.randint(1, 4)))
    if kind < 0.45:
        return str(rng.randint(0, 10 ** rng.randint(1, 9))) + rng.choice(["", ".5", "%", "年", "km"])
    word = rng.choice(rng.choice(ORDINARY))
    return "".join(c.upper() if rng.random() < 0.2 else c for c in word) if word.isascii() else word


def make_corpus(n: int, seed: int, rare: bool) -> list[str]:
    rng = random.Random(seed)
    corpus = ["", " ", "\t\n", "猫", "一只猫在沙发上睡觉", "A photo of a cat", "“猫”", "ＡＢＣ１２３，。！"]
    for _ in range(n - len(corpus)):
        pieces = rng.randint(0, 90) if rng.random() < 0.15 else rng.randint(1, 14)  # some well over 60 tokens
        text = "".join(_piece(rng, rare) + (rng.choice(SPACES) if rng.random() < 0.4 else "") for _ in range(pieces))
        corpus.append(text)
    return corpus


ORDINARY_CORPUS = make_corpus(1200, seed=0, rare=False)
FULL_CORPUS = ORDINARY_CORPUS + make_corpus(400, seed=1, rare=True)


# ---- vocab ----------------------------------------------------------------------------------------


def test_vocab_file_and_special_ids():
    assert hashlib.md5(VOCAB_PATH.read_bytes()).hexdigest() == VOCAB_MD5
    tok = get_tokenizer()
    assert tok.vocab_size == 21128 == tok.hf_tokenizer.vocab_size
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (
        0,
        100,
        101,
        102,
        103,
    )
    ids = tokenize("一只猫")[0, :5].tolist()
    assert ids == [101, 671, 1372, 4344, 102]  # real ids, not the tiny default vocab of transformers 5


def test_corpus_is_varied():
    tok = get_tokenizer()
    lengths = [len(ids) for ids in tok.wordpiece_ids(FULL_CORPUS)]
    assert len(FULL_CORPUS) >= 1000 and len(set(FULL_CORPUS)) > 0.95 * len(FULL_CORPUS)
    assert sum(n > 60 for n in lengths) >= 50 and 0 in lengths


# ---- parity ---------------------------------------------------------------------------------------


def test_parity_with_original_cn_clip(original):
    """``tokenize`` equals ``cn_clip.clip.tokenize`` on every string (curly quotes mapped first)."""
    ours = tokenize(FULL_CORPUS)
    reference = original.tokenize([normalize_quotes(t) for t in FULL_CORPUS])
    assert ours.dtype == torch.int64 and ours.shape == (len(FULL_CORPUS), 52)
    differ = [FULL_CORPUS[i] for i in torch.nonzero((ours != reference).any(1)).flatten().tolist()]
    assert not differ, f"{len(differ)} strings differ, e.g. {differ[:3]!r}"
    for context_length in (2, 8, 77):
        assert torch.equal(
            tokenize(FULL_CORPUS[:200], context_length),
            original.tokenize([normalize_quotes(t) for t in FULL_CORPUS[:200]], context_length),
        )


def test_parity_with_transformers_bert_tokenizer(hf_bert):
    """Equal to transformers' BertTokenizer with the original's rule (CLS + ids[:50] + SEP, zero-padded)."""
    ours = tokenize(ORDINARY_CORPUS).tolist()
    encoded = hf_bert([normalize_quotes(t) for t in ORDINARY_CORPUS], add_special_tokens=False)["input_ids"]
    differ = [t for t, a, b in zip(ORDINARY_CORPUS, ours, encoded) if a != original_rule(b)]
    assert not differ, f"{len(differ)} strings differ, e.g. {differ[:3]!r}"
    # With padding/truncation done by transformers itself:
    batch = hf_bert(
        ORDINARY_CORPUS[:300], padding="max_length", truncation=True, max_length=52, return_tensors="pt"
    )  # curly quotes excluded here: transformers maps them to [UNK]
    plain = [i for i, t in enumerate(ORDINARY_CORPUS[:300]) if normalize_quotes(t) == t]
    assert torch.equal(batch["input_ids"][plain], tokenize([ORDINARY_CORPUS[i] for i in plain]))


def test_where_transformers_differs_we_follow_the_original(original, hf_bert):
    """Rare inputs on which transformers' tokenizer departs from the original; ours matches the original."""
    ours = get_tokenizer().wordpiece_ids(RARE)
    reference = [original._tokenizer.convert_tokens_to_ids(original._tokenizer.tokenize(t)) for t in RARE]
    theirs = hf_bert(RARE, add_special_tokens=False)["input_ids"]
    assert ours == reference
    assert [t for t, a, b in zip(RARE, theirs, reference) if a == b] == []  # documents transformers' divergence


def _sweep(lo: int, hi: int, step: int = 1) -> list[str]:
    return [chr(c) for c in range(lo, hi + 1, step) if not 0xD800 <= c <= 0xDFFF]


def test_every_character_class_matches_original(original):
    """Guards the fast path's character set on this Python / tokenizers version: each character alone
    and inside a word gives the original's ids (CJK / Hangul blocks sampled), and a sample of the rest
    (exact Python path) does too."""
    from cnclip_vision.data.tokenizer import _FAST_CHARS

    chars = (
        _sweep(0, 0x33FF)
        + _sweep(0x3400, 0x9FFF, 7)
        + _sweep(0xA000, 0xABFF)
        + _sweep(0xAC00, 0xD7AF, 11)
        + _sweep(0xE000, 0xF8FF, 13)
        + _sweep(0xF900, 0xFFFF)
        + _sweep(0x1F000, 0x1FAFF)
        + _sweep(0x20000, 0x2FFFF, 97)
        + _sweep(0x10000, 0x1EFFF, 7)
        + _sweep(0xE0000, 0xE01EF)
        + _sweep(0xF0000, 0x10FFFF, 4099)
    )
    texts = chars + [f"a{c}b" for c in chars] + [f"Σ{c}" for c in chars[::5]]
    assert sum(bool(_FAST_CHARS.fullmatch(c)) for c in chars) > 10000  # both paths are exercised
    ours = get_tokenizer().wordpiece_ids(texts)
    ft = original._tokenizer
    differ = [t for t, ids in zip(texts, ours) if ids != ft.convert_tokens_to_ids(ft.tokenize(normalize_quotes(t)))]
    assert not differ, f"{len(differ)} differ, e.g. {[hex(ord(t[-1])) for t in differ[:10]]}"


# ---- behaviour ------------------------------------------------------------------------------------


def test_dynamic_padding_and_attention_mask():
    tok = get_tokenizer()
    texts = ["猫", "一只猫在沙发上睡觉", "a dog"]
    out = tok(texts)
    assert set(out.keys()) == {"input_ids", "attention_mask"}
    assert out["input_ids"].dtype == out["attention_mask"].dtype == torch.int64
    assert out["input_ids"].shape == (3, 11)  # longest: 9 characters + [CLS] + [SEP]
    assert torch.equal(out["attention_mask"], (out["input_ids"] != 0).long())
    assert torch.equal(out["input_ids"], tokenize(texts)[:, :11])
    fixed = tok(texts, padding="max_length")
    assert torch.equal(fixed["input_ids"], tokenize(texts)) and fixed["attention_mask"].sum() == 3 + 11 + 4
    assert tok("猫")["input_ids"].tolist() == [[101, 4344, 102]] == tok(("猫",))["input_ids"].tolist()
    assert tok(texts, return_tensors="np")["input_ids"].dtype.name == "int64"
    assert tok(texts, return_tensors=None)["input_ids"][0] == [101, 4344, 102] + [0] * 8
    assert tok(["猫" * 80])["input_ids"].shape == (1, 52)  # capped at context_length


def test_padding_does_not_change_cls_output():
    """The text feature (hidden state at [CLS]) is the same with dynamic and fixed-length padding."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=21128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    bert = BertModel(config, add_pooling_layer=False).eval()
    texts = ["猫", "一只猫在沙发上睡觉", "a red circle 左上角"]
    tok = get_tokenizer()
    with torch.no_grad():
        cls = [bert(**tok(texts, padding=p)).last_hidden_state[:, 0] for p in ("longest", "max_length")]
    torch.testing.assert_close(cls[0], cls[1], atol=1e-5, rtol=1e-5)


def test_curly_quotes_map_to_ascii():
    assert normalize_quotes("“猫”‘狗’„x‟") == '"猫"\'狗\'"x"'
    assert torch.equal(tokenize("“猫”"), tokenize('"猫"'))
    assert torch.equal(tokenize("‘猫’"), tokenize("'猫'"))
    assert 100 not in tokenize("“猫” ‘狗’ „鱼‟")[0].tolist()


def test_special_token_literals_are_plain_text():
    ids = tokenize("[MASK][PAD]")[0].tolist()
    assert ids[:10] == [101, 138, 9622, 8998, 140, 138, 10257, 140, 102, 0]


def test_truncation_warning_names_the_text(caplog):
    long_text = "这是一段很长的描述" * 10
    texts = ["猫", long_text]
    assert find_truncated(texts) == [(1, long_text)]
    assert find_truncated(texts, context_length=2) == [(0, "猫"), (1, long_text)]
    with caplog.at_level(logging.WARNING, logger="cnclip_vision.data.tokenizer"):
        get_tokenizer()(texts)
    records = [r for r in caplog.records if r.name == "cnclip_vision.data.tokenizer"]
    assert len(records) == 1 and long_text in records[0].getMessage() and "text 1" in records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cnclip_vision.data.tokenizer"):
        get_tokenizer()(texts, warn_truncation=False)
        get_tokenizer()(["猫"])
    assert not [r for r in caplog.records if r.name == "cnclip_vision.data.tokenizer"]


@pytest.mark.parametrize(
    ("texts", "error", "match"),
    [
        (None, TypeError, "NoneType"),
        (["猫", None], TypeError, r"texts\[1\].*NoneType"),
        (["猫", 3], TypeError, r"texts\[1\].*int"),
        (42, TypeError, "int"),
        ([], ValueError, "texts is empty"),
    ],
)
def test_bad_texts(texts, error, match):
    with pytest.raises(error, match=match):
        tokenize(texts)
    with pytest.raises(error, match=match):
        get_tokenizer()(texts)


def test_bad_arguments():
    with pytest.raises(ValueError, match="context_length"):
        tokenize("猫", context_length=1)
    with pytest.raises(ValueError, match="padding"):
        get_tokenizer()("猫", padding="do_not_pad")
    with pytest.raises(ValueError, match="return_tensors"):
        get_tokenizer()("猫", return_tensors="tf")
    with pytest.raises(FileNotFoundError, match="no_such_vocab"):
        Tokenizer("no_such_vocab.txt")


def test_get_tokenizer_is_cached_and_lazy(tmp_path):
    assert get_tokenizer() is get_tokenizer() and get_tokenizer().vocab_path == VOCAB_PATH
    assert DEFAULT_CONTEXT_LENGTH == 52
    custom = tmp_path / "vocab.txt"
    custom.write_bytes(VOCAB_PATH.read_bytes())
    tok = Tokenizer(custom)
    assert "hf_tokenizer" not in vars(tok)  # nothing built until first use
    assert torch.equal(tok("猫狗")["input_ids"], get_tokenizer()("猫狗")["input_ids"])
    assert get_tokenizer(custom) is get_tokenizer(str(custom))


def test_decode():
    tok = get_tokenizer()
    assert tok.decode(tokenize("一只猫 Hello")[0]).replace(" ", "") == "一只猫hello"
