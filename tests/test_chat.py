"""Chat templates rendered like transformers' `apply_chat_template` (the reference renders the same
template through a tokenizer transformers loaded from disk), the ChatML default, and the sandbox.

The SmolLM2 GGUF's own template is checked in tests/test_gguf_smollm2.py.
"""

import pytest

from phi_jax.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplateError, render_chat
from phi_jax.tokenizer import Tokenizer, train_bpe

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And naïve 日本語 \"quotes\" <b>tags</b>?\n\tindented"},
]

# Shapes of templates found on the hub: BOS + header tokens (Llama 3), role checks with
# raise_exception (Mistral/Zephyr), tools through tojson and namespace + loop controls (Qwen2.5,
# Hermes), and a date through strftime_now.
TEMPLATES = {
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
        " + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "alternating": (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
        "{{ bos_token }}{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + (system + '\n\n' if system is defined and loop.first else '') + message['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"),
    "tools": (
        "{%- if tools %}{{- '<|im_start|>system\n# Tools\n' }}{%- for tool in tools %}"
        "{{- '\n' }}{{- tool | tojson }}{%- endfor %}{{- '<|im_end|>\n' }}{%- endif %}"
        "{%- set ns = namespace(last_user=0) %}"
        "{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}"
        "{%- endif %}{%- endfor %}"
        "{%- for message in messages %}{%- if loop.index0 > ns.last_user %}{%- break %}{%- endif %}"
        "{{- '<|im_start|>' + message.role + '\n' + message.content | tojson(indent=2) + '<|im_end|>\n' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"),
    "dated": ("{{ 'Today is ' + strftime_now('%d %b %Y') + '.\n' }}{% for m in messages %}"
              "{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}{{ dict(a=1) | tojson }}"),
}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add <two> numbers",
                                           "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture(scope="module")
def tokenizers_pair(tmp_path_factory):
    """(ours, transformers') for one tokenizer saved to disk, a template added per test."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("tok")
    train_bpe(["the quick brown fox\n" * 20], vocab_size=300).save(path)
    return Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(str(path))


def test_default_is_chatml():
    got = render_chat(CONVERSATION[:3], bos_token="<s>", eos_token="</s>")
    assert got == ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?"
                   "<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(CONVERSATION[:1], bos_token="", eos_token="", add_generation_prompt=False) == \
        "<|im_start|>system\nYou are terse.<|im_end|>\n"


@pytest.mark.parametrize("name", [None, *TEMPLATES])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_renders_like_transformers(tokenizers_pair, name, generation_prompt):
    ours, theirs = tokenizers_pair
    template = DEFAULT_CHAT_TEMPLATE if name is None else TEMPLATES[name]
    messages = CONVERSATION[:3] if name == "alternating" else CONVERSATION
    extra = {"tools": TOOLS} if name == "tools" else {}
    want = theirs.apply_chat_template(messages, chat_template=template, tokenize=False,
                                      add_generation_prompt=generation_prompt, **extra)
    got = render_chat(messages, template, add_generation_prompt=generation_prompt,
                      **ours.special_tokens_map, **extra)
    assert got == want
    assert ours.encode(got) == theirs.encode(want, add_special_tokens=False)


def test_template_errors_are_one_line_chat_template_errors():
    alternating = TEMPLATES["alternating"]
    bad = [CONVERSATION[1], CONVERSATION[1]]
    with pytest.raises(ChatTemplateError, match="roles must alternate") as info:
        render_chat(bad, alternating, bos_token="", eos_token="")
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    with pytest.raises(ChatTemplateError, match="failed on these messages"):
        render_chat(CONVERSATION, "{% for %}", bos_token="", eos_token="")


@pytest.mark.parametrize("template", [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__base__.__subclasses__() }}",
    "{% set ns = namespace(_x=1) %}",
    "{{ messages.append(1) }}",  # immutable sandbox: no mutation of the caller's data
])
def test_sandbox_refuses_escapes(template):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError):
        render_chat(messages, template, bos_token="", eos_token="")
    assert messages == [{"role": "user", "content": "hi"}]
