"""``python -m dipreg.selftest --device cuda|cpu --out DIR [--sizes real|tiny]``."""

from __future__ import annotations

import argparse
import sys

from dipreg.selftest.run import SIZES, run_selftest


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the check, print where the JSON went; exit code 1 when a parity check failed."""
    parser = argparse.ArgumentParser(prog="python -m dipreg.selftest", description=__doc__)
    parser.add_argument("--device", default="cuda", help="target device: cuda, cuda:INDEX or cpu (default: cuda)")
    parser.add_argument("--out", required=True, help="folder for selftest.json")
    parser.add_argument(
        "--sizes",
        choices=SIZES,
        default=None,
        help="timed model sizes: real = Qwen2.5-1.5B and -7B configs, tiny = a small Qwen2 (seconds on a CPU) "
        "(default: real on cuda, tiny on cpu)",
    )
    parser.add_argument(
        "--architectures",
        default=None,
        help="comma-separated model types for the parity part (default: every supported one)",
    )
    args = parser.parse_args(argv)
    archs = [a.strip() for a in args.architectures.split(",") if a.strip()] if args.architectures else None
    report = run_selftest(args.device, args.out, sizes=args.sizes, architectures=archs)
    print(f"wrote {report['path']}; parity {'ok' if report['parity_ok'] else 'FAILED'}")
    return 0 if report["parity_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
