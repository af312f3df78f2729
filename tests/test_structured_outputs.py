"""Structured outputs and top-20 log-probs: through `generate` and through HTTP with the `openai` client.

A tiny random model sampled at temperature 1 is the hardest case for a grammar (it would write any
byte): every constrained answer must still parse and validate, checked independently with
`json.loads` + the `jsonschema` package (else explicit field checks), `re.fullmatch` and set
membership. Unconstrained rows sharing a batch with constrained ones keep `generate`'s tokens.
"""

import concurrent.futures
import json
import re
from types import SimpleNamespace

import jax
import numpy as np
import openai
import pytest

from phi_jax.chat import render_chat
from phi_jax.config import preset
from phi_jax.errors import InputError
from phi_jax.inference import grammar
from phi_jax.inference.decode import apply_token_masks, generate
from phi_jax.model import Phi, init_params
from phi_jax.serve import Engine, ServerConfig, ServerThread, create_app
from phi_jax.tokenizer import train_bpe

pytestmark = pytest.mark.slow  # compiles generate and the engine (~30 s on 2 cores), then fast

TEXTS = ["def add(a, b):\n    return a + b\n" * 20, "class A:\n    pass\n" * 20,
         "the quick brown fox jumps over the lazy dog\n" * 20, '{"name": "ada", "age": 36}\n' * 20]
MODEL = "tiny-structured"
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 4},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 2},
                         "ok": {"type": "boolean"}},
          "required": ["name", "age", "ok"], "additionalProperties": False}


def _validate(answer: str) -> None:
    """json.loads + an independent JSON-schema validator (explicit checks without one)."""
    value = json.loads(answer)
    try:
        import jsonschema
    except ImportError:
        assert set(value) <= set(SCHEMA["properties"]) and {"name", "age", "ok"} <= set(value)
        assert isinstance(value["name"], str) and len(value["name"]) <= 4
        assert type(value["age"]) is int and 0 <= value["age"] <= 120 and type(value["ok"]) is bool
        assert all(t in ("a", "b", "c") for t in value.get("tags", []))
    else:
        jsonschema.validate(value, SCHEMA)
    assert " " not in answer.replace(value["name"], "")  # compact: no free whitespace


