#!/usr/bin/env python3
"""Soak test of smtpproxy: a long run of mail, faults and hostile clients,
checked against a ledger of every message.

Usage (by hand, not in CI; Linux, as it binds client sockets to
127.0.0.2 ... 127.0.0.30 and reads /proc)::

    python3 contrib/soak.py                   # 600 seconds of load
    python3 contrib/soak.py --duration 60     # a quick run
    python3 contrib/soak.py --duration 3600 --clients 40 --seed 7 --verbose

Options: ``--duration SECONDS`` of load (600), ``--clients N`` client
threads (20), ``--seed N`` (random by default; the report names it),
``--python PATH`` the interpreter that runs the proxy (this one),
``--set KEY=VALUE`` a configuration key of the proxy (repeatable; with
``workers``, the descriptors, threads and RSS are the master's and its
workers' together),
``--keep`` keeps the temporary directory (configuration, store, the
proxy's log), ``--verbose`` prints progress and every failure's details,
``--postgresql`` greylists in a private PostgreSQL cluster (tests/pg.py),
and with it ``--failover [SECONDS]`` crashes that cluster's primary
SECONDS into the load (half the duration if not given) and promotes its
hot standby ``--promote-after SECONDS`` later (15, as a site's failover
manager or admin would), and ``--stale-primary SECONDS`` starts the old
primary again that long after the promotion (a stale primary; not by
default): see "Failover" below.
It needs nothing beyond the standard library, and sends nothing beyond
the loopback interface.

What it runs:

- A fault-injecting upstream SMTP server of its own (threaded, raw sockets,
  for control of every byte) on a free port of 127.0.0.1.  It offers
  PIPELINING, 8BITMIME, SIZE and ENHANCEDSTATUSCODES, and at random
  answers RCPT, DATA or the final dot with a 4xx or a 5xx, drops the
  connection at RCPT, at DATA, in the middle of the data or right after
  the final dot without a word, and waits up to 2 seconds before a reply
  (the proxy's ``upstream_timeout`` is 10).  Its *received ledger* holds
  a message once its 250 to the final dot has been written.  It notes the
  proxy's own protocol errors: a command out of order, a data line with a
  bare CR or LF, a NUL or more than 1000 octets, 8-bit data without
  BODY=8BITMIME.  Like Postfix, it keeps a transaction open after refusing
  DATA: a client (the proxy) must say RSET before its next MAIL.
- smtpproxy.py from its command line, with smtpproxy.GreyListingPolicy
  for example.org and greylisting timings short enough for mail to pass
  within a second (``min_defer_time = 1``), keyed by the exact client
  address (``ipv4_prefix = 32``), ``inactivity_timeout = 5``; its store
  an sqlite file, or the PostgreSQL database of ``--greylist-db URI``,
  or with ``--postgresql`` one in a private cluster (tests/pg.py).
- ``--clients`` threads, each a series of SMTP sessions from 127.0.0.2 to
  127.0.0.30 (127.0.0.1 may relay: it is never greylisted): messages of
  1 KB to 200 KB (dot lines, 8-bit text, lines of 998 octets, the most
  RFC 5321 allows, some beginning with a dot) to 1-5 recipients, several
  per session at times, with smtplib or pipelined on a raw socket, the
  data in random pieces.  Each message carries a unique
  ``X-Soak-Id`` header.  The *sent ledger* holds what the client heard
  for each recipient: 250, 5xx (refused), 4xx (retried later from the
  same address, like a real MTA, until the end of the run), or no reply
  to the final dot (ambiguous: not retried).  One session in ten is
  hostile: it vanishes in the middle of the data, goes silent there until
  the proxy times it out, hides a second message behind a bare-LF end of
  data (SMTP smuggling), or sends a line too long; none of those may
  arrive.

What it checks, and fails on:

- every recipient the client heard 250 for got the message exactly once
  (lost, duplicated); nothing arrived that the client did not hear 250
  for, except ambiguous ones (phantom; the ambiguous are reported apart);
  no hostile message arrived; what arrived is byte for byte what was sent,
  from the sender it was sent from (corrupted);
- a well-behaved client hears only the replies it should: the upstream's
  (its faults included), greylisting's 451 4.7.1, 451 4.4.x when the
  upstream failed, and 503 to a pipelined DATA whose recipients all
  failed; every 250 to a message names that message (no crossed replies);
  the proxy never drops it (but after that 503: ``strict``); the hostile
  get a 5xx, the silent a 421 in time;
- the upstream saw no protocol error;
- the proxy's descriptors and threads, sampled every 5 seconds from /proc,
  are back to the idle baseline (+5, +2) once the load has stopped (the
  upstream sessions it keeps may wait ``upstream_pool_idle`` seconds, its
  spare threads ``thread_idle_time``: then they must be gone; with a
  PostgreSQL store, one descriptor more per process that decides: its
  connection to the store, opened at its first decision and kept), and
  its RSS did not grow steadily (the mean of the last third of the load
  within 20% of the first third's);
- the proxy's standard error holds no Traceback, and it exits 0 on
  SIGTERM.

Failover (``--failover``, with ``--postgresql``):

- The private cluster gets a hot standby (pg_basebackup -R, streaming
  replication, asynchronous), and the proxy's ``greylist_db`` lists both
  hosts, the primary first
  (``postgresql://greylist:secret@127.0.0.1:P1,127.0.0.1:P2/NAME``;
  smtpproxy adds target_session_attrs=read-write, so that libpq takes
  the writable one).  At SECONDS into the load the primary is stopped
  with "immediate" (SIGQUIT: a crash, its sessions cut), and
  ``--promote-after`` seconds after that the standby is promoted
  (pg_ctl promote, waited for, and polled until it is out of
  recovery); with ``--stale-primary``, the old primary is started again
  later, writable on its old timeline (the report shows what the proxy
  logged of it: a store that connects to it says so as an error, a
  former primary; one that keeps its connection to the new primary
  never sees it).  Clients keep sending all along:
  with ``greylist_fail_mode = accept`` (the default) mail passes
  ungreylisted meanwhile, with ``--set greylist_fail_mode=defer`` it is
  deferred (451 4.7.1) and retried.
- The proxy runs with ``debug = yes`` (its dialogue log,
  greylist-debug.log in the run's directory, about 15 MB a minute: the
  one place it notes each decision, and the rule "store-failed" of those
  made in fail mode) and ``client_key = network`` (no reverse lookup: a
  lookup the resolver leaves unanswered waits dns_timeout, 5 s, which
  would hide the store's wait in a RCPT's reply time); --set overrides
  both.  From 10 seconds before the primary's stop until 60 seconds
  after the promotion the upstream injects no delay (its other faults go
  on), so that a RCPT's reply time is the proxy's decision (and the
  upstream's prompt reply).
- The report's failover lines, in seconds into the load: when the
  primary was stopped, when pg_ctl promote ran, and when the standby
  was ready as primary (its log's "database system is ready to accept
  connections" after "selected new timeline ID"; promote() returning,
  which polls, is shown too); for each worker process, from the proxy's
  log: its store failures (logged once per distinct error and
  incident; libpq's text shown per host), its "now on the server at"
  (the store on the promoted standby) and its "usable again" (its first
  decision made by the store again), and the time from the standby's
  readiness to the latter: the worker's recovery; the outage, from the
  stop to the last worker's recovery; the decisions made in fail mode
  (the dialogue log's "store-failed" lines: their count, the first and
  the last) of all the decisions in the outage, and the longest of
  these (the dialogue log's RCPT line to its decision's); what the
  clients saw then: their RCPT replies, and the longest (timed in the
  smtplib sessions, one command at a time, so that the reply is that
  RCPT's own; relayed to the upstream when accepted), and, with fail
  mode accept, the new triplets (a fresh sender's first RCPT) that
  passed ungreylisted, and the first greylisted again after the
  promotion.
- It fails when the failover could not be made, when a worker whose
  store failed does not log "usable again" after the promotion, or only
  more than 5 seconds after it (decisions should work again within about
  a second of the database being usable), and when a RCPT's reply during
  the outage took more than greylist_db_timeout + 1 seconds (a decision
  waits greylist_db_timeout at most in all); and on every check above,
  which hold through the failover: the ledger (nothing lost, duplicated,
  phantom or corrupted), the replies, the descriptors and threads back
  to the baseline (each worker keeps its one connection to the store,
  within the slack; the store's connector thread ends once no decision
  asks for a connection), the RSS, no Traceback, exit 0.

Exit status: 0 if every check passed, 1 otherwise.

Last run of the failover: ``--duration 3600 --postgresql --failover 1800
--set workers=3 --keep`` (fail mode accept, seed 430093; Python 3.11,
psycopg 3.3.9, libpq and PostgreSQL 15 as tests/pg.py runs it; 2 cores
shared with another 1-hour soak and a 48-thread fuzzer, load average up
to 37): PASS.  377892 sessions (37750 hostile), 138608 messages in
495525 transactions, 416018 recipients: 390837 accepted, 22366 refused,
2815 still deferred at the end; lost 0, duplicated 0, phantom 0,
corrupted 0, hostile arrived 0; upstream protocol errors 0; descriptors
24 / 77 / 27 (baseline, peak, end), threads 5 / 56 / 7, RSS baseline
193.7 MB, the load's first third 247.2 MB, last 256.7 MB; no Traceback,
exit 0.  Failover: primary stopped at 1800.0 s into the load, standby
ready as primary at 1815.2 s (its log; promote() returned at 1815.2 s);
the three workers failed from 1800.1-1800.3 s (2 errors each: the
primary shutting down or refusing, the standby read-only), were on the
promoted standby (timeline 2) at 1815.3, 1815.4, 1815.9 s and usable
again 0.14, 0.20, 1.00 s after its readiness; outage 16.2 s; 3263
decisions made in fail mode (accept) of 5865 in the outage, the longest
decision 0.52 s; 5740 RCPT replies in the outage, the longest of 3806
timed 0.60 s (greylist_db_timeout 5 s; 4.25 s outside it, upstream
delays); 907 new triplets passed ungreylisted, the first greylisted
again 0.2 s after the promotion.
"""

import argparse
import calendar
import collections
import hashlib
import heapq
import math
import os
import random
import re
import shutil
import signal
import smtplib
import socket
import socketserver
import string
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from helpers import child_pids, free_port  # noqa: E402

PROXY_SCRIPT = os.path.join(os.path.dirname(HERE), "smtpproxy.py")
sys.path.insert(0, os.path.dirname(HERE))
import smtpproxy  # noqa: E402  (its defaults: how long idle things stay)

LOOPBACK = "127.0.0.1"
# Client addresses: each its own greylisting client (ipv4_prefix = 32).
SOURCES = ["127.0.0.%d" % number for number in range(2, 31)]
DOMAIN = "example.org"
RECIPIENTS = ["user%02d@%s" % (number, DOMAIN) for number in range(12)]
# The greylisting key normalises senders: the tagged ones share keys.
SENDERS = ["alice@sender-a.test", "bob+one@sender-b.test",
           "bob+two@sender-b.test", "prvs=0123abcd=carol@sender-c.test",
           "dave@sender-d.test", "erin@sender-e.test", ""]
