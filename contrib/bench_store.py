#!/usr/bin/env python3
"""Greylisting decisions per second, and their latency, on each store.

Usage (from the repository root)::

    python3 contrib/bench_store.py              # about a minute
    python3 contrib/bench_store.py --quick      # some seconds

Measured: GreylistStore.check() (one greylisting decision: the triplet
read, the timing table, the change written) called by ``--threads``
threads in each of 1 and 2 processes, as the sessions of one or two proxy
processes (two MX hosts) call it, on

- sqlite: one file on local disk, shared by the processes;
- PostgreSQL: a private cluster (tests/pg.py: initdb and postgres in a
  temporary directory, as user nobody when root), with its durability on
  (fsync, synchronous_commit: as a site runs it), reached over TCP on
  127.0.0.1, with each driver installed (psycopg 3, psycopg2).

Each thread decides ``--decisions`` times on its own 20 triplets (a
sender to 20 recipients), half of them passed beforehand: the first
decisions are first sightings (an insert), then retries of grey triplets
(read only) and passes (an update), in turn.  Printed per store and
process count: decisions per second (all processes together, from the
moment every process is ready), the median and 99th percentile latency
of one decision in milliseconds.  Processes start, connect and make the
tables before the clock starts.

Needs PostgreSQL's server programs (Debian package postgresql) and a
driver (pip install psycopg2-binary or 'psycopg[binary]') for the
PostgreSQL rows; without them those rows say why, and the sqlite rows
still run.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r"""
import json, sys, threading, time
sys.path.insert(0, %(repo)r)
import smtpproxy
location, driver, process, threads, decisions = sys.argv[1:6]
threads, decisions = int(threads), int(decisions)
if driver == "sqlite":
    store = smtpproxy.GreylistStore(location)
else:
    store = type("S", (smtpproxy.PostgreSQLStore,), {"driver": driver})(
        location)

def key(thread, n):
    return "192.0.2.0/24 s%%s.%%d@example.net r%%d@example.org" %% (
        process, thread, n %% 20)

for thread in range(threads):           # half the triplets passed
    for n in range(0, 20, 2):
        store.pass_key(key(thread, n), time.time())
latencies = [[] for _ in range(threads)]
go = threading.Event()

def session(thread):
    go.wait()
    mine = latencies[thread]
    for n in range(decisions):
        start = time.perf_counter()
        store.check(key(thread, n), time.time(), client="192.0.2.0/24")
        mine.append(time.perf_counter() - start)

workers = [threading.Thread(target=session, args=(t,))
           for t in range(threads)]
for worker in workers:
    worker.start()
print("ready", flush=True)
sys.stdin.readline()
go.set()
for worker in workers:
    worker.join()
print(json.dumps([x for mine in latencies for x in mine]), flush=True)
store.close()
"""


def run(location, driver, processes, threads, decisions):
    """Decisions per second, p50 ms, p99 ms of one configuration."""
    code = WORKER % {"repo": REPO}
    children = [subprocess.Popen(
        [sys.executable, "-c", code, location, driver, str(number),
         str(threads), str(decisions)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, universal_newlines=True)
        for number in range(processes)]
    for child in children:
        line = child.stdout.readline()
        if line != "ready\n":
            raise RuntimeError("worker failed: %r" % line)
    start = time.perf_counter()
    for child in children:
        child.stdin.write("go\n")
        child.stdin.flush()
    latencies = []
    for child in children:
        latencies.extend(json.loads(child.stdout.readline()))
    elapsed = time.perf_counter() - start
    for child in children:
        child.stdin.close()
        child.stdout.close()
        if child.wait():
            raise RuntimeError("worker exited with %d" % child.returncode)
    latencies.sort()
    return (len(latencies) / elapsed,
            1000 * statistics.median(latencies),
            1000 * latencies[int(len(latencies) * 0.99) - 1])


def drivers():
    found = []
    for name in ("psycopg", "psycopg2"):
        try:
            __import__(name)
            found.append(name)
        except ImportError:
            pass
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=25,
                        help="deciding threads per process (25)")
    parser.add_argument("--decisions", type=int, default=400,
                        help="decisions per thread (400)")
    parser.add_argument("--quick", action="store_true",
                        help="50 decisions per thread")
    args = parser.parse_args(argv)
    if args.quick:
        args.decisions = 50
    sys.path.insert(0, os.path.join(REPO, "tests"))
    workdir = tempfile.mkdtemp(prefix="bench-store-")
    rows = []
    cluster = None
    try:
        for processes in (1, 2):
            path = os.path.join(workdir, "store-%d.db" % processes)
            rows.append(("sqlite", processes) + run(
                path, "sqlite", processes, args.threads, args.decisions))
        names = drivers()
        if not names:
            rows.append(("postgresql: no driver installed (pip install "
                         "'psycopg[binary]' or psycopg2-binary)",))
        else:
            try:
                import pg
                cluster = pg.PostgreSQL(settings={
                    "fsync": "on", "synchronous_commit": "on",
                    "full_page_writes": "on", "shared_buffers": "128MB"})
            except (RuntimeError, OSError) as error:
                rows.append(("postgresql: %s" % error,))
            for name in names if cluster else ():
                for processes in (1, 2):
                    rows.append(("postgresql " + name, processes) + run(
                        cluster.database(), name, processes, args.threads,
                        args.decisions))
    finally:
        if cluster is not None:
            cluster.close()
    print("greylisting decisions: %d threads per process, %d decisions "
          "each; Python %s" % (args.threads, args.decisions,
                               sys.version.split()[0]))
    print("%-22s %9s %12s %8s %8s" % ("store", "processes", "decisions/s",
                                      "p50 ms", "p99 ms"))
    for row in rows:
        if len(row) == 1:
            print(row[0])
        else:
            print("%-22s %9d %12.0f %8.2f %8.2f" % row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