@pytest.fixture(scope="module")
def tiny():
    tokenizer = train_bpe(TEXTS, vocab_size=300)
    config = preset("test", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id, max_len=256)
    model, variables = Phi(config), init_params(config, jax.random.key(0))
    engine = Engine(model, variables, num_slots=4, max_len=256)
    with ServerThread(create_app(engine, tokenizer, ServerConfig(model_name=MODEL))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        yield SimpleNamespace(client=client, model=model, variables=variables, tokenizer=tokenizer,
                              config=config, eos=tokenizer.eos_id, engine=engine, url=server.url)


def _constraint(s, **request):
    return grammar.compile_constraint(s.tokenizer, s.config.vocab_size, **request)


def test_masks_apply_exactly_what_llguidance_allows():
    """The device-side unpacking of [R,M] bitmasks equals llguidance's own numpy reference."""
    rng = np.random.default_rng(0)
    masks = rng.integers(-2**31, 2**31, size=(3, 10), dtype=np.int64).astype(np.int32)
    logits = rng.normal(size=(3, 300)).astype(np.float32)
    import llguidance.numpy

    want = logits.copy()
    llguidance.numpy.apply_token_bitmask_inplace(want, masks)
    np.testing.assert_array_equal(np.asarray(apply_token_masks(logits, masks)), want)
    np.testing.assert_array_equal(grammar.allowed_tokens(masks, 300), np.isfinite(want))


def test_every_sampled_json_answer_validates_and_free_rows_keep_their_tokens(tiny):
    s = tiny
    schema = _constraint(s, response_format={"type": "json_schema",
                                             "json_schema": {"name": "person", "schema": SCHEMA}})
    prompts = [s.tokenizer.encode(t) for t in ("the quick", "def add", "class A", "{")] * 3
    seeds = list(range(100, 112))
    constraints = [None if i % 3 == 2 else schema for i in range(12)]  # 8 constrained, 4 free
    kw = dict(temperature=1.0, seed=seeds, stop_tokens=[s.eos])
    out = generate(s.model, s.variables, prompts, 120, constraints=constraints, **kw)
    free = generate(s.model, s.variables, prompts, 120, **kw)
    for i in range(12):
        if constraints[i] is None:
            assert out[i] == free[i]
        else:
            assert out[i][-1] == s.eos, s.tokenizer.decode(out[i])  # finished, not cut
            _validate(s.tokenizer.decode(out[i][:-1]))
    greedy = generate(s.model, s.variables, prompts, 120, stop_tokens=[s.eos], constraints=constraints)
    assert [greedy[i] for i in (2, 5, 8, 11)] == generate(
        s.model, s.variables, [prompts[i] for i in (2, 5, 8, 11)], 120, stop_tokens=[s.eos])


def test_generate_refuses_a_constraint_without_its_eos(tiny):
    s = tiny
    choice = _constraint(s, structured_outputs={"choice": ["yes", "no"]})
    with pytest.raises(InputError, match="eos"):
        generate(s.model, s.variables, [[5, 6]], 4, stop_tokens=[], constraints=choice)
    with pytest.raises(InputError, match="regex"):
        _constraint(s, structured_outputs={"regex": "(unclosed"})


def test_mixed_batch_over_http_choice_regex_json_and_free_rows(tiny):
    """Constrained and free requests in flight together (8 slots): each answer obeys its own
    constraint, and the free greedy ones equal `generate` alone."""
    s = tiny
    c = s.client
    choices = ["positive", "negative", "neutral"]
    free_prompts = ["def add(a, b):", "class A:", "the lazy dog"]

    def free(p):
        return c.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0).choices[0].text

    def choice(seed):
        r = c.completions.create(model=MODEL, prompt="the quick", max_tokens=12, temperature=1.0,
                                 seed=seed, extra_body={"structured_outputs": {"choice": choices}})
        return r.choices[0]

    def regex(seed):
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "date?"}],
                                      max_tokens=20, temperature=1.0, seed=seed,
                                      extra_body={"structured_outputs": {"regex": r"[0-9]{4}-[0-9]{2}-[0-9]{2}"}})
        return r.choices[0]

    def schema(seed):
        r = c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "who?"}], max_tokens=120, temperature=1.0,
            seed=seed, response_format={"type": "json_schema",
                                        "json_schema": {"name": "person", "schema": SCHEMA}})
        return r.choices[0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # 4 slots: they queue and mix
        frees = [pool.submit(free, p) for p in free_prompts]
        picks = [pool.submit(choice, seed) for seed in range(3)]
        dates = [pool.submit(regex, seed) for seed in range(2)]
        people = [pool.submit(schema, seed) for seed in range(2)]
        frees += [pool.submit(free, p) for p in free_prompts]
    for future, p in zip(frees, free_prompts * 2):
        ids = generate(s.model, s.variables, [s.tokenizer.encode(p)], 24, stop_tokens=[s.eos])[0]
        assert future.result() == s.tokenizer.decode(ids)
    for f in picks:
        assert f.result().text in choices and f.result().finish_reason == "stop"
    for f in dates:
        assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", f.result().message.content)
    for f in people:
        assert f.result().finish_reason == "stop"
        _validate(f.result().message.content)
    # json_object bounds nothing (greedy, a random model writes one endless key): sample a few
    objects = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=4,
                                        max_tokens=100, temperature=1.0, seed=1,
                                        response_format={"type": "json_object"}).choices
    finished = [o.message.content for o in objects if o.finish_reason == "stop"]
    assert finished and all(isinstance(json.loads(o), dict) for o in finished)
    assert all(o.message.content.startswith("{") for o in objects)


def test_top_20_logprobs_on_both_endpoints_equal_a_full_forward(tiny):
    s = tiny
    prompt = "def add(a, b):"
    ids = s.tokenizer.encode(prompt)
    logits = s.model.apply(s.variables, np.asarray([ids], np.int32))[0][0, -1]
    want = np.asarray(jax.nn.log_softmax(logits))
    order = np.argsort(-want)[:20]
    r = s.client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=20)
    top = r.choices[0].logprobs.top_logprobs[0]
    expected: dict[str, float] = {}  # keyed by text as OpenAI does: the likelier id of a shared text
    for token_id in order:
        expected.setdefault(s.tokenizer.decode([int(token_id)]), float(want[token_id]))
    assert top.keys() == expected.keys()
    np.testing.assert_allclose([top[k] for k in expected], list(expected.values()), atol=1e-4)
    chat = s.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=1, temperature=0, logprobs=True, top_logprobs=20)
    entries = chat.choices[0].logprobs.content[0].top_logprobs
    assert len(entries) == 20  # one per id here
    assert [e.logprob for e in entries] == sorted((e.logprob for e in entries), reverse=True)


def test_continue_final_message_answers_from_inside_the_assistant_turn(tiny):
    """The judge's "Score: " prompt: the answer continues the last (assistant) message."""
    s = tiny
    messages = [{"role": "user", "content": "rate"}, {"role": "assistant", "content": "Score: "}]
    text = render_chat(messages, add_generation_prompt=False, **s.tokenizer.special_tokens_map)
    prompt = text[:text.rindex("Score: ") + len("Score: ")]
    want = generate(s.model, s.variables, [s.tokenizer.encode(prompt)], 4, stop_tokens=[s.eos])[0]
    r = s.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                         extra_body={"continue_final_message": True,
                                                     "add_generation_prompt": False})
    assert r.choices[0].message.content == s.tokenizer.decode(want)
    assert r.usage.prompt_tokens == len(s.tokenizer.encode(prompt))


