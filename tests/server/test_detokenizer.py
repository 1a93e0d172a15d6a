import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from server.detokenizer import IncrementalDetokenizer
from server.request import SamplingParams

TRAINING_TEXT = [
    "héllo wörld 日本語 🙂",
    "the quick brown fox jumps over the lazy dog",
    "stop here. STOP now! naïve café résumé",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE (GPT-2 style), trained here so that tests need no download."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(TRAINING_TEXT * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style spaces ("▁"): a decode strips the space of its first token."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"])
    bpe.train_from_iterator(TRAINING_TEXT * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", unk_token="<unk>")


def char_tokens(tokenizer, text: str) -> list[int]:
    """Token ids of `text` with a token boundary after every character (at least)."""
    return [i for char in text for i in tokenizer.encode(char)]


def stream(detok: IncrementalDetokenizer, ids: list[int], rng=None) -> tuple[list[str], bool]:
    """Feed ids in groups of 1-3 tokens; returns the deltas (flush included) and stopped."""
    deltas, position = [], 0
    while position < len(ids):
        size = rng.randint(1, 3) if rng else 1
        text, stopped = detok.add_tokens(ids[position : position + size])
        deltas.append(text)
        position += size
        if stopped:
            return deltas, True
    deltas.append(detok.flush())
    return deltas, False


def reference(full: str, stops: list[str], include: bool) -> str:
    """Full text cut at the stop string that completes first (ties: the earliest start)."""
    matches = [(full.find(s) + len(s), full.find(s), s) for s in stops if s in full]
    if not matches:
        return full
    end, start, _ = min(matches)
    return full[:end] if include else full[:start]


def test_random_ids_stream_to_the_full_decode(tokenizer):
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 30))]
        deltas, stopped = stream(IncrementalDetokenizer(tokenizer), ids, rng)
        assert not stopped
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


def test_sentencepiece_spaces_survive_streaming(metaspace_tokenizer):
    ids = metaspace_tokenizer.encode("the quick brown fox")
    assert metaspace_tokenizer.decode(ids[1:2]) == "quick"  # no leading space on its own
    deltas, _ = stream(IncrementalDetokenizer(metaspace_tokenizer), ids)
    assert deltas[:4] == ["the", " quick", " brown", " fox"]
    rng = random.Random(2)
    for _ in range(100):
        ids = [rng.randrange(len(metaspace_tokenizer)) for _ in range(rng.randint(1, 20))]
        deltas, _ = stream(IncrementalDetokenizer(metaspace_tokenizer), ids, rng)
        assert "".join(deltas) == metaspace_tokenizer.decode(ids, skip_special_tokens=True)


def test_multibyte_characters_are_never_split(tokenizer):
    text = "Ωmega 中文 and 😀🙂 héllo wörld 日本語"
    ids = char_tokens(tokenizer, text)
    # Characters unseen in training take several byte-level tokens.
    assert len(tokenizer.encode("😀")) > 1 and len(tokenizer.encode("Ω")) > 1
    deltas, _ = stream(IncrementalDetokenizer(tokenizer), ids)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_special_tokens_skipped(tokenizer):
    ids = [*tokenizer.encode("héllo"), tokenizer.eos_token_id, *tokenizer.encode(" dog")]
    deltas, _ = stream(IncrementalDetokenizer(tokenizer), ids)
    assert "".join(deltas) == "héllo dog"


def test_stop_string_split_across_tokens_is_caught_and_not_emitted(tokenizer):
    ids = char_tokens(tokenizer, "the quick brown fox")
    detok = IncrementalDetokenizer(tokenizer, stop=["ck bro"])
    deltas, stopped = stream(detok, ids)
    assert stopped and "".join(deltas) == "the qui"
    assert not any(d.startswith(("c", "k")) for d in deltas if d)
    assert detok.add_tokens(tokenizer.encode(" more")) == ("", True)
    assert detok.flush() == ""


def test_include_stop_str_in_output(tokenizer):
    params = SamplingParams(stop=["brown"], include_stop_str_in_output=True)
    detok = IncrementalDetokenizer.from_params(tokenizer, params)
    deltas, stopped = stream(detok, char_tokens(tokenizer, "the quick brown fox"))
    assert stopped and "".join(deltas) == "the quick brown"
    assert detok.output_text == "the quick brown"


def test_earliest_stop_wins_whatever_the_order(tokenizer):
    ids = tokenizer.encode("the quick brown fox jumps over the lazy dog")
    deltas, _ = stream(IncrementalDetokenizer(tokenizer, stop=["lazy", "fox", "jumps"]), ids)
    assert "".join(deltas) == "the quick brown "
    # "brown" completes before "own fox", which starts earlier.
    deltas, _ = stream(IncrementalDetokenizer(tokenizer, stop=["own fox", "brown"]), ids)
    assert "".join(deltas) == "the quick "


def test_multibyte_stop_string(tokenizer):
    ids = char_tokens(tokenizer, "héllo 中文 wörld")
    deltas, stopped = stream(IncrementalDetokenizer(tokenizer, stop=["文 w"]), ids)
    assert stopped and "".join(deltas) == "héllo 中"


def test_possible_stop_prefix_is_held_then_flushed(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, stop=["STOP now"])
    text, stopped = detok.add_tokens(char_tokens(tokenizer, "say STO"))
    assert (text, stopped) == ("say ", False)
    assert detok.add_tokens(tokenizer.encode("P")) == ("", False)
    assert detok.add_tokens(tokenizer.encode("!")) == ("STOP!", False)
    assert detok.add_tokens(char_tokens(tokenizer, " STOP no")) == (" ", False)
    assert detok.flush() == "STOP no"
    assert detok.output_text == "say STOP! STOP no"


def test_random_streams_with_stops_match_reference(tokenizer):
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 25))]
        full = tokenizer.decode(ids, skip_special_tokens=True)
        stops = [full[a : a + rng.randint(1, 4)] for a in rng.choices(range(len(full) + 1), k=2)]
        stops = [s for s in stops if s] + ["never there"]
        include = rng.random() < 0.5
        detok = IncrementalDetokenizer(tokenizer, stop=stops, include_stop_str_in_output=include)
        deltas, _ = stream(detok, ids, rng)
        assert "".join(deltas) == reference(full, stops, include)
        # A stop string containing U+FFFD can only be seen at flush, which returns text only.
        assert detok.stopped == any(s in full for s in stops)
