#!/usr/bin/env python3
"""Runs the client's tests (unittest; no pytest needed) and ends with one summary line for CI:

    python: N passed, N failed, N skipped

Usage: /usr/bin/python3 clients/python/run_tests.py [-k PATTERN] [-q]
Failures caused by the service are listed with the request and the service's answer.
"""

import argparse
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-k", dest="patterns", action="append", help="only tests whose name contains this")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args()
    tests_dir = os.path.join(HERE, "tests")
    sys.path[:0] = [tests_dir, HERE]
    loader = unittest.TestLoader()
    if args.patterns:
        loader.testNamePatterns = [f"*{p}*" for p in args.patterns]
    suite = loader.discover(tests_dir, top_level_dir=tests_dir)
    result = unittest.TextTestRunner(verbosity=1 if args.quiet else 2, stream=sys.stdout).run(suite)
    failed = result.failures + result.errors + [(t, "unexpected success") for t in result.unexpectedSuccesses]
    if failed:
        print("\nFailed tests (first line of each error):")
        for test, trace in failed:
            last = [line for line in str(trace).strip().splitlines() if line and not line.startswith(" ")]
            print(f"  {test.id()}: {last[-1] if last else trace}")
    skipped = len(result.skipped)
    passed = result.testsRun - len(failed) - skipped - len(result.expectedFailures)
    print(f"python: {passed} passed, {len(failed)} failed, {skipped} skipped")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
