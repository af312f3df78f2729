"""phi_jax.tokenizer: both backends round-trip, save/load, parity with transformers, errors."""

import difflib
import inspect
import io
import json
import pickle
import textwrap

import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import processors

from phi_jax import tokenizer as tokenizer_lib
from phi_jax.tokenizer import Tokenizer

SAMPLES = [
    "def f(x):\n\treturn x ** 2  # square\n\n\n",
    "class A:\n    '''Docstring.'''\n    def __init__(self):\n        self.v = {'k': [1, 2.5]}\n",
    "Café naïve façade — résumé, Ångström, straße.",
    "日本語のテキストと中文字符，한국어 텍스트。",
    "emoji 😀🎉👩‍💻 and symbols ∑∫√≠ ±",
    "\ttabs\tand  double  spaces   \n  leading spaces and trailing newline\n",
    "",
    " ",
    "\n\n",
]


def _training_text() -> str:
    return textwrap.dedent(inspect.getsource(json)) + inspect.getsource(textwrap) + "\n".join(SAMPLES)


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return tokenizer_lib.train_bpe([_training_text()] * 2, vocab_size=700)


@pytest.fixture(scope="module")
def sp() -> Tokenizer:
    # Llama-style options so that the model itself is lossless: identity normalization, no dummy
    # prefix, byte fallback for characters it never saw.
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_text().splitlines()), model_writer=buf, vocab_size=600,
        model_type="bpe", normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, byte_fallback=True, allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n", "\t"], character_coverage=1.0, pad_id=3, minloglevel=2)
    return tokenizer_lib.SentencePieceTokenizer(buf.getvalue())


@pytest.fixture(params=["bpe", "sp"])
def tok(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_bos_eos_are_explicit(tok):
    ids = tok.encode("hello world")
    assert tok.encode("hello world", add_bos=True, add_eos=True) == [tok.bos_id] + ids + [tok.eos_id]
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == "hello world"
    assert tok.encode_batch(["a b", "hello world"], add_eos=True)[1] == ids + [tok.eos_id]


def test_decode_keeps_special_tokens_when_asked(tok):
    ids = tok.encode("x = 1", add_eos=True)
    eos = tok.id_to_token(tok.eos_id)
    assert tok.decode(ids, skip_special_tokens=False) == "x = 1" + eos


def test_special_ids(bpe, sp):
    assert bpe.special_tokens == {"<|endoftext|>": 0, "<|pad|>": 1}
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (0, 0, 1)  # <|endoftext|> is BOS and EOS (Phi).
    assert sp.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    assert (sp.bos_id, sp.eos_id, sp.pad_id) == (1, 2, 3)
    assert bpe.chat_template is None


def test_trained_bpe_round_trips_unseen_stdlib_source(bpe):
    source = inspect.getsource(difflib)  # Not in the training text.
    ids = bpe.encode(source)
    assert bpe.decode(ids) == source
    assert len(ids) < len(source.encode()) / 2  # Merges were learned, not just bytes.


def test_train_bpe_is_deterministic():
    texts = [_training_text()]
    a = tokenizer_lib.train_bpe(texts, vocab_size=500)
    b = tokenizer_lib.train_bpe(texts, vocab_size=500)
    assert a.backend.to_str() == b.backend.to_str()
    assert a.vocab_size == 500


def test_save_load_gives_identical_ids(tok, tmp_path):
    tok.save(tmp_path)
    for path in (tmp_path, next(p for p in tmp_path.iterdir() if p.name.startswith("tokenizer."))):
        loaded = Tokenizer.from_pretrained(path)
        assert type(loaded) is type(tok)
        assert (loaded.vocab_size, loaded.bos_id, loaded.eos_id, loaded.pad_id) == (
            tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id)
        assert loaded.special_tokens == tok.special_tokens
        for text in SAMPLES:
            assert loaded.encode(text, add_eos=True) == tok.encode(text, add_eos=True)


def test_pickle_round_trip(tok):
    """Grain sends the tokenizer to worker processes by pickling it."""
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode_batch(SAMPLES) == tok.encode_batch(SAMPLES)
    assert clone.eos_id == tok.eos_id


def test_matches_transformers_fast_tokenizer(bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe.backend)
    for text in SAMPLES + [inspect.getsource(difflib)[:5000]]:
        expected = reference.encode(text, add_special_tokens=False)
        assert bpe.encode(text) == expected
        assert bpe.decode(expected) == reference.decode(expected, clean_up_tokenization_spaces=False)
    # The directory we save is what transformers' AutoTokenizer reads, with the same special ids.
    bpe.save(tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (
        bpe.bos_id, bpe.eos_id, bpe.pad_id)
    assert auto.encode(SAMPLES[0], add_special_tokens=False) == bpe.encode(SAMPLES[0])


def test_post_processor_never_adds_tokens_on_its_own(bpe, tmp_path):
    """A tokenizer.json whose post-processor inserts BOS (Llama-style) still encodes plain text."""
    transformers = pytest.importorskip("transformers")
    backend = tokenizers.Tokenizer.from_str(bpe.backend.to_str())
    backend.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    backend.save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.from_pretrained(tmp_path)
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    text = "import os\n"
    assert reference.encode(text) == loaded.encode(text, add_bos=True)
    assert reference.encode(text, add_special_tokens=False) == loaded.encode(text)


def test_tokenizer_config_is_read(bpe, tmp_path):
    """Phi-style config: AddedToken dicts, an added non-special whitespace token, a chat template."""
    backend = tokenizers.Tokenizer.from_str(bpe.backend.to_str())
    backend.add_tokens([tokenizers.AddedToken("        ", normalized=False)])  # Phi adds these.
    backend.add_special_tokens(["<|user|>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|endoftext|>", "special": True}, "eos_token": "<|user|>",
        "pad_token": None, "chat_template": template}))
    loaded = Tokenizer.from_pretrained(tmp_path)
    user = loaded.token_to_id("<|user|>")
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (0, user, None)
    assert loaded.chat_template == template
    assert "        " not in loaded.special_tokens and loaded.special_tokens["<|user|>"] == user
    spaces = loaded.token_to_id("        ")
    assert spaces in loaded.encode("x" + " " * 8 + "y")
    assert loaded.decode(loaded.encode("x" + " " * 8 + "y")) == "x        y"
    loaded.save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())["chat_template"] \
        == template


