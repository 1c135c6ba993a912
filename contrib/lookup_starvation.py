#!/usr/bin/env python3
"""Lookup starvation, measured: sessions whose reverse lookups never
answer, and one ordinary client whose lookups do (issue 21).

Usage (by hand; Linux: it binds clients to 127.0.0.2 ...)::

    python3 contrib/lookup_starvation.py [--sessions 100] [--networks 1]
        [--dns-timeout 5] [--module DIR]

A proxy (GreyListingPolicy, ``greylist_clients = suspicious``) runs in
this process in front of the sink of contrib/hostile.py; its resolver
hooks (reverse_lookup, forward_lookup) stand in for DNS: the reverse
lookup of every hostile client hangs (as one whose reverse zone never
answers, until the system resolver gives up, here 30 s); that of the
ordinary client 127.1.0.2 answers mx.ordinary.example, which resolves
back to it.

``--sessions`` hostile clients (127.0.X.2 ..., spread over ``--networks``
/24s) each send EHLO, MAIL, RCPT and wait; a second later the ordinary
client sends its RCPT.  Printed: the lookup threads busy, those held by
each hostile network, the hostile sessions' replies so far, and the
ordinary client's RCPT reply, time and rule: with its name it is
``not-suspicious name:ordinary.example`` (250 at once); a client left
nameless is ``suspicious:no-name ...`` (451).

``--module DIR`` imports smtpproxy.py from DIR (another version, to
compare).  Exit status: 0 if the ordinary client got its name.
"""

import argparse
import os
import socket
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDINARY = "127.1.0.2"
NAME = "mx.ordinary.example"


def session(port, source, replies, lock):
    """EHLO, MAIL, RCPT from ``source``; the RCPT's reply is kept."""
    client = socket.create_connection(("127.0.0.1", port), 60,
                                      source_address=(source, 0))
    stream = client.makefile("rb")
    try:
        for line in (None, b"EHLO client.example\r\n",
                     b"MAIL FROM:<a@example.net>\r\n",
                     b"RCPT TO:<b@example.org>\r\n"):
            if line is not None:
                client.sendall(line)
            while True:
                reply = stream.readline()
                if reply[3:4] != b"-":
                    break
        with lock:
            replies[source] = reply.decode("ascii", "replace").strip()
        client.sendall(b"QUIT\r\n")
    except OSError as error:
        with lock:
            replies[source] = "error: %s" % error
    finally:
        client.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--networks", type=int, default=1)
    parser.add_argument("--dns-timeout", type=float, default=5)
    parser.add_argument("--hang", type=float, default=30)
    parser.add_argument("--module", default=ROOT)
    arguments = parser.parse_args()
    sys.path.insert(0, os.path.abspath(arguments.module))
    sys.path.insert(1, os.path.join(ROOT, "contrib"))
    import smtpproxy
    from hostile import Sink

    hostile = ["127.0.%d.%d" % (2 + number % arguments.networks,
                                2 + number // arguments.networks)
               for number in range(arguments.sessions)]
    hostile_set = set(hostile)
    release = threading.Event()
    decisions = {}

    def reverse_lookup(self, address):
        if address in hostile_set:
            release.wait(arguments.hang)
            return []
        return [NAME] if address == ORDINARY else []

    def forward_lookup(self, name):
        return {ORDINARY} if name == NAME else set()

    class Recorder(smtpproxy.Greylister):
        def decide(self, client, *args, **keywords):
            decision = smtpproxy.Greylister.decide(self, client, *args,
                                                   **keywords)
            decisions[client] = decision.rule
            return decision

    sink = Sink()
    directory = tempfile.mkdtemp(prefix="starvation-")
    handler = type("Starved", (smtpproxy.GreyListingPolicy,), dict(
        smtp_ip="127.0.0.1", smtp_port=sink.port, allowed_senders=[],
        allowed_domains=["example.org"],
        greylist_db=os.path.join(directory, "grey.db"),
        greylist_clients="suspicious", dns_timeout=arguments.dns_timeout,
        inactivity_timeout=120, reverse_lookup=reverse_lookup,
        forward_lookup=forward_lookup, greylister_class=Recorder))
    handler.learn_upstream()
    server = smtpproxy.SMTPProxyServer(("127.0.0.1", 0), handler)
    server.max_connections = arguments.sessions + 50
    threading.Thread(target=server.serve_forever, args=(0.05,),
                     daemon=True).start()
    port = server.server_address[1]

    replies, lock = {}, threading.Lock()
    threads = [threading.Thread(target=session,
                                args=(port, source, replies, lock),
                                daemon=True) for source in hostile]
    for thread in threads:
        thread.start()
    time.sleep(1)       # a script, not a test: let the sessions settle
    pool = smtpproxy.lookup_threads
    held = {}
    if hasattr(pool, "held"):
        for source in hostile:
            owner = smtpproxy.lookup_owner(source)
            held[owner] = pool.held(owner)
    print("smtpproxy from %s" % os.path.abspath(arguments.module))
    print("hostile sessions: %d from %d /24s; dns_timeout %s s"
          % (len(hostile), arguments.networks, arguments.dns_timeout))
    print("lookup threads busy: %d (limit %d)" % (pool.count, pool.limit))
    if held:
        print("held per hostile network: %s" % ", ".join(
            "%s %d" % item for item in sorted(held.items())))
    with lock:
        answered = len(replies)
    print("hostile RCPTs answered after 1 s: %d" % answered)

    began = time.monotonic()
    ordinary = {}
    session(port, ORDINARY, ordinary, threading.Lock())
    elapsed = time.monotonic() - began
    print("ordinary client %s: RCPT %s in %.2f s; rule %s"
          % (ORDINARY, ordinary.get(ORDINARY), elapsed,
             decisions.get(ORDINARY)))
    named = (decisions.get(ORDINARY) or "").startswith("not-suspicious")
    release.set()
    for thread in threads:
        thread.join(arguments.hang + 10)
    server.shutdown()
    server.server_close()
    return 0 if named else 1


if __name__ == "__main__":
    sys.exit(main())
