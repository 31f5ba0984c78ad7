"""Floating-point operations of one gradient update of a training script, counted by torch's FlopCounterMode.

    python results/count_flops.py --updates 30 -- algorithms/bcq_continuous.py --total-steps 30 --eval-freq 30 ...

runs the script as `python <script> <its arguments>` would (as __main__, with its own command line), under
torch.utils.flop_counter.FlopCounterMode, and reads the counter after every optimizer step through torch's
global optimizer hook. An update's FLOPs are those counted between the end of the first update and the end of
the last one, divided by the updates in between, so the setup before the first update and the evaluation after
the last one are left out (where updates differ in their optimizer steps, as TD3's delayed actor, from the first
step to the last, within one actor step over the updates). It prints one JSON line:
{"flops_per_update": ..., "optimizer_steps": ...}. FlopCounterMode counts the matrix
products (mm, addmm, bmm, baddbmm, convolutions), where nearly all of the arithmetic of these networks is.
benchmark_speed.py uses it with our venv for our scripts and with the d3rlpy venv for results/d3rlpy_speed.py.
"""

import argparse
import contextlib
import io
import json
import runpy
import sys
from typing import NoReturn, Optional


class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag said in one line (argparse's own error prints the usage line before it)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}; see --help", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The flags, checked before the script runs: its run is what takes long."""
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, required=True, help="gradient updates the script will make (2 or more)")
    parser.add_argument(
        "--uneven",
        action="store_true",
        help="updates differ in their optimizer steps (one to two each, as TD3's delayed actor)",
    )
    parser.add_argument("script", help="the training script")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments (after --)")
    args = parser.parse_args(argv)
    if args.updates < 2:  # an update's FLOPs are measured between the first update and the last
        parser.error(f"argument --updates: must be at least 2, got {args.updates}")
    return args


def main() -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.utils.flop_counter import FlopCounterMode

    args = parse_args()
    script_args = args.script_args[1:] if args.script_args[:1] == ["--"] else args.script_args
    counter = FlopCounterMode(display=False)
    counts_after_step = []
    register_optimizer_step_post_hook(lambda optimizer, *_: counts_after_step.append(counter.get_total_flops()))
    sys.argv = [args.script, *script_args]
    with counter, contextlib.redirect_stdout(io.StringIO()):
        runpy.run_path(args.script, run_name="__main__")
    steps = len(counts_after_step)
    even = not args.uneven and steps % args.updates == 0
    if not (even or args.uneven and args.updates < steps < 2 * args.updates):
        hint = "" if args.uneven else ", and --uneven where updates differ in their steps"
        print(
            f"error: {steps} optimizer steps for {args.updates} updates; give --updates as the script's step "
            f"count{hint}",
            file=sys.stderr,
        )
        sys.exit(2)
    if even:
        steps_per_update = steps // args.updates
        flops = (counts_after_step[-1] - counts_after_step[steps_per_update - 1]) / (args.updates - 1)
    else:
        # From the first step to the last: updates - 1 whole updates and the rest of the first one, so the error is
        # at most one of the occasional steps (TD3's delayed actor) over updates - 1.
        flops = (counts_after_step[-1] - counts_after_step[0]) / (args.updates - 1)
    print(json.dumps({"flops_per_update": flops, "optimizer_steps": steps}))


if __name__ == "__main__":
    main()
