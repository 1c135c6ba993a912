#!/usr/bin/env python3
"""Hostile load against smtpproxy, measured from outside: the long cases
of the hostile harness (tests/test_hostile.py has the fast ones).

Usage (by hand; Linux: it binds clients to 127.0.0.2 ... and reads /proc)::

    python3 contrib/hostile.py greylisted [--sessions 1500] [--parallel 20]
    python3 contrib/hostile.py slowloris [--clients 200] [--timeout 5]
    python3 contrib/hostile.py rcptflood [--rcpts 5000] [--connections 1]
                                         [-o KEY=VALUE ...]

Each scenario starts smtpproxy.py from its command line (the default
class, greylisting for example.org, a store in a temporary directory) in
front of a sink of its own, runs the load, and prints the proxy's open
descriptors and threads (its master's and workers' together) before, at
the peak and after, from /proc.

greylisted  many short greylisted sessions (EHLO, MAIL, RCPT: 451 4.7.1,
            QUIT), ``--parallel`` at a time from 127.0.0.2 to 127.0.0.201;
            the descriptors must come back to the idle baseline (taken
            after a first session opened the store) within a second of
            the end.
slowloris   ``--clients`` clients each trickling one byte every
            ``timeout - 1`` seconds into a command line that never ends,
            while a normal client sends a message; every trickler must be
            dropped within ``timeout + 1`` seconds of its first byte, and
            the message must be delivered.
rcptflood   ``--connections`` connections, one after the other, from
            addresses of one /24 (127.0.0.2, .3, ...), each pipelining
            ``--rcpts`` RCPTs to new recipients in one write; prints the
            replies, the rows the store gained and its size (file + WAL).
            ``-o`` sets a key of the proxy (max_errors=100000 shows the
            session's bound alone).  The check: the store gained at most
            ``--bound`` rows, and every connection was cut off (421) or,
            with ``--no-cut``, was not.

Exit status: 0 if the scenario's check passed, 1 otherwise.  Traffic goes
to loopback addresses only; every loop is bounded.
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

from helpers import child_pids, free_port  # noqa: E402
import smtpproxy  # noqa: E402  (its defaults: the threads that may wait)


class Sink(object):
    """A minimal SMTP server that takes every message: the upstream."""

    def __init__(self):
        self.messages = 0
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        thread = threading.Thread(target=self.serve)
        thread.daemon = True
        thread.start()

    def serve(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self.session, args=(connection,))
            thread.daemon = True
            thread.start()

    def session(self, connection):
        stream = connection.makefile("rwb", 0)
        try:
            stream.write(b"220 sink ESMTP\r\n")
            in_data = False
            for line in stream:
                if in_data:
                    if line == b".\r\n":
                        in_data = False
                        self.messages += 1
                        stream.write(b"250 2.0.0 queued\r\n")
                    continue
                verb = line[:4].upper()
                if verb == b"EHLO":
                    stream.write(b"250-sink\r\n250 PIPELINING\r\n")
                elif verb == b"DATA":
                    in_data = True
                    stream.write(b"354 go ahead\r\n")
                elif verb == b"QUIT":
                    stream.write(b"221 bye\r\n")
                    break
                else:
                    stream.write(b"250 ok\r\n")
        except OSError:
            pass
        finally:
            connection.close()


class Proxy(object):
    """smtpproxy.py from its command line, with a throwaway store."""

    def __init__(self, upstream_port, directory, options=()):
        self.port = free_port()
        self.log = open(os.path.join(directory, "proxy.log"), "wb")
        command = [sys.executable, os.path.join(ROOT, "smtpproxy.py"),
                   "--listen", "127.0.0.1:%d" % self.port,
                   "--upstream", "127.0.0.1:%d" % upstream_port,
                   "-o", "allowed_domains=example.org",
                   "-o", "greylist_db=%s" % os.path.join(directory, "g.db"),
                   "-o", "greylist_log=", "-o", "max_connections_per_ip=0",
                   "-o", "max_connections=1000"] + list(options)
        if os.geteuid() == 0:
            command += ["-o", "run_as_root=yes"]
        self.process = subprocess.Popen(command, stderr=self.log,
                                        cwd=directory)
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll():
                    raise SystemExit("the proxy did not start")
                time.sleep(0.05)

    def pids(self):
        """The proxy's process and its workers (workers = auto): each
        figure is their sum."""
        return [self.process.pid] + child_pids(self.process.pid)

    def descriptors(self):
        count = 0
        for pid in self.pids():
            try:
                count += len(os.listdir("/proc/%d/fd" % pid))
            except OSError:
                pass
        return count

    def threads(self):
        count = 0
        for pid in self.pids():
            try:
                with open("/proc/%d/status" % pid) as status:
                    for line in status:
                        if line.startswith("Threads:"):
                            count += int(line.split()[1])
            except OSError:
                pass
        return count

    def stop(self):
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def reply(stream):
    """The code of one (possibly multi-line) reply, or None at the end."""
    while True:
        line = stream.readline()
        if not line:
            return None
        if line[3:4] != b"-":
            return int(line[:3])


def greylisted_session(port, source):
    with socket.create_connection(("127.0.0.1", port), 10,
                                  source_address=(source, 0)) as sock:
        stream = sock.makefile("rwb", 0)
        codes = [reply(stream)]
        for command in (b"EHLO client.example\r\n",
                        b"MAIL FROM:<a@example.net>\r\n",
                        b"RCPT TO:<b@example.org>\r\n", b"QUIT\r\n"):
            stream.write(command)
            codes.append(reply(stream))
        return codes


def greylisted(arguments, directory):
    sink = Sink()
    proxy = Proxy(sink.port, directory)
    # Some sessions first, at once, so that every worker gets some: the
    # store's connections (its file, -wal and -shm, and the
    # checkpointer's) are opened by a worker's first greylisted session
    # and kept, whatever the load.  The baseline is after them.
    warm = [threading.Thread(target=greylisted_session,
                             args=(proxy.port, "127.0.0.%d" % (2 + number)))
            for number in range(2 * arguments.parallel)]
    for thread in warm:
        thread.start()
    for thread in warm:
        thread.join()
    time.sleep(1.0)
    baseline = proxy.descriptors(), proxy.threads()
    peak = list(baseline)
    codes = {}
    lock = threading.Lock()
    counter = iter(range(arguments.sessions))

    def worker():
        for number in counter:
            try:
                got = greylisted_session(
                    proxy.port, "127.0.0.%d" % (2 + number % 200))[3]
            except OSError as error:
                got = type(error).__name__
            with lock:
                codes[got] = codes.get(got, 0) + 1
    workers = [threading.Thread(target=worker)
               for _ in range(arguments.parallel)]
    start = time.monotonic()
    for thread in workers:
        thread.start()
    while any(thread.is_alive() for thread in workers):
        peak[0] = max(peak[0], proxy.descriptors())
        peak[1] = max(peak[1], proxy.threads())
        time.sleep(0.02)
    elapsed = time.monotonic() - start
    time.sleep(1.0)
    after = proxy.descriptors(), proxy.threads()
    proxy.stop()
    print("greylisted: %d sessions, %d at a time, in %.1f s; RCPT replies %s"
          % (arguments.sessions, arguments.parallel, elapsed, codes))
    print("descriptors: before %d, peak %d, 1 s after %d"
          % (baseline[0], peak[0], after[0]))
    print("threads:     before %d, peak %d, 1 s after %d"
          % (baseline[1], peak[1], after[1]))
    # Session threads kept for the next client (spare_threads, in each
    # worker) may wait; they end after thread_idle_time.
    spare = smtpproxy.SMTPProxyServer.spare_threads * smtpproxy.worker_count(
        {})
    print("             (up to %d threads may wait for the next client)"
          % spare)
    ok = after[0] <= baseline[0] and after[1] <= baseline[1] + spare
    print("PASS" if ok else "FAIL")
    return ok


def slowloris(arguments, directory):
    sink = Sink()
    timeout = arguments.timeout
    proxy = Proxy(sink.port, directory,
                  ["-o", "inactivity_timeout=%d" % timeout])
    baseline = proxy.descriptors(), proxy.threads()
    dropped = {}
    lock = threading.Lock()

    def trickler(number):
        source = "127.0.0.%d" % (2 + number % 200)
        try:
            sock = socket.create_connection(("127.0.0.1", proxy.port), 30,
                                            source_address=(source, 0))
        except OSError:
            return
        with sock:
            stream = sock.makefile("rb")
            stream.readline()                       # the greeting
            first = time.monotonic()
            sock.settimeout(timeout - 1)
            for _ in range(6 * timeout):            # bounded
                try:
                    sock.send(b"X")
                    data = sock.recv(4096)
                except socket.timeout:
                    continue
                except OSError:
                    data = b""
                if not data or b"421" in data:
                    break
            with lock:
                dropped[number] = time.monotonic() - first
    threads = [threading.Thread(target=trickler, args=(number,))
               for number in range(arguments.clients)]
    for thread in threads:
        thread.daemon = True
        thread.start()
    time.sleep(1.0)
    peak = proxy.descriptors(), proxy.threads()
    import smtplib
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", proxy.port, timeout=30) as smtp:
        smtp.sendmail("a@example.net", ["b@example.org"],
                      b"Subject: meanwhile\r\n\r\nhello\r\n")
    delivered = time.monotonic() - started
    for thread in threads:
        thread.join(6 * timeout)
    time.sleep(1.0)
    after = proxy.descriptors(), proxy.threads()
    proxy.stop()
    times = sorted(dropped.values())
    print("slowloris: %d tricklers, inactivity_timeout %d; dropped %d, "
          "after %.2f s (first) to %.2f s (last) from their first byte"
          % (arguments.clients, timeout, len(times), times[0] if times
             else 0, times[-1] if times else 0))
    print("a message from 127.0.0.1 meanwhile: delivered in %.2f s "
          "(sink has %d)" % (delivered, sink.messages))
    print("descriptors: before %d, peak %d, after %d; threads: before %d, "
          "peak %d, after %d" % (baseline[0], peak[0], after[0],
                                 baseline[1], peak[1], after[1]))
    ok = (len(times) == arguments.clients and times[-1] <= timeout + 1
          and sink.messages == 1)
    print("PASS" if ok else "FAIL")
    return ok


def store_size(directory):
    """(rows, octets of the file and its WAL) of the proxy's store."""
    import sqlite3
    path = os.path.join(directory, "g.db")
    sizes = [os.path.getsize(name) for name in (path, path + "-wal")
             if os.path.exists(name)]
    if not sizes:
        return 0, 0
    connection = sqlite3.connect("file:%s?mode=ro" % path, uri=True,
                                 timeout=30)
    try:
        rows = connection.execute("SELECT count(*) FROM triplets").fetchone()
    except sqlite3.OperationalError:    # no table yet
        rows = (0,)
    finally:
        connection.close()
    return rows[0], sum(sizes)


