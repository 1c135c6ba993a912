#!/usr/bin/env python3
"""The timeline of a PostgreSQL failover under two smtpproxy MX hosts, and
the longest decision when hosts of the URI never answer.

Usage (by hand; Linux; as root PostgreSQL runs as nobody, see tests/pg.py)::

    python3 contrib/failover.py failover [--fail-mode accept|defer]
                                         [--promote-after 15]
                                         [--smtpproxy PATH]
    python3 contrib/failover.py silent [--hosts 2] [--clients 10]
                                       [--smtpproxy PATH]

failover  A private PostgreSQL primary and its hot standby (pg_basebackup
          -R), two proxies (smtpproxy.py from its command line, default
          workers) on one URI listing both hosts, the primary first, and
          a client per proxy that greylists a new triplet and retries it
          at once, over and over (too_soon = min_defer_time = 0: a store
          that works answers 451, then 250).  The primary is stopped
          with -m immediate (a host that dies); ``--promote-after``
          seconds later the standby is promoted.  A pair of answers that
          is not (451, 250) was decided by greylist_fail_mode.  Printed:
          when the new primary was ready, and for each proxy the last
          answer of the fail mode after that (its recovery: the last of
          its workers back), the count of fail-mode answers, and the
          longest RCPT reply during the outage.
silent    One proxy on a URI whose first ``--hosts`` hosts take TCP
          connections and never answer, then the real server; at its
          start ``--clients`` clients at once send RCPTs for 15 s.
          Printed: the longest RCPT reply (the store's budget is
          greylist_db_timeout, 5 s).

``--smtpproxy PATH`` runs another copy of smtpproxy.py (an older one, to
compare).  Traffic goes to loopback addresses only; every wait is bounded.
"""

import argparse
import itertools
import os
import smtplib
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "contrib"))

from helpers import free_port  # noqa: E402
from hostile import Sink  # noqa: E402
from pg import PostgreSQL  # noqa: E402


def senders():
    # Letters only: smtpproxy keys senders with their digits normalised.
    for letters in itertools.product(string.ascii_lowercase, repeat=5):
        yield "".join(letters) + "@example.net"


class Proxy(object):
    """smtpproxy.py from its command line, greylisting example.org."""

    def __init__(self, script, directory, upstream, uri, **keys):
        self.port = free_port()
        os.makedirs(directory)
        values = {"greylist_db": uri, "too_soon": 0, "min_defer_time": 0,
                  "client_key": "network", "auto_whitelist_clients": 0,
                  "greylist_log": os.path.join(directory, "greylist.log")}
        values.update(keys)
        config = os.path.join(directory, "smtpproxy.conf")
        with open(config, "w") as stream:
            stream.write("allowed_senders:\nallowed_domains:\n"
                         "    example.org\n")
            for item in values.items():
                stream.write("%s = %s\n" % item)
            if os.geteuid() == 0:
                stream.write("run_as_root = yes\n")
        self.log_path = os.path.join(directory, "stderr.txt")
        self.process = subprocess.Popen(
            [sys.executable, script, "--config", config,
             "--class", "smtpproxy.GreyListingPolicy",
             "--listen", "127.0.0.1:%d" % self.port,
             "--upstream", "127.0.0.1:%d" % upstream],
            stderr=open(self.log_path, "wb"), cwd=directory)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return
            except OSError:
                if time.monotonic() > deadline or \
                        self.process.poll() is not None:
                    raise RuntimeError("the proxy did not start: "
                                       + open(self.log_path).read())
                time.sleep(0.05)

    def rcpt(self, sender):
        """The reply code to RCPT, and how long the reply took."""
        client = smtplib.SMTP("127.0.0.1", self.port, timeout=60)
        try:
            client.ehlo("client.example.net")
            client.mail(sender)
            began = time.monotonic()
            code = client.rcpt("user@example.org")[0]
            return code, time.monotonic() - began
        finally:
            client.close()

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Client(threading.Thread):
    """New triplets and their retries through one proxy, until stopped:
    (time, store-decided, longest reply of the pair) for each pair."""

    def __init__(self, proxy, names):
        threading.Thread.__init__(self)
        self.daemon = True
        self.proxy, self.names = proxy, names
        self.pairs = []
        self.running = True

    def run(self):
        while self.running:
            sender = next(self.names)
            first, took1 = self.proxy.rcpt(sender)
            again, took2 = self.proxy.rcpt(sender)
            self.pairs.append((time.monotonic(), (first, again) == (451, 250),
                               max(took1, took2)))


