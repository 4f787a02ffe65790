"""Serve the checkpoint CKPT over HTTP with OpenAI's API (completions, chat completions, SSE
streaming), many requests batched together on one model (continuous batching).

    python -m mistral_jax.serve ckpt/ --port 8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "My favourite condiment is", "max_tokens": 20, "temperature": 0}'

Needs the serve extra: pip install 'mistral_jax[serve]'.
"""

from __future__ import annotations

from pathlib import Path

from mistral_jax import cli


def arguments():
    p = cli.parser("python -m mistral_jax.serve", __doc__)
    p.add_argument("ckpt", help="checkpoint directory, with a tokenizer")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every "
                   "interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one)")
    p.add_argument("--name", default=None, help="the model's name in /v1/models and responses "
                   "(default: the checkpoint directory's name)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (cache "
                   "slots)")
    p.add_argument("--max-len", type=int, default=None, help="most tokens of a request, prompt "
                   "and completion (default: the model's positions, at most 4096)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a "
                   "slot; past it the server answers 429")
    p.add_argument("--shutdown-grace", type=float, default=10.0, metavar="S", help="on SIGTERM, "
                   "seconds running requests may take to finish before they are cancelled")
    cli.add_model(p)
    return p


def main(argv=None) -> int:
    return cli.entry(arguments(), serve, argv)


def serve(args) -> None:
    try:
        import uvicorn

        from mistral_jax.serving.app import create_app
        from mistral_jax.serving.server import Server
    except ImportError as e:
        raise ValueError(f"{e.name} is missing: pip install 'mistral_jax[serve]'") from None
    from mistral_jax.cli import progress
    from mistral_jax.serving.engine import Engine

    model = cli.load_model(args)
    progress.build_kernel()
    with Engine(model, max_batch=args.max_batch, max_len=args.max_len,
                max_queue=args.max_queue) as engine:
        app = create_app(engine, args.name or Path(args.ckpt).resolve().name)
        progress.warm_up(engine)  # every step a request needs compiled before listening
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                timeout_graceful_shutdown=args.shutdown_grace + 10)
        Server(config, engine, args.shutdown_grace).run()
