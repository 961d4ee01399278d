"""IncrementalDetokenizer: streamed text equals the full decode; stop strings; hold-back; bounds.

Tokenizers: the tiny byte-level BPE of ``tests/tiny_models.py`` (both variants), two SentencePiece
layouts built here (Llama 2's legacy decoder with byte fallback and ``Strip``, and the ``Metaspace``
decoder) and, only if it is already in the local cache, the demo model's tokenizer.
"""

from __future__ import annotations

import random

import pytest

from cluster.detokenizer import (
    MAX_STOP_STRINGS,
    IncrementalDetokenizer,
    TextDelta,
    validate_stop_strings,
)
from tests.tiny_models import EOS_ID, write_tiny_tokenizer

TEXT = "héllo wörld 日本語 🙂"
FFFD = "\ufffd"


def write_sp_tokenizer(directory, style: str):
    """A SentencePiece-style tokenizer (Unigram with byte fallback): ``llama2`` or ``metaspace`` decoder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["▁", "▁hello", "▁world", "▁wor", "ld", "▁the", "▁he", "llo", "é", "ö", "▁h", "▁w", "▁日", "本"]
    chars = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:;()")
    vocab = [(t, 0.0) for t in ("<unk>", "<s>", "</s>")] + [(f"<0x{b:02X}>", 0.0) for b in range(256)]
    vocab += [(w, -1.0 - 0.1 * i) for i, w in enumerate(words)] + [(c, -5.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    if style == "llama2":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)]
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(directory))
    return directory


def write_straddling_tokenizer(directory):
    """Byte-level BPE whose merged tokens straddle characters: " " + a lead byte, a last byte + "x"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    u = bytes_to_unicode()
    merges = [(u[a], u[b]) for a, b in ((0x20, 0xE6), (0x97, 0xA5), (0xF0, 0x9F), (0x82, ord("x")))]
    tokens = ["<unk>", "<s>", "</s>"] + sorted(u.values()) + [a + b for a, b in merges]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(directory))
    return directory


TOKENIZERS = ["bbpe0", "bbpe1", "bbpe-straddle", "sp-llama2", "sp-metaspace", "demo"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from actors.model.tokenizer import load_tokenizer

    out = {}
    for variant in (0, 1):
        out[f"bbpe{variant}"] = load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("bbpe"), variant))
    out["bbpe-straddle"] = load_tokenizer(write_straddling_tokenizer(tmp_path_factory.mktemp("straddle")))
    for style in ("llama2", "metaspace"):
        out[f"sp-{style}"] = load_tokenizer(write_sp_tokenizer(tmp_path_factory.mktemp("sp"), style))
    return out


@pytest.fixture(scope="module")
def demo_tokenizer():
    from actors.model.tokenizer import load_tokenizer
    from cluster.demo_model import converted_dir, is_complete

    path = converted_dir()
    if not is_complete(path):
        pytest.skip("demo model not in the local cache (tests never download it)")
    return load_tokenizer(path)


@pytest.fixture(params=TOKENIZERS)
def tok(request, tokenizers):
    if request.param == "demo":
        return request.getfixturevalue("demo_tokenizer")
    return tokenizers[request.param]


@pytest.fixture
def bbpe(tokenizers):
    return tokenizers["bbpe0"]


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def chunks(ids, rng: random.Random | None, size: int | None = None):
    """``ids`` split into consecutive chunks: fixed ``size``, or random sizes 1..5 from ``rng``."""
    i = 0
    while i < len(ids):
        n = size if size is not None else rng.randint(1, 5)
        yield ids[i : i + n]
        i += n


def stream(detok: IncrementalDetokenizer, ids, rng=None, size=None) -> tuple[list[TextDelta], str]:
    deltas = []
    for chunk in chunks(list(ids), rng, size):
        deltas.append(detok.push(chunk))
        if deltas[-1].stopped:
            break
    return deltas, detok.finish()


def expected_text(tok, prompt, gen) -> str:
    """What a client must see: the text ``gen`` adds to the prompt's text."""
    before, after = decode(tok, prompt), decode(tok, list(prompt) + list(gen))
    assert after.startswith(before)
    return after[len(before) :]


