"""Supervised fine-tuning: `python -m experiments.sft --gin experiments/configs/sft/tiny.gin [--show_mask N]`.

`--show_mask N` prints N training conversations with the trained (loss) spans in `[[...]]` and exits.
"""

from __future__ import annotations

import argparse
import json
import sys

from experiments.cli import entry_point, parse_args, say
from internlm2_jax.sft.train import sft_train


@entry_point
def main(argv=None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--show_mask", type=int, default=0, help="print N samples with masked spans and exit")
    extra, rest = pre.parse_known_args(argv)
    args = parse_args(__doc__, default_gin="sft/tiny.gin", argv=rest)
    last = sft_train(args.workdir, show_mask=extra.show_mask)
    if not extra.show_mask:
        print(json.dumps({"workdir": args.workdir, **last}))
        scores = ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k.startswith("eval_") and isinstance(v, float))
        say(f"SFT: {scores or 'no eval'}; {last.get('skipped_records', 0)} bad records skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
