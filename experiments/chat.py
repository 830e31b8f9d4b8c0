"""Interactive terminal chat with an InternLM2 model (streaming, multi-turn).

    python -m experiments.chat --hf PATH [--tokenizer PATH]
    python -m experiments.chat --checkpoint DIR --preset NAME --tokenizer PATH

Commands: `/reset` clears the conversation, `/exit` (or end of input) quits. Works with piped stdin, e.g.
`printf 'hi\\n/exit\\n' | python -m experiments.chat --hf ckpt`. Replies stream token by token.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Sequence, TextIO

from experiments.cli import entry_point
import jax


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """`(config, params)` from `--hf` or an orbax train-state `--checkpoint` with `--preset`."""
    from internlm2_jax import get_preset, load_hf
    if args.hf:
        return load_hf(args.hf, dtype=args.dtype)
    from internlm2_jax.params_loading import load_policy, single_device_abstract

    config = get_preset(args.preset, dtype=args.dtype)
    shardings = jax.tree.map(lambda a: a.sharding, single_device_abstract(config))
    return config, load_policy(args.checkpoint, config, shardings, args.step)


def chat(config: Any, params: Any, tokenizer: Any, *, stdin: TextIO, stdout: TextIO, system: Optional[str],
         max_new_tokens: int, max_context: int, temperature: float, top_p: float, top_k: int,
         repetition_penalty: float, seed: int) -> None:
    """The read-eval-print loop; each reply is streamed to `stdout` as its tokens are sampled."""
    from internlm2_jax.generate import generate_stream

    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    rng = jax.random.key(seed)
    stops = tuple(tokenizer.stop_ids)
    stdout.write("chat ready (/reset, /exit)\n")
    for line in stdin:
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            messages = list(base)
            stdout.write("[conversation reset]\n")
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        prompt = tokenizer.encode_chat(messages, add_generation_prompt=True)
        while len(prompt) + max_new_tokens > max_context and len(messages) > len(base) + 1:
            del messages[len(base):len(base) + 2]  # drop the oldest exchange
            prompt = tokenizer.encode_chat(messages, add_generation_prompt=True)
        rng, sub = jax.random.split(rng)
        stdout.write("assistant> ")
        out: list[int] = []
        shown = ""
        for tok in generate_stream(config, params, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                                   stop_ids=stops, rng=sub, pad_id=tokenizer.pad_id,
                                   vocab_limit=tokenizer.vocab_size):
            if tok in stops:
                break
            out.append(tok)
            text_so_far = tokenizer.decode(out, skip_special=True)
            if not text_so_far.endswith("\ufffd"):  # wait for complete UTF-8 characters
                stdout.write(text_so_far[len(shown):])
                stdout.flush()
                shown = text_so_far
        reply = tokenizer.decode(out)
        stdout.write(tokenizer.decode(out, skip_special=True)[len(shown):] + "\n")
        stdout.flush()
        messages.append({"role": "assistant", "content": reply})


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="HF InternLM2 checkpoint folder")
    src.add_argument("--checkpoint", help="orbax train-state checkpoint directory (needs --preset)")
    p.add_argument("--preset", help="model preset of --checkpoint")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--tokenizer", help="tokenizer.model (default: inside --hf)")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-context", type=int, default=4096)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.checkpoint and not args.preset:
        p.error("--checkpoint needs --preset")
    tok_path = args.tokenizer or (os.path.join(args.hf, "tokenizer.model") if args.hf else None)
    if not tok_path or not os.path.exists(tok_path):
        p.error(f"tokenizer not found ({tok_path}); pass --tokenizer")
    from internlm2_jax import Tokenizer
    tokenizer = Tokenizer(tok_path)
    config, params = load_model(args)
    tokenizer.check_compatible(config.vocab_size)
    chat(config, params, tokenizer, stdin=sys.stdin, stdout=sys.stdout, system=args.system,
         max_new_tokens=args.max_new_tokens, max_context=args.max_context, temperature=args.temperature,
         top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