# ------------------------------------------------------------------ streaming equals decoding
@pytest.mark.parametrize("prompt_text", [None, "The answer:"])
def test_stream_matches_full_decode(tok, prompt_text):
    prompt = [] if prompt_text is None else encode(tok, prompt_text)
    gen = encode(tok, TEXT)
    want = expected_text(tok, prompt, gen)
    if prompt_text is None:
        assert want == decode(tok, gen)
    assert "日本語" in want and "🙂" in want
    rng = random.Random(0)
    for size in (1, 2, 3, None, None, None, len(gen)):
        detok = IncrementalDetokenizer(tok, prompt)
        deltas, tail = stream(detok, gen, rng, size)
        assert "".join(d.text for d in deltas) + tail == want, size
        assert all(FFFD not in d.text for d in deltas)  # never a partial character
        assert not any(d.stopped for d in deltas) and sum(d.num_tokens_kept for d in deltas) == len(gen)
        assert detok.text == want and detok.num_tokens == len(gen)


def test_token_by_token_shows_each_character_once_complete(bbpe):
    gen = encode(bbpe, "日🙂")  # 3 + 4 byte tokens
    detok = IncrementalDetokenizer(bbpe, [])
    shown = [detok.push([t]).text for t in gen]
    assert shown == ["", "", "日", "", "", "", "🙂"]
    assert detok.finish() == ""


def test_random_valid_text_with_special_tokens(tok):
    """Random texts heavy in multi-byte characters, specials interleaved, random chunks."""
    rng = random.Random(1)
    alphabet = ["a", "b", " ", "é", "ö", "日", "本", "語", "🙂", "hello", " world", ".", "\n"]
    specials = sorted(tok.all_special_ids)
    for _ in range(25):
        gen = []
        for _ in range(rng.randint(1, 12)):
            gen += encode(tok, "".join(rng.choices(alphabet, k=rng.randint(1, 4))))
            if rng.random() < 0.3:
                gen.append(rng.choice(specials))
        prompt = encode(tok, "".join(rng.choices(alphabet, k=rng.randint(0, 8))))
        want = expected_text(tok, prompt, gen)
        detok = IncrementalDetokenizer(tok, prompt)
        deltas, tail = stream(detok, gen, rng)
        assert "".join(d.text for d in deltas) + tail == want
        assert all(FFFD not in d.text for d in deltas)


@pytest.mark.parametrize("variant", ["bbpe0", "bbpe1"])
def test_random_ids_byte_level_equal_decode(tokenizers, variant):
    """Any ids, invalid UTF-8 included: the stream still equals ``decode(all)``."""
    tok = tokenizers[variant]
    vocab = len(tok.get_vocab())
    high = [tok.convert_tokens_to_ids(bytes_to_unicode_char(b)) for b in range(0x80, 0x100)]
    rng = random.Random(2)
    for _ in range(60):
        n = rng.randint(0, 80)
        pool = high if rng.random() < 0.3 else range(vocab)  # some runs of bytes >= 0x80 only
        gen = [rng.choice(pool) for _ in range(n)]
        detok = IncrementalDetokenizer(tok, [])
        deltas, tail = stream(detok, gen, rng)
        assert "".join(d.text for d in deltas) + tail == decode(tok, gen)


def bytes_to_unicode_char(b: int) -> str:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()[b]


class CountingTokenizer:
    """Forwards to a tokenizer and records the longest id list ever decoded."""

    def __init__(self, tok):
        self.tok, self.longest, self.calls = tok, 0, 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def decode(self, ids, **kwargs):
        self.longest, self.calls = max(self.longest, len(ids)), self.calls + 1
        return self.tok.decode(ids, **kwargs)


def test_decoding_window_is_bounded(bbpe):
    """O(1) per token: no decode sees more than a small window, even in a long run of invalid bytes."""
    continuation = bbpe.convert_tokens_to_ids(bytes_to_unicode_char(0x9F))
    gen = encode(bbpe, TEXT * 30) + [continuation] * 300 + encode(bbpe, TEXT * 5)
    prompt = encode(bbpe, "a long prompt " * 50)
    counting = CountingTokenizer(bbpe)
    detok = IncrementalDetokenizer(counting, prompt, stop_strings=["never"])
    deltas, tail = stream(detok, gen, random.Random(3))
    assert "".join(d.text for d in deltas) + tail == decode(bbpe, gen)
    assert counting.longest <= 24
    assert counting.calls <= 2 * len(gen)


def test_prompt_ending_inside_a_character(bbpe):
    ids = encode(bbpe, "x日")
    prompt, gen = ids[:-1], ids[-1:] + encode(bbpe, "a")
    detok = IncrementalDetokenizer(bbpe, prompt)
    assert detok.push(gen).text == "日a"  # the character the output completes is output whole


