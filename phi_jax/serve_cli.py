"""`phi-jax serve`: load a checkpoint, compile, and serve it over OpenAI's HTTP API with uvicorn.

    phi-jax serve --workdir=runs/tiny --port=8000          # a phi_jax run (--checkpoint is an alias)
    phi-jax serve --hf=path/to/phi-2 --num-slots=16 --max-len=1024
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

_log = logging.getLogger(__name__)


def _cmd_serve(args) -> int:
    import uvicorn

    from phi_jax.cli import load_for_inference
    from phi_jax.serve import Engine, ServerConfig, create_app
    from phi_jax.tokenizer import Tokenizer

    model, variables, tokenizer = load_for_inference(workdir=args.workdir, hf=args.hf, dtype=args.dtype)
    if args.tokenizer:
        tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    if tokenizer is None:
        raise SystemExit("no tokenizer.json or tokenizer.model beside the checkpoint; copy the tokenizer "
                         "files into it or pass --tokenizer=DIR")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise SystemExit(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                         f"{model.config.vocab_size}; pass the tokenizer this model was trained with")
    chat_template = Path(args.chat_template).read_text() if args.chat_template else None
    name = args.served_model_name or Path(args.workdir or args.hf).resolve().name
    try:
        engine = Engine(model, variables, num_slots=args.num_slots, max_len=args.max_len,
                        max_queue=args.max_queue, decode_chunk=args.decode_chunk)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if args.warmup:
        _log.info("compiling the decode step and %d prefill buckets ...", len(engine.prefill_buckets()))
        engine.warmup()
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        _log.warning("serving on %s: reachable from other machines, and there is no authentication",
                     args.host)
    app = create_app(engine, tokenizer, ServerConfig(model_name=name, chat_template=chat_template,
                                                     add_bos=args.add_bos))
    _log.info("serving %r on http://%s:%d/v1 (%d slots x %d tokens)", name, args.host, args.port,
              engine.num_slots, engine.max_len)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                limit_concurrency=args.max_connections)
    return 0


def register(subparsers) -> None:
    """Add `serve` to the `phi-jax` argparse subcommands."""
    p = subparsers.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API")
    p.add_argument("--workdir", "--checkpoint", dest="workdir",
                   help="a phi_jax training workdir (latest checkpoint); --checkpoint is an alias")
    p.add_argument("--hf", help="an HF Phi checkpoint directory")
    p.add_argument("--tokenizer", help="tokenizer directory or file (default: beside the checkpoint)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the `model` id clients send (default: the directory name)")
    p.add_argument("--num-slots", type=int, default=8, help="requests decoded at once (batch size)")
    p.add_argument("--max-len", type=int, default=None,
                   help="tokens per request, prompt + completion (default: the model's max_len)")
    p.add_argument("--decode-chunk", type=int, default=8,
                   help="decode steps per device call while no request waits (1 = one per call)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a slot; more are answered 429")
    p.add_argument("--max-connections", type=int, default=1024,
                   help="open connections beyond this are answered 503 by uvicorn")
    p.add_argument("--chat-template", help="a Jinja chat template file (default: the tokenizer's, else "
                                           "'Role: content' lines)")
    p.add_argument("--add-bos", action="store_true", help="prepend the BOS token to every prompt")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip compiling every prefill bucket before accepting requests")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_cmd_serve)
