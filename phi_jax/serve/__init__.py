"""`phi-jax serve`: an OpenAI-compatible HTTP server with streaming and continuous batching.

    engine = Engine(model, variables, num_slots=8)         # decode slots over one KV cache
    app = create_app(engine, tokenizer, ServerConfig(model_name="phi-2"))
    uvicorn.run(app, host="127.0.0.1", port=8000)          # or ServerThread(app) in tests

`engine` batches (and is usable without HTTP), `app` speaks OpenAI's protocol, `protocol` validates
requests, `chat` renders chat templates, `text` turns tokens into streamed text.
"""

from phi_jax.serve.app import ServerConfig, create_app
from phi_jax.serve.background import ServerThread
from phi_jax.serve.engine import Engine, SamplingParams, TokenEvent

__all__ = ["Engine", "SamplingParams", "ServerConfig", "ServerThread", "TokenEvent", "create_app"]
