"""Structured outputs: JSON that always validates, from the library and from the server.

    python examples/structured_outputs.py

A tiny random model (it would write any byte) answers under a JSON schema, a choice and a regex:
once through `phi_jax.inference.decode.generate` with compiled constraints, once through the
OpenAI-compatible server with the official `openai` client (`response_format` and vLLM's
`structured_outputs`). With a real model (`phi_jax.load("smollm2")`) the same calls give sensible
JSON; the grammar only guarantees the shape.
"""

import json

import jax

from phi_jax.config import preset
from phi_jax.inference import grammar
from phi_jax.inference.decode import generate
from phi_jax.model import Phi, init_params
from phi_jax.tokenizer import train_bpe

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}


def main() -> None:
    tokenizer = train_bpe(['{"name": "ada", "age": 36}\n' * 20, "the quick brown fox\n" * 20], vocab_size=300)
    config = preset("test", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id, max_len=256)
    model, variables = Phi(config), init_params(config, jax.random.key(0))

    # 1. The library: compile a constraint once, pass it per prompt (None = free text).
    person = grammar.compile_constraint(tokenizer, config.vocab_size, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    yes_no = grammar.compile_constraint(tokenizer, config.vocab_size,
                                        structured_outputs={"choice": ["yes", "no"]})
    prompts = [tokenizer.encode("who?")] * 3
    out = generate(model, variables, prompts, 100, temperature=1.0, seed=7,
                   stop_tokens=[tokenizer.eos_id], constraints=[person, yes_no, None])
    answer = tokenizer.decode(out[0])
    print("schema :", answer, "->", json.loads(answer))
    print("choice :", tokenizer.decode(out[1]))
    print("free   :", repr(tokenizer.decode(out[2])[:40]))

    # 2. The server, with the official openai client.
    import openai

    from phi_jax.serve import Engine, ServerConfig, ServerThread, create_app

    engine = Engine(model, variables, num_slots=2, max_len=256)
    with ServerThread(create_app(engine, tokenizer, ServerConfig(model_name="tiny"))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "who?"}], max_tokens=100, temperature=1.0,
            seed=3, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
        print("served :", r.choices[0].message.content, json.loads(r.choices[0].message.content))
        r = client.completions.create(model="tiny", prompt="date:", max_tokens=20, temperature=1.0, seed=1,
                                      extra_body={"structured_outputs": {"regex": r"[0-9]{4}-[0-9]{2}-[0-9]{2}"}})
        print("regex  :", r.choices[0].text)


if __name__ == "__main__":
    main()