# A share of messages come from a sender never seen before, so that
# greylisting defers new triplets all through a long run, not only at the
# start (and the store grows).
FRESH_SENDER_CHANCE = 0.2
FRESH_PREFIX = "someone@fresh-"
HOSTILE_SENDER = "mallory@attacker.test"

# The proxy's timings (configuration keys).
INACTIVITY_TIMEOUT = 5
UPSTREAM_TIMEOUT = 10
# The upstream's longest wait before a reply: well below UPSTREAM_TIMEOUT.
MAX_DELAY = 2.0
# A client's socket timeout: the proxy answers a RCPT after up to four
# upstream replies (greeting, EHLO, MAIL, RCPT), each possibly delayed.
CLIENT_TIMEOUT = 30
RETRY_DELAY = (1.0, 3.0)        # seconds before a deferred message is retried
SAMPLE_INTERVAL = 5.0
MIN_SIZE, MAX_SIZE = 1024, 200 * 1024
UPSTREAM_SIZE_LIMIT = 10 * 1024 * 1024
MAX_TEXT_LINE = 1000            # RFC 5321, CR LF included

# The chance of each fault where it may happen, and of a delayed reply.
FAULTS = {
    "rcpt": (("4xx", 0.03), ("5xx", 0.02), ("drop", 0.005)),
    "data": (("4xx", 0.02), ("5xx", 0.01), ("drop", 0.005)),
    "message": (("drop", 0.01),),       # in the middle of the data
    "dot": (("4xx", 0.03), ("5xx", 0.02), ("drop", 0.01)),
}
DELAY_CHANCE = 0.03
FAULT_MARK = "(soak fault)"     # in the text of every fault reply
# As Postfix, the upstream keeps the transaction after it refused DATA:
# the next MAIL must come after an RSET, or it is a nested MAIL (503).
DATA_REFUSAL_KEEPS_TRANSACTION = True

# Chance of a message line of 998 octets (1000 with its CR LF, the most RFC
# 5321 allows), half of them beginning with a dot: 1001 octets once
# dot-stuffed, but the stuffed dot does not count (section 4.5.3.1.6).
LONGEST_LINE_CHANCE = 0.005

# How a session goes, and how often.
SESSION_STYLES = (("smtplib", 0.6), ("pipelined", 0.3), ("hostile", 0.1))
HOSTILE_KINDS = (("vanish", 0.3), ("silent", 0.1), ("smuggle", 0.35),
                 ("overlong", 0.25))
# The ends of data a lax server might see; each is followed by a second,
# smuggled message.
SMUGGLED_ENDS = (b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r",
                 b"\r\n\x00.\r\n")

# Outcomes of a recipient in the sent ledger.
PENDING = "pending"             # deferred (4xx), or not tried yet
ACCEPTED = "accepted"           # 250 to the final dot
REFUSED = "refused"             # 5xx
AMBIGUOUS = "ambiguous"         # the final dot went out, no reply came back

# Replies of the proxy's own that a well-behaved client may hear.
EXPECTED_PROXY_REPLIES = (
    (451, r"4\.7\.1 "),         # greylisting
    (451, r"4\.4\.[12] "),      # the upstream unreachable, or lost
)


def choose(rng, weighted):
    """One key of ``weighted``, pairs (key, weight)."""
    point = rng.uniform(0, sum(weight for _, weight in weighted))
    for key, weight in weighted:
        point -= weight
        if point <= 0:
            return key
    return weighted[-1][0]


def digest(data):
    return hashlib.sha256(data).hexdigest()


def dot_stuff(content):
    """The content as sent after DATA: lines beginning with "." get one
    more, and the final CR LF . CR LF."""
    return re.sub(br"(?m)^\.", b"..", content) + b".\r\n"


class Tally(object):
    """Counters shared by threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = collections.Counter()

    def add(self, key, number=1):
        with self._lock:
            self._counts[key] += number

    def get(self, key):
        with self._lock:
            return self._counts[key]

    def items(self):
        with self._lock:
            return sorted(self._counts.items())


class Problems(object):
    """Failures noted by threads: a count per kind, a few examples, and
    counts by ``group`` (the same symptom, whatever the message)."""

    examples_kept = 20

    def __init__(self):
        self._lock = threading.Lock()
        self.counts = collections.Counter()
        self.examples = collections.defaultdict(list)
        self.groups = collections.defaultdict(collections.Counter)

    def note(self, kind, detail, group=None):
        with self._lock:
            self.counts[kind] += 1
            if len(self.examples[kind]) < self.examples_kept:
                self.examples[kind].append(detail)
            if group is not None:
                self.groups[kind][group] += 1

    def lines(self, verbose):
        """The report's lines on the failures."""
        lines = []
        for kind, number in sorted(self.counts.items()):
            lines.append("  %s: %d" % (kind, number))
            groups = self.groups.get(kind)
            if groups:
                for group, count in groups.most_common():
                    lines.append("    %5d x %s" % (count, group))
            if verbose or not groups:
                for example in self.examples[kind][:None if verbose else 3]:
                    lines.append("      " + example.replace("\n", "\n      "))
        return lines


def symptom(text):
    """``text`` without what varies from message to message: addresses and
    ids."""
    text = re.sub(r"<[^<>]*>", "<...>", text)
    return re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-"
                  r"[0-9a-f]{12}", "ID", text)


# ---------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------

class TextSource(object):
    """Random message lines, cut from one random block of words."""

    special_lines = (b".", b"..", b"...", b". a line beginning with a dot",
                     b".\t", b"", b" ", b"\t", b"From the beginning of a line",
                     b"MAIL FROM:<inner@example.net>", b"DATA", b"QUIT")
    eight_bit_lines = ("Grüße aus Köln, ça va ? ★".encode("utf-8"),
                       "Ελληνικά, русский, 日本語".encode("utf-8"),
                       b"Latin-1 bytes: caf\xe9 na\xefve")

    longest = 10000

    def __init__(self, seed):
        rng = random.Random(seed)
        words = ["".join(rng.choice(string.ascii_letters + string.digits)
                         for _ in range(rng.randint(1, 12)))
                 for _ in range(3000)]
        text = " ".join(rng.choice(words) for _ in range(80000))
        # Room at the end for the longest line from any start.
        self.block = (text + " " + text[:self.longest]).encode("ascii")
        self.usable = len(self.block) - self.longest

    def line(self, rng, eight_bit):
        """One line of text, without its CR LF."""
        roll = rng.random()
        if roll < 0.02:
            return rng.choice(self.special_lines)
        if eight_bit and roll < 0.04:
            return rng.choice(self.eight_bit_lines)
        if rng.random() < LONGEST_LINE_CHANCE:
            return rng.choice((b"x", b".")) + self.text(rng, 997)
        if roll < 0.3:
            return self.text(rng, rng.randint(79, 997))
        return self.text(rng, rng.randint(0, 78))

    def text(self, rng, length):
        """``length`` octets of text (``longest`` at most)."""
        start = rng.randrange(self.usable)
        return self.block[start:start + length]


class Message(object):
    """A message of the sent ledger: its content, and for each recipient
    the outcome the client heard."""

    def __init__(self, message_id, sender, recipients, content, source,
                 eight_bit):
        self.id = message_id
        self.sender = sender
        self.recipients = list(recipients)
        self.content = content      # dropped once no recipient is pending
        self.digest = digest(content)
        self.size = len(content)
        self.source = source
        self.eight_bit = eight_bit
        self.status = dict.fromkeys(recipients, PENDING)
        self.attempts = 0
        # A sender never seen before: each recipient's first RCPT is a
        # new triplet (--failover notes those, in ``sighted``).
        self.fresh = sender.startswith(FRESH_PREFIX)
        self.sighted = None

    def pending(self):
        return [recipient for recipient in self.recipients
                if self.status[recipient] == PENDING]


def build_message(rng, text, message_id, sender, recipients):
    """The content (bytes, CR LF line ends) of a new message, and whether
    it holds 8-bit octets."""
    eight_bit = rng.random() < 0.2
    size = int(math.exp(rng.uniform(math.log(MIN_SIZE),
                                    math.log(MAX_SIZE))))
    headers = [
        "Message-ID: <%s@soak.test>" % message_id,
        "X-Soak-Id: %s" % message_id,
        "From: <%s>" % (sender or "MAILER-DAEMON@soak.test"),
        "To: %s" % ", ".join("<%s>" % address for address in recipients),
        "Subject: soak %s" % message_id,
        "Date: %s" % time.strftime("%a, %d %b %Y %H:%M:%S +0000",
                                   time.gmtime()),
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=%s"
        % ("utf-8" if eight_bit else "us-ascii"),
        "Content-Transfer-Encoding: %s" % ("8bit" if eight_bit else "7bit"),
        "",
    ]
    lines = [header.encode("ascii") for header in headers]
    total = sum(len(line) + 2 for line in lines)
    while total < size:
        line = text.line(rng, eight_bit)
        lines.append(line)
        total += len(line) + 2
    return b"\r\n".join(lines) + b"\r\n", eight_bit


# ---------------------------------------------------------------------------
# The sent ledger
# ---------------------------------------------------------------------------