# ------------------------------------------------------------------ Orca-2 answers through the server
def _bigram_variables(s, chain: dict[int, dict[int, float]], bias: dict[int, float]):
    """The tiny model's shapes, set so that its next-token logits depend on the last token alone:
    attention and MLP outputs are zero (the residual is the token's embedding), each token of
    `chain` embeds as one-hot, and the head maps it to the logits given (others: `bias`)."""
    variables = jax.tree_util.tree_map(np.array, s.variables)
    params, d = variables["params"], s.config.d_model
    for name in ("self_attn", "mlp"):
        out = params["layers"]["block"][name]["dense" if name == "self_attn" else "fc2"]
        out["kernel"][:], out["bias"][:] = 0, 0
    params["embed_tokens"]["embedding"][:] = 0
    params["final_layernorm"]["scale"][:], params["final_layernorm"]["bias"][:] = 1, 0
    head = params["lm_head"]
    head["kernel"][:], head["bias"][:] = 0, 0
    hot = (1 - 1 / d) / np.sqrt((1 - 1 / d) / d + s.config.layer_norm_eps)  # a one-hot after LayerNorm
    for row, (token, logits) in enumerate(chain.items()):
        params["embed_tokens"]["embedding"][token, row] = 1
        for nxt, logit in logits.items():
            head["kernel"][row, nxt] = logit / hot
    for token, logit in bias.items():
        head["bias"][token] = logit
    return jax.tree_util.tree_map(jax.numpy.asarray, variables)


def test_orca_answers_through_phi_jax_serve_end_with_the_line_the_scorer_reads(tiny, tmp_path):
    """`phi-jax data instruct` against the served tiny model, set to write "Answer:" and stop there
    (a greedy bigram chain, ending where the scorer finds nothing) unless held on: every reference
    task's answer matches its regex and is scored (choice and exact, against the known "C"); a task
    without a reference is asked freely and stops after "Answer:"; a constraint the model cannot
    satisfy (choices A, B) runs to max_tokens and is dropped as truncated, never stored unscored."""
    from phi_jax import cli
    from phi_jax.data import records

    s = tiny
    ids = s.tokenizer.encode("Answer: C")
    colon = next(i for i in range(len(ids)) if s.tokenizer.decode(ids[:i + 1]) == "Answer:")
    assert len(set(ids)) == len(ids) and s.eos not in ids
    chain = {a: {b: 10.0} for a, b in zip(ids, ids[1:])}
    chain[ids[colon]] = {s.eos: 10.0, ids[colon + 1]: 8.0}  # free, it stops after "Answer:"
    chain[ids[-1]] = {s.eos: 10.0}
    free_regex, mc = r"(?:[^\n]*\n)*Answer: [^\s" + "\x1c-\x1f" + r"][^\n]*", r"(?:[^\n]*\n)*Answer: [{}]"
    tasks = [{"id": "exact", "type": "t", "prompt": "Which letter?", "answer": "C", "split": "train"},
             {"id": "mc3", "type": "t", "prompt": "Pick one.", "choices": ["x", "y", "z"], "answer": "C",
              "split": "train"},
             {"id": "mc2", "type": "t", "prompt": "Pick.", "choices": ["x", "y"], "answer": "A",
              "split": "train"},
             {"id": "free", "type": "t", "prompt": "Say something."}]
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "short.txt").write_text(
        "name: short\ndescription: a short one\n---\nThink about the task briefly and then write the "
        "final answer on its own line, as the task asks for it.\n")
    (tmp_path / "map.json").write_text(json.dumps({"default": "short"}))
    out = tmp_path / "out"
    saved, s.engine.variables = s.engine.variables, _bigram_variables(s, chain, {ids[0]: 5.0})
    try:
        rc = cli.main(["data", "instruct", f"--tasks={tmp_path / 'tasks.jsonl'}", f"--output={out}",
                       f"--teacher={s.url}/v1", f"--teacher-model={MODEL}", "--max-tokens=24",
                       f"--strategies={tmp_path / 'mine'}", f"--strategy-map={tmp_path / 'map.json'}",
                       "--concurrency=4", "--no-progress"])
    finally:
        s.engine.variables = saved
    assert rc == 0
    got = {r["id"]: r for r in records.iter_output(out)}
    answer = {k: r["meta"]["messages"][-1]["content"] for k, r in got.items()}
    assert answer == {"exact": "Answer: C", "mc3": "Answer: C", "free": "Answer:"}
    assert re.fullmatch(free_regex, answer["exact"]) and re.fullmatch(mc.format("ABC"), answer["mc3"])
    assert got["exact"]["meta"]["reference_score"] == got["mc3"]["meta"]["reference_score"] == 1.0
    counts = records.read_manifest(out)["counts"]
    assert counts["dropped"] == {"truncated_answer": 1}  # mc2: "Answer: C" is no final line there
    assert counts["stage"]["reference_scored"] == counts["stage"]["reference_correct"] == 2