# ------------------------------------------------------------------ stop strings
def stop_oracle(tok, gen, stops, include):
    """(text, stopped, tokens kept, stop): stop at the first stop string to appear char by char."""
    full = decode(tok, gen)
    best = None
    for s in stops:
        i = full.find(s)
        if i >= 0 and (best is None or (i + len(s), -len(s)) < (best[0] + len(best[1]), -len(best[1]))):
            best = (i, s)
    if best is None:
        return full, False, len(gen), None
    i, s = best
    kept = next(k for k in range(1, len(gen) + 1) if s in decode(tok, gen[:k]))
    return full[: i + len(s) if include else i], True, kept, s


def run_stop(tok, text, stops, include=False, rng=None, size=1, prompt=()):
    gen = encode(tok, text)
    detok = IncrementalDetokenizer(tok, list(prompt), stop_strings=stops, include_stop_str=include)
    deltas, tail = stream(detok, gen, rng, size)
    return gen, detok, deltas, tail


def test_stop_string_across_token_boundaries(bbpe):
    text = "Hello world. Goodbye"
    gen, detok, deltas, tail = run_stop(bbpe, text, ["world."])
    assert len(encode(bbpe, "world.")) > 1
    assert "".join(d.text for d in deltas) == "Hello " and tail == ""
    assert deltas[-1].stopped and detok.stopped and detok.stop_string == "world."
    want_kept = stop_oracle(bbpe, gen, ["world."], False)[2]
    assert sum(d.num_tokens_kept for d in deltas) == want_kept == detok.num_tokens < len(gen)
    assert decode(bbpe, gen[:want_kept]).endswith("world.")  # the completing token is the last kept
    assert detok.text == "Hello "


def test_held_prefix_then_released_when_text_diverges(bbpe):
    gen = encode(bbpe, "Hello world.")
    detok = IncrementalDetokenizer(bbpe, [], stop_strings=["world!"])
    shown, cut = "", next(k for k in range(len(gen)) if decode(bbpe, gen[:k]).endswith("wor"))
    shown += detok.push(gen[:cut]).text
    assert shown == "Hello "  # "wor" could start "world!": held back
    rest = detok.push(gen[cut:])
    assert shown + rest.text == "Hello world." and not rest.stopped
    assert rest.num_tokens_kept == len(gen) - cut
    assert detok.finish() == ""


def test_finish_flushes_held_text(bbpe):
    gen = encode(bbpe, "Hello wor")
    detok = IncrementalDetokenizer(bbpe, [], stop_strings=["world", "xyz"])
    delta = detok.push(gen)
    assert delta == TextDelta("Hello ", False, len(gen))
    assert detok.text == "Hello "
    assert detok.finish() == "wor"
    assert detok.text == "Hello wor" and not detok.stopped
    assert detok.finish() == ""  # idempotent
    with pytest.raises(RuntimeError):
        detok.push(gen[:1])


def test_finish_flushes_a_partial_character_as_decode_does(bbpe):
    gen = encode(bbpe, "ok🙂")[:-2]
    detok = IncrementalDetokenizer(bbpe, [])
    assert detok.push(gen).text == "ok"
    assert "ok" + detok.finish() == decode(bbpe, gen) == "ok" + FFFD


def test_stop_at_the_very_first_token(tok):
    gen = encode(tok, "hello world")
    first = decode(tok, gen[:1])
    assert first
    detok = IncrementalDetokenizer(tok, [], stop_strings=[first])
    assert detok.push(gen) == TextDelta("", True, 1)
    assert detok.push(gen) == TextDelta("", True, 0)  # ignored after a stop
    assert detok.finish() == "" and detok.text == ""
    detok = IncrementalDetokenizer(tok, [], stop_strings=first, include_stop_str=True)
    assert detok.push(gen) == TextDelta(first, True, 1)


def test_include_stop_str(bbpe):
    gen, detok, deltas, tail = run_stop(bbpe, "Hello world. Goodbye", ["world"], include=True)
    assert "".join(d.text for d in deltas) + tail == "Hello world" and detok.text == "Hello world"
    assert decode(bbpe, gen[: detok.num_tokens]).endswith("world")


def test_several_stop_strings_first_to_appear_wins(bbpe):
    for size in (1, 3, 100):  # independent of chunking
        _, detok, deltas, _ = run_stop(bbpe, "Hello world", ["world", "lo w"], size=size)
        assert "".join(d.text for d in deltas) == "Hel" and detok.stop_string == "lo w"
        # same last character: the longer one wins
        _, detok, deltas, _ = run_stop(bbpe, "Hello world", ["o w", "lo w"], size=size)
        assert "".join(d.text for d in deltas) == "Hel" and detok.stop_string == "lo w"
        # "ello" starts earlier but ends later than "l"
        _, detok, deltas, _ = run_stop(bbpe, "Hello world", ["ello", "l"], include=True, size=size)
        assert "".join(d.text for d in deltas) == "Hel" and detok.stop_string == "l"