class Transaction(object):
    """One attempt at a message's pending recipients, and what the client
    heard: ``mail``, ``rcpt`` (recipient -> reply), ``data`` (a reply to
    DATA other than 354), ``final`` (the reply to the final dot), each
    ``(code, text)``; ``dot_sent`` once the final dot is written; ``lost``
    the error that ended the connection, if one did."""

    def __init__(self, message, recipients):
        self.message = message
        self.recipients = recipients
        self.mail = None
        self.rcpt = {}
        self.data = None
        self.final = None
        self.dot_sent = False
        self.lost = None
        self.settled = False

    def accepted_recipients(self):
        return [recipient for recipient in self.recipients
                if self.rcpt.get(recipient, (0,))[0] // 100 == 2]


class Ledger(object):
    """The sent ledger: every message, the hostile ones' ids (which must not
    arrive), and the outbox of deferred recipients, by client address."""

    def __init__(self):
        self.lock = threading.Lock()
        self.messages = {}
        self.hostile = {}           # id -> kind
        self.outbox = dict((source, []) for source in SOURCES)
        self.sequence = 0
        self.tally = Tally()

    def new_message(self, message):
        with self.lock:
            if message.id in self.messages or message.id in self.hostile:
                raise AssertionError("message id used twice: %s" % message.id)
            self.messages[message.id] = message
        self.tally.add("messages")

    def new_hostile(self, message_id, kind):
        with self.lock:
            if message_id in self.messages or message_id in self.hostile:
                raise AssertionError("message id used twice: %s" % message_id)
            self.hostile[message_id] = kind

    def take_due(self, source=None):
        """A deferred message due for a retry, ``(message, recipients)``,
        from ``source`` (or the one most overdue); None if there is none."""
        now = time.monotonic()
        with self.lock:
            if source is None:
                due = [(queue[0][0], name) for name, queue in
                       self.outbox.items() if queue and queue[0][0] <= now]
                if not due:
                    return None
                source = min(due)[1]
            queue = self.outbox[source]
            if not queue or queue[0][0] > now:
                return None
            _, _, message = heapq.heappop(queue)
            return message, message.pending()

    def settle(self, transaction, rng):
        """Record what the client heard for each recipient of
        ``transaction``; queue the deferred ones for a retry."""
        message = transaction.message
        transaction.settled = True
        retry = []
        with self.lock:
            if transaction.mail is not None or transaction.lost is not None:
                message.attempts += 1
            for recipient in transaction.recipients:
                outcome, reason = self.outcome(transaction, recipient)
                if outcome == PENDING:
                    retry.append(recipient)
                    if reason != "not tried":
                        self.tally.add("deferred: " + reason)
                else:
                    message.status[recipient] = outcome
                    self.tally.add(outcome)
            if retry:
                self.sequence += 1
                due = time.monotonic() + rng.uniform(*RETRY_DELAY)
                heapq.heappush(self.outbox[message.source],
                               (due, self.sequence, message))
            elif not message.pending():
                message.content = None
                message.sighted = None

    @staticmethod
    def outcome(transaction, recipient):
        """``(outcome, reason of a deferral)`` for one recipient."""
        if transaction.mail is None and transaction.lost is None:
            return PENDING, "not tried"
        reply = transaction.rcpt.get(recipient)
        if transaction.mail is not None and transaction.mail[0] != 250:
            reply = transaction.mail
        elif reply is not None and reply[0] // 100 == 2:
            reply = transaction.final or transaction.data
            if reply is None:
                if transaction.dot_sent:
                    return AMBIGUOUS, None
                return PENDING, "connection lost"
        if reply is None:
            return PENDING, "connection lost"
        code, text = reply
        if code // 100 == 2:
            return ACCEPTED, None
        if code // 100 == 5:
            return REFUSED, None
        if FAULT_MARK in text:
            return PENDING, "upstream 4xx"
        if text.startswith("4.7.1"):
            return PENDING, "greylisting"
        if text.startswith("4.4."):
            return PENDING, "upstream lost"
        return PENDING, "other 4xx"


# ---------------------------------------------------------------------------
# The fault-injecting upstream
# ---------------------------------------------------------------------------

Arrival = collections.namedtuple(
    "Arrival", "id sender recipients digest size")


class Dropped(Exception):
    """The upstream drops the connection (a fault of its own)."""


class FaultyUpstream(socketserver.ThreadingTCPServer):
    """The upstream SMTP server: see the module's docstring.

    ``arrivals`` is its received ledger, ``faults`` counts the faults
    injected by kind, ``problems`` gets the proxy's protocol errors, and
    ``open_sessions`` the sessions in progress.
    """

    daemon_threads = True
    allow_reuse_address = True
    max_commands = 10000        # per session
    max_data_lines = 1000000
    idle_timeout = 60

    def __init__(self, seed, problems):
        self.rng = random.Random(seed)
        self.problems = problems
        self.lock = threading.Lock()
        self.arrivals = []
        self.faults = Tally()
        self.sessions = 0
        self.open_sessions = 0
        self.faults_on = True
        self.delays_on = True       # --failover suspends them a while
        socketserver.ThreadingTCPServer.__init__(
            self, (LOOPBACK, 0), UpstreamSession)
        self.port = self.server_address[1]
        self.thread = threading.Thread(target=self.serve_forever,
                                       args=(0.1,), name="upstream")
        self.thread.daemon = True
        self.thread.start()

    def session_rng(self):
        with self.lock:
            self.sessions += 1
            self.open_sessions += 1
            return random.Random(self.rng.getrandbits(64))

    def session_ended(self):
        with self.lock:
            self.open_sessions -= 1

    def record(self, arrival):
        with self.lock:
            self.arrivals.append(arrival)

    def wait_quiet(self, timeout):
        """Wait until no session is open; False if it took too long."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.open_sessions == 0:
                    return True
            time.sleep(0.05)
        return False

    def stop(self):
        self.shutdown()
        self.server_close()


class UpstreamSession(socketserver.StreamRequestHandler):
    """One upstream session, as a strict server would hold it."""

    timeout = FaultyUpstream.idle_timeout

    def setup(self):
        socketserver.StreamRequestHandler.setup(self)
        self.rng = self.server.session_rng()
        self.mail_from = None
        self.body = None            # the MAIL's BODY= parameter
        self.rcpt = []
        self.data_refused = False   # DATA refused: the transaction stays

    def handle(self):
        try:
            self.reply("220 upstream.soak.test ESMTP soak")
            for _ in range(self.server.max_commands):
                line = self.rfile.readline(2048)
                if not line:
                    return
                if not line.endswith(b"\r\n"):
                    self.protocol_error("command line without CR LF",
                                        repr(line[:80]))
                    return
                text = line[:-2].decode("ascii", "replace")
                verb, _, args = text.partition(" ")
                command = getattr(self, "smtp_" + verb.upper(), None)
                if command is None:
                    self.protocol_error("unknown command", repr(text[:80]))
                    self.reply("500 5.5.2 Error: command not recognized")
                elif command(args) is False:
                    return
        except Dropped:
            self.drop()
        except (OSError, ValueError):
            pass                    # the proxy went away, or timed out
        finally:
            self.server.session_ended()

    def finish(self):
        try:
            socketserver.StreamRequestHandler.finish(self)
        except OSError:
            pass

    # -- faults ---------------------------------------------------------

    def fault(self, where, count=True):
        """The fault to inject at ``where``, or None; counted, unless the
        caller counts it once it happens."""
        if not self.server.faults_on:
            return None
        roll = self.rng.random()
        for kind, chance in FAULTS[where]:
            if roll < chance:
                if count:
                    self.server.faults.add("%s %s" % (where, kind))
                return kind
            roll -= chance
        return None

    def reply(self, line):
        if self.server.faults_on and self.rng.random() < DELAY_CHANCE \
                and self.server.delays_on:
            self.server.faults.add("delay")
            time.sleep(self.rng.uniform(0.05, MAX_DELAY))
        self.wfile.write(line.encode("ascii") + b"\r\n")
        self.wfile.flush()

    def drop(self):
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def protocol_error(self, what, detail=""):
        self.server.problems.note("upstream saw a protocol error",
                                  ("%s: %s" % (what, detail)).rstrip(": "),
                                  symptom(what))

    def reset(self):
        self.mail_from = None
        self.body = None
        self.rcpt = []
        self.data_refused = False

    # -- commands -------------------------------------------------------

    def smtp_EHLO(self, args):
        self.reset()
        self.reply("250-upstream.soak.test\r\n250-PIPELINING\r\n"
                   "250-8BITMIME\r\n250-SIZE %d\r\n250 ENHANCEDSTATUSCODES"
                   % UPSTREAM_SIZE_LIMIT)

    def smtp_HELO(self, args):
        self.reset()
        self.reply("250 upstream.soak.test")

    def smtp_NOOP(self, args):
        self.reply("250 2.0.0 Ok")

    def smtp_RSET(self, args):
        self.reset()
        self.reply("250 2.0.0 Ok")

    def smtp_QUIT(self, args):
        self.reply("221 2.0.0 Bye")
        return False

    def smtp_MAIL(self, args):
        match = re.match(r"FROM:<([^<>]*)>((?: [^ ]+)*)\Z", args, re.I)
        if match is None:
            self.protocol_error("bad MAIL", repr(args[:80]))
            self.reply("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        if self.mail_from is not None:
            self.protocol_error(
                "nested MAIL (no RSET%s)" % (" after a refused DATA"
                                             if self.data_refused else ""),
                args[:80])
            self.reply("503 5.5.1 Error: nested MAIL command")
            return
        body = None
        for parameter in match.group(2).split():
            keyword, _, value = parameter.partition("=")
            keyword = keyword.upper()
            if keyword == "BODY":
                body = value.upper()
            elif keyword == "SIZE":
                if not value.isdigit():
                    self.protocol_error("bad SIZE", parameter)
                elif int(value) > UPSTREAM_SIZE_LIMIT:
                    self.reply("552 5.3.4 Message size exceeds fixed limit")
                    return
            else:
                self.protocol_error("MAIL parameter not offered", parameter)
        self.mail_from = match.group(1)
        self.body = body
        self.reply("250 2.1.0 Ok")

    def smtp_RCPT(self, args):
        match = re.match(r"TO:<([^<>]+)>\Z", args, re.I)
        if match is None:
            self.protocol_error("bad RCPT", repr(args[:80]))
            self.reply("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        if self.mail_from is None:
            self.protocol_error("RCPT without MAIL")
            self.reply("503 5.5.1 Error: need MAIL command")
            return
        fault = self.fault("rcpt")
        if fault == "drop":
            raise Dropped()
        if fault == "4xx":
            self.reply("450 4.2.1 <%s>: Mailbox busy %s"
                       % (match.group(1), FAULT_MARK))
        elif fault == "5xx":
            self.reply("550 5.1.1 <%s>: No such user %s"
                       % (match.group(1), FAULT_MARK))
        else:
            self.rcpt.append(match.group(1))
            self.reply("250 2.1.5 Ok")

    def smtp_DATA(self, args):
        if not self.rcpt:
            self.protocol_error("DATA without an accepted RCPT")
            self.reply("503 5.5.1 Error: need RCPT command")
            return
        fault = self.fault("data")
        if fault == "drop":
            raise Dropped()
        if fault in ("4xx", "5xx"):
            if DATA_REFUSAL_KEEPS_TRANSACTION:
                self.data_refused = True
            else:
                self.reset()
            self.reply("451 4.3.0 Try again %s" % FAULT_MARK if fault == "4xx"
                       else "554 5.7.0 Transaction refused %s" % FAULT_MARK)
            return
        self.reply("354 End data with <CR><LF>.<CR><LF>")
        content = self.receive_data()
        match = re.search(br"^X-Soak-Id: ([0-9a-f-]+)\r$",
                          content.split(b"\r\n\r\n", 1)[0], re.M)
        message_id = match.group(1).decode("ascii") if match else "unknown"
        if self.body != "8BITMIME" and re.search(b"[\x80-\xff]", content):
            self.protocol_error("8-bit data without BODY=8BITMIME",
                                message_id)
        arrival = Arrival(message_id, self.mail_from, tuple(self.rcpt),
                          digest(content), len(content))
        self.reset()
        fault = self.fault("dot")
        if fault == "drop":
            raise Dropped()
        if fault == "4xx":
            self.reply("451 4.3.0 Queue file write error %s %s"
                       % (FAULT_MARK, message_id))
        elif fault == "5xx":
            self.reply("554 5.6.0 Content refused %s %s"
                       % (FAULT_MARK, message_id))
        else:
            self.reply("250 2.0.0 Ok: queued as %s" % message_id)
            self.server.record(arrival)

    def receive_data(self):
        """The message, dot-unstuffed, up to the line "."; Dropped for a
        fault in the middle."""
        lines = []
        drop_at = None
        if self.fault("message", count=False) == "drop":
            drop_at = self.rng.randint(1, 200)
        for number in range(self.server.max_data_lines):
            line = self.rfile.readline(MAX_TEXT_LINE + 100)
            if not line:
                raise OSError("closed during DATA")
            if line == b".\r\n":
                return b"".join(lines)
            self.check_data_line(line, number)
            if line.startswith(b"."):
                line = line[1:]
            lines.append(line)
            if number + 1 == drop_at:
                self.server.faults.add("message drop")
                raise Dropped()
        raise OSError("too many lines")

    def check_data_line(self, line, number):
        problem = None
        if not line.endswith(b"\r\n"):
            problem = "no CR LF at its end"
        elif b"\r" in line[:-2] or b"\n" in line[:-2]:
            problem = "a bare CR or LF"
        elif b"\x00" in line:
            problem = "a NUL"
        elif len(line) - line.startswith(b".") > MAX_TEXT_LINE:
            problem = "more than %d octets" % MAX_TEXT_LINE
        if problem:
            self.protocol_error("data line with " + problem, "line %d: %r"
                                % (number + 1, line[:60]))


# ---------------------------------------------------------------------------
# The proxy
# ---------------------------------------------------------------------------

Sample = collections.namedtuple("Sample", "time fds threads rss")


class ProxyProcess(object):
    """smtpproxy.py run from its command line, greylisting for DOMAIN."""

    start_timeout = 30

    def __init__(self, python, directory, upstream_port, greylist_db=None,
                 settings=()):
        self.directory = directory
        self.settings = list(settings)     # "key = value" lines
        self.greylist_db = greylist_db or os.path.join(directory,
                                                       "greylist.db")
        self.port = free_port()
        self.config_path = os.path.join(directory, "smtpproxy.conf")
        self.stderr_path = os.path.join(directory, "proxy-stderr.txt")
        with open(self.config_path, "w") as config:
            config.write(self.configuration())
        self.stderr = open(self.stderr_path, "wb")
        self.process = subprocess.Popen(
            [python, PROXY_SCRIPT, "--config", self.config_path,
             "--listen", "%s:%d" % (LOOPBACK, self.port),
             "--upstream", "%s:%d" % (LOOPBACK, upstream_port)],
            stdin=subprocess.DEVNULL, stdout=self.stderr,
            stderr=self.stderr, cwd=directory)
        self.pid = self.process.pid

    def configuration(self):
        lines = [
            "# Written by contrib/soak.py.",
            "servername = proxy.soak.test",
            "greylist_db = %s" % self.greylist_db,
            "greylist_log = %s" % os.path.join(self.directory,
                                               "greylist.log"),
            "allowed_domains:",
            "    %s" % DOMAIN,
            # Greylisting that lets a retry pass after a second.
            "too_soon = 0",
            "min_defer_time = 1",
            "max_defer_time = 86400",
            "ipv4_prefix = 32",
            # Every new triplet is greylisted, all through the run.
            "auto_whitelist_clients = 0",
            "inactivity_timeout = %d" % INACTIVITY_TIMEOUT,
            "upstream_timeout = %d" % UPSTREAM_TIMEOUT,
            "max_connections_per_ip = 0",
            "grace_period = 5",
        ]
        if os.geteuid() == 0:
            lines.append("run_as_root = yes")
        lines += self.settings
        return "\n".join(lines) + "\n"

    def wait_ready(self):
        """Wait until it greets; an error message if it does not."""
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return "the proxy exited (%s): %s" % (
                    self.process.returncode, self.log_text()[-2000:])
            try:
                probe = socket.create_connection((LOOPBACK, self.port), 5)
            except OSError:
                time.sleep(0.1)
                continue
            try:
                greeting = probe.makefile("rb").readline()
                probe.sendall(b"QUIT\r\n")
            except OSError:
                greeting = b""
            finally:
                probe.close()
            if greeting.startswith(b"220 "):
                return None
            time.sleep(0.1)
        return "the proxy did not greet within %d seconds" % (
            self.start_timeout)

    def sample(self):
        """Its open descriptors, threads and RSS (bytes) now, those of its
        worker processes (``workers``) added; None once it has gone."""
        fds = threads = rss = 0
        for pid in [self.pid] + self.workers():
            try:
                fds += len(os.listdir("/proc/%d/fd" % pid))
                with open("/proc/%d/status" % pid) as status:
                    fields = dict(line.split(":", 1) for line in status
                                  if ":" in line)
                threads += int(fields["Threads"])
                rss += int(fields["VmRSS"].split()[0]) * 1024
            except (OSError, KeyError, ValueError):
                if pid == self.pid:
                    return None
        return Sample(time.monotonic(), fds, threads, rss)

    def workers(self):
        """The pids of its worker processes (none if workers = 1)."""
        return child_pids(self.pid)

    def descriptors(self):
        """What its open descriptors point to (files, sockets, pipes)."""
        names = []
        directory = "/proc/%d/fd" % self.pid
        try:
            for fd in os.listdir(directory):
                try:
                    names.append(os.readlink(os.path.join(directory, fd)))
                except OSError:
                    pass
        except OSError:
            pass
        return sorted(names)

    def alive(self):
        return self.process.poll() is None

    def stop(self, timeout=30):
        """SIGTERM, and its exit status (None if it had to be killed)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                self.stderr.close()
                return None
        self.stderr.close()
        return self.process.returncode

    def log_text(self):
        with open(self.stderr_path, "rb") as log:
            return log.read().decode("utf-8", "replace")


class Monitor(object):
    """Samples the proxy's resources every SAMPLE_INTERVAL seconds."""

    def __init__(self, proxy, limit, progress=None):
        """At most ``limit`` samples; with ``progress`` (a function giving
        a line of text), print a line at each."""
        self.proxy = proxy
        self.limit = limit
        self.progress = progress
        self.samples = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name="monitor")
        self.thread.daemon = True
        self.thread.start()

    def run(self):
        for _ in range(self.limit):
            if self.stopped.wait(SAMPLE_INTERVAL):
                return
            sample = self.proxy.sample()
            if sample is None:
                return
            self.samples.append(sample)
            if self.progress is not None:
                print("%s  fds %d  threads %d  RSS %.1f MB"
                      % (self.progress(), sample.fds, sample.threads,
                         sample.rss / 1e6))
                sys.stdout.flush()

    def stop(self):
        self.stopped.set()
        self.thread.join(SAMPLE_INTERVAL + 5)


