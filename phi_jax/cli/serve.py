"""`phi-jax serve`: load any model, compile, and serve it over OpenAI's HTTP API with uvicorn.

    phi-jax serve --model=runs/tiny --port=8000
    phi-jax serve --model=path/to/phi-2 --num-slots=16 --max-len=1024
    phi-jax serve --model=SmolLM2-135M-Instruct.Q4_1.gguf        # a local teacher endpoint

The process exits non-zero if the generation engine fails (rather than answering 503 forever),
and stops on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
from pathlib import Path

from phi_jax.cli.common import add_model_arguments, add_quantization_arguments, load_model

_log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    add_quantization_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the `model` id clients send (default: the file or "
                                               "directory name)")
    p.add_argument("--num-slots", type=int, default=8, help="requests decoded at once (batch size)")
    p.add_argument("--max-len", type=int, default=None,
                   help="tokens per request, prompt + completion (default: the model's max_len)")
    p.add_argument("--decode-chunk", type=int, default=8,
                   help="decode steps per device call while no request waits (1 = one per call)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a slot; more are answered 429")
    p.add_argument("--max-connections", type=int, default=1024,
                   help="open connections beyond this are answered 503 by uvicorn")
    p.add_argument("--chat-template", help="a Jinja chat template file (default: the model's own, else "
                                           "ChatML)")
    p.add_argument("--add-bos", action="store_true", help="prepend the BOS token to every prompt")
    p.add_argument("--prefix-cache-tokens", type=int, default=4096,
                   help="tokens of prompt prefixes (system prompts, rubrics) whose KV is kept and "
                        "reused, least recently used evicted first; 0 turns the prefix cache off")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="longer prompts are prefilled in chunks of this many tokens, with decode "
                        "steps for the running requests between them")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="compile nothing before accepting requests (the first ones compile)")
    p.add_argument("--warmup-all", action="store_true",
                   help="compile every prefill bucket and decode batch before accepting requests "
                        "(default: only what a first request needs; the rest compiles on first use "
                        "and is kept in the compile cache for the next start)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def run(args) -> int:
    import uvicorn

    from phi_jax.errors import InputError, MissingFileError, RunError
    from phi_jax.serve import Engine, ServerConfig, create_app
    from phi_jax.serve.connections import DeadlineH11Protocol

    if not 1 <= args.port <= 65535:
        raise InputError(f"--port={args.port}: must be in [1, 65535]")
    chat_template = None
    if args.chat_template:
        if not Path(args.chat_template).is_file():
            raise MissingFileError(f"--chat-template={args.chat_template}: no such file")
        chat_template = Path(args.chat_template).read_text()
    loaded = load_model(args)
    model, variables, tokenizer = loaded
    name = args.served_model_name or Path(args.model).resolve().name
    server: uvicorn.Server | None = None

    def on_fatal(error: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    engine = Engine(model, variables, num_slots=args.num_slots, max_len=args.max_len,
                    max_queue=args.max_queue, decode_chunk=args.decode_chunk, on_fatal=on_fatal,
                    prefill_chunk=args.prefill_chunk, prefix_cache_tokens=args.prefix_cache_tokens)
    if args.warmup:
        _log.info("compiling %s ...", "every prefill bucket and decode batch" if args.warmup_all
                  else "the first prefill and decode step")
        engine.warmup(everything=args.warmup_all)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        _log.warning("serving on %s: reachable from other machines, and there is no authentication",
                     args.host)
    app = create_app(engine, tokenizer, ServerConfig(model_name=name, chat_template=chat_template or
                                                     loaded.chat_template, add_bos=args.add_bos))
    _log.info("serving %r on http://%s:%d/v1 (%d slots x %d tokens; prefix cache %s; metrics at "
              "/metrics)", name, args.host, args.port, engine.num_slots, engine.max_len,
              f"{engine.prefix_cache.capacity_tokens} tokens" if engine.prefix_cache else "off")
    server = uvicorn.Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, http=DeadlineH11Protocol,
        limit_concurrency=args.max_connections, timeout_keep_alive=5, timeout_graceful_shutdown=10))
    server.run()
    if engine.error is not None:
        raise RunError(f"the generation engine failed ({type(engine.error).__name__}: {engine.error}); "
                       "the server stopped. Rerun with --debug and report the log if it repeats")
    if not server.started:
        raise RunError(f"the server could not start on {args.host}:{args.port} (see the log above; "
                       "is the port in use?)")
    return 0
