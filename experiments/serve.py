"""OpenAI-compatible server for an InternLM2 checkpoint (continuous batching; `internlm2_jax.serving`).

    python -m experiments.serve --hf runs/sft_tiny/hf --port 8000
    python -m experiments.serve --checkpoint DIR --preset NAME --tokenizer PATH

    curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "12+34="}], "max_tokens": 8, "temperature": 0}'

Listens on 127.0.0.1 unless `--host` says otherwise; `--api-key` (or $INTERNLM2_JAX_API_KEY) requires
`Authorization: Bearer KEY`. Logs one line per request and the engine's throughput every 10 s while busy.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from experiments.chat import DEFAULT_MAX_CONTEXT, add_model_args, load_checked, tokenizer_path
from experiments.cli import entry_point, say, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="id in /v1/models (default: the folder's name)")
    p.add_argument("--api-key", default=os.environ.get("INTERNLM2_JAX_API_KEY"))
    p.add_argument("--slots", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-context", type=int, default=None,
                   help=f"prompt + reply tokens per request (default: max_position_embeddings, at most "
                        f"{DEFAULT_MAX_CONTEXT})")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens prefilled per step (power of 2)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before HTTP 429")
    p.add_argument("--weights", choices=("float", "int8", "int4"), default="float",
                   help="weight-only quantization of the linear layers")
    p.add_argument("--kv-cache", choices=("model", "int8"), default="model",
                   help="KV cache storage: the compute dtype, or int8 with per-token scales")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is cut off")
    p.add_argument("--max-tokens", type=int, default=256, help="default max_tokens of a request")
    return p


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    tok_path = tokenizer_path(p, args)
    import uvicorn

    from internlm2_jax.serving.engine import Engine, EngineConfig
    from internlm2_jax.serving.server import ServerConfig, create_app

    tokenizer, config, params = load_checked(args, tok_path)
    setup_logging()
    max_len = args.max_context or min(DEFAULT_MAX_CONTEXT, config.max_position_embeddings)
    try:
        engine_config = EngineConfig(slots=args.slots, max_len=max_len, prefill_chunk=args.prefill_chunk,
                                     max_queue=args.max_queue, weights=args.weights,
                                     kv_cache=args.kv_cache)
    except ValueError as e:
        p.error(str(e))
    engine = Engine(config, params, engine_config, vocab_limit=tokenizer.vocab_size).start()
    name = args.model_name or os.path.basename(os.path.normpath(args.hf or args.checkpoint))
    app = create_app(engine, tokenizer, ServerConfig(model_name=name, api_key=args.api_key,
                                                     request_timeout_s=args.request_timeout,
                                                     default_max_tokens=args.max_tokens))
    say(f"serving {name!r} on http://{args.host}:{args.port}/v1 ({args.slots} slots, context {max_len}, "
        f"weights {args.weights}, kv cache {args.kv_cache}{', API key required' if args.api_key else ''})")
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=False)
    engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