# ---------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------

class ConnectionLost(Exception):
    """The connection to the proxy ended, or timed out."""


class RawClient(object):
    """An SMTP client on a raw socket: pipelining, hostile behaviour."""

    max_reply_lines = 100

    def __init__(self, port, source, timeout=CLIENT_TIMEOUT):
        try:
            self.sock = socket.create_connection(
                (LOOPBACK, port), timeout, source_address=(source, 0))
        except OSError as error:
            raise ConnectionLost("cannot connect: %s" % error)
        self.file = self.sock.makefile("rb")

    def reply(self):
        """One reply, ``(code, text)``, its lines joined by newlines."""
        lines = []
        try:
            for _ in range(self.max_reply_lines):
                line = self.file.readline(4096)
                if not line:
                    raise ConnectionLost("closed by the proxy")
                match = re.match(br"([2-5][0-9][0-9])([ -])(.*)\r\n\Z", line)
                if match is None:
                    raise ConnectionLost("garbage from the proxy: %r"
                                         % line[:80])
                lines.append(match.group(3).decode("ascii", "replace"))
                if match.group(2) == b" ":
                    return int(match.group(1)), "\n".join(lines)
        except OSError as error:
            raise ConnectionLost(str(error) or error.__class__.__name__)
        raise ConnectionLost("a reply of too many lines")

    def send(self, data):
        try:
            self.sock.sendall(data)
        except OSError as error:
            raise ConnectionLost(str(error))

    def send_in_pieces(self, data, rng):
        """Send ``data`` in a few pieces of random sizes and its last octets
        one by one, so that the end of data comes split across reads."""
        tail = min(len(data), rng.randint(1, 8))
        head = data[:len(data) - tail]
        cuts = sorted(rng.randrange(len(head) + 1)
                      for _ in range(rng.randint(0, 6)))
        start = 0
        for cut in cuts + [len(head)]:
            if cut > start:
                self.send(head[start:cut])
                start = cut
        for position in range(len(data) - tail, len(data)):
            time.sleep(0.001)
            self.send(data[position:position + 1])

    def command(self, line):
        self.send(line.encode("utf-8") + b"\r\n")
        return self.reply()

    def close(self, reset=False):
        if reset:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))
            except OSError:
                pass
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass


class LedgerSMTP(smtplib.SMTP):
    """smtplib.SMTP that notes when the final dot has been written."""

    dot_sent = False

    def send(self, data):
        smtplib.SMTP.send(self, data)
        if isinstance(data, bytes) and data.endswith(b"\r\n.\r\n"):
            self.dot_sent = True


