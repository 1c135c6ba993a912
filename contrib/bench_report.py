#!/usr/bin/env python3
"""How long --db-report takes on a store of a million triplets.

Usage (from the repository root)::

    python3 contrib/bench_report.py                  # sqlite and PostgreSQL
    python3 contrib/bench_report.py --triplets 100000 --runs 1
    python3 contrib/bench_report.py --index          # and with an index

Each store is filled as a busy site's would be after max_grey (35 days):
``--triplets`` rows (a million), nine in ten passed (first seen evenly
over 35 days, each after a wait of 5 minutes to 7 hours, one in ten with
no wait known, as rows of an earlier version), the rest grey and first
seen within max_defer_time (25000 s); the purge's tallies of the
triplets never retried over the 35 days, as many an hour as nine in ten
of the grey rows' hours; the client parts
drawn from 60,000 IPv4 networks, 6,000 IPv6 networks, 6,000 name keys
and the unknown client (a few big senders far more often); 30,000
clients of the auto-whitelist.  Rows are written in bulk (not through
decisions: a million decisions take long), with the schema smtpproxy
makes.

Measured, the median of ``--runs``: StoreBase.report() on a read-only
store (a new connection each time, as the command has) for --since 1d,
7d and 35d, and the whole command ``smtpproxy --db-report`` (the
interpreter's start included) with its text and with --json; then the
purge that finds the grey rows expired, with its tally (the grey rows'
count per hour, then the delete).  With ``--index``, the same again
after CREATE INDEX on first_seen, to see whether the report needs one.

sqlite: a file on local disk.  PostgreSQL: a private cluster (tests/pg.py:
initdb and postgres in a temporary directory, as user nobody when root;
shared_buffers 128MB), reached over TCP on 127.0.0.1; needs PostgreSQL's
server programs and a driver, else its rows say why.
"""

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import smtpproxy  # noqa: E402

HOUR, DAY = 3600, 86400
MAX_GREY, MAX_DEFER = 35 * DAY, 25000


def client_parts(rng):
    """A function drawing a key's client part, some far more often."""
    ipv4 = ["%d.%d.%d.0/24" % (rng.randrange(1, 224), rng.randrange(256),
                               rng.randrange(256)) for _ in range(60000)]
    ipv6 = ["2001:db8:%x:%x::/64" % (rng.randrange(65536),
                                     rng.randrange(65536))
            for _ in range(6000)]
    names = ["out%d.example%d.com" % (n, n % 977) for n in range(6000)]

    def draw():
        roll = rng.random()
        pool = (ipv4 if roll < 0.8 else ipv6 if roll < 0.9 else names
                if roll < 0.999 else ["unknown"])
        # The first twenty of each pool send a third of their kind's.
        if rng.random() < 0.33:
            return pool[rng.randrange(min(20, len(pool)))]
        return pool[rng.randrange(len(pool))]
    return draw


