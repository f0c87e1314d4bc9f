"""Run the whole test suite: each test file in a unittest process of its own, a few at a time.

    python3 tests/run.py               # every tests/test_*.py, 3 files at once
    python3 tests/run.py -j 1 test_pop.py test_smtp.py

Most of a test's time is spent waiting (for a server to start, a timeout
to pass, a reply to come back), not computing, so three files at once on
two CPUs take about a third of the time of one after the other (measured:
see README.md).  The files are independent: each starts its own servers
on free ports in mail roots of its own.  Each file's unittest output is
printed whole when it ends, and the last line counts the tests of all of
them.  Exits 1 if any test failed, errored, or a file ran no test.
"""

import argparse
import os
import re
import subprocess
import sys
import threading
import time

TESTS = os.path.dirname(os.path.abspath(__file__))
RAN = re.compile(r"^Ran (\d+) tests? in ", re.MULTILINE)
OUTCOME = re.compile(r"^(OK|FAILED)(?: \((.*)\))?$", re.MULTILINE)


def run_file(name, results, slots):
    """Run one test file under unittest; keep (name, exit code, output, seconds) in results."""
    with slots:
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "unittest", "-v", name[:-3]], cwd=TESTS,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        results.append((name, done.returncode, done.stdout.decode("utf-8", "replace"),
                        time.monotonic() - started))


def counts(output):
    """(tests run, failed, errors, skipped) as one unittest process reported them."""
    ran = RAN.search(output)
    outcome = OUTCOME.search(output)
    details = dict(part.split("=") for part in (outcome.group(2) or "").split(", ") if "=" in part) \
        if outcome else {}
    return (int(ran.group(1)) if ran else 0, int(details.get("failures", 0)), int(details.get("errors", 0)),
            int(details.get("skipped", 0)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-j", "--jobs", type=int, default=3, help="test files run at once (default: 3)")
    parser.add_argument("files", nargs="*", help="test files (default: every tests/test_*.py)")
    args = parser.parse_args()
    names = args.files or [n for n in os.listdir(TESTS) if n.startswith("test_") and n.endswith(".py")]
    # The longest first (by size, a fair guess of time), so that no long file starts last.
    names.sort(key=lambda n: -os.path.getsize(os.path.join(TESTS, n)))
    results, slots = [], threading.Semaphore(max(1, args.jobs))
    threads = [threading.Thread(target=run_file, args=(name, results, slots)) for name in names]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = [0, 0, 0, 0]
    bad = []
    for name, code, output, seconds in sorted(results):
        print("===== %s (%.1f s)" % (name, seconds))
        print(output.rstrip())
        found = counts(output)
        total = [a + b for a, b in zip(total, found)]
        if code != 0 or found[0] == 0:
            bad.append(name)
    run, failed, errors, skipped = total
    print("\n%d test files in %.1f s, %d at once%s" % (len(names), time.monotonic() - started, args.jobs,
                                                       "; not passing: " + ", ".join(bad) if bad else ""))
    print("%d passed, %d failed, %d skipped" % (run - failed - errors - skipped, failed + errors, skipped))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