class Client(threading.Thread):
    """One client thread: sessions, one after the other, until the end."""

    def __init__(self, number, soak):
        threading.Thread.__init__(self, name="client-%d" % number)
        self.daemon = True
        self.soak = soak
        self.ledger = soak.ledger
        self.problems = soak.problems
        self.tally = soak.tally
        self.port = soak.proxy.port
        self.rng = random.Random("%s-client-%d" % (soak.seed, number))
        self.helo = "client%d.soak.test" % number

    def run(self):
        for _ in range(10 ** 7):
            if self.soak.stopping.is_set():
                return
            style = choose(self.rng, SESSION_STYLES)
            self.tally.add("sessions")
            try:
                if style == "hostile":
                    self.hostile_session()
                else:
                    self.session(style)
            except Exception as error:          # a bug of the soak itself
                self.problems.note("soak client error", "%s: %r"
                                   % (style, error))
                time.sleep(0.1)

    # -- well-behaved sessions ------------------------------------------

    def next_attempt(self, source):
        """A deferred message due from ``source``, or a new one."""
        due = self.ledger.take_due(source)
        if due is not None:
            return Transaction(*due)
        recipients = self.rng.sample(RECIPIENTS, self.rng.randint(1, 5))
        if self.rng.random() < FRESH_SENDER_CHANCE:
            sender = FRESH_PREFIX + "%08x.test" % self.rng.getrandbits(32)
        else:
            sender = self.rng.choice(SENDERS)
        message_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        content, eight_bit = build_message(self.rng, self.soak.text,
                                           message_id, sender, recipients)
        message = Message(message_id, sender, recipients, content, source,
                          eight_bit)
        self.ledger.new_message(message)
        return Transaction(message, message.pending())

    def session(self, style):
        """A session of 1-3 transactions: retries due first (its address is
        theirs), new messages otherwise."""
        first = self.ledger.take_due()
        source = (first[0].source if first is not None
                  else self.rng.choice(SOURCES))
        transactions = self.rng.choice((1, 1, 1, 2, 3))
        attempts = []
        if first is not None:
            attempts.append(Transaction(*first))
        session = (self.smtplib_session if style == "smtplib"
                   else self.pipelined_session)
        try:
            session(source, attempts, transactions)
        finally:
            for attempt in attempts:
                if not attempt.settled:     # back to the outbox
                    self.settle(attempt)

    def mail_options(self, message):
        options = []
        if message.eight_bit:
            options.append("BODY=8BITMIME")
        if self.rng.random() < 0.3:
            options.append("SIZE=%d" % message.size)
        return options

    def smtplib_session(self, source, attempts, count):
        smtp = LedgerSMTP(local_hostname=self.helo, timeout=CLIENT_TIMEOUT,
                          source_address=(source, 0))
        transaction = None
        try:
            code, text = smtp.connect(LOOPBACK, self.port)
            self.check_reply("greeting", code, text, 220)
            code, text = smtp.ehlo()
            self.check_reply("EHLO", code, text, 250)
            for number in range(count):
                if self.soak.stopping.is_set():
                    break
                transaction = (attempts[number] if number < len(attempts)
                               else self.next_attempt(source))
                smtp.dot_sent = False
                self.smtplib_transaction(smtp, transaction)
                self.settle(transaction)
                transaction = None
            code, text = smtp.docmd("QUIT")
            self.check_reply("QUIT", code, text, 221)
        except (smtplib.SMTPException, OSError) as error:
            self.connection_lost(transaction, smtp.dot_sent, error)
        finally:
            smtp.close()

    def smtplib_transaction(self, smtp, transaction):
        message = transaction.message
        code, text = smtp.mail(message.sender, self.mail_options(message))
        transaction.mail = (code, self.text(text))
        self.check_reply("MAIL", code, text, 250)
        if code == 250:
            for recipient in transaction.recipients:
                asked = time.time()
                code, text = smtp.rcpt(recipient)
                transaction.rcpt[recipient] = (code, self.text(text))
                self.check_reply("RCPT", code, text)
                self.soak.rcpt_replied(message, recipient, code,
                                       self.text(text), asked)
        if not transaction.accepted_recipients():
            smtp.rset()
            return
        try:
            code, text = smtp.data(message.content)
        except smtplib.SMTPDataError as error:
            transaction.data = (error.smtp_code, self.text(error.smtp_error))
            self.check_reply("DATA", error.smtp_code, error.smtp_error)
            smtp.rset()
            return
        transaction.final = (code, self.text(text))
        self.check_final(transaction)

    def pipelined_session(self, source, attempts, count):
        """Each transaction's MAIL, RCPTs and DATA in one write (RFC 2920),
        the data in random pieces."""
        transaction = None
        client = None
        try:
            client = RawClient(self.port, source)
            code, text = client.reply()
            self.check_reply("greeting", code, text, 220)
            code, text = client.command("EHLO " + self.helo)
            self.check_reply("EHLO", code, text, 250)
            if "PIPELINING" not in text.split("\n"):
                self.problems.note("unexpected reply", "EHLO without "
                                   "PIPELINING: %r" % text)
            for number in range(count):
                if self.soak.stopping.is_set():
                    break
                transaction = (attempts[number] if number < len(attempts)
                               else self.next_attempt(source))
                going_on = self.pipelined_transaction(client, transaction)
                self.settle(transaction)
                transaction = None
                if not going_on:
                    return
            code, text = client.command("QUIT")
            self.check_reply("QUIT", code, text, 221)
        except ConnectionLost as error:
            self.connection_lost(transaction, transaction is not None
                                 and transaction.dot_sent, error)
        finally:
            if client is not None:
                client.close()

    def pipelined_transaction(self, client, transaction):
        """False when the proxy closed the connection (a DATA without a
        valid recipient is a protocol error: ``strict``)."""
        message = transaction.message
        commands = ["MAIL FROM:<%s>%s" % (message.sender, "".join(
            " " + option for option in self.mail_options(message)))]
        commands += ["RCPT TO:<%s>" % recipient
                     for recipient in transaction.recipients]
        commands.append("DATA")
        client.send("".join(line + "\r\n" for line in commands).encode())
        transaction.mail = client.reply()
        self.check_reply("MAIL", transaction.mail[0], transaction.mail[1],
                         250)
        for recipient in transaction.recipients:
            transaction.rcpt[recipient] = client.reply()
            self.check_reply("RCPT", *transaction.rcpt[recipient])
            self.soak.rcpt_replied(message, recipient,
                                   *transaction.rcpt[recipient])
        code, text = client.reply()
        if code != 354:
            transaction.data = (code, text)
            if code == 503 and not transaction.accepted_recipients():
                return False        # expected, and the connection is closed
            self.check_reply("DATA", code, text)
            return True
        client.send_in_pieces(dot_stuff(message.content), self.rng)
        transaction.dot_sent = True
        transaction.final = client.reply()
        self.check_final(transaction)
        return True

    # -- what a well-behaved client hears -------------------------------

    @staticmethod
    def text(text):
        if isinstance(text, bytes):
            return text.decode("ascii", "replace")
        return text

    def check_reply(self, stage, code, text, wanted=None):
        """Note a reply that a well-behaved client should not hear."""
        text = self.text(text)
        if wanted is not None:
            good = code == wanted
        else:
            good = (code // 100 == 2 or code == 354 or FAULT_MARK in text
                    or any(code == expected and re.match(pattern, text)
                           for expected, pattern in EXPECTED_PROXY_REPLIES))
        if not good:
            detail = "%s: %d %s" % (stage, code, text)
            self.problems.note("unexpected reply", detail, symptom(detail))

    def check_final(self, transaction):
        code, text = transaction.final
        self.check_reply("end of data", code, text)
        if (code // 100 == 2 or FAULT_MARK in text) and \
                transaction.message.id not in text:
            self.problems.note("crossed reply", "%s got %d %s"
                               % (transaction.message.id, code, text))

    def settle(self, transaction):
        self.ledger.settle(transaction, self.rng)

    def connection_lost(self, transaction, dot_sent, error):
        """The proxy closed the connection, or stopped answering: it should
        not, to a well-behaved client."""
        detail = "%s: %s" % (error.__class__.__name__, error)
        self.problems.note("connection lost", detail, symptom(detail))
        if transaction is not None:
            transaction.dot_sent = dot_sent
            transaction.lost = str(error)
            self.settle(transaction)

    # -- hostile sessions -----------------------------------------------

    def hostile_session(self):
        kind = choose(self.rng, HOSTILE_KINDS)
        self.tally.add("hostile: " + kind)
        source = self.rng.choice(SOURCES)
        message_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        self.ledger.new_hostile(message_id, kind)
        recipient = self.rng.choice(RECIPIENTS)
        content, _ = build_message(self.rng, self.soak.text, message_id,
                                   HOSTILE_SENDER, [recipient])
        client = None
        try:
            client = RawClient(self.port, source)
            client.reply()
            client.command("EHLO mallory.attacker.test")
            if not self.reach_data(client, recipient):
                client.command("QUIT")
                return
            self.tally.add("hostile reached DATA")
            getattr(self, "hostile_" + kind)(client, content, message_id)
        except ConnectionLost:
            pass
        finally:
            if client is not None:
                client.close(reset=kind == "vanish" and self.rng.random() < .5)

    def reach_data(self, client, recipient):
        """MAIL, RCPT (again after greylisting's deferral: it passes after
        a second), DATA: True at 354."""
        code, _ = client.command("MAIL FROM:<%s>" % HOSTILE_SENDER)
        if code != 250:
            return False
        for _ in range(3):
            code, text = client.command("RCPT TO:<%s>" % recipient)
            if code == 250:
                break
            if code != 451 or not text.startswith("4.7.1"):
                return False
            time.sleep(1.2)
        else:
            return False
        code, _ = client.command("DATA")
        return code == 354

    def partial_data(self, content):
        data = dot_stuff(content)[:-3]      # never the final dot
        return data[:self.rng.randint(0, len(data))]

    def hostile_vanish(self, client, content, message_id):
        """Gone in the middle of the data (closed, or reset)."""
        client.send(self.partial_data(content))

    def hostile_silent(self, client, content, message_id):
        """Silent in the middle of the data: the proxy must say 421 and
        close after inactivity_timeout."""
        client.send(self.partial_data(content))
        started = time.monotonic()
        client.sock.settimeout(INACTIVITY_TIMEOUT + 10)
        try:
            code, text = client.reply()
        except ConnectionLost as error:
            code, text = None, str(error)
        waited = time.monotonic() - started
        if code != 421 or waited > INACTIVITY_TIMEOUT + 3:
            self.problems.note("silent client not timed out",
                               "%s after %.1f s: %s %s"
                               % (message_id, waited, code, text))

    def hostile_smuggle(self, client, content, message_id):
        """A second message behind an end of data that only a lax server
        sees (a bare LF, CR or a NUL in it): refused, and neither
        arrives."""
        inner_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        self.ledger.new_hostile(inner_id, "smuggled")
        inner, _ = build_message(self.rng, self.soak.text, inner_id,
                                 HOSTILE_SENDER, [RECIPIENTS[0]])
        fake_end = self.rng.choice(SMUGGLED_ENDS)
        data = (dot_stuff(content)[:-5] + fake_end
                + ("MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\nDATA\r\n"
                   % (HOSTILE_SENDER, RECIPIENTS[0])).encode()
                + dot_stuff(inner))
        client.send_in_pieces(data, self.rng)
        self.expect_refusal(client, message_id, "smuggling %r" % fake_end)

    def hostile_overlong(self, client, content, message_id):
        """A line longer than 1000 octets: refused, and it does not
        arrive."""
        lines = content.split(b"\r\n")
        position = self.rng.randrange(len(lines) // 2, len(lines))
        lines.insert(position, self.soak.text.text(
            self.rng, self.rng.randint(MAX_TEXT_LINE - 1, 5000)).replace(
                b" ", b"x"))
        client.send_in_pieces(dot_stuff(b"\r\n".join(lines)), self.rng)
        self.expect_refusal(client, message_id, "a line too long")

    def expect_refusal(self, client, message_id, what):
        """A 5xx (550 5.5.2 for a bare CR or LF, 552 5.5.6 for a long line:
        the first problem found in the data decides)."""
        code, text = client.reply()
        if code // 100 != 5:
            self.problems.note("hostile message not refused",
                               "%s (%s): %d %s"
                               % (message_id, what, code, text))
        client.command("QUIT")


# ---------------------------------------------------------------------------
# The failover (--failover)
# ---------------------------------------------------------------------------

# A line of the proxy's own log, and a decision of its dialogue log (debug).
SERVICE_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) "
                          r"smtpproxy\[(\d+)\]: ([A-Z]+) (.*)\Z")