def test_multibyte_stop_strings(bbpe):
    for text, stop in (("héllo", "é"), ("ab日本語", "日本"), ("x🙂y", "🙂")):
        gen, detok, deltas, tail = run_stop(bbpe, text, [stop])
        want = stop_oracle(bbpe, gen, [stop], False)
        assert ("".join(d.text for d in deltas) + tail, detok.stopped, detok.num_tokens) == want[:3]
        assert detok.num_tokens < len(gen) or text.endswith(stop)


def test_text_before_a_partial_character_is_final(tokenizers):
    """A token holding " " + the first byte of 日 shows (and stops on) the space at once."""
    tok = tokenizers["bbpe-straddle"]
    gen = encode(tok, "a 日a")
    assert tok.convert_ids_to_tokens(gen[1]) == "Ġæ"
    detok = IncrementalDetokenizer(tok, [])
    assert [detok.push([t]).text for t in gen] == ["a", " ", "日", "a"]
    detok = IncrementalDetokenizer(tok, [], stop_strings=[" "])
    assert detok.push(gen) == TextDelta("a", True, 2)
    gen = encode(tok, "🙂xy")  # the last byte of 🙂 and "x" in one token
    detok = IncrementalDetokenizer(tok, [], stop_strings=["x"])
    assert detok.push(gen) == TextDelta("🙂", True, len(gen) - 1)


def test_stop_strings_match_visible_text_only(bbpe):
    a, b = encode(bbpe, "a"), encode(bbpe, "b")
    detok = IncrementalDetokenizer(bbpe, [], stop_strings=["ab"])
    assert detok.push(a + [EOS_ID] + b) == TextDelta("", True, 3)  # the special token is invisible
    detok = IncrementalDetokenizer(bbpe, [], stop_strings=["</s>"])
    assert detok.push(a + [EOS_ID]) == TextDelta("a", False, 2)  # and never matches a stop string


def test_random_stop_strings_against_oracle(tok):
    rng = random.Random(4)
    alphabet = ["a", "b", " ", "é", "日", "本", "🙂", "."]
    for trial in range(60):
        text = "".join(rng.choices(alphabet, k=rng.randint(1, 20)))
        stops = ["".join(rng.choices(alphabet, k=rng.randint(1, 3))) for _ in range(rng.randint(1, 4))]
        include = rng.random() < 0.5
        gen = encode(tok, text)
        want_text, want_stopped, want_kept, want_stop = stop_oracle(tok, gen, stops, include)
        detok = IncrementalDetokenizer(tok, [], stop_strings=stops, include_stop_str=include)
        deltas, tail = stream(detok, gen, rng)
        shown = "".join(d.text for d in deltas)
        assert shown + tail == want_text, (trial, text, stops)
        assert (detok.stopped, detok.num_tokens, detok.stop_string) == (want_stopped, want_kept, want_stop)
        assert sum(d.num_tokens_kept for d in deltas) == want_kept
        if want_stopped:
            assert tail == ""
        # what was shown before the end is never part of a stop string that got cut
        for k in range(1, len(deltas)):
            partial = "".join(d.text for d in deltas[:k])
            assert want_text.startswith(partial)


# ------------------------------------------------------------------ validation
def test_validate_stop_strings():
    assert validate_stop_strings(None) == ()
    assert validate_stop_strings("###") == ("###",)
    assert validate_stop_strings([]) == ()
    assert validate_stop_strings(["a", "b", "a"]) == ("a", "b")
    assert validate_stop_strings(("x",)) == ("x",)
    assert len(validate_stop_strings([str(i) for i in range(MAX_STOP_STRINGS)])) == MAX_STOP_STRINGS
    bad = [
        ("", "empty"), ([""], r"stop\[0\].*empty"), (["ok", 3], r"stop\[1\] must be a string"),
        ([str(i) for i in range(MAX_STOP_STRINGS + 1)], "at most 16"), (5, "got int"),
        (b"x", "got bytes"), ({"a"}, "got set"),
    ]
    for value, message in bad:
        with pytest.raises(ValueError, match=message):
            validate_stop_strings(value)
    with pytest.raises(ValueError):
        IncrementalDetokenizer(None, [], stop_strings=[""])
