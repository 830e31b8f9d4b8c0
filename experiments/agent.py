"""The InternLM2 tool loop on a checkpoint or a server: plugins, a sandboxed code interpreter, the turns shown.

    python -m experiments.agent --hf runs/sft_tiny_tools/hf --dtype float32 --plugin calculator "What is 4821*37?"
    python -m experiments.agent --hf CKPT --interpreter --file sales.csv "Which region sold most?"
    python -m experiments.agent --server http://127.0.0.1:8000/v1 --plugin calculator "What is 4821*37?"
    python -m experiments.agent --hf runs/sft_tiny_tools/hf --dtype float32 --plugin calculator \\
        --eval runs/sft_tiny_tools/data/eval.jsonl       # accuracy through the loop, with and without the tool

Each turn is printed as InternLM2 renders it (system turns with `--show-system`); the last line on stdout is
a JSON summary. `--server` talks to any OpenAI-compatible chat endpoint (e.g. `experiments.serve`) and
supports plugins only; the interpreter needs the in-process model. See `docs/agents.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional, Sequence

from experiments.chat import add_model_args, load_checked, tokenizer_path
from experiments.cli import entry_point, say
from internlm2_jax.errors import ConfigValueError, InputDataError


def build_parser(server: bool) -> argparse.ArgumentParser:
    from internlm2_jax.agent.plugins import BUILTIN_PLUGINS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question", nargs="?", help="the user's question")
    p.add_argument("--server", help="OpenAI-compatible base URL (instead of --hf / --checkpoint)")
    if server:
        p.add_argument("--model", default=None, help="model id on the server (default: its first)")
        p.add_argument("--api-key", default=os.environ.get("INTERNLM2_JAX_API_KEY", "none"))
    else:
        add_model_args(p)
    p.add_argument("--plugin", action="append", default=[], choices=sorted(BUILTIN_PLUGINS),
                   help="offer a built-in plugin (repeatable)")
    p.add_argument("--interpreter", action="store_true", help="offer the sandboxed Python interpreter")
    p.add_argument("--file", action="append", default=[], help="a file for the interpreter (repeatable)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per interpreter cell")
    p.add_argument("--memory-mb", type=int, default=1024, help="address space per interpreter cell")
    p.add_argument("--max-turns", type=int, default=4, help="model turns before giving up")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per model turn")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--show-system", action="store_true", help="also print the system turns (tool lists)")
    p.add_argument("--eval", default=None, help="task JSONL (question/answer records): accuracy with and without tools")
    return p


def show(messages: Sequence[dict[str, Any]], *, system: bool) -> None:
    """Prints each turn as InternLM2 renders it."""
    from internlm2_jax.chat_format import render_message

    for n, msg in enumerate(messages):
        if msg["role"] == "system" and not system:
            continue
        header, body = render_message(msg, index=n)
        print(f"<|im_start|>{header}\n{body}<|im_end|>", flush=True)


def make_backend(args: argparse.Namespace, p: argparse.ArgumentParser) -> Any:
    from internlm2_jax.agent.backends import LocalBackend, OpenAIBackend

    if args.server:
        return OpenAIBackend(args.server, model=args.model, api_key=args.api_key, max_tokens=args.max_new_tokens,
                             temperature=args.temperature)
    tokenizer, config, params = load_checked(args, tokenizer_path(p, args))
    return LocalBackend(config, params, tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature)


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--server")
    server = pre.parse_known_args(argv)[0].server is not None
    p = build_parser(server)
    args = p.parse_args(argv)
    if (args.question is None) == (args.eval is None):
        p.error("give a question or --eval FILE (one of them)")
    if server and (args.interpreter or args.file):
        p.error("--interpreter/--file need the in-process model (--hf or --checkpoint): the OpenAI chat API "
                "has no interpreter turns")
    for path in args.file:
        if not os.path.isfile(path):
            raise InputDataError(f"--file {path}: no such file")
    if args.max_turns < 1 or args.max_new_tokens < 1 or args.timeout <= 0:
        raise ConfigValueError("--max-turns, --max-new-tokens and --timeout must be positive")

    from internlm2_jax.agent.loop import Agent
    from internlm2_jax.agent.plugins import BUILTIN_PLUGINS
    from internlm2_jax.agent.sandbox import SandboxLimits

    backend = make_backend(args, p)
    plugins = [BUILTIN_PLUGINS[name] for name in dict.fromkeys(args.plugin)]
    limits = (SandboxLimits(timeout_s=args.timeout, memory_mb=args.memory_mb)
              if args.interpreter or args.file else None)
    agent = Agent(backend, plugins, limits, max_turns=args.max_turns, system=args.system)
    if args.eval:
        from internlm2_jax.agent.tool_task import evaluate, read_questions

        try:
            pairs = read_questions(args.eval)
        except (OSError, ValueError, KeyError) as e:
            raise InputDataError(f"--eval {args.eval}: {e}") from e
        with_tools = evaluate(agent, pairs)
        without = evaluate(Agent(backend, max_turns=args.max_turns, system=args.system), pairs)
        print(json.dumps({"with_tools": with_tools, "without_tools": without}))
        say(f"accuracy through the agent loop on {len(pairs)} questions: {with_tools['accuracy']:.3f} with "
            f"{', '.join(p.name for p in plugins) or 'no tools'} (a tool ran in {with_tools['tool_use']:.0%}), "
            f"{without['accuracy']:.3f} without tools")
        return 0
    run = agent.run(args.question, args.file)
    show(run.messages, system=args.show_system)
    print(json.dumps({"answer": run.answer, "tool_calls": run.tool_calls, "tool_errors": run.tool_errors,
                      "stop": run.stop}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