def failover(args):
    primary = PostgreSQL()
    standby = None
    sink = Sink()
    proxies = []
    try:
        name = primary.database().rsplit("/", 1)[1]
        standby = primary.standby()
        uri = primary.uri(name).replace(
            "127.0.0.1:%d/" % primary.port, "127.0.0.1:%d,127.0.0.1:%d/"
            % (primary.port, standby.port))
        # As a site writes it (and as smtpproxy adds it when it is not
        # written): only a primary will do.
        uri += "?target_session_attrs=read-write"
        directory = tempfile.mkdtemp(prefix="smtpproxy-failover-")
        for number in (1, 2):
            proxies.append(Proxy(args.smtpproxy, os.path.join(
                directory, "mx%d" % number), sink.port, uri,
                greylist_fail_mode=args.fail_mode))
        names = senders()
        lock = threading.Lock()

        def shared():
            while True:
                with lock:
                    value = next(names)
                yield value
        clients = [Client(proxy, shared()) for proxy in proxies]
        for client in clients:
            client.start()
        time.sleep(5)                       # the load before the failure
        stopped = time.monotonic()
        primary.stop("immediate")
        time.sleep(args.promote_after)      # the failover manager's delay
        standby.promote()
        ready = time.monotonic()
        time.sleep(args.after)              # the load after it
        for client in clients:
            client.running = False
        for client in clients:
            client.join(120)
        print("fail mode %s; primary stopped at 0.0 s, the standby "
              "promoted and ready at %.1f s" % (args.fail_mode,
                                                ready - stopped))
        for number, client in enumerate(clients, 1):
            failed = [when for when, clean, _ in client.pairs
                      if not clean and when > stopped]
            before = [clean for when, clean, _ in client.pairs
                      if when < stopped]
            longest = max([took for when, _, took in client.pairs
                           if stopped <= when <= ready + 5] or [0])
            after = [when for when in failed if when > ready]
            print("mx%d: %d pairs before the stop (%d by the store); %d "
                  "fail-mode pairs after it; the last %.2f s after the new "
                  "primary was ready%s; longest RCPT during the outage "
                  "%.2f s" % (
                      number, len(before), sum(before), len(failed),
                      (after[-1] - ready) if after else 0.0,
                      "" if after else " (none after it)", longest))
    finally:
        for proxy in proxies:
            proxy.stop()
        if standby is not None:
            standby.close()
        primary.close()


class Silent(object):
    """A host that takes TCP connections and never answers."""

    def __init__(self):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(128)
        self.port = self.socket.getsockname()[1]


def silent(args):
    cluster = PostgreSQL()
    sink = Sink()
    hosts = [Silent() for _ in range(args.hosts)]
    proxy = None
    try:
        uri = cluster.database()
        uri = uri.replace("127.0.0.1:%d/" % cluster.port, "%s,127.0.0.1:%d/"
                          % (",".join("127.0.0.1:%d" % host.port
                                      for host in hosts), cluster.port))
        directory = tempfile.mkdtemp(prefix="smtpproxy-silent-")
        proxy = Proxy(args.smtpproxy, os.path.join(directory, "mx"),
                      sink.port, uri, greylist_fail_mode="accept")
        names = senders()
        lock = threading.Lock()
        took = []
        end = time.monotonic() + 15

        def client():
            while time.monotonic() < end:
                with lock:
                    sender = next(names)
                took.append(proxy.rcpt(sender)[1])
        threads = [threading.Thread(target=client)
                   for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        print("%d silent hosts before the server, %d clients: %d RCPTs, "
              "the longest reply %.2f s, the median %.3f s" % (
                  args.hosts, args.clients, len(took), max(took),
                  sorted(took)[len(took) // 2]))
    finally:
        if proxy is not None:
            proxy.stop()
        cluster.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenario", choices=["failover", "silent"])
    parser.add_argument("--fail-mode", default="accept",
                        choices=["accept", "defer"])
    parser.add_argument("--promote-after", type=float, default=15)
    parser.add_argument("--after", type=float, default=20,
                        help="seconds of load after the promotion")
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--smtpproxy", default=os.path.join(ROOT,
                                                            "smtpproxy.py"))
    args = parser.parse_args()
    args.smtpproxy = os.path.abspath(args.smtpproxy)
    if args.scenario == "failover":
        failover(args)
    else:
        silent(args)


if __name__ == "__main__":
    main()