def test_errors(bpe, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "missing")
    (tmp_path / "tokenizer.bin").write_bytes(b"\x80\x04K\x01.")  # A pickle.
    with pytest.raises(ValueError, match="pickle"):
        Tokenizer.from_pretrained(tmp_path / "tokenizer.bin")
    with pytest.raises(FileNotFoundError, match="tokenizer.bin"):  # Lists what the dir holds.
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(ValueError, match="unknown tokenizer file"):
        Tokenizer.from_pretrained(tmp_path / "vocab.txt")
    no_special = tokenizer_lib.train_bpe(["abc abd abe"] * 3, vocab_size=260, special_tokens=())
    assert no_special.bos_id is None and no_special.eos_id is None
    with pytest.raises(ValueError, match="no BOS"):
        no_special.encode("a", add_bos=True)
    with pytest.raises(ValueError, match="too small"):
        tokenizer_lib.train_bpe(["a"], vocab_size=100)


def test_broken_files_are_named(bpe, tmp_path):
    from phi_jax.errors import ConfigError, InputError

    bpe.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(InputError, match=r"tokenizer.json is not a readable tokenizer.json \(") as e:
        Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "broken.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(InputError, match="broken.model is not a readable sentencepiece model"):
        Tokenizer.from_pretrained(tmp_path)


def test_special_ids_without_tokenizer_config(bpe, tmp_path):
    """A bare tokenizer.json: <|endoftext|> is EOS and (GPT-2 convention) BOS, <|pad|> is PAD."""
    bpe.backend.save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.from_pretrained(tmp_path / "tokenizer.json")
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (0, 0, 1)
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": null}')  # Explicitly none.
    assert Tokenizer.from_pretrained(tmp_path).bos_id is None
