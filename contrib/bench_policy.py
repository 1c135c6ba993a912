#!/usr/bin/env python3
"""Policy requests per second, and their latency, of smtpproxy's policy
service (check_policy_service), as Postfix's smtpd processes ask it.

Usage (from the repository root)::

    python3 contrib/bench_policy.py                 # about half a minute
    python3 contrib/bench_policy.py --quick         # some seconds
    python3 contrib/bench_policy.py --postgresql    # the store in PostgreSQL

smtpproxy.py runs as its own process with the policy service alone
(``smtp_proxy = no``, ``policy_listen`` on 127.0.0.1, greylisting
example.org, keyed by network, no DNS), on an sqlite store in a temporary
directory, or with ``--postgresql`` on a private cluster (tests/pg.py).
``--connections`` threads (20, as many smtpd processes) each keep one
connection and send ``--requests`` RCPT requests on it, one after the
other, as Postfix does, in two runs:

- new triplets: a sender never seen, every time (the store inserts; the
  answer is DEFER_IF_PERMIT);
- known triplets: one of 20 triplets per connection that passed before
  the run (the store renews the pass; the answer is DUNNO).

Printed for each: requests per second (all connections together) and the
median and 99th percentile latency of one request, in milliseconds, from
the request's first byte sent to its answer's last byte received.  Every
answer is checked; a wrong one fails the run (exit status 1).

``--burst N[,N...]`` measures instead what a busy Postfix does when its
smtpd processes start: N connections opened at the same instant (threads
released together), each sending one request (a new triplet) and keeping
its connection open until all have their answer.  Printed for each N: how
many were answered, how many closed or failed, the slowest connect() and
the slowest answer, in milliseconds from the release::

    python3 contrib/bench_policy.py --burst 100,500
    python3 contrib/bench_policy.py --burst 100,500 --server 127.0.0.1:10023

``--server`` asks a service already running there (a postgrey, say)
instead of starting smtpproxy; any ``action=`` answer counts.
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

import smtpproxy  # noqa: E402
from helpers import free_port  # noqa: E402

DEFER = b"action=DEFER_IF_PERMIT 4.7.1 Greylisted, please try again later\n\n"
DUNNO = b"action=DUNNO\n\n"


def request(sender, recipient):
    return ("request=smtpd_access_policy\nprotocol_state=RCPT\n"
            "protocol_name=ESMTP\nclient_address=192.0.2.7\n"
            "client_name=unknown\nreverse_client_name=unknown\n"
            "helo_name=client.example.net\nsender=%s\nrecipient=%s\n"
            "instance=1.2.3\nqueue_id=\nsize=0\n\n"
            % (sender, recipient)).encode()


def connection(port, requests, expected, latencies, errors):
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    mine = []
    try:
        for data in requests:
            start = time.perf_counter()
            sock.sendall(data)
            answer = b""
            while not answer.endswith(b"\n\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    raise OSError("closed")
                answer += chunk
            mine.append(time.perf_counter() - start)
            if answer != expected:
                errors.append(answer)
                return
    except OSError as error:
        errors.append(repr(error))
    finally:
        sock.close()
        latencies.extend(mine)


def burst(port, count, expected, tag):
    """``count`` connections released at the same instant, one request
    each: (answered, closed, slowest connect ms, slowest answer ms)."""
    barrier = threading.Barrier(count + 1)
    lock = threading.Lock()
    results = {"answered": 0, "closed": 0, "connect": 0.0, "answer": 0.0,
               "wrong": []}
    socks = []

    def one(number):
        data = request("burst%s%s@example.net" % (tag, _letters(number)),
                       "r%d@example.org" % (number % 20))
        barrier.wait()
        start = time.perf_counter()
        sock = None
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=60)
            connected = time.perf_counter() - start
            sock.sendall(data)
            answer = b""
            while not answer.endswith(b"\n\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    raise OSError("closed")
                answer += chunk
            answered = time.perf_counter() - start
            with lock:
                results["answered"] += 1
                results["connect"] = max(results["connect"], connected)
                results["answer"] = max(results["answer"], answered)
                if expected is None and not answer.startswith(b"action="):
                    results["wrong"].append(answer)
                elif expected is not None and answer != expected:
                    results["wrong"].append(answer)
                socks.append(sock)
            sock = None
        except OSError:
            with lock:
                results["closed"] += 1
        finally:
            if sock is not None:
                sock.close()

    threads = [threading.Thread(target=one, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    barrier.wait()
    for thread in threads:
        thread.join()
    for sock in socks:
        sock.close()
    if results["wrong"]:
        raise RuntimeError("wrong answers: %r" % results["wrong"][:3])
    return (results["answered"], results["closed"],
            1000 * results["connect"], 1000 * results["answer"])


def run(port, batches, expected):
    latencies, errors = [], []
    threads = [threading.Thread(target=connection, args=(
        port, batch, expected, latencies, errors)) for batch in batches]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError("wrong answers: %r" % errors[:3])
    latencies.sort()
    return (len(latencies) / elapsed, 1000 * statistics.median(latencies),
            1000 * latencies[int(len(latencies) * 0.99) - 1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--requests", type=int, default=500,
                        help="requests per connection and run (500)")
    parser.add_argument("--quick", action="store_true",
                        help="50 requests per connection")
    parser.add_argument("--postgresql", action="store_true",
                        help="the store in a private PostgreSQL cluster")
    parser.add_argument("--burst", metavar="N[,N...]",
                        help="N connections at the same instant, one "
                        "request each (instead of the runs above)")
    parser.add_argument("--server", metavar="HOST:PORT",
                        help="ask the service running there (--burst)")
    args = parser.parse_args(argv)
    if args.burst:
        return main_burst(args)
    if args.quick:
        args.requests = 50
    workdir = tempfile.mkdtemp(prefix="bench-policy-")
    cluster = process = None
    try:
        if args.postgresql:
            import pg
            cluster = pg.PostgreSQL(settings={"fsync": "on"})
            store = cluster.database()
        else:
            store = os.path.join(workdir, "greylist.db")
        recipients = ["r%d@example.org" % n for n in range(20)]
        # The known triplets passed before the run.
        known = smtpproxy.open_store(store)
        for number in range(args.connections):
            for recipient in recipients:
                known.pass_key("192.0.2.0/24 known%s@example.net %s"
                               % (chr(97 + number % 26) * (1 + number // 26),
                                  recipient), time.time())
        known.close()
        port = free_port()
        process = start(workdir, store, port, args.connections + 10)
        # Digits in senders are normalised away: they differ in letters.
        new = [[request("new%s%s@example.net" % (
            chr(97 + c % 26) * (1 + c // 26), _letters(n)),
            recipients[n % 20]) for n in range(args.requests)]
            for c in range(args.connections)]
        passed = [[request("known%s@example.net" % (
            chr(97 + c % 26) * (1 + c // 26)), recipients[n % 20])
            for n in range(args.requests)] for c in range(args.connections)]
        rows = [("new triplets",) + run(port, new, DEFER),
                ("known triplets",) + run(port, passed, DUNNO)]
    finally:
        if process is not None:
            process.terminate()
            process.wait(20)
        if cluster is not None:
            cluster.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print("policy service: %d connections, %d requests each per run, store "
          "%s; Python %s" % (args.connections, args.requests,
                             "PostgreSQL" if args.postgresql else "sqlite",
                             sys.version.split()[0]))
    print("%-16s %12s %8s %8s" % ("requests", "requests/s", "p50 ms",
                                  "p99 ms"))
    for row in rows:
        print("%-16s %12.0f %8.2f %8.2f" % row)
    return 0


def main_burst(args):
    counts = [int(count) for count in args.burst.split(",")]
    workdir = tempfile.mkdtemp(prefix="bench-policy-")
    process = None
    rows = []
    try:
        if args.server:
            port = int(args.server.rpartition(":")[2])
            expected = None
            what = "the service on %s" % args.server
        else:
            port = free_port()
            expected = DEFER
            process = start(workdir, os.path.join(workdir, "greylist.db"),
                            port, None)
            what = "smtpproxy (its defaults: policy_max_connections, " \
                   "policy_backlog)"
        for run_number, count in enumerate(counts):
            rows.append((count,) + burst(port, count, expected,
                                         _letters(run_number)))
    finally:
        if process is not None:
            process.terminate()
            process.wait(20)
        shutil.rmtree(workdir, ignore_errors=True)
    print("policy service: connections at the same instant, one request "
          "each; %s; Python %s" % (what, sys.version.split()[0]))
    print("%11s %9s %7s %11s %10s" % ("connections", "answered", "closed",
                                      "connect ms", "answer ms"))
    for row in rows:
        print("%11d %9d %7d %11.0f %10.0f" % row)
    return 0


def start(workdir, store, port, max_connections):
    """smtpproxy.py as its own process, the policy service alone on
    ``port``; its defaults for the limits if ``max_connections`` is
    None."""
    config = os.path.join(workdir, "smtpproxy.conf")
    with open(config, "w") as stream:
        stream.write("smtp_proxy = no\npolicy_listen = 127.0.0.1:%d\n"
                     "allowed_domains:\n    example.org\n"
                     "allowed_senders:\nclient_key = network\n"
                     "greylist_db = %s\ngreylist_log = %s\n%s%s"
                     % (port, store, os.path.join(workdir, "g.log"),
                        "policy_max_connections = %d\n" % max_connections
                        if max_connections else "",
                        "run_as_root = yes\n" if os.geteuid() == 0
                        else ""))
    process = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "smtpproxy.py"), "--config",
         config], stderr=open(os.path.join(workdir, "stderr"), "wb"),
        cwd=workdir)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("the service did not start")
            time.sleep(0.05)


def _letters(number):
    """``number`` written in letters (a sender's digits are normalised)."""
    text = ""
    while True:
        number, digit = divmod(number, 26)
        text = chr(97 + digit) + text
        if not number:
            return text


if __name__ == "__main__":
    sys.exit(main())
