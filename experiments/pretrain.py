"""Pretraining: `python -m experiments.pretrain --gin experiments/configs/pretrain/tiny.gin`."""

from __future__ import annotations

import json
import sys

from experiments.cli import entry_point, parse_args, say
from internlm2_jax.train.pretraining import train


@entry_point
def main(argv=None) -> int:
    args = parse_args(__doc__, default_gin="pretrain/tiny.gin", argv=argv)
    last = train(args.workdir)
    print(json.dumps({"workdir": args.workdir, **last}))
    if "eval_loss" in last:
        say(f"pretraining: eval loss {last['eval_loss']:.3f} (ppl {last['eval_ppl']:.1f}), train loss "
            f"{last.get('loss', float('nan')):.3f}; {last.get('skipped_records', 0)} bad records skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