DECISION_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \S+ "
                           r"(relay|accept|refuse|defer|unavailable) "
                           r"\S+: (\S+)")


def log_time(date, milliseconds):
    """The time (seconds since the epoch) of a log line's stamp, written
    by logging in local time."""
    return (time.mktime(time.strptime(date, "%Y-%m-%d %H:%M:%S"))
            + int(milliseconds) / 1000.0)


# A line of PostgreSQL's log (log_line_prefix '%m [%p] ', 15's default).
POSTGRES_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.(\d{3}) "
                           r"(\S+) \[\d+\] \w+: +(.*)")


def postgres_ready(log_text):
    """When a promoted standby was ready as primary, by its log: its
    "database system is ready to accept connections" after "selected new
    timeline ID" (time.time()); None if its log does not say."""
    promoted = False
    for line in log_text.splitlines():
        match = POSTGRES_LINE.match(line)
        if match is None:
            continue
        if match.group(4).startswith("selected new timeline ID"):
            promoted = True
        elif promoted and match.group(4).startswith(
                "database system is ready to accept connections"):
            stamp = time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")
            # log_timezone: initdb's, the system's (UTC here).
            seconds = (calendar.timegm(stamp)
                       if match.group(3) in ("UTC", "GMT")
                       else time.mktime(stamp))
            return seconds + int(match.group(2)) / 1000.0
    return None


# libpq's failure of a URI of several hosts, per host (psycopg 3's text).
LIBPQ_HOST_FAILURE = re.compile(
    r"- host: '([^']*)', port: '([^']*)'.*?, port \d+ failed: "
    r"(.*?)(?= - host: |\Z)")


def short_error(text):
    """A store's error as the report shows it: libpq's failure of several
    hosts as each host's reason, in one sentence each; else its first 240
    characters."""
    if "All failures were:" in text:
        failures = LIBPQ_HOST_FAILURE.findall(text.split(
            "All failures were:", 1)[1])
        if failures:
            return "; ".join(
                "%s:%s %s" % (host, port, re.split(
                    r"(?<=[a-z]) (?=[A-Z])", reason, 1)[0])
                for host, port, reason in failures)
    return text if len(text) < 240 else text[:240] + "..."


def log_stamp(moment):
    """The stamp logging writes for ``moment``: stamps compare as text."""
    return "%s,%03d" % (time.strftime("%Y-%m-%d %H:%M:%S",
                                      time.localtime(moment)),
                        int((moment - int(moment)) * 1000))


class Failover(threading.Thread):
    """--failover: the cluster's primary crashes ``at`` seconds into the
    load, its standby is promoted ``promote_after`` seconds later (and,
    with ``stale_after``, the old primary starts again that long after
    the promotion); see the module's docstring.

    ``events``: when each step was taken (time.time()): "stop" (the
    primary's SIGQUIT sent), "stopped", "promote" (pg_ctl promote run),
    "promoted" (out of recovery), "stale primary".  ``replies``: the RCPT
    replies heard from ``before`` seconds before the stop to
    ``window_after`` seconds after the promotion (the upstream makes no
    delay meanwhile), each (time of the reply, seconds it
    took or None when pipelined, greylisted (451 4.7.1), a first
    sighting of a new triplet); ``longest_outside`` the longest timed
    reply outside that window, (seconds, time)."""

    before = 10.0
    window_after = 60.0
    recovery_limit = 5.0        # seconds from the promotion to "usable"
    rcpt_slack = 1.0            # a RCPT's reply: greylist_db_timeout + this

    def __init__(self, soak, primary, standby, at, promote_after,
                 stale_after=None):
        threading.Thread.__init__(self, name="failover")
        self.daemon = True
        self.soak = soak
        self.primary = primary
        self.standby = standby
        self.at = at
        self.promote_after = promote_after
        self.stale_after = stale_after
        self.events = {}
        self.error = None
        self.lock = threading.Lock()
        self.recording = False
        self.replies = []
        self.longest_outside = (0.0, None)

    # -- the steps -------------------------------------------------------

    def wait_until(self, moment):
        """Until ``moment`` (time.monotonic()); False if the load ended
        first."""
        return not self.soak.stopping.wait(max(0.0,
                                               moment - time.monotonic()))

    def note(self, event):
        self.events[event] = time.time()
        if self.soak.args.verbose:
            print("failover: %s at %.1f s into the load"
                  % (event, self.events[event] - self.soak.started_wall))
            sys.stdout.flush()

    def run(self):
        try:
            self.steps()
        except Exception as error:      # the cluster's tools failed
            self.error = "%s: %s" % (error.__class__.__name__, error)
        finally:
            with self.lock:
                self.recording = False
            self.soak.upstream.delays_on = True

    def steps(self):
        start = self.soak.started
        if not self.wait_until(start + self.at - self.before):
            return
        with self.lock:
            self.recording = True
        # No upstream delay meanwhile: none is under way at the stop.
        self.soak.upstream.delays_on = False
        if not self.wait_until(start + self.at):
            return
        stop = time.monotonic()
        self.note("stop")
        self.primary.stop("immediate")
        self.note("stopped")
        if not self.wait_until(stop + self.promote_after):
            return
        self.note("promote")
        self.standby.promote()
        self.note("promoted")
        promoted = time.monotonic()
        later = [(promoted + self.window_after, self.end_window)]
        if self.stale_after is not None:
            later.append((promoted + self.stale_after, self.start_stale))
        for moment, step in sorted(later, key=lambda item: item[0]):
            if not self.wait_until(moment):
                return
            step()

    def end_window(self):
        with self.lock:
            self.recording = False
        self.soak.upstream.delays_on = True

    def start_stale(self):
        self.primary.start()
        self.note("stale primary")

    def rcpt(self, message, recipient, code, text, asked=None):
        """A client heard ``code`` ``text`` to the RCPT of ``recipient``
        (asked at ``asked``, time.time(), if timed)."""
        now = time.time()
        first = False
        if message.fresh:
            if message.sighted is None:
                message.sighted = set()
            first = recipient not in message.sighted
            message.sighted.add(recipient)
        seconds = None if asked is None else now - asked
        greylisted = code == 451 and text.startswith("4.7.1")
        with self.lock:
            if self.recording:
                self.replies.append((now, seconds, greylisted, first))
            elif seconds is not None and seconds > self.longest_outside[0]:
                self.longest_outside = (seconds, now)

    # -- what happened ---------------------------------------------------

    def workers(self, log_text, master):
        """From the proxy's log, per process (pid) but the master: what
        its store logged from the stop on: "failures" [(time, error)],
        "moved" [(time, server)], "usable" [time], "stale" [(time,
        text)]; and "before", the store's failures logged before the
        stop."""
        stop = self.events["stop"]
        uri = smtpproxy.redact_uri(self.soak.proxy.greylist_db)
        prefix = "greylisting store %s: " % uri
        workers = {}
        for line in log_text.splitlines():
            match = SERVICE_LINE.match(line)
            if match is None or not match.group(5).startswith(prefix):
                continue
            pid = int(match.group(3))
            if pid == master:
                continue
            when = log_time(match.group(1), match.group(2))
            text = match.group(5)[len(prefix):]
            worker = workers.setdefault(pid, dict(
                failures=[], moved=[], usable=[], stale=[], before=0))
            if text.endswith("; decisions fall back to accept") or \
                    text.endswith("; decisions fall back to defer"):
                if when < stop:
                    worker["before"] += 1
                else:
                    worker["failures"].append(
                        (when, text.rsplit("; decisions fall back", 1)[0]))
            elif when < stop:
                continue
            elif text == "usable again":
                worker["usable"].append(when)
            elif text.startswith("now on the server at "):
                worker["moved"].append(
                    (when, text[len("now on the server at "):].split(
                        "; it was")[0]))
            elif "former primary" in text:
                worker["stale"].append((when, text))
        return workers

    def decisions(self, path, start, end):
        """From the dialogue log: the decisions made in fail mode (rule
        store-failed), a Counter by verdict, the first's and the last's
        time; the count of all decisions from ``start`` to ``end``, and
        the longest of them, (seconds, time): from the RCPT's line to the
        decision's, in the session (its client's address and port)."""
        failed = collections.Counter()
        first = last = None
        during = 0
        longest = (0.0, None)
        asked = {}
        low, high = log_stamp(start), log_stamp(end)
        with open(path, "r", errors="replace") as log:
            for line in log:
                inside = low <= line[:23] <= high
                if not inside and "store-failed" not in line:
                    continue
                match = DECISION_LINE.match(line)
                if match is None:
                    words = line[24:].split(" ", 3)
                    if inside and len(words) > 2 and words[1] == "<" and \
                            words[2].upper() == "RCPT":
                        asked[words[0]] = log_time(line[:19], line[20:23])
                    continue
                if inside:
                    during += 1
                    when = log_time(match.group(1), match.group(2))
                    since = asked.pop(line[24:].split(" ", 1)[0], None)
                    if since is not None and when - since > longest[0]:
                        longest = (when - since, when)
                if match.group(4) == "store-failed":
                    failed[match.group(3)] += 1
                    when = log_time(match.group(1), match.group(2))
                    first = when if first is None else min(first, when)
                    last = when if last is None else max(last, when)
        return failed, first, last, during, longest

    def report(self, log_text, master, debug_log, problems):
        """The report's lines on the failover; its failures noted in
        ``problems``."""
        zero = self.soak.started_wall

        def at(moment):
            return "%.1f s" % (moment - zero) if moment is not None else "-"

        lines = []
        if self.error is not None:
            problems.note("failover", self.error)
        if "promoted" not in self.events:
            problems.note("failover", "not made: %s" % (
                self.error or "the load ended first (steps taken: %s)"
                % (", ".join(sorted(self.events)) or "none")))
            return ["  failover      not made; steps taken: %s"
                    % (", ".join("%s at %s" % (name, at(moment))
                                 for name, moment in sorted(
                                     self.events.items(),
                                     key=lambda item: item[1]))
                       or "none")]
        stop = self.events["stop"]
        # The standby's own log says when it was ready as primary; the
        # poll (promote() returning) sees it up to a second later.
        ready = postgres_ready(self.standby.log())
        promoted = ready if ready is not None else self.events["promoted"]
        lines.append(
            "  failover      primary stopped (immediate) at %s into the "
            "load (down at %s); pg_ctl promote run at %s; the standby "
            "ready as primary at %s (%s), %.1f s after the stop; "
            "promote() returned at %s%s"
            % (at(stop), at(self.events["stopped"]),
               at(self.events["promote"]), at(promoted),
               "its log" if ready is not None else "not in its log: "
               "promote() returned", promoted - stop,
               at(self.events["promoted"]),
               "; stale primary started at %s"
               % at(self.events["stale primary"])
               if "stale primary" in self.events else ""))
        workers = self.workers(log_text, master)
        recovered = []
        errors = collections.Counter()
        for pid, worker in sorted(workers.items()):
            usable = [when for when in worker["usable"]
                      if when >= self.events["promote"]]
            moved = [item for item in worker["moved"]
                     if item[0] >= self.events["promote"]]
            for _, text in worker["failures"]:
                errors[text] += 1
            parts = []
            if worker["failures"]:
                parts.append("failed from %s (%d errors logged)"
                             % (at(worker["failures"][0][0]),
                                len(worker["failures"])))
            else:
                parts.append("no failure logged")
            if moved:
                parts.append("now on %s at %s" % (moved[0][1],
                                                  at(moved[0][0])))
            if usable:
                recovered.append(usable[0])
                parts.append("usable again at %s: %.2f s after the "
                             "promotion" % (at(usable[0]),
                                            usable[0] - promoted))
                if usable[0] - promoted > self.recovery_limit:
                    problems.note("slow recovery", "worker %d: usable again "
                                  "%.1f s after the promotion"
                                  % (pid, usable[0] - promoted))
            elif worker["failures"]:
                parts.append("never usable again")
                problems.note("no recovery", "worker %d: its store failed "
                              "from %s, and never logged \"usable again\" "
                              "after the promotion" % (
                                  pid, at(worker["failures"][0][0])))
            if worker["before"]:
                parts.append("%d failures logged before the stop"
                             % worker["before"])
            for when, text in worker["stale"]:
                parts.append("at %s: %s" % (at(when), text))
            lines.append("  worker %-6d %s" % (pid, "; ".join(parts)))
        shown = collections.Counter()
        for text, count in errors.items():
            shown[short_error(text)] += count
        for text, count in shown.most_common():
            lines.append("    %d x %s" % (count, text))
        end = max(recovered) if recovered else promoted
        lines.append("  outage        %.1f s: the stop to the last worker's "
                     "recovery (%s)" % (end - stop, at(end)))
        if debug_log is not None and os.path.exists(debug_log):
            failed, first, last, during, slowest = self.decisions(
                debug_log, stop, end)
            lines.append(
                "  fail mode     %d decisions made in fail mode (%s), "
                "from %s to %s; %d decisions in all during the outage, "
                "the longest %.2f s (at %s; RCPT read to decision)"
                % (sum(failed.values()),
                   self.soak.format_counts(dict(failed)), at(first),
                   at(last), during, slowest[0], at(slowest[1])))
        else:
            lines.append("  fail mode     not counted: no dialogue log "
                         "(debug = no)")
        lines += self.client_lines(stop, end, promoted, at, problems)
        return lines

    def client_lines(self, stop, end, promoted, at, problems):
        with self.lock:
            replies = list(self.replies)
            outside = self.longest_outside
        timed = []
        heard = greylisted = 0
        passed = []             # first sightings not greylisted
        regreylisted = None     # the first greylisted after the promotion
        for when, seconds, deferred, first in replies:
            asked = when - (seconds or 0)
            if seconds is not None and asked <= end and when >= stop:
                timed.append((seconds, when))
            elif seconds is not None and seconds > outside[0]:
                outside = (seconds, when)
            if stop <= when <= end:
                heard += 1
                greylisted += deferred
            if first and stop <= when <= end and not deferred:
                passed.append(when)
            if first and deferred and when >= promoted and (
                    regreylisted is None or when < regreylisted):
                regreylisted = when
        longest = max(timed) if timed else (0.0, None)
        limit = self.soak.setting(
            "greylist_db_timeout",
            smtpproxy.GreyListingPolicy.greylist_db_timeout)
        if longest[0] > limit + self.rcpt_slack:
            problems.note("slow RCPT in the outage", "%.1f s at %s "
                          "(greylist_db_timeout %s s)"
                          % (longest[0], at(longest[1]), limit))
        lines = [
            "  clients       %d RCPT replies in the outage, %d of them "
            "451 4.7.1; the longest of %d timed %.2f s (at %s; "
            "greylist_db_timeout %g s); the longest outside it %.2f s"
            % (heard, greylisted, len(timed), longest[0], at(longest[1]),
               limit, outside[0]),
        ]
        if self.soak.setting_text("greylist_fail_mode", "accept") == \
                "accept":
            lines.append(
                "  new triplets  %d passed ungreylisted in the outage (the "
                "last at %s); the first greylisted after the promotion at "
                "%s" % (len(passed), at(max(passed) if passed else None),
                        at(regreylisted)))
        return lines


