"""Shared command line of the experiments: `--gin FILE` (repeatable), `--gin_param`, `--workdir`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


def parse_args(description: str, default_gin: Optional[str] = None,
               argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parses the common flags and applies the gin config; exits with one clear line on bad config."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--gin", action="append", default=[], help="gin config file (repeatable)")
    p.add_argument("--gin_param", action="append", default=[], help="gin binding, e.g. 'train.num_steps=10'")
    p.add_argument("--workdir", default=None, help="output dir (default runs/<config name>)")
    args = p.parse_args(argv)
    if not args.gin and default_gin:
        args.gin = [os.path.join(CONFIG_DIR, default_gin)]
    if not args.gin:
        p.error("at least one --gin FILE is required")
    if args.workdir is None:  # runs/<config folder>_<config name>, e.g. runs/pretrain_tiny
        folder = os.path.basename(os.path.dirname(os.path.abspath(args.gin[-1])))
        stem = os.path.splitext(os.path.basename(args.gin[-1]))[0]
        args.workdir = os.path.join("runs", stem if folder in ("", "configs") else f"{folder}_{stem}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from internlm2_jax.gin_setup import GinConfigError, parse_gin

    try:
        parse_gin(args.gin, args.gin_param)
    except GinConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    from internlm2_jax import distributed

    distributed.initialize()  # multi-host (env / SLURM / TPU pod); a no-op for one process
    return args
