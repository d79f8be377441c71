"""
Run pbroker's fuzz generators for longer than the test suite does.

    python tests/fuzz/run.py --seconds 60 --seed 1

The generators are those of ``tests/test_fuzz.py``: random bytes and mutated jelly encodings
through the banana decoder and the unjellier, mutated s-expressions through the unjellier, and
endless streams against the decoder's limits. They run in rounds of small batches, round-robin,
until the time or the input count runs out; batch ``n`` of generator ``g`` draws from
``random.Random(f"{seed}:{g}:{n}")``, so a run is reproducible from its seed.

Every distinct unexpected outcome (an exception other than ``BananaError`` or ``InsecureJelly``,
a hang, too much buffered data, a module imported because the input named it) is reported with
its input, shrunk when there is time, and the exit status is 1. With none, it is 0.

Never add ``DummySecurityOptions`` here: it imports whatever module the input names.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import warnings
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests import test_fuzz as fuzz  # noqa: E402  (needs the repository on the path)


def parseArguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fuzz pbroker's banana decoder and unjellier.",
    )
    parser.add_argument(
        "--seconds", type=float, default=60.0, help="how long to fuzz (default: 60)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="the seed of the run (default: a random one, printed so the run can be repeated)",
    )
    parser.add_argument(
        "--max-inputs",
        type=int,
        default=50_000_000,
        help="stop after about this many inputs (default: 50,000,000)",
    )
    parser.add_argument(
        "--max-failures",
        type=int,
        default=50,
        help="stop after this many distinct failures (default: 50)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=0.5,
        help="seconds one input may run before it counts as a hang (default: 0.5)",
    )
    parser.add_argument(
        "--minimize-seconds",
        type=float,
        default=3.0,
        help="time to spend shrinking each failing input (default: 3; 0 to skip)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(fuzz.GENERATORS),
        help="run only this generator (may be repeated)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress lines, only the final report"
    )
    return parser.parse_args(argv)


def fuzzFor(args: argparse.Namespace, run: fuzz.FuzzRun) -> dict[str, tuple[int, float]]:
    """
    Run the generators round-robin until time, inputs or failures run out.

    :returns: generator name -> (inputs tried, seconds spent, not counting shrinking).
    """
    names = args.only or list(fuzz.GENERATORS)
    done = {name: (0, 0.0) for name in names}
    stopAt = time.monotonic() + args.seconds
    nextProgress = time.monotonic() + 10
    batch = 0
    while not run.stopped and run.inputs < args.max_inputs:
        for name in names:
            now = time.monotonic()
            if now >= stopAt or run.stopped or run.inputs >= args.max_inputs:
                return done
            generator, size = fuzz.GENERATORS[name]
            run.context = f"--seed {args.seed}, generator {name}, batch {batch}"
            # Never spend much longer shrinking than the run has left.
            run.minimizeSeconds = min(args.minimize_seconds, max(1.0, stopAt - now))
            before, shrinking = run.inputs, run.shrinkSeconds
            started = time.perf_counter()
            generator(random.Random(f"{args.seed}:{name}:{batch}"), size, run)
            spent = time.perf_counter() - started - (run.shrinkSeconds - shrinking)
            done[name] = (done[name][0] + run.inputs - before, done[name][1] + spent)
        batch += 1
        if not args.quiet and time.monotonic() >= nextProgress:
            nextProgress += 10
            print(
                f"  ... {run.inputs} inputs, {len(run.failures)} failure(s)",
                file=sys.stderr,
                flush=True,
            )
    return done


def main(argv: list[str] | None = None) -> int:
    args = parseArguments(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**32)
    run = fuzz.FuzzRun(
        maxFailures=args.max_failures,
        timeout=args.timeout,
        minimizeSeconds=args.minimize_seconds,
    )
    if not args.quiet:
        print(f"fuzzing for {args.seconds:g} s with --seed {args.seed}", file=sys.stderr)
    modulesBefore = set(sys.modules)
    started = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        done = fuzzFor(args, run)
    elapsed = time.monotonic() - started
    imported = fuzz.importedCanaries(modulesBefore)

    fuzzing = max(elapsed - run.shrinkSeconds, 1e-9)
    print(
        f"seed {args.seed}: {run.inputs} inputs in {elapsed:.1f} s "
        f"({run.inputs / fuzzing:.0f}/s, not counting {run.shrinkSeconds:.1f} s of shrinking)"
    )
    for name, (tried, spent) in done.items():
        rate = tried / spent if spent else 0.0
        print(f"  {name:16} {tried:9} inputs  {rate:8.0f}/s")
    print(
        f"  decoder: {run.decodeOk} inputs decoded, {run.decodeErrors} refused "
        f"({', '.join(f'{kind} {count}' for kind, count in run.limitErrors.most_common())})"
    )
    print(
        f"  unjelly: {run.expressions} expressions; {run.unjellied} unjellied, "
        f"{run.refused} refused (counting each of {len(fuzz.TASTERS)} tasters)"
    )
    failed = bool(run.failures or imported)
    if imported:
        print(f"\nMODULES IMPORTED BECAUSE THE INPUT NAMED THEM: {', '.join(imported)}")
    if run.failures:
        print(
            f"\n{len(run.failures)} distinct unexpected outcome(s)"
            f" (and {run.duplicates} more like them):\n"
        )
        print(run.report())
    print("\nFAIL" if failed else "\nOK: only BananaError and InsecureJelly were raised")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