# ---------------------------------------------------------------------------
# The run, the checks and the report
# ---------------------------------------------------------------------------

class Soak(object):
    """One soak run: see the module's docstring."""

    fd_slack = 5
    thread_slack = 2
    rss_growth = 1.2

    def __init__(self, args, directory, primary=None, standby=None):
        self.args = args
        self.primary = primary          # the cluster, with --failover
        self.standby = standby
        self.failover = None
        self.directory = directory
        self.seed = args.seed
        self.problems = Problems()
        self.ledger = Ledger()
        self.tally = Tally()
        self.stopping = threading.Event()
        self.text = TextSource(self.seed)
        self.proxy = None
        self.upstream = None
        self.load_time = 0.0
        self.settle_time = 0.0
        self.baseline = self.idle = None
        self.store_connections = 0
        self.samples = []
        self.baseline_descriptors = self.idle_descriptors = []
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.exit_status = None
        self.log = ""

    def progress(self):
        return "%6.1f s  sessions %d  messages %d  accepted %d  arrived %d" % (
            time.monotonic() - self.started, self.tally.get("sessions"),
            self.ledger.tally.get("messages"),
            self.ledger.tally.get(ACCEPTED), len(self.upstream.arrivals))

    def run(self):
        self.upstream = FaultyUpstream(self.seed, self.problems)
        try:
            settings = []
            if self.args.failover is not None:
                # What the failover's report needs (see the docstring);
                # --set comes after: the last line of a key is in force.
                settings = ["debug = yes",
                            "greylist_debuglog = %s" % self.debug_log(),
                            "client_key = network"]
            try:
                self.proxy = ProxyProcess(
                    self.args.python, self.directory, self.upstream.port,
                    self.args.greylist_db, settings +
                    [item.replace("=", " = ", 1) for item in self.args.set])
            except OSError as error:
                print("FAIL: cannot run %s: %s" % (self.args.python, error))
                return 1
            error = self.proxy.wait_ready()
            if error is not None:
                print("FAIL: %s" % error)
                self.proxy.stop()
                return 1
            try:
                self.load()
            finally:
                self.exit_status = self.proxy.stop()
                self.log = self.proxy.log_text()
        finally:
            self.upstream.stop()
        return self.report()

    def load(self):
        # The proxy asked the upstream for its extensions as it started.
        self.upstream.wait_quiet(15)
        time.sleep(1)
        self.baseline = self.proxy.sample()
        self.baseline_descriptors = self.proxy.descriptors()
        self.started = time.monotonic()
        self.started_wall = time.time()
        if self.args.failover is not None:
            self.failover = Failover(self, self.primary, self.standby,
                                     self.args.failover,
                                     self.args.promote_after,
                                     self.args.stale_primary)
            self.failover.start()
        monitor = Monitor(self.proxy,
                          int(self.args.duration / SAMPLE_INTERVAL) + 100,
                          self.progress if self.args.verbose else None)
        clients = [Client(number, self) for number in range(self.args.clients)]
        for client in clients:
            client.start()
        deadline = self.started + self.args.duration
        while time.monotonic() < deadline and self.proxy.alive():
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        if not self.proxy.alive():
            self.problems.note("proxy died", "exit status %s during the load"
                               % self.proxy.process.returncode)
        self.stopping.set()
        stop_by = time.monotonic() + 3 * CLIENT_TIMEOUT
        for client in clients:
            client.join(max(0.1, stop_by - time.monotonic()))
            if client.is_alive():
                self.problems.note("client did not stop", client.name)
        if self.failover is not None:
            # A step under way (pg_ctl, a start) ends within its timeout.
            self.failover.join(120)
            if self.failover.is_alive():
                self.problems.note("failover", "its thread did not end")
        self.load_time = time.monotonic() - self.started
        monitor.stop()
        self.samples = monitor.samples
        self.upstream.faults_on = False
        # Upstream sessions kept for the next client (upstream_pool_size)
        # may rightly wait upstream_pool_idle seconds; not longer.
        quiet = self.setting("upstream_pool_idle",
                             smtpproxy.ConcreteMailHandler.upstream_pool_idle)
        if not self.upstream.wait_quiet(quiet + 15):
            self.problems.note("upstream not quiet",
                               "sessions still open %d s after the load"
                               % (quiet + 15))
        self.idle = self.wait_idle()
        self.idle_descriptors = self.proxy.descriptors()
        self.settle_time = time.monotonic() - self.started - self.load_time

    def setting_text(self, name, default):
        """The proxy's key ``name`` as --set gives it, as text."""
        for item in reversed(self.args.set):
            key, _, value = item.partition("=")
            if key.strip() == name:
                return value.strip()
        return default

    def debug_log(self):
        """The proxy's dialogue log (--failover turns debug on), or None
        when --set turns it off."""
        if self.setting_text("debug", "yes" if self.args.failover is not None
                             else "no").lower() not in ("yes", "true", "on",
                                                        "1"):
            return None
        return self.setting_text("greylist_debuglog", os.path.join(
            self.directory, "greylist-debug.log"))

    def rcpt_replied(self, message, recipient, code, text, asked=None):
        """A client heard ``code`` ``text`` to a RCPT (asked at
        ``asked``, time.time(), if timed): --failover notes it."""
        if self.failover is not None:
            self.failover.rcpt(message, recipient, code, text, asked)

    def setting(self, name, default):
        """The proxy's key ``name`` (a number) as --set gives it."""
        for item in self.args.set:
            key, _, value = item.partition("=")
            if key.strip() == name:
                return float(value)
        return default

    def wait_idle(self):
        """The proxy's resources once the load is over: after 2 seconds,
        or while they are still above the baseline, up to 15 seconds more
        than a spare session thread may wait for a client (spare_threads,
        thread_idle_time): those threads must end by then."""
        time.sleep(2)
        # The connections to a PostgreSQL store that it keeps: one per
        # process that decides (each worker, or the one process).
        if smtpproxy.is_database_uri(self.args.greylist_db or ""):
            self.store_connections = len(self.proxy.workers()) or 1
        deadline = time.monotonic() + 13 + self.setting(
            "thread_idle_time", smtpproxy.SMTPProxyServer.thread_idle_time)
        sample = self.proxy.sample()
        while (sample is not None and self.baseline is not None
               and not self.back_to_baseline(sample)
               and time.monotonic() < deadline):
            time.sleep(0.5)
            sample = self.proxy.sample()
        return sample

    def back_to_baseline(self, sample):
        return (sample.fds <= self.baseline.fds + self.fd_slack
                + self.store_connections
                and sample.threads <= self.baseline.threads
                + self.thread_slack)

    # -- checks ----------------------------------------------------------

    def check_ledger(self):
        """Compare the sent ledger with the received one; return counts."""
        counts = collections.Counter()
        problems = self.problems
        arrived = collections.defaultdict(list)   # (id, recipient) -> [...]
        messages_arrived = set()
        for arrival in self.upstream.arrivals:
            counts["arrivals"] += 1
            hostile = self.ledger.hostile.get(arrival.id)
            if hostile is not None:
                problems.note("hostile message arrived", "%s (%s)"
                              % (arrival.id, hostile))
                continue
            message = self.ledger.messages.get(arrival.id)
            if message is None:
                problems.note("phantom", "unknown message %s" % arrival.id)
                continue
            messages_arrived.add(arrival.id)
            if (arrival.digest, arrival.size, arrival.sender) != (
                    message.digest, message.size, message.sender):
                problems.note("corrupted", "%s: %d octets from <%s>, sent "
                              "%d from <%s>" % (arrival.id, arrival.size,
                                                arrival.sender, message.size,
                                                message.sender))
            for recipient in arrival.recipients:
                arrived[(arrival.id, recipient)].append(arrival)
                counts["recipients arrived"] += 1
                if recipient not in message.status:
                    problems.note("phantom", "%s to <%s>, not a recipient"
                                  % (arrival.id, recipient))
        counts["messages arrived"] = len(messages_arrived)
        for message in self.ledger.messages.values():
            for recipient, status in sorted(message.status.items()):
                copies = len(arrived.get((message.id, recipient), ()))
                where = "%s to <%s>" % (message.id, recipient)
                counts[status] += 1
                if status == AMBIGUOUS and copies:
                    counts["ambiguous arrived"] += 1
                if copies > 1:
                    problems.note("duplicated", "%s: %d copies"
                                  % (where, copies))
                elif status == ACCEPTED and copies == 0:
                    problems.note("lost", "%s: 250, never arrived" % where)
                elif status in (PENDING, REFUSED) and copies:
                    problems.note("phantom", "%s: arrived, but the client "
                                  "heard %s" % (where, status))
        return counts

    def check_resources(self):
        if self.baseline is None or self.idle is None:
            self.problems.note("resources", "the proxy could not be sampled")
            return
        if not self.back_to_baseline(self.idle):
            self.problems.note(
                "resources not back to idle",
                "%d descriptors and %d threads after the load, %d and %d "
                "before; descriptors opened: %s"
                % (self.idle.fds, self.idle.threads, self.baseline.fds,
                   self.baseline.threads, ", ".join(self.new_descriptors())))
        first, last = self.rss_thirds()
        if first and last > self.rss_growth * first:
            self.problems.note("RSS grew", "mean of the last third of the "
                               "load %.1f MB, of the first %.1f MB"
                               % (last / 1e6, first / 1e6))

    def new_descriptors(self):
        """What the descriptors open after the load, and not before, point
        to."""
        left = collections.Counter(self.idle_descriptors)
        left.subtract(collections.Counter(self.baseline_descriptors))
        return sorted("%s%s" % (name, " (%d)" % count if count > 1 else "")
                      for name, count in left.items() if count > 0)

    def rss_thirds(self):
        """Mean RSS of the first and the last third of the load's samples
        ((None, None) if there are fewer than three)."""
        rss = [sample.rss for sample in self.samples]
        third = len(rss) // 3
        if third == 0:
            return None, None
        return (sum(rss[:third]) / float(third),
                sum(rss[-third:]) / float(third))

    def check_proxy(self):
        tracebacks = self.log.count("Traceback")
        if tracebacks:
            start = self.log.index("Traceback")
            self.problems.note("traceback in the proxy's log",
                               self.log[start:start + 1500])
        if self.exit_status != 0:
            self.problems.note("proxy exit status",
                               "%s after SIGTERM" % self.exit_status)
        return tracebacks

    # -- the report ------------------------------------------------------

    def report(self):
        counts = self.check_ledger()
        self.check_resources()
        tracebacks = self.check_proxy()
        failover_lines = []
        if self.failover is not None:
            failover_lines = self.failover.report(
                self.log, self.proxy.pid, self.debug_log(), self.problems)
        problems = self.problems
        failed = sum(problems.counts.values())
        tally = dict(self.tally.items())
        deferred = dict((key[len("deferred: "):], value)
                        for key, value in self.ledger.tally.items()
                        if key.startswith("deferred: "))
        hostile = dict((key[len("hostile: "):], value)
                       for key, value in tally.items()
                       if key.startswith("hostile: "))
        recipients = sum(counts[status] for status in
                         (ACCEPTED, REFUSED, PENDING, AMBIGUOUS))
        lines = [
            "smtpproxy soak: %s" % ("PASS" if not failed else "FAIL"),
            "  duration      %.1f s of load, %.1f s to settle; %d clients, "
            "seed %s" % (self.load_time, self.settle_time, self.args.clients,
                         self.seed),
            "  sessions      %d (%d hostile)"
            % (tally.get("sessions", 0), sum(hostile.values())),
            "  messages      %d sent in %d transactions; %d of them arrived"
            % (len(self.ledger.messages), sum(
                message.attempts for message in self.ledger.messages.values()),
               counts["messages arrived"]),
            "  recipients    %d: %d accepted (250), %d refused (5xx), "
            "%d still deferred at the end, %d ambiguous (%d of them "
            "arrived)" % (recipients, counts[ACCEPTED], counts[REFUSED],
                          counts[PENDING], counts[AMBIGUOUS],
                          counts["ambiguous arrived"]),
            "  retries       %d deferred recipients retried: %s"
            % (sum(deferred.values()), self.format_counts(deferred)),
            "  arrivals      %d (the upstream's 250s), for %d recipients"
            % (counts["arrivals"], counts["recipients arrived"]),
            "  ledger        lost %d, duplicated %d, phantom %d, "
            "corrupted %d, hostile arrived %d"
            % tuple(problems.counts[kind] for kind in (
                "lost", "duplicated", "phantom", "corrupted",
                "hostile message arrived")),
            "  hostile       %s; %d reached DATA"
            % (self.format_counts(hostile),
               tally.get("hostile reached DATA", 0)),
            "  faults        %s" % self.format_counts(
                dict(self.upstream.faults.items())),
            "  upstream      %d sessions, %d protocol errors"
            % (self.upstream.sessions,
               problems.counts["upstream saw a protocol error"]),
        ]
        lines += self.resource_lines()
        lines.append("  proxy log     %d tracebacks; exit status %s"
                     % (tracebacks, self.exit_status))
        lines += failover_lines
        if failed:
            lines.append("failures:")
            lines += problems.lines(self.args.verbose)
        lines.append("PASS" if not failed else "FAIL")
        print("\n".join(lines))
        return 0 if not failed else 1

    @staticmethod
    def format_counts(counts):
        return ", ".join("%s %d" % item for item in sorted(counts.items())) \
            or "none"

    def resource_lines(self):
        if self.baseline is None or self.idle is None:
            return ["  resources     not sampled"]
        samples = self.samples + [self.idle]
        first, last = self.rss_thirds()
        opened = self.new_descriptors()
        return [
            "  descriptors   baseline %d, peak %d, end %d%s"
            % (self.baseline.fds, max(s.fds for s in samples),
               self.idle.fds, " (%s)" % ", ".join(opened)
               if opened and self.args.verbose else ""),
            "  threads       baseline %d, peak %d, end %d"
            % (self.baseline.threads, max(s.threads for s in samples),
               self.idle.threads),
            "  RSS           baseline %.1f MB, peak %.1f MB, end %.1f MB%s"
            % (self.baseline.rss / 1e6, max(s.rss for s in samples) / 1e6,
               self.idle.rss / 1e6,
               "; load's first third %.1f MB, last %.1f MB"
               % (first / 1e6, last / 1e6) if first else ""),
        ]


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Soak test of smtpproxy: load, faults, hostile clients "
        "and a ledger of every message (see the module's docstring).")
    parser.add_argument("--duration", type=float, default=600,
                        help="seconds of load (600)")
    parser.add_argument("--clients", type=int, default=20,
                        help="client threads (20)")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed (random)")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter that runs the proxy (%s)"
                        % sys.executable)
    parser.add_argument("--greylist-db", metavar="LOCATION",
                        help="the greylisting store: a PostgreSQL URI "
                        "(an sqlite file in the run's directory)")
    parser.add_argument("--postgresql", action="store_true",
                        help="greylist in a private PostgreSQL cluster "
                        "(tests/pg.py), stopped at the end")
    parser.add_argument("--failover", metavar="SECONDS", type=float,
                        nargs="?", const=-1.0, default=None,
                        help="with --postgresql: a hot standby, the primary "
                        "crashed SECONDS into the load (half the duration)")
    parser.add_argument("--promote-after", metavar="SECONDS", type=float,
                        default=15.0, help="the standby promoted SECONDS "
                        "after the primary's crash (15)")
    parser.add_argument("--stale-primary", metavar="SECONDS", type=float,
                        default=None, help="the old primary started again "
                        "SECONDS after the promotion (not by default)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append",
                        default=[], help="a configuration key of the proxy "
                        "(repeatable), such as --set workers=2")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory")
    parser.add_argument("--verbose", action="store_true",
                        help="print progress, and every failure's details")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(10 ** 6)
    if args.duration <= 0 or args.clients < 1:
        parser.error("--duration and --clients must be positive")
    if args.failover is not None:
        if not args.postgresql:
            parser.error("--failover needs --postgresql (its cluster)")
        if args.failover < 0:
            args.failover = args.duration / 2.0
        if args.promote_after < 0 or args.failover < Failover.before or \
                args.failover + args.promote_after >= args.duration:
            parser.error("--failover and --promote-after: the promotion "
                         "must come within the load, the crash %d s into "
                         "it at least" % Failover.before)
    elif args.stale_primary is not None:
        parser.error("--stale-primary goes with --failover")
    return args


def main(argv=None):
    args = parse_args(argv)
    directory = tempfile.mkdtemp(prefix="smtpproxy-soak-")
    cluster = standby = None
    try:
        if args.postgresql:
            import pg
            cluster = pg.PostgreSQL()
            args.greylist_db = cluster.database()
            if args.failover is not None:
                # The database is there already: the standby has it too.
                standby = cluster.standby()
                args.greylist_db = "postgresql://%s:%s@%s:%d,%s:%d/%s" % (
                    pg.ROLE, pg.PASSWORD, LOOPBACK, cluster.port, LOOPBACK,
                    standby.port, args.greylist_db.rsplit("/", 1)[1])
        return Soak(args, directory, cluster, standby).run()
    finally:
        if standby is not None:
            standby.close()
        if cluster is not None:
            cluster.close()
        if args.keep:
            print("kept %s" % directory)
        else:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
