"""Serving pieces without a model: streamed detokenization with stop strings and request
validation (chat templates: tests/test_chat.py)."""

import pytest

from phi_jax.serve import protocol
from phi_jax.inference.detokenize import TextAssembler
from phi_jax.tokenizer import train_bpe


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(["the quick brown fox jumps over the lazy dog\n" * 30, "def add(a, b): return a\n" * 30],
                     vocab_size=300)


def _stream(tokenizer, ids, stop=()):
    text = TextAssembler(tokenizer, stop)
    deltas = [text.add(t) for t in ids]
    if not text.stopped:
        deltas.append(text.finish())
    return text, deltas


def test_stream_is_the_whole_decode_and_never_splits_a_character(tokenizer):
    message = "naïve café — 日本語 the quick brown 🦊"
    ids = tokenizer.encode(message)
    text, deltas = _stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == message == text.text
    assert not any("\ufffd" in d for d in deltas)
    assert len(ids) > len(message.encode()) // 2  # the rare characters really are split into bytes
    assert [r.offset for r in text.records] == [len(tokenizer.decode(ids[:i])) for i in range(len(ids))]


@pytest.mark.parametrize("stop,expected", [
    (["ck br"], "the qui"),  # spans several tokens
    (["zzz", "fox"], "the quick brown "),  # the first stop that appears wins
    (["the"], ""),  # stop at the very start
    (["quick", "qu"], "the "),  # the earliest match, whichever string
])
def test_stop_strings(tokenizer, stop, expected):
    ids = tokenizer.encode("the quick brown fox jumps")
    text, deltas = _stream(tokenizer, ids, stop)
    assert text.stopped and "".join(deltas) == expected == text.text
    shown = ""
    for delta in deltas:  # nothing past the stop point was ever shown, not even briefly
        shown += delta
        assert expected.startswith(shown)


def test_text_that_only_looks_like_a_stop_is_released_at_the_end(tokenizer):
    ids = tokenizer.encode("the quick brown fo")
    text, deltas = _stream(tokenizer, ids, ["fox"])
    assert not text.stopped
    assert "".join(deltas[:-1]) == "the quick brown "  # "fo" held back while it might become "fox"
    assert "".join(deltas) == "the quick brown fo"


def test_request_validation_normalises_and_names_nested_fields():
    req = protocol.parse_request(b'{"model": "m", "prompt": [[1, 2], "text"], "stop": "###"}',
                                 protocol.CompletionRequest)
    assert req.prompt == [[1, 2], "text"] and req.stop == ["###"] and req.temperature == 1.0
    chat = protocol.parse_request(
        b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},'
        b' {"type": "text", "text": "b"}]}], "max_tokens": 5, "max_completion_tokens": 7}',
        protocol.ChatCompletionRequest)
    assert chat.messages[0].content == "ab" and chat.max_tokens == 7
    with pytest.raises(protocol.APIError) as info:
        protocol.parse_request(b'{"model": "m", "messages": [{"role": "user", "content": "a"}, {"content": "b"}]}',
                               protocol.ChatCompletionRequest)
    assert info.value.status == 400 and info.value.param == "messages[1].role"
    with pytest.raises(protocol.APIError) as info:
        protocol.parse_request(b'{"model": "m", "prompt": "a", "temperature": NaN}', protocol.CompletionRequest)
    assert info.value.param == "temperature"