def flood_session(port, source, number, rcpts):
    """One connection pipelining ``rcpts`` RCPTs to new recipients; the
    codes of the RCPT replies it got, and whether it heard a 421."""
    with socket.create_connection(("127.0.0.1", port), 60,
                                  source_address=(source, 0)) as sock:
        stream = sock.makefile("rb")
        reply(stream)
        sock.sendall(b"EHLO flood.example\r\n")
        reply(stream)
        sock.sendall(b"MAIL FROM:<flood@example.net>\r\n")
        reply(stream)
        lines = b"".join(b"RCPT TO:<n%d-%d@example.org>\r\n" % (number, n)
                         for n in range(rcpts)) + b"QUIT\r\n"
        codes = []

        def read():
            for _ in range(rcpts + 2):              # bounded
                try:
                    code = reply(stream)
                except OSError:
                    return
                if code is None:
                    return
                codes.append(code)
        reader = threading.Thread(target=read)
        reader.start()
        try:
            sock.sendall(lines)
        except OSError:
            pass                                    # cut off: expected
        reader.join(120)
        return codes


def rcptflood(arguments, directory):
    sink = Sink()
    options = []
    for option in arguments.option:
        options += ["-o", option]
    proxy = Proxy(sink.port, directory, options)
    rows_before, size_before = store_size(directory)
    tally = {}
    cut = 0
    start = time.monotonic()
    for number in range(arguments.connections):
        codes = flood_session(proxy.port, "127.0.0.%d" % (2 + number % 200),
                              number, arguments.rcpts)
        cut += 421 in codes
        for code in codes:
            tally[code] = tally.get(code, 0) + 1
    elapsed = time.monotonic() - start
    time.sleep(1.5)             # the server's checkpoint
    rows, size = store_size(directory)
    proxy.stop()
    print("rcptflood: %d connection(s) from one /24, %d pipelined RCPTs "
          "each, in %.2f s; replies %s" % (arguments.connections,
                                           arguments.rcpts, elapsed,
                                           dict(sorted(tally.items()))))
    print("connections cut off with 421: %d of %d"
          % (cut, arguments.connections))
    print("store: %d rows added (%d before); file + WAL %.1f MB (%.1f MB "
          "before)" % (rows - rows_before, rows_before, size / 1e6,
                       size_before / 1e6))
    ok = rows - rows_before <= arguments.bound and \
        cut == (0 if arguments.no_cut else arguments.connections)
    print("PASS" if ok else "FAIL")
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="scenario")
    grey = commands.add_parser("greylisted")
    grey.add_argument("--sessions", type=int, default=1500)
    grey.add_argument("--parallel", type=int, default=20)
    slow = commands.add_parser("slowloris")
    slow.add_argument("--clients", type=int, default=200)
    slow.add_argument("--timeout", type=int, default=5)
    flood = commands.add_parser("rcptflood")
    flood.add_argument("--rcpts", type=int, default=5000)
    flood.add_argument("--connections", type=int, default=1)
    flood.add_argument("--bound", type=int, default=1000,
                       help="most rows the store may gain (the default "
                            "max_new_triplets_per_network)")
    flood.add_argument("--no-cut", action="store_true",
                       help="the connections are not expected to be cut")
    flood.add_argument("-o", dest="option", action="append", default=[],
                       metavar="KEY=VALUE", help="a key of the proxy")
    arguments = parser.parse_args()
    if arguments.scenario is None:
        parser.error("name a scenario: greylisted, slowloris or rcptflood")
    directory = tempfile.mkdtemp(prefix="smtpproxy-hostile-")
    try:
        scenario = {"greylisted": greylisted, "slowloris": slowloris,
                    "rcptflood": rcptflood}[arguments.scenario]
        return 0 if scenario(arguments, directory) else 1
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