def rows(count, now, seed=1):
    """The triplets (key, first_seen, last_seen, passed, passes, delay)
    and the tallies (hour, triplets), as described above."""
    rng = random.Random(seed)
    draw = client_parts(rng)
    triplets = []
    for n in range(count):
        client = draw()
        key = "%s s%d@example.net r%d@example.org" % (client, n, n % 5000)
        if n % 10 == 9:                 # grey, in its window
            first = now - rng.uniform(0, MAX_DEFER)
            triplets.append((key, first, first, None, 0, None))
            continue
        delay = rng.uniform(300, MAX_DEFER)
        first = now - rng.uniform(delay, MAX_GREY)
        passed = first + delay + rng.uniform(0, now - first - delay)
        triplets.append((key, first, passed, passed, rng.randrange(1, 6),
                         None if n % 10 == 8 else delay))
    # As many never retried an hour as the grey rows show (nine in ten
    # of them).
    per_hour = max(1, int(0.9 * (count // 10) * HOUR / MAX_DEFER))
    tallies = [(int(hour), per_hour) for hour in range(
        int((now - MAX_GREY) // HOUR * HOUR), int(now), HOUR)]
    clients = [(draw(), rng.randrange(1, 10), now - rng.uniform(0, MAX_GREY))
               for _ in range(30000)]
    return triplets, tallies, clients


class Settings(object):
    too_soon, min_defer_time, max_defer_time = 180, 300, MAX_DEFER
    max_grey, auto_whitelist_clients = MAX_GREY, 5
    greylist_db_timeout, greylist_cache_time = 60, 60


def fill_sqlite(path, data):
    import sqlite3
    smtpproxy.GreylistStore(path).close()       # the tables
    triplets, tallies, clients = data
    connection = sqlite3.connect(path)
    with connection:
        connection.executemany("INSERT OR REPLACE INTO triplets (key,"
                               " first_seen, last_seen, passed, passes,"
                               " delay) VALUES (?, ?, ?, ?, ?, ?)", triplets)
        connection.executemany("INSERT INTO expired VALUES (?, ?)", tallies)
        connection.executemany("INSERT OR REPLACE INTO clients"
                               " VALUES (?, ?, ?)", clients)
    connection.execute("ANALYZE")
    connection.close()


def fill_postgresql(uri, data):
    store = smtpproxy.PostgreSQLStore(uri, Settings)
    store.stats()                               # the tables
    store.close()
    module = smtpproxy.postgresql_driver()
    connection = module.connect(uri)
    triplets, tallies, clients = data

    def text(table):
        return "".join("\t".join("\\N" if value is None else str(value)
                                 for value in row) + "\n" for row in table)
    cursor = connection.cursor()
    for table, columns, content in (
            ("smtpproxy_triplets", "key, first_seen, last_seen, passed,"
             " passes, delay", text(triplets)),
            ("smtpproxy_expired", "hour, triplets", text(tallies)),
            ("smtpproxy_clients", "network, passes, last_seen",
             text(dict((row[0], row) for row in clients).values()))):
        sql = "COPY %s (%s) FROM STDIN" % (table, columns)
        if module.__name__ == "psycopg":
            with cursor.copy(sql) as copy:
                copy.write(content)
        else:
            cursor.copy_expert(sql, io.StringIO(content))
    connection.commit()
    connection.autocommit = True
    cursor.execute("VACUUM ANALYZE")
    connection.close()


def timed(function, runs):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def command(location, *args):
    subprocess.run(
        [sys.executable, os.path.join(REPO, "smtpproxy.py"), "--config",
         os.devnull, "-o", "greylist_db=" + location, "--db-report"]
        + list(args), stdout=subprocess.DEVNULL, check=True,
        stderr=subprocess.DEVNULL)


def measure(name, location, runs, results):
    def report(period):
        store = smtpproxy.open_store(location, Settings, read_only=True)
        try:
            return store.report(period)
        finally:
            store.close()
    for since in ("1d", "7d", "35d"):
        seconds = timed(lambda: report(smtpproxy.parse_duration(since)),
                        runs)
        results.append((name, "report() --since " + since, seconds))
    results.append((name, "smtpproxy --db-report",
                    timed(lambda: command(location), runs)))
    results.append((name, "smtpproxy --db-report --json",
                    timed(lambda: command(location, "--json"), runs)))
    figures = report(7 * DAY)
    return figures


def purge(name, location, results):
    # The grey rows' window closes: the purge tallies and deletes them.
    store = smtpproxy.open_store(location, Settings)
    if kind_of(location) == "postgresql":
        store.database_clock = False
    start = time.perf_counter()
    gone = store.purge(time.time() + MAX_DEFER + HOUR)
    results.append((name, "purge of %d expired (with the tally)" % gone,
                    time.perf_counter() - start))
    store.close()


def kind_of(location):
    return "postgresql" if smtpproxy.is_database_uri(location) else "sqlite"


def index(location):
    if kind_of(location) == "sqlite":
        import sqlite3
        connection = sqlite3.connect(location)
        connection.execute("CREATE INDEX IF NOT EXISTS triplets_first_seen"
                           " ON triplets (first_seen)")
        connection.execute("ANALYZE")
        connection.close()
    else:
        connection = smtpproxy.postgresql_driver().connect(location)
        connection.autocommit = True
        cursor = connection.cursor()
        cursor.execute("CREATE INDEX IF NOT EXISTS triplets_first_seen"
                       " ON smtpproxy_triplets (first_seen)")
        cursor.execute("ANALYZE")
        connection.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--triplets", type=int, default=1000000,
                        help="rows of the store (a million)")
    parser.add_argument("--runs", type=int, default=3,
                        help="runs of each measure, the median shown (3)")
    parser.add_argument("--index", action="store_true",
                        help="measure again with an index on first_seen")
    parser.add_argument("--no-postgresql", action="store_true")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.join(REPO, "tests"))
    workdir = tempfile.mkdtemp(prefix="bench-report-")
    now = time.time()
    start = time.perf_counter()
    data = rows(args.triplets, now)
    print("made %d triplets in %.1f s" % (len(data[0]),
                                           time.perf_counter() - start))
    results, cluster = [], None
    locations = [("sqlite", os.path.join(workdir, "greylist.db"))]
    try:
        if not args.no_postgresql:
            try:
                import pg
                cluster = pg.PostgreSQL(settings={"shared_buffers": "128MB"})
                locations.append(("postgresql", cluster.database()))
            except (RuntimeError, OSError, ImportError) as error:
                results.append(("postgresql: %s" % error,))
        for name, location in locations:
            start = time.perf_counter()
            (fill_sqlite if name == "sqlite" else fill_postgresql)(
                location, data)
            print("%s filled in %.1f s" % (name,
                                           time.perf_counter() - start))
            figures = measure(name, location, args.runs, results)
            print("%s, --since 7d: %s" % (name, json.dumps(
                [figures["triplets"], figures["wait"]])))
            if args.index:
                index(location)
                measure(name + " +index", location, args.runs, results)
            purge(name, location, results)
    finally:
        if cluster is not None:
            cluster.close()
        for name in os.listdir(workdir):
            os.unlink(os.path.join(workdir, name))
        os.rmdir(workdir)
    print("--db-report on %d triplets; Python %s; median of %d runs"
          % (args.triplets, sys.version.split()[0], args.runs))
    for row in results:
        if len(row) == 1:
            print(row[0])
        else:
            print("%-20s %-40s %8.3f s" % row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
