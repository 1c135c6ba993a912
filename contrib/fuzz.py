#!/usr/bin/env python3
"""Mutation fuzzer of smtpproxy: clients send mutated SMTP dialogues, and an
oracle checks every reply they read and the framing of all that reaches
the upstream.

Usage (by hand, not in CI; Linux: it binds clients to 127.0.0.2 ... and
127.0.1.1 ... and reads /proc)::

    python3 contrib/fuzz.py                         # 100,000 sessions
    python3 contrib/fuzz.py --sessions 1000000 --seed 7 --verbose
    python3 contrib/fuzz.py --replay 7:123456       # one session, shown

Options: ``--sessions N`` (100000), ``--first N`` the number of the first
session (0; session numbers are what ``--replay`` takes), ``--seed N``
(random by default; the report names it), ``--processes P`` client
processes (3) of ``--threads T`` threads each (48), ``--rate R`` sessions
a second at most (no limit), ``--python PATH`` the interpreter that runs
the proxy (this one), ``--set KEY=VALUE`` a configuration key of the proxy
(repeatable), ``--proxy-class DOTTED.NAME`` the proxy's ``--class`` (the
tests plant broken handlers so), ``--no-idle-check`` skips waiting for the
proxy's descriptors and threads to come back to their baseline (for short
runs), ``--keep`` keeps the temporary directory, ``--verbose`` prints
progress and more examples of each violation.  ``--replay SEED:N`` runs
session N of seed SEED alone against a fresh proxy and prints its whole
dialogue: what was sent, each reply, what the oracle expected.  Standard
library only; loopback only; every loop is bounded and every wait has a
deadline.

What it runs:

- smtpproxy.py from its command line, configured as contrib/soak.py does
  (its ProxyProcess: GreyListingPolicy for example.org, greylisting that
  passes a retry after a second, ``upstream_timeout = 10``), the defaults
  otherwise (``workers = auto``: a master and its workers; spare threads;
  the upstream pool), 127.0.1.0/24 in ``allowed_sender_nets``, and
  soak.py's ``inactivity_timeout = 5``.
- In its own process, soak.py's fault-injecting upstream (4xx, 5xx, drops
  at RCPT, DATA, in the data and at the final dot, delayed replies),
  offering SMTPUTF8 and DSN too, whose received ledger goes to the main
  process.  It notes the proxy's framing errors as soak.py's does (a
  command out of order, a data line with a bare CR or LF, a NUL or over
  1000 octets) and more: a command line over 512 octets, with a bare CR,
  LF, NUL or control character, or 8-bit without SMTPUTF8; a malformed
  envelope; a parameter not offered.
- ``--processes`` client processes of ``--threads`` threads, each session
  numbered and made from its own random generator (seed, number): 75% from
  127.0.1.x (relaying), 25% from 127.0.0.2 ... 127.0.0.30 (greylisted:
  their triplets repeat, so most pass after their first try, and fresh
  senders are deferred).  A session is EHLO or HELO, 0 to 3 transactions
  (MAIL with SIZE, BODY, SMTPUTF8, RET, ENVID; 1 to 4 RCPTs, some with
  NOTIFY, ORCPT; quoted local-parts, source routes, address literals,
  <Postmaster>, the null sender, UTF-8 addresses; DATA and a message of
  soak.py's lines: dot lines, lines of 998 octets, 8-bit text), NOOP,
  RSET, VRFY, QUIT; sent one command at a time, pipelined (RFC 2920), or
  blasted in one stream without waiting for any reply, always in writes
  cut at random places.  60% of the sessions are mutated, 1 to 3 times:
  commands dropped, duplicated, swapped or inserted (unknown, HELP, BDAT,
  AUTH, empty lines, ...), verbs in other case, extra spaces and tabs, bad
  paths (no brackets, <>, routes, quoted, literals, too long), junk, huge
  and repeated parameters, odd HELO names, lines of 511 to 3000 octets,
  bits flipped, octets inserted (NUL, CR, LF, 8-bit) or deleted, line ends
  changed (LF, CR, none); in the data: SMTP smuggling (a second message
  behind a bare-LF, bare-CR or NUL end of data), NUL, bare CR or LF, lines
  of 999 octets and more, octets flipped, an early end, a dot unstuffed,
  8-bit text without BODY=8BITMIME.  A session ends with QUIT and a
  half-close, or is cut at a random octet (then half-closed), closed or
  reset there, or goes silent there until the proxy's timeout; rarely it
  talks before the greeting.

What it checks (the oracle), and fails on:

- every reply is well-formed (RFC 5321 4.2: three digits, 2-5 then 0-5,
  "-" or " " and text of printable ASCII or tabs, CR LF, at most 512
  octets, one code in a multi-line reply), an enhanced status code (RFC
  3463) agrees with its reply's class, and once EHLO offered
  ENHANCEDSTATUSCODES every reply but the greeting's, EHLO's and 354 has
  one;
- a model of the dialogue, run on the octets as sent and the replies as
  read: one reply per command line the proxy reads (a line is what ends
  with LF within 512 octets; a longer one is one line to its LF), and per
  message, and none else (but the greeting, a 421 after
  ``max_errors`` refusals, and a 421 4.4.2 after ``inactivity_timeout`` of
  silence, never sooner); each reply of a code the command may get in its
  state (a protocol error its own code, and the connection closed after
  it: ``strict``); the connection closed only after 221, 421 or a
  protocol error, and every command line before a half-close answered; a
  message ends at the first CR LF . CR LF and nowhere else, and is refused
  (550, 552) if it holds a NUL, a bare CR or LF or a line over 1000
  octets; in unmutated sessions no valid command refused; every 2xx to a
  message names it (no crossed replies);
- the ledgers: a 2xx to a message only if the upstream received it and
  answered 250 (nothing lost); nothing received that the client did not
  end (no smuggling: a bare-LF dot neither ends nor splits a message) or
  that the proxy refused; what is received identical to what the client
  sent, dot-stuffing undone, from the sender the client gave, to the
  recipients it was told 2xx for, with its MAIL and RCPT parameters (no
  8-bit data without BODY=8BITMIME but as the client sent it); nothing
  received twice; nothing the upstream answered 250 that the client was
  told failed;
- no session waits past its deadline for a reply or for the end; the
  proxy's processes stay up (no worker replaced), its standard error holds
  no Traceback, it exits 0 on SIGTERM, and its descriptors and threads
  (master and workers, from /proc) come back to their baseline (+5, +2)
  once the load is over and the upstream pool and spare threads have
  expired.

Every violation names its session: ``--replay SEED:N`` shows it again.
Exit status: 0 if there was no violation, 1 otherwise.

Its last long run, of commit 8073b2e on a 2-core VM shared with other
work (the fuzzer and the proxy took 1.1 cores)::

    python3 contrib/fuzz.py --sessions 1000000 --seed 20261206 \
        --threads 48 --verbose

1,000,000 sessions in 2447 s of load, 409 a second; 57.8% mutated, 29.9%
unmutated and well-behaved; 8,067,121 replies (12,847,765 lines) checked;
831,068 messages sent to their end: 699,765 accepted (2xx) and every one
of them delivered, 45,568 failed by the upstream's injected faults,
84,519 refused as bad (NUL, bare CR or LF, a line over 1000 octets) and
none of those received; 60,866 smuggling attempts; the upstream's 225,872
sessions saw no protocol error.  CPU: the proxy's 1167 s (1.17 ms a
session), the fuzzer's 1552 s.  The proxy's descriptors: 34 at the
baseline, 328 at the peak, 35 at the end; threads 4, 182, 4; RSS 152.4
MB, 227.0 MB, 219.1 MB.  No traceback; exit status 0; no violation.

That run had ``inactivity_timeout = 15``, for earlier runs with soak.py's
5 s had found the proxy timing out clients that had sent their lines in
time, about 5 sessions in 100,000 (421 4.4.2, "line not complete within
5 s"): a line's deadline, counted from its first octet, ran on while the
proxy waited for the upstream (RCPTs whose replies the upstream delayed,
message data it read slowly), so a pipelined line cut across two writes
expired though its rest had come.  Fixed in smtpproxy (a line's deadline
counts from when the reading of it began; tests/test_hostile.py), and
the fuzzer is back at 5 s: 100,000 sessions (seed 20261207, 526 a
second) then found no violation.
"""

import argparse
import collections
import multiprocessing
import multiprocessing.connection
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import hostile  # noqa: E402  (its greylisted session warms the workers up)
import soak  # noqa: E402  (its upstream, proxy process and messages)

smtpproxy = soak.smtpproxy

LOOPBACK = soak.LOOPBACK
DOMAIN = soak.DOMAIN
RELAY_NET = "127.0.1.0/24"
RELAY_SOURCES = ["127.0.1.%d" % number for number in range(1, 255)]
GREY_SOURCES = soak.SOURCES
RELAY_SHARE = 0.75

# RFC 5321 4.5.3.1: command lines, text lines and reply lines, CR LF
# included.
MAX_COMMAND_LINE = 512
MAX_TEXT_LINE = soak.MAX_TEXT_LINE
MAX_REPLY_LINE = 512
MAX_REPLY_LINES = 100

# The proxy's inactivity_timeout, soak.py's: a command or text line must
# be complete within it from when the proxy began reading it.
INACTIVITY_TIMEOUT = 5
# How long a client waits for a reply, for the end of the session, for a
# connection: past that the proxy hangs.
REPLY_WAIT = 20.0
CONNECT_WAIT = 10.0
# A claim of the client ledger (or an arrival of the upstream's) is judged
# this long after it came, when nothing of its message can come any more.
SETTLE_AGE = 120.0
SAMPLE_INTERVAL = 5.0
MAX_EXAMPLES = 5

MUTATED_SHARE = 0.6
STYLES = (("sync", 0.4), ("pipelined", 0.35), ("blast", 0.25))
ENDINGS = (("finish", 0.947), ("cut", 0.03), ("close", 0.015),
           ("reset", 0.005), ("silence", 0.003))
TALK_FIRST_CHANCE = 0.002
SLOW_PIECES_CHANCE = 0.05

# Replies that refuse a valid command: an unmutated session never hears
# them (but a pipelined DATA whose recipients all failed: 503).
PROTOCOL_REFUSALS = frozenset((500, 501, 502, 503, 504, 552, 553, 555))

# Whether the proxy closes after a reply: it must; it may (the reply
# says).
MUST, MAY = "must", "may"

_NOT_PRINTABLE = re.compile(b"[^\x20-\x7e]")
_UTF8_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_HELO_ARGUMENT = re.compile(r"[\x21-\x7e]{1,255}\Z")
_REPLY_LINE = re.compile(br"([2-5][0-5][0-9])(?:([ -])([\t\x20-\x7e]*))?"
                         br"\r\n\Z")
_LOOKS_ENHANCED = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+")
_ENHANCED = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?: |\Z)")
# In a message: a NUL, a CR without its LF, a LF without its CR.
_FORBIDDEN = re.compile(b"\x00|\r(?!\n)|(?<!\r)\n")
_MESSAGE_ID = re.compile(br"^X-Soak-Id: ([0-9a-f-]+)\r$", re.M)
# A path in angle brackets, a quoted string's ">" inside it, and the rest.
_PATH = re.compile(br'<(?:"(?:[^"\\\r\n]|\\.)*"|[^<>"\r\n])*>')


def codes(*ranges):
    """A frozenset of reply codes: numbers, and (first, last) ranges."""
    found = set()
    for item in ranges:
        if isinstance(item, tuple):
            found.update(range(item[0], item[1] + 1))
        else:
            found.add(item)
    return frozenset(found)


REFUSALS = codes((400, 459), (500, 559)) - {421}
RCPT_CODES = codes(250, 251) | REFUSALS
MAIL_CODES = codes(250, (500, 559))
DATA_CODES = codes(354) | REFUSALS
TEMPORARY = codes((400, 459)) - {421}


def message_key(content):
    """What ties a message in the client's ledger to the upstream's: its
    X-Soak-Id, or (a message whose id a mutation hid) its digest."""
    match = _MESSAGE_ID.search(content.split(b"\r\n\r\n", 1)[0])
    if match:
        return match.group(1).decode("ascii")
    return "sha256:" + soak.digest(content)


def session_of(key):
    """The session number in a message key, or None."""
    parts = key.split("-")
    if len(parts) == 3:
        try:
            return int(parts[1], 16)
        except ValueError:
            pass
    return None


def unstuff(message):
    """A message as sent after DATA (up to the CR LF before the final dot),
    its transparency dots taken off."""
    return b"\r\n".join(line[1:] if line.startswith(b".") else line
                        for line in message.split(b"\r\n"))


def message_problem(message):
    """Why the proxy must refuse ``message`` (dot-stuffed, up to the final
    dot), or None: said otherwise than the proxy's DataScanner does."""
    match = _FORBIDDEN.search(message)
    if match:
        return {b"\x00": "NUL", b"\r": "bare CR", b"\n": "bare LF"}[
            match.group()]
    longest = MAX_TEXT_LINE - 2
    if any(len(line) > longest and len(line) - line.startswith(b".")
           > longest for line in message.split(b"\r\n")):
        return "a line over %d octets" % MAX_TEXT_LINE
    return None


def path_of(line):
    """The path (bytes, with its brackets) in a MAIL or RCPT line, and the
    parameters after it (a sorted list of upper-cased bytes), or None."""
    match = _PATH.search(line)
    if match is None:
        return None
    rest = line[match.end():].rstrip(b"\r\n")
    return match.group(), sorted(word.upper() for word in rest.split(b" ")
                                 if word)


# ---------------------------------------------------------------------------
# Sessions: a plan of writes, and the mutations
# ---------------------------------------------------------------------------

RELAY_SENDERS = ("alice@sender-a.test", "", '"alice smith"@sender-a.test',
                 "@relay.test,@hop.test:bob@sender-b.test",
                 "carol@[192.0.2.1]", "dave@[IPv6:2001:db8::1]",
                 "prvs=0123abcd=erin@sender-c.test", "x.y.z@sub.sender.test")
RELAY_RECIPIENTS = ("user%02d@" + DOMAIN, "someone@elsewhere.test",
                    "Postmaster", '"two words"@' + DOMAIN, "user@[127.0.0.1]",
                    "postmaster@" + DOMAIN, "@hop.test:user01@" + DOMAIN)
UTF8_SENDERS = ("j\u00f6rg@b\u00fccher.test",
                "\u03b4\u03bf\u03ba\u03b9\u03bc\u03ae@example.test")
UTF8_RECIPIENTS = ("d\u00f6rte@" + DOMAIN, "\u7528\u6237@" + DOMAIN)
GREY_SENDERS = ("alice@sender-a.test", "bob+tag@sender-b.test",
                "carol@sender-c.test")

JUNK_COMMANDS = (b"NOOP", b"NOOP hello there", b"RSET", b"RSET now", b"VRFY",
                 b"VRFY user00", b"HELP", b"HELP MAIL", b"EXPN list",
                 b"ETRN example.org", b"AUTH PLAIN AGFsaWNlAHNlY3JldA==",
                 b"BDAT 10 LAST", b"STARTTLS", b"STARTTLS now", b"TURN",
                 b"XCLIENT ADDR=192.0.2.1", b"XFORWARD NAME=spoof.test",
                 b"QUIT now", b"", b" ", b"DATA", b"DATA now",
                 b"MAIL FROM:<late@example.net>", b"RCPT TO:<user00@" +
                 DOMAIN.encode() + b">", b"EHLO again.test", b"HELO",
                 b"EHLO", b"GET / HTTP/1.0", b"QUIT", b"MAIL", b"RCPT",
                 b"MAIL TO:<a@b.test>", b"RCPT FROM:<a@b.test>")
BAD_PATHS = (b"<>", b"a@example.org", b"<a@example.org", b"a@example.org>",
             b"<<a@example.org>>", b"< a@example.org>", b"<a @example.org>",
             b'<"quoted"@example.org>', b'<"a\\"b"@example.org>',
             b'<"a>b"@example.org>', b"<@x.test,@y.test:u@example.org>",
             b"<@x:u@example.org>", b"<@:u@example.org>",
             b"<u@[127.0.0.1]>", b"<u@[IPv6:::1]>", b"<u@[300.1.1.1]>",
             b"<u@[IPv6:zz]>", b"<" + b"l" * 65 + b"@example.org>",
             b"<" + b"l" * 64 + b"@example.org>",
             b"<u@" + b"d" * 64 + b".test>", b"<u@" + b"d" * 63 + b".test>",
             b"<u@" + b".".join([b"d" * 60] * 5) + b">",
             b"<Postmaster>", b"<postmaster>", b"<u%x@example.org>",
             b"<x!u@example.org>", b"<u@example.org> (comment)",
             b"Alice <u@example.org>", b"<u@example..org>", b"<u@-x.test>",
             b"<.u@example.org>", b"<u.@example.org>", b"<u@example.org.>",
             b"<u@>", b"<@example.org>", b"<u@@example.org>",
             b"<\xc3\xbc@example.org>", b"<u@\xc3\xbc.test>",
             b"<\xff@example.org>")
PARAMETERS = (b"SIZE=1000", b"SIZE=99999999999999999999999",
              b"SIZE=-1", b"SIZE", b"SIZE=12x", b"SIZE=0", b"BODY=7BIT",
              b"BODY=8BITMIME", b"body=8bitmime", b"BODY=BINARYMIME",
              b"BODY", b"SMTPUTF8", b"SMTPUTF8=yes", b"RET=FULL", b"RET=HDRS",
              b"RET=ALL", b"ENVID=abc+2Bdef", b"ENVID=" + b"e" * 101,
              b"ENVID=bad+zz", b"NOTIFY=SUCCESS,FAILURE", b"NOTIFY=NEVER",
              b"NOTIFY=NEVER,SUCCESS", b"NOTIFY=SUCCESS,SUCCESS",
              b"ORCPT=rfc822;user00@example.org", b"ORCPT=bad",
              b"AUTH=<>", b"FOO=bar", b"=x", b"X=", b"SIZE=10 SIZE=10",
              b"BODY=7BIT BODY=8BITMIME", b"X-" + b"P" * 300 + b"=1")
HELO_NAMES = (b"", b" x.test", b"x.test ", b"a" * 255, b"a" * 256,
              b"[127.0.0.1]", b"two words", b"\tx.test", b"x\x7f.test",
              b"d\xc3\xb6rfli.test", b"-", b"x" * 500)
# The ends of data a lax server might see (soak.py's, and more), each
# followed by a second, smuggled message.
SMUGGLED_ENDS = soak.SMUGGLED_ENDS + (b"\n.\r\r\n", b"\r\n.\x00\r\n",
                                      b"\r\r\n.\r\n", b"\n\n.\n\n")
SPECIAL_OCTETS = (b"\x00", b"\r", b"\n", b"\t", b"\x7f", b"\x80", b"\xff",
                  b"\x1b", b" ", b".", b":", b"<", b">", b"\"")
LINE_ENDS = (b"\n", b"\r", b"", b"\r\r\n", b"\n\r\n", b"\r\n\r\n", b" \r\n")
LONG_LINES = (511, 512, 513, 514, 600, 1000, 3000)
DATA_LINE_LENGTHS = (997, 998, 999, 1000, 1001, 1500, 5000)


class Item(object):
    """A command line of a session's plan (``verb``, upper-cased bytes), or
    its message: what follows DATA, dot-stuffed, up to its final dot."""

    __slots__ = ("kind", "data", "verb")

    def __init__(self, kind, data, verb=b""):
        self.kind = kind
        self.data = data
        self.verb = verb


def command(line):
    return Item("command", line + b"\r\n", line.split(b" ", 1)[0].upper())


class Write(object):
    """What a session writes at once (cut into ``pieces``); ``sync``: after
    the replies to all it sent before; ``message``: only if DATA got 354
    (not when blasting); ``data_command``: a bare DATA, which a client that
    waits replaces by RSET if no recipient was accepted."""

    __slots__ = ("pieces", "sync", "message", "data_command")

    def __init__(self, pieces, sync, message, data_command):
        self.pieces = pieces
        self.sync = sync
        self.message = message
        self.data_command = data_command


class Plan(object):
    """One session, made from (seed, number) alone: see the module's
    docstring."""

    def __init__(self, seed, number, text):
        self.number = number
        rng = self.rng = random.Random("%d:%d" % (seed, number))
        self.seed = seed
        self.text = text
        self.relay = rng.random() < RELAY_SHARE
        self.source = rng.choice(RELAY_SOURCES if self.relay
                                 else GREY_SOURCES)
        self.style = soak.choose(rng, STYLES)
        self.esmtp = rng.random() < 0.85
        self.mutations = []
        self.items = self.dialogue()
        if rng.random() < MUTATED_SHARE:
            self.mutate()
        self.ending = soak.choose(rng, ENDINGS)
        self.talk_first = rng.random() < TALK_FIRST_CHANCE
        self.slow = rng.random() < SLOW_PIECES_CHANCE
        self.writes = self.make_writes()
        total = sum(len(piece) for write in self.writes
                    for piece in write.pieces)
        self.cut_at = (rng.randrange(total + 1) if self.ending != "finish"
                       else None)
        # Unmutated, sent as a well-behaved client would: every valid
        # command must be taken.
        self.clean = (not self.mutations and self.style != "blast"
                      and self.ending == "finish" and not self.talk_first)

    # -- the dialogue -----------------------------------------------------

    def dialogue(self):
        rng = self.rng
        helo = b"n%x.fuzz.test" % self.number
        items = [command((b"EHLO " if self.esmtp else b"HELO ") + helo)]
        transactions = soak.choose(rng, ((0, 0.05), (1, 0.6), (2, 0.25),
                                         (3, 0.1)))
        for transaction in range(transactions):
            if rng.random() < 0.1:
                items.append(command(rng.choice((
                    b"NOOP", b"RSET", b"VRFY user%02d" % rng.randrange(4)))))
            items += self.transaction(transaction)
        items.append(command(b"QUIT"))
        return items

    def envelope(self):
        """(sender, recipients, whether they need SMTPUTF8)."""
        rng = self.rng
        if not self.relay:
            if rng.random() < 0.1:
                sender = "fresh-%08x@sender-f.test" % rng.getrandbits(32)
            else:
                sender = GREY_SENDERS[(GREY_SOURCES.index(self.source)
                                       + rng.randrange(3)) % 3]
            recipients = [("user%02d@" + DOMAIN) % rng.randrange(4)
                          if rng.random() < 0.93 else "user@elsewhere.test"
                          for _ in range(rng.choice((1, 1, 1, 2, 3)))]
            return sender, recipients, False
        utf8 = self.esmtp and rng.random() < 0.05
        sender = rng.choice(UTF8_SENDERS if utf8 else RELAY_SENDERS)
        recipients = []
        for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
            recipient = rng.choice(UTF8_RECIPIENTS if utf8 and
                                   rng.random() < 0.5 else RELAY_RECIPIENTS)
            if "%02d" in recipient:
                recipient = recipient % rng.randrange(20)
            recipients.append(recipient)
        return sender, recipients, utf8

    def transaction(self, number):
        rng = self.rng
        sender, recipients, utf8 = self.envelope()
        eight_bit = self.esmtp and rng.random() < 0.2
        message_id = "%x-%x-%x" % (self.seed, self.number, number)
        content = self.content(message_id, eight_bit)
        parameters = []
        if self.esmtp:
            if eight_bit or rng.random() < 0.1:
                parameters.append("BODY=8BITMIME" if eight_bit else "BODY=7BIT")
            if rng.random() < 0.3:
                parameters.append("SIZE=%d" % len(content))
            if utf8:
                parameters.append("SMTPUTF8")
            if rng.random() < 0.05:
                parameters.append(rng.choice(("RET=HDRS", "RET=FULL")))
            if rng.random() < 0.05:
                parameters.append("ENVID=fuzz+2B%x" % self.number)
        rng.shuffle(parameters)
        items = [command(("MAIL FROM:<%s>" % sender + "".join(
            " " + parameter for parameter in parameters)).encode("utf-8"))]
        for recipient in recipients:
            extra = ""
            if self.esmtp and rng.random() < 0.05:
                extra = rng.choice((" NOTIFY=SUCCESS,FAILURE", " NOTIFY=NEVER",
                                    " ORCPT=rfc822;user00@example.org"))
            items.append(command(("RCPT TO:<%s>%s" % (recipient, extra))
                                 .encode("utf-8")))
        if rng.random() < 0.05:
            items.append(command(b"RSET"))      # abandoned
            return items
        items.append(command(b"DATA"))
        items.append(Item("message", soak.dot_stuff(content)))
        return items

    def content(self, message_id, eight_bit):
        """A message: its id first, soak.py's lines (dot lines, 998-octet
        lines, 8-bit text if ``eight_bit``), mostly small."""
        rng = self.rng
        lines = [b"X-Soak-Id: " + message_id.encode("ascii"),
                 b"Subject: fuzz " + message_id.encode("ascii"),
                 b"Content-Type: text/plain; charset=%s"
                 % (b"utf-8" if eight_bit else b"us-ascii"), b""]
        count = soak.choose(rng, ((0, 0.6), (1, 0.3), (2, 0.08), (3, 0.02)))
        count = rng.randint(*((0, 8), (8, 40), (40, 200), (300, 1200))[count])
        for _ in range(count):
            if rng.random() < 0.05:
                lines.append(rng.choice((b".", b"..", b". dot", b".\t",
                                         b"...", b".x" * 40)))
            else:
                lines.append(self.text.line(rng, eight_bit))
        return b"\r\n".join(lines) + b"\r\n"

    # -- mutations --------------------------------------------------------

    def mutate(self):
        rng = self.rng
        operations = (
            ("drop", 3), ("duplicate", 3), ("swap", 3), ("insert", 6),
            ("case", 3), ("spaces", 4), ("path", 6), ("parameter", 5),
            ("helo", 2), ("long line", 4), ("flip", 4), ("octet", 6),
            ("delete", 3), ("line end", 5), ("smuggle", 6),
            ("bad data octet", 4), ("long data line", 4), ("data octets", 4),
            ("early end", 2), ("unstuffed", 2), ("undeclared 8-bit", 2))
        for _ in range(rng.choice((1, 1, 1, 1, 2, 3))):
            name = soak.choose(rng, operations)
            if getattr(self, "mutate_" + name.replace(" ", "_").replace(
                    "-", "_"))():
                self.mutations.append(name)

    def pick(self, kind="command", verbs=None):
        """The index of a random item of ``kind`` (and verb), or None."""
        found = [index for index, item in enumerate(self.items)
                 if item.kind == kind and (verbs is None or item.verb in verbs)]
        return self.rng.choice(found) if found else None

    def mutate_drop(self):
        index = self.pick()
        if index is None:
            return False
        del self.items[index]
        return True

    def mutate_duplicate(self):
        index = self.pick()
        if index is None:
            return False
        self.items.insert(index, self.items[index])
        return True

    def mutate_swap(self):
        index = self.pick()
        if index is None or index + 1 >= len(self.items):
            return False
        items = self.items
        items[index], items[index + 1] = items[index + 1], items[index]
        return True

    def mutate_insert(self):
        self.items.insert(self.rng.randrange(len(self.items) + 1),
                          command(self.rng.choice(JUNK_COMMANDS)))
        return True

    def replace_line(self, index, line):
        self.items[index] = command(line)

    def mutate_case(self):
        index = self.pick()
        if index is None:
            return False
        line = self.items[index].data[:-2]
        head, colon, rest = line.partition(b":")
        if not colon:
            head, rest = line, b""
        mixed = bytes(octet ^ 0x20 if 65 <= (octet | 0x20) - 32 <= 90
                      and self.rng.random() < 0.5 else octet for octet in head)
        self.replace_line(index, mixed + colon + rest)
        return True

    def mutate_spaces(self):
        index = self.pick()
        if index is None:
            return False
        line = self.items[index].data[:-2]
        where = self.rng.choice(
            [position for position in (line.find(b" "), line.find(b":") + 1,
                                       line.find(b">"), len(line), 0)
             if position >= 0])
        self.replace_line(index, line[:where] + self.rng.choice(
            (b" ", b"  ", b"\t", b" \t ")) + line[where:])
        return True

    def mutate_path(self):
        index = self.pick(verbs=(b"MAIL", b"RCPT"))
        if index is None:
            return False
        line = self.items[index].data[:-2]
        match = _PATH.search(line)
        start, end = (match.start(), match.end()) if match else (len(line),
                                                                 len(line))
        self.replace_line(index, line[:start] + self.rng.choice(BAD_PATHS)
                          + line[end:])
        return True

    def mutate_parameter(self):
        index = self.pick(verbs=(b"MAIL", b"RCPT"))
        if index is None:
            return False
        self.replace_line(index, self.items[index].data[:-2] + b" "
                          + self.rng.choice(PARAMETERS))
        return True

    def mutate_helo(self):
        index = self.pick(verbs=(b"EHLO", b"HELO"))
        if index is None:
            return False
        verb = self.items[index].data[:4]
        self.replace_line(index, verb + b" " + self.rng.choice(HELO_NAMES))
        return True

    def mutate_long_line(self):
        """A command padded to a length around 512 octets or far beyond,
        CR LF included."""
        index = self.pick(verbs=(b"NOOP", b"VRFY", b"MAIL", b"RCPT", b"EHLO",
                                 b"HELO", b"RSET", b"QUIT"))
        length = self.rng.choice(LONG_LINES)
        if index is None or self.items[index].verb in (b"NOOP", b"VRFY"):
            line = b"NOOP " if index is None else self.items[index].data[:5]
        else:
            line = self.items[index].data[:-2] + b" X-PAD="
        line += b"x" * max(0, length - 2 - len(line))
        if index is None:
            self.items.insert(self.rng.randrange(len(self.items) + 1),
                              command(line))
        else:
            self.replace_line(index, line)
        return True

    def edit_command(self, edit):
        """Apply ``edit`` to the octets (a bytearray) of a random command."""
        index = self.pick()
        if index is None:
            return False
        line = bytearray(self.items[index].data)
        edit(line, self.rng)
        self.items[index] = Item("command", bytes(line), self.items[index].verb)
        return True

    def mutate_flip(self):
        def flip(line, rng):
            line[rng.randrange(len(line))] ^= 1 << rng.randrange(8)
        return self.edit_command(flip)

    def mutate_octet(self):
        def insert(line, rng):
            position = rng.randrange(len(line) + 1)
            line[position:position] = (
                rng.choice(SPECIAL_OCTETS) if rng.random() < 0.8
                else bytes((rng.randrange(256),)))
        return self.edit_command(insert)

    def mutate_delete(self):
        def delete(line, rng):
            del line[rng.randrange(len(line))]
        return self.edit_command(delete)

    def mutate_line_end(self):
        index = self.pick()
        if index is None:
            return False
        item = self.items[index]
        self.items[index] = Item("command", item.data[:-2]
                                 + self.rng.choice(LINE_ENDS), item.verb)
        return True

    def edit_message(self, edit):
        """Replace a random message by ``edit(data, body, rng)``: ``data``
        its octets, dot-stuffed, to its final dot, ``body`` where its body
        begins (the header block is left alone, so that the message keeps
        its id); False if there is none, or ``edit`` returns None."""
        index = self.pick("message")
        if index is None:
            return False
        data = self.items[index].data
        data = edit(data, data.find(b"\r\n\r\n") + 4, self.rng)
        if data is None:
            return False
        self.items[index] = Item("message", data)
        return True

    @staticmethod
    def body_position(data, body, rng, line_start=False):
        """A place in the body, before the final dot: anywhere, or where a
        line begins."""
        if not line_start:
            return rng.randint(body, len(data) - 3)
        return rng.choice([body] + [match.end() for match in re.finditer(
            b"\r\n", data[body:len(data) - 3])])

    def mutate_smuggle(self):
        """A second message behind a fake end, in place of a line's CR LF:
        it ends at the real end."""
        inner_id = "%x-%x-%x" % (self.seed, self.number, 100 + len(
            self.mutations))
        inner = soak.dot_stuff(self.content(inner_id, False))[:-3]

        def smuggle(data, body, rng):
            position = max(body, self.body_position(data, body, rng, True)
                           - 2)
            return (data[:position] + rng.choice(SMUGGLED_ENDS)
                    + b"MAIL FROM:<mallory@attacker.test>\r\nRCPT TO:<user00@"
                    + DOMAIN.encode() + b">\r\nDATA\r\n" + inner
                    + data[position:])
        return self.edit_message(smuggle)

    def mutate_bad_data_octet(self):
        def insert(data, body, rng):
            position = self.body_position(data, body, rng)
            return data[:position] + rng.choice(
                (b"\x00", b"\r", b"\n", b"\r\r\n", b"\n\n")) + data[position:]
        return self.edit_message(insert)

    def mutate_long_data_line(self):
        def insert(data, body, rng):
            length = rng.choice(DATA_LINE_LENGTHS)
            line = (rng.choice((b"x", b".")) * 2 + self.text.text(
                rng, length)).replace(b"\r", b"x").replace(b"\n", b"x")
            position = self.body_position(data, body, rng, True)
            return data[:position] + line[:length] + b"\r\n" + data[position:]
        return self.edit_message(insert)

    def mutate_data_octets(self):
        def change(data, body, rng):
            data = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                position = self.body_position(data, body, rng)
                what = rng.randrange(3)
                if what == 1:
                    data[position:position] = rng.choice(SPECIAL_OCTETS)
                elif position < len(data) - 3 and what == 0:
                    data[position] ^= 1 << rng.randrange(8)
                elif position < len(data) - 3:
                    del data[position]
            return bytes(data)
        return self.edit_message(change)

    def mutate_early_end(self):
        def end(data, body, rng):
            position = self.body_position(data, body, rng, True)
            return data[:position] + b".\r\n" + data[position:]
        return self.edit_message(end)

    def mutate_unstuffed(self):
        def unstuff_one(data, body, rng):
            stuffed = [match.start() + 2 for match in re.finditer(
                b"\r\n[.][.]", data[body - 2:])]
            if not stuffed:
                return None
            position = body - 2 + rng.choice(stuffed)
            return data[:position] + data[position + 1:]
        return self.edit_message(unstuff_one)

    def mutate_undeclared_8_bit(self):
        def insert(data, body, rng):
            position = self.body_position(data, body, rng)
            return (data[:position] + "\u00e9t\u00e9".encode("utf-8")
                    + data[position:])
        return self.edit_message(insert)

    # -- the writes -------------------------------------------------------

    def make_writes(self):
        """The items as writes, by style, each cut into pieces."""
        writes = []
        previous = None
        for item in self.items:
            message = item.kind == "message"
            if self.style == "sync":
                sync = True
            elif self.style == "pipelined":
                # RFC 2920: EHLO, HELO and DATA end a group.
                sync = message or (previous is not None and previous.verb in (
                    b"EHLO", b"HELO", b"STARTTLS"))
            else:
                sync = False
            if writes and not sync and not writes[-1][1]["message"] \
                    and self.style != "sync":
                writes[-1][0].append(item.data)
                writes[-1][1]["data_command"] = False
            else:
                writes.append(([item.data], {
                    "sync": sync, "message": message and self.style != "blast",
                    "data_command": item.data == b"DATA\r\n"}))
            previous = item
        return [Write(self.cut(b"".join(parts)), **flags)
                for parts, flags in writes]

    def cut(self, data):
        """``data`` in pieces: a few cuts at random places, and at times
        its last octets one by one."""
        rng = self.rng
        points = sorted(rng.randrange(len(data) + 1)
                        for _ in range(rng.choice((0, 0, 0, 1, 2, 3, 8))))
        if rng.random() < 0.05:
            points += range(max(0, len(data) - rng.randint(1, 8)), len(data))
        pieces = []
        start = 0
        for point in sorted(set(points)) + [len(data)]:
            if point > start:
                pieces.append(data[start:point])
                start = point
        return pieces


# ---------------------------------------------------------------------------
# The client's side: its connection, the model of the dialogue
# ---------------------------------------------------------------------------

class BadReply(Exception):
    """A reply that breaks RFC 5321's syntax."""


class NoReply(Exception):
    """No reply, or no end, within its deadline."""


Reply = collections.namedtuple("Reply", "code lines time")


class Connection(soak.RawClient):
    """A client's socket to the proxy (soak.py's RawClient, for connecting
    and closing): raw writes, and replies read and checked for their
    syntax."""

    def __init__(self, port, source):
        soak.RawClient.__init__(self, port, source, CONNECT_WAIT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.ended = None           # "end" or "reset": the proxy's side
        self.write_failed = False

    def send(self, data):
        """Write ``data``; False if the proxy closed or reset."""
        if self.write_failed:
            return False
        try:
            self.sock.sendall(data)
        except OSError:
            self.write_failed = True
            return False
        return True

    def half_close(self):
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def line(self, deadline):
        """The next line the proxy sent, with its LF; None at its end."""
        for _ in range(1000000):
            end = self.buffer.find(b"\n")
            if end >= 0:
                line, self.buffer = (self.buffer[:end + 1],
                                     self.buffer[end + 1:])
                return line
            if len(self.buffer) > 4 * MAX_REPLY_LINE:
                raise BadReply("a reply line of over %d octets: %r"
                               % (len(self.buffer), self.buffer[:80]))
            if self.ended:
                if self.buffer:
                    raise BadReply("the connection ended inside a reply "
                                   "line: %r" % self.buffer[:80])
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoReply()
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                raise NoReply()
            except OSError as error:
                self.ended = "reset (%s)" % (
                    os.strerror(error.errno) if error.errno else error)
                continue
            if not data:
                self.ended = "end"
            self.buffer += data
        raise BadReply("endless input")

    def reply(self, deadline):
        """The next reply, checked; None at the end of the connection."""
        lines = []
        code = None
        for _ in range(MAX_REPLY_LINES + 1):
            line = self.line(deadline)
            if line is None:
                if lines:
                    raise BadReply("the connection ended inside a reply: %r"
                                   % lines)
                return None
            if len(line) > MAX_REPLY_LINE:
                raise BadReply("a reply line of %d octets: %r"
                               % (len(line), line[:80]))
            match = _REPLY_LINE.match(line)
            if match is None or (match.group(2) == b" "
                                 and not match.group(3)):
                raise BadReply("malformed reply line %r" % line[:120])
            if code is not None and match.group(1) != code:
                raise BadReply("a multi-line reply of codes %s and %s"
                               % (code.decode(), match.group(1).decode()))
            code = match.group(1)
            text = (match.group(3) or b"").decode("ascii")
            check_enhanced(int(code), text)
            lines.append(text)
            if match.group(2) != b"-":
                return Reply(int(code), lines, time.monotonic())
        raise BadReply("a reply of over %d lines" % MAX_REPLY_LINES)


def check_enhanced(code, text):
    """An enhanced status code (RFC 3463) at the start of ``text`` must be
    well-formed and of the reply's class."""
    if _LOOKS_ENHANCED.match(text):
        match = _ENHANCED.match(text)
        if match is None or int(match.group(1)) != code // 100:
            raise BadReply("enhanced status code %r in a %d reply"
                           % (text.split(" ")[0], code))


class Unit(object):
    """What the proxy answers once: a command line (``raw``: to its LF,
    all of an overlong one), or a message (``raw``: its data up to the
    CR LF before the final dot)."""

    __slots__ = ("kind", "raw", "problem", "key")

    def __init__(self, kind, raw):
        self.kind = kind
        self.raw = raw
        self.problem = None
        self.key = None
        if kind == "message":
            self.problem = message_problem(raw)
            self.key = message_key(unstuff(raw))

    def __repr__(self):
        if self.kind == "message":
            return "message %s (%d octets%s)" % (
                self.key, len(self.raw),
                ", " + self.problem if self.problem else "")
        return repr(self.raw[:100]) + ("..." if len(self.raw) > 100 else "")


class Result(object):
    """What a session came to: counts, violations, ledger claims."""

    __slots__ = ("number", "counts", "violations", "claims")

    def __init__(self, number):
        self.number = number
        self.counts = collections.Counter()
        self.violations = []
        self.claims = []

    def violation(self, kind, detail):
        self.violations.append((self.number, kind, detail))


class Dialogue(object):
    """The oracle's model of one session: fed the octets the client sent
    and the replies it read, in order; see the module's docstring.

    The octets are cut into units as the proxy reads them (command lines,
    and after a 354 a message to its first CR LF . CR LF); units wait for
    their replies in order; what a unit may get is decided when its reply
    comes, from the state the replies before it made.  Octets after a DATA
    line are cut only once its reply says whether they are data.
    """

    def __init__(self, plan, result, settings, trace=None):
        self.plan = plan
        self.result = result
        self.max_errors = settings.max_errors
        self.inactivity_timeout = settings.inactivity_timeout
        self.trace = trace
        self.buffer = b""
        self.units = collections.deque()
        self.blocked = False        # a DATA line waits for its reply
        self.in_data = False
        self.greeted = False
        self.closing = None         # MUST after a closing reply
        self.expect_421 = False     # max_errors refusals: 421 comes next
        self.desync = False         # after a violation: syntax only
        self.last_send = time.monotonic()   # the session's, at each write
        self.helo = None
        self.offered = set()
        self.enhanced = False
        self.errors = 0
        self.new_transaction()

    def new_transaction(self):
        self.mail = None
        self.rcpts = []
        self.lost = False

    def note(self, text):
        if self.trace:
            self.trace("   " + text)

    def violation(self, kind, detail):
        self.note("VIOLATION %s: %s" % (kind, detail))
        self.result.violation(kind, detail)
        self.desync = True

    # -- what was sent ----------------------------------------------------

    def sent(self, data):
        self.buffer += data
        self.parse()

    def parse(self):
        for _ in range(1000000):
            if self.blocked or self.closing == MUST:
                return
            unit = self.message() if self.in_data else self.line()
            if unit is None:
                return
            self.units.append(unit)
            if unit.kind == "line" and unit.raw.endswith(b"\r\n") \
                    and not _NOT_PRINTABLE.search(unit.raw[:-2]) \
                    and unit.raw[:-2].split(b" ", 1)[0].upper() == b"DATA":
                self.blocked = True

    def line(self):
        """The next command line the proxy reads, or None."""
        buffer = self.buffer
        end = buffer.find(b"\n", 0, MAX_COMMAND_LINE)
        kind = "line"
        if end < 0:
            if len(buffer) < MAX_COMMAND_LINE:
                return None
            # Too long: the proxy reads it to its LF, and answers once.
            end = buffer.find(b"\n", MAX_COMMAND_LINE)
            if end < 0:
                return None
            kind = "overlong"
        self.buffer = buffer[end + 1:]
        return Unit(kind, buffer[:end + 1])

    def message(self):
        """The message after a 354, to its end, or None."""
        end = (b"\r\n" + self.buffer).find(b"\r\n.\r\n")
        if end < 0:
            return None
        unit = Unit("message", self.buffer[:end])
        self.buffer = self.buffer[end + 3:]
        self.in_data = False
        self.result.counts["messages sent"] += 1
        return unit

    # -- what the proxy said ----------------------------------------------

    def reply(self, reply):
        counts = self.result.counts
        counts["replies"] += 1
        counts["reply lines"] += len(reply.lines)
        if self.trace:
            self.trace("S: %d %s" % (reply.code, "\n   ".join(reply.lines)))
        if not self.greeted:
            self.greeted = True
            if reply.code == 554 and self.plan.talk_first:
                self.closing = MUST
                counts["outcome: 554 to a client talking first"] += 1
            elif reply.code != 220:
                self.violation("bad greeting", "%d %s"
                               % (reply.code, reply.lines[0]))
            return
        if self.desync:
            return
        if self.closing == MUST:
            self.violation("reply after a closing reply", "%d %s"
                           % (reply.code, reply.lines[0]))
            return
        if reply.code == 421:
            self.reply_421(reply)
            return
        if self.expect_421:
            self.violation("no 421 after max_errors refusals",
                           "got %d %s" % (reply.code, reply.lines[0]))
            return
        if not self.units:
            self.violation("reply to no command", "%d %s"
                           % (reply.code, reply.lines[0]))
            return
        unit = self.units.popleft()
        if unit.kind == "message":
            self.answer_message(unit, reply)
        else:
            self.answer_line(unit, reply)
        self.parse()

    def reply_421(self, reply):
        text = reply.lines[0]
        self.closing = MUST
        if self.expect_421 and text.startswith("4.7.0"):
            self.expect_421 = False
            self.result.counts["outcome: 421 after max_errors refusals"] += 1
            return
        if text.startswith("4.4.2"):
            self.result.counts["outcome: 421 timeout"] += 1
            silent = reply.time - self.last_send
            if self.units:
                self.violation("timeout with commands unanswered",
                               "%d unanswered, first %r"
                               % (len(self.units), self.units[0]))
            elif silent < self.inactivity_timeout - 0.5:
                self.violation("timeout too soon", "421 after %.2f s of "
                               "silence (inactivity_timeout %s)"
                               % (silent, self.inactivity_timeout))
            return
        self.violation("unexpected 421", "%s, commands unanswered: %d"
                       % (text, len(self.units)))

    def expect(self, unit):
        """(codes the proxy may answer ``unit`` with now, whether it closes
        after them, what the unit is)."""
        raw = unit.raw
        if unit.kind == "overlong":
            return codes(500), None, "overlong line"
        if not raw.endswith(b"\r\n"):
            return codes(500), MUST, "bare LF"
        text = raw[:-2]
        if _NOT_PRINTABLE.search(text):
            text = self.utf8_command(text)
            if text is None:
                return codes(500), MUST, "control or 8-bit octets"
        else:
            text = text.decode("ascii")
        verb, _, args = text.partition(" ")
        verb = verb.upper()
        if verb in ("HELO", "EHLO"):
            if _HELO_ARGUMENT.match(args):
                return codes(250), None, verb
            return codes(501), MUST, verb + " syntax"
        if verb == "MAIL":
            if self.helo is None:
                return codes(503), None, "MAIL before HELO"
            if self.mail is not None:
                return codes(503), None, "nested MAIL"
            if args[:5].upper() != "FROM:":
                return codes(501), MUST, "MAIL syntax"
            return MAIL_CODES, MAY, "MAIL"
        if verb == "RCPT":
            if self.mail is None:
                return codes(503), MUST, "RCPT before MAIL"
            if args[:3].upper() != "TO:":
                return codes(501), MUST, "RCPT syntax"
            return RCPT_CODES, MAY, "RCPT"
        if verb == "DATA":
            if args:
                return codes(501), MUST, "DATA syntax"
            if self.mail is None:
                return codes(503), MUST, "DATA before MAIL"
            if self.lost:
                return TEMPORARY, None, "DATA (upstream lost)"
            if not self.rcpts:
                return codes(503), MUST, "DATA before RCPT"
            return DATA_CODES, None, "DATA"
        simple = {"RSET": (250, 501), "VRFY": (501, 252), "QUIT": (221, 501),
                  "NOOP": (250, 250), "STARTTLS": (503, 501)}
        if verb in simple:
            code = simple[verb][bool(args)]
            close = MUST if verb == "QUIT" and code == 221 else None
            return codes(code), close, verb
        if verb == "HELP":
            return codes(502), MUST, "HELP"
        return codes(500), MUST, "unknown command"

    def utf8_command(self, text):
        """A MAIL or RCPT line in UTF-8 is a command once SMTPUTF8 was
        offered (RFC 6531): its text then, else None."""
        if "SMTPUTF8" in self.offered and text[:5].upper() in (b"MAIL ",
                                                                b"RCPT "):
            try:
                decoded = text.decode("utf-8")
            except UnicodeDecodeError:
                decoded = ""
            if decoded and not _UTF8_CONTROL.search(decoded):
                return decoded
        return None

    def answer_line(self, unit, reply):
        allowed, close, what = self.expect(unit)
        code = reply.code
        counts = self.result.counts
        counts["reply to %s: %d" % (what, code)] += 1
        self.note("(%s %r: may get %s%s)" % (
            what, unit, describe(allowed),
            ", then closes" if close == MUST else ""))
        if code not in allowed:
            self.violation("unexpected reply", "%s %r: %d %s" % (
                what, unit, code, " / ".join(reply.lines)))
            return
        if self.plan.clean and code in PROTOCOL_REFUSALS and not (
                what == "DATA before RCPT"
                and self.plan.style == "pipelined"):
            self.violation("valid command refused", "%r: %d %s"
                           % (unit, code, reply.lines[0]))
            return
        if self.enhanced and what not in ("EHLO", "HELO") and code != 354 \
                and not _ENHANCED.match(reply.lines[0]):
            self.violation("no enhanced status code", "%r: %d %s"
                           % (unit, code, reply.lines[0]))
            return
        self.update(unit, what, reply)
        if close == MAY:
            # A bad address is a protocol error (strict closes); a bad
            # parameter is not: RFC 3463's X.1.x against X.5.4.
            close = MUST if code == 501 and reply.lines[0].startswith(
                "5.1.") else None
        if close == MUST:
            self.closing = MUST
            counts["outcome: closed after %s %d" % (
                "QUIT" if code == 221 else "protocol error", code)] += 1
            return
        self.closing = None
        refusal = (400 <= code < 600 and code != 452
                   and not what.startswith("DATA"))
        if refusal:
            self.errors += 1
            if self.errors >= self.max_errors:
                self.expect_421 = True

    def update(self, unit, what, reply):
        """The state after a reply that the model expected."""
        code = reply.code
        if what in ("HELO", "EHLO"):
            self.new_transaction()
            self.helo = unit.raw
            self.offered = set(line.split(" ")[0].upper()
                               for line in reply.lines[1:]) \
                if what == "EHLO" else set()
            self.enhanced = "ENHANCEDSTATUSCODES" in self.offered
        elif what == "MAIL" and code == 250:
            self.mail = unit.raw
        elif what == "RCPT":
            if code // 100 == 2:
                self.rcpts.append(unit.raw)
            elif reply.lines[0].startswith("4.4."):
                self.lost = True
        elif what.startswith("DATA"):
            self.blocked = False
            if code == 354:
                self.in_data = True
            elif what in ("DATA", "DATA (upstream lost)"):
                self.new_transaction()
        elif what == "RSET" and code == 250:
            self.new_transaction()

    def answer_message(self, unit, reply):
        code = reply.code
        counts = self.result.counts
        text = " / ".join(reply.lines)
        self.note("(the end of %r)" % unit)
        if unit.problem:
            status = "bad"
            counts["message refused: %s" % unit.problem] += 1
            if code not in (550, 552):
                self.violation("bad message not refused", "%r: %d %s"
                               % (unit, code, text))
        elif code // 100 == 2:
            status = "accepted"
            counts["message accepted"] += 1
            if unit.key.startswith("sha256:"):
                counts["message accepted without its id"] += 1
            elif unit.key not in text:
                self.violation("crossed reply", "%r got %d %s"
                               % (unit, code, text))
        elif code // 100 == 4 or soak.FAULT_MARK in text:
            status = "refused"
            counts["message failed upstream (%dxx)" % (code // 100)] += 1
        else:
            status = "refused"
            self.violation("clean message refused", "%r: %d %s"
                           % (unit, code, text))
        self.claim(unit, status, code)
        self.new_transaction()
        if code // 100 == 2:
            self.errors = 0
        self.closing = None

    def claim(self, unit, status, code=None, envelope=True):
        """A message for the ledger: its key, what the client was told,
        and its envelope as the replies made it (None: not known, the
        client left before the replies)."""
        self.result.claims.append((
            unit.key, self.plan.number, status,
            soak.digest(unstuff(unit.raw)) if status != "unread" else None,
            self.mail if envelope else None,
            tuple(self.rcpts) if envelope else None, code))

    # -- the end ----------------------------------------------------------

    def ended(self, how, client):
        """The proxy closed the connection (``how``); ``client``: what the
        client had done by then ("half-closed", "silent", or None)."""
        counts = self.result.counts
        if not self.greeted:
            self.violation("closed before the greeting", how)
        if self.desync:
            return
        if self.closing is not None:
            pass
        elif self.expect_421:
            self.violation("no 421 after max_errors refusals", how)
        elif self.units:
            self.violation("commands unanswered", "%s with %d unanswered, "
                           "first %r" % (how, len(self.units), self.units[0]))
        elif client == "silent":
            self.violation("silent client dropped without 421", how)
        elif client != "half-closed":
            self.violation("closed without a closing reply", how)
        else:
            counts["outcome: closed after the client's half-close"] += 1
        if how.startswith("reset"):
            counts["connection reset by the proxy"] += 1

    def settle(self, closed_by_proxy):
        """The claims of messages that got no reply: never read (the
        proxy closed after a closing reply), or ambiguous (the client left
        first, or the proxy closed for no reason).  A client that left
        before it knew whether its DATA got 354 may have had every message
        it blasted read: they are all ambiguous."""
        unread = closed_by_proxy and self.closing is not None
        for _ in range(1000000):
            if unread or not self.blocked or self.closing == MUST:
                break
            self.blocked = False
            self.in_data = True
            self.parse()
        for index, unit in enumerate(self.units):
            if unit.kind == "message":
                self.claim(unit, "unread" if unread else "ambiguous",
                           envelope=index == 0)
        if self.in_data and self.buffer:
            partial = unstuff(self.buffer)
            match = _MESSAGE_ID.search(partial.split(b"\r\n\r\n", 1)[0])
            if match:
                self.result.claims.append((match.group(1).decode("ascii"),
                                           self.plan.number, "unread", None,
                                           self.mail, (), None))


def describe(allowed):
    """A set of codes, shortly."""
    if len(allowed) <= 3:
        return "/".join(str(code) for code in sorted(allowed))
    classes = sorted(set(code // 100 for code in allowed))
    return "/".join("%dxx" % first for first in classes)


# ---------------------------------------------------------------------------
# Running a session
# ---------------------------------------------------------------------------

class SessionRunner(object):
    """Runs one planned session against the proxy, feeding the model."""

    def __init__(self, settings, text, number, trace=None):
        self.settings = settings
        self.plan = Plan(settings.seed, number, text)
        self.result = Result(number)
        self.trace = trace
        self.model = Dialogue(self.plan, self.result, settings, trace)
        self.connection = None
        self.sent = 0
        self.client = None          # "half-closed", "silent", "closed"

    def run(self):
        plan = self.plan
        counts = self.result.counts
        counts["sessions"] += 1
        counts["style: " + plan.style] += 1
        counts["ending: " + plan.ending] += 1
        if plan.mutations:
            counts["mutated"] += 1
        if plan.clean:
            counts["clean"] += 1
        if plan.talk_first:
            counts["talks first"] += 1
        for name in plan.mutations:
            counts["mutation: " + name] += 1
        if self.trace:
            self.trace("session %d: from %s, %s, %s%s, ending %s%s" % (
                plan.number, plan.source, plan.style,
                "mutated (%s)" % ", ".join(plan.mutations)
                if plan.mutations else "not mutated",
                ", talks first" if plan.talk_first else "", plan.ending,
                " at octet %d" % plan.cut_at if plan.cut_at is not None
                else ""))
        started = time.monotonic()
        try:
            self.connection = Connection(self.settings.port, plan.source)
        except soak.ConnectionLost as error:
            self.result.violation("cannot connect", str(error))
            return self.result
        try:
            self.dialogue()
        except BadReply as error:
            self.model.violation("malformed reply", str(error))
            self.client = "closed"
        except NoReply:
            self.model.violation("hang", "no reply or end within %d s "
                                 "(%d units waiting)"
                                 % (REPLY_WAIT, len(self.model.units)))
            self.client = "closed"
        finally:
            self.connection.close(reset=plan.ending == "reset")
        self.model.settle(self.connection.ended is not None
                          and self.client != "closed")
        counts["seconds"] += time.monotonic() - started
        return self.result

    def dialogue(self):
        plan = self.plan
        model = self.model
        connection = self.connection
        deadline = time.monotonic() + REPLY_WAIT
        writes = plan.writes
        if plan.talk_first and writes:
            self.send(writes[0].pieces[:1])
            writes = [Write(writes[0].pieces[1:], False, False, False)] \
                + writes[1:]
        self.receive(deadline)
        for write in writes:
            if model.closing == MUST or connection.ended:
                break
            if write.sync and not self.wait():
                break
            pieces = write.pieces
            if write.message and not model.in_data:
                continue            # a client that waits sends no data
            if write.data_command and plan.style == "sync" and \
                    model.mail is not None and not model.rcpts:
                pieces = [b"RSET\r\n"]
            if not self.send(pieces):
                break
        self.finish()

    def send(self, pieces):
        """Write ``pieces`` one by one; False if the session stops sending
        (cut, or the proxy closed)."""
        plan = self.plan
        connection = self.connection
        for piece in pieces:
            if plan.cut_at is not None and self.sent + len(piece) >= \
                    plan.cut_at:
                piece = piece[:plan.cut_at - self.sent]
                if piece:
                    self.write(piece)
                return False
            if not self.write(piece):
                return False
            if plan.slow:
                time.sleep(0.002)
        return True

    def write(self, piece):
        if self.trace:
            self.trace("C: %r" % piece)
        self.model.last_send = time.monotonic()
        if not self.connection.send(piece):
            return False
        self.sent += len(piece)
        self.model.sent(piece)
        return True

    def receive(self, deadline):
        """One reply to the model; False at the end of the connection."""
        reply = self.connection.reply(deadline)
        if reply is None:
            self.model.ended(self.connection.ended, self.client)
            return False
        self.model.reply(reply)
        return True

    def wait(self):
        """Read replies until every unit sent has one: what a client that
        waits for replies does; False if the connection ended."""
        model = self.model
        deadline = time.monotonic() + REPLY_WAIT
        for _ in range(100000):
            if not model.units or model.closing == MUST or model.desync:
                return not self.connection.ended
            if not self.receive(deadline):
                return False
        return False

    def finish(self):
        """The session's end: half-close and read to the end, or go silent
        until the proxy's timeout, or just close."""
        plan = self.plan
        ending = plan.ending
        if ending in ("close", "reset"):
            self.client = "closed"
            return
        if ending == "silence" and not self.connection.ended:
            self.client = "silent"
            wait = self.settings.inactivity_timeout + REPLY_WAIT
        else:
            self.client = "half-closed"
            self.connection.half_close()
            wait = REPLY_WAIT
        deadline = time.monotonic() + wait
        for _ in range(100000):
            if not self.receive(deadline):
                return


def settings_value(items, name, default):
    """The value of key ``name`` in ``--set`` items, else ``default``."""
    for item in items:
        key, _, value = item.partition("=")
        if key.strip() == name:
            return float(value)
    return default


class ClientSettings(object):
    """What a client process needs to know (picklable)."""

    def __init__(self, args, port):
        self.seed = args.seed
        self.port = port
        self.max_errors = int(settings_value(
            args.set, "max_errors", smtpproxy.MailHandler.max_errors))
        self.inactivity_timeout = settings_value(
            args.set, "inactivity_timeout", INACTIVITY_TIMEOUT)
        self.rate = args.rate
        self.trace = bool(args.replay)


# ---------------------------------------------------------------------------
# Client processes
# ---------------------------------------------------------------------------

class Batch(object):
    """Results of sessions, gathered by threads, sent on in batches."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        self.violations = []
        self.claims = []

    def take(self):
        with self.lock:
            batch = (self.counts, self.violations, self.claims)
            self.counts = collections.Counter()
            self.violations = []
            self.claims = []
        return batch

    def add(self, result):
        with self.lock:
            self.counts.update(result.counts)
            self.violations += result.violations
            self.claims += result.claims


def trace(line):
    print(line)
    sys.stdout.flush()


def client_process(settings, numbers, threads, channel):
    """Run the sessions ``numbers`` on ``threads`` threads; send the
    results through ``channel`` every half second."""
    text = soak.TextSource(settings.seed)
    batch = Batch()
    lock = threading.Lock()
    queue = iter(numbers)
    interval = threads / settings.rate if settings.rate else 0.0

    def work():
        next_start = time.monotonic()
        while True:
            with lock:
                number = next(queue, None)
            if number is None:
                return
            if interval:
                next_start += interval
                time.sleep(max(0.0, next_start - time.monotonic()))
            try:
                result = SessionRunner(settings, text, number,
                                       trace if settings.trace else None).run()
            except Exception as error:          # a bug of the fuzzer
                result = Result(number)
                result.violation("fuzzer error", "%s: %s" % (
                    error.__class__.__name__, error))
            batch.add(result)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.daemon = True
        worker.start()
    for worker in workers:
        for _ in range(10 ** 7):        # each session has its deadlines
            worker.join(0.5)
            channel.send(("results",) + batch.take())
            if not worker.is_alive():
                break
    channel.send(("results",) + batch.take())
    channel.send(("done",))
    channel.close()


# ---------------------------------------------------------------------------
# The upstream: soak.py's, in a process of its own
# ---------------------------------------------------------------------------

class Events(object):
    """What the upstream's threads note for the main process."""

    def __init__(self):
        self.lock = threading.Lock()
        self.items = []

    def add(self, event):
        with self.lock:
            self.items.append(event)

    def take(self):
        with self.lock:
            items, self.items = self.items, []
        return items

    def note(self, kind, detail, group=None):
        """soak.Problems' interface: a protocol error of the proxy's (by
        its symptom)."""
        self.add(("problem", group or kind, detail))


class CheckedLines(object):
    """An upstream session's rfile: each command line is checked for its
    framing as it is read (soak.py's session reads through it)."""

    def __init__(self, session, rfile):
        self.session = session
        self.rfile = rfile
        self.in_data = False
        self.last = b""

    def readline(self, limit=-1):
        line = self.rfile.readline(limit)
        if not self.in_data and line:
            self.last = line
            self.session.check_command(line)
        return line

    def __getattr__(self, name):
        return getattr(self.rfile, name)


class UpstreamSession(soak.UpstreamSession):
    """soak.py's upstream session, which also offers SMTPUTF8 and DSN,
    checks the framing of every command line, and tells the main process
    of every message it receives (``received``) and answers 250
    (``accepted``)."""

    def setup(self):
        soak.UpstreamSession.setup(self)
        # Replies to pipelined commands go out at once, not after the
        # proxy's delayed ACK of the one before (Nagle).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile = CheckedLines(self, self.rfile)
        self.client = "?"
        self.reset()

    def reset(self):
        soak.UpstreamSession.reset(self)
        self.smtputf8 = False
        self.mail_line = None
        self.rcpt_lines = []

    def protocol_error(self, what, detail=""):
        if what.startswith("8-bit data"):
            return          # judged against the client's ledger instead
        soak.UpstreamSession.protocol_error(
            self, what, "%s (client session %s)" % (detail, self.client))

    def check_command(self, line):
        """The proxy's command line, as RFC 5321 wants it."""
        body = line[:-2] if line.endswith(b"\r\n") else line
        if len(line) > MAX_COMMAND_LINE:
            self.protocol_error("command line over %d octets"
                                % MAX_COMMAND_LINE, repr(line[:80]))
        if re.search(b"[\x00-\x1f\x7f]", body):
            self.protocol_error("command line with a control octet",
                                repr(line[:120]))
        if re.search(b"[\x80-\xff]", body):
            verb = body[:5].upper()
            if not (verb == b"MAIL " and b" SMTPUTF8" in body.upper()
                    or verb == b"RCPT " and self.smtputf8):
                self.protocol_error("8-bit command without SMTPUTF8",
                                    repr(line[:120]))

    def smtp_EHLO(self, args):
        self.reset()
        self.client = client_of(args)
        self.reply("250-upstream.fuzz.test\r\n250-PIPELINING\r\n250-8BITMIME"
                   "\r\n250-SMTPUTF8\r\n250-DSN\r\n250-SIZE %d\r\n"
                   "250 ENHANCEDSTATUSCODES" % soak.UPSTREAM_SIZE_LIMIT)

    def smtp_HELO(self, args):
        self.client = client_of(args)
        soak.UpstreamSession.smtp_HELO(self, args)

    def screened(self, command, keywords):
        """The path of the last line (``command`` and its path), its
        parameters other than ``keywords`` removed, for soak.py's checks,
        with a stand-in for the path; None if malformed."""
        line = self.rfile.last[:-2]
        head = command.encode("ascii") + b":"
        parsed = path_of(line)
        if parsed is None or line[5:5 + len(head)].upper() != head or \
                not line[5 + len(head):].startswith(b"<") or \
                line.find(b">", 5) < 0:
            self.protocol_error("bad " + command[:4],
                                repr(line[:120]))
            self.reply("501 5.5.4 Syntax error")
            return None
        path, parameters = parsed
        kept = []
        for parameter in parameters:
            keyword = parameter.split(b"=", 1)[0]
            if keyword in keywords:
                if keyword == b"SMTPUTF8":
                    self.smtputf8 = True
            else:
                kept.append(parameter.decode("ascii", "replace"))
        if len(set(parameter.split(b"=", 1)[0] for parameter in parameters)) \
                != len(parameters):
            self.protocol_error("a parameter twice", repr(line[:120]))
        return "%s:<x>%s" % (command, "".join(" " + word for word in kept))

    def smtp_MAIL(self, args):
        had = self.mail_from
        smtputf8 = self.smtputf8
        screened = self.screened("FROM", (b"SMTPUTF8", b"RET", b"ENVID"))
        if screened is None:
            return
        soak.UpstreamSession.smtp_MAIL(self, screened)
        if had is None and self.mail_from is not None:
            self.mail_line = self.rfile.last
        else:
            self.smtputf8 = smtputf8

    def smtp_RCPT(self, args):
        screened = self.screened("TO", (b"NOTIFY", b"ORCPT"))
        if screened is None:
            return
        before = len(self.rcpt)
        soak.UpstreamSession.smtp_RCPT(self, screened)
        if len(self.rcpt) > before:
            self.rcpt_lines.append(self.rfile.last)

    def receive_data(self):
        self.rfile.in_data = True
        try:
            content = soak.UpstreamSession.receive_data(self)
        finally:
            self.rfile.in_data = False
        self.server.events.add((
            "received", message_key(content), soak.digest(content),
            self.mail_line,
            tuple(self.rcpt_lines), bool(re.search(b"[\x80-\xff]", content)),
            self.client))
        return content


def client_of(helo):
    """The client session a HELO name names (n<hex>.fuzz.test), or "?"."""
    match = re.match(r"n([0-9a-f]+)\.fuzz\.test\Z", helo)
    return str(int(match.group(1), 16)) if match else "?"


class Upstream(soak.FaultyUpstream):
    """soak.py's upstream with the sessions above; its ledger goes out as
    events."""

    max_commands = 10 ** 7

    def __init__(self, seed):
        self.events = Events()
        soak.FaultyUpstream.__init__(self, seed, self.events)
        self.RequestHandlerClass = UpstreamSession

    def record(self, arrival):
        """soak.py's session answered 250 to a message: its key, as
        message_key() makes it (soak.py found the same id, or none)."""
        self.events.add(("accepted", arrival.id if arrival.id != "unknown"
                         else "sha256:" + arrival.digest))


def upstream_process(seed, channel):
    """Serve as the upstream until told to stop; send the events every
    fifth of a second."""
    server = Upstream(seed)
    channel.send(("port", server.port))
    for _ in range(10 ** 8):
        stop = channel.poll(0.2)
        channel.send(("events", server.events.take(), server.sessions,
                      server.open_sessions, dict(server.faults.items())))
        if stop:
            break
    server.stop()
    channel.send(("events", server.events.take(), server.sessions,
                  server.open_sessions, dict(server.faults.items())))
    channel.send(("done",))
    channel.close()


# ---------------------------------------------------------------------------
# The main process: the ledger, the proxy, the run, the report
# ---------------------------------------------------------------------------

class Violations(object):
    """Every violation: a count per kind, the sessions, a few examples."""

    def __init__(self, seed, examples):
        self.seed = seed
        self.examples_kept = examples
        self.counts = collections.Counter()
        self.examples = collections.defaultdict(list)

    def add(self, number, kind, detail):
        self.counts[kind] += 1
        if len(self.examples[kind]) < self.examples_kept:
            self.examples[kind].append((number, detail))

    def total(self):
        return sum(self.counts.values())

    def lines(self):
        lines = []
        for kind, count in sorted(self.counts.items()):
            lines.append("  %s: %d" % (kind, count))
            for number, detail in self.examples[kind]:
                lines.append("    %s  %s" % (
                    "--replay %d:%d" % (self.seed, number)
                    if number is not None else "(no session)", detail))
        return lines


class Ledger(object):
    """The client's claims (what it was told of each message) against the
    upstream's arrivals (what it received, and answered 250), by message
    key; a pair is judged once both are in, or once SETTLE_AGE has passed
    (see the module's docstring)."""

    def __init__(self, violations):
        self.violations = violations
        self.claims = collections.OrderedDict()    # key -> (time, claim)
        self.arrivals = collections.OrderedDict()  # key -> [time, event, 250]
        self.counts = collections.Counter()

    def claim(self, claim, now):
        key = claim[0]
        self.counts["claims: " + claim[2]] += 1
        if key in self.claims:
            self.counts["claims of a key already claimed"] += 1
        self.claims[key] = (now, claim)
        arrival = self.arrivals.get(key)
        if arrival is not None:
            self.compare(claim, arrival[1])
        self.judge_if_done(key)

    def received(self, event, now):
        key = event[1]
        self.counts["received"] += 1
        if key in self.arrivals:
            self.add(event, "message received twice", key)
        self.arrivals[key] = [now, event, False]
        claim = self.claims.get(key)
        if claim is not None:
            self.compare(claim[1], event)

    def accepted(self, key, now):
        self.counts["answered 250"] += 1
        arrival = self.arrivals.get(key)
        if arrival is None:
            self.violations.add(session_of(key), "250 to a message never "
                                "received (fuzzer error)", key)
            return
        arrival[2] = True
        self.judge_if_done(key)

    def add(self, event, kind, detail):
        client = event[6]
        number = int(client) if client.isdigit() else session_of(event[1])
        self.violations.add(number, kind, detail)

    def compare(self, claim, event):
        """A message the client sent that the upstream received."""
        key, number, status, digest, mail, rcpts, code = claim
        if status in ("bad", "unread"):
            self.violations.add(number, "message received that the client "
                                "never ended" if status == "unread" else
                                "message received that the proxy refused",
                                "%s (the client heard %s)" % (key, code))
            return
        problems = []
        if digest != event[2]:
            problems.append("content differs")
        problem = envelope_differs(mail, event[3]) if rcpts is not None \
            else None
        if problem:
            problems.append("sender: " + problem)
        if rcpts is None:
            pass            # not known: the client left before the replies
        elif len(rcpts) != len(event[4]):
            problems.append("%d recipients accepted, %d received"
                            % (len(rcpts), len(event[4])))
        else:
            for sent, received in zip(rcpts, event[4]):
                problem = envelope_differs(sent, received)
                if problem:
                    problems.append("recipient: " + problem)
        if problems:
            self.violations.add(number, "message received altered",
                                "%s: %s" % (key, "; ".join(problems)))
        if event[5] and not re.search(b"(?i) BODY=8BITMIME", mail or b""):
            self.counts["8-bit data without BODY=8BITMIME passed on as the "
                        "client sent it"] += 1

    def judge_if_done(self, key):
        claim = self.claims.get(key)
        arrival = self.arrivals.get(key)
        if claim is not None and arrival is not None and arrival[2] and \
                claim[1][2] == "accepted":
            self.judge(key)

    def judge(self, key):
        claim = self.claims.pop(key, (None, None))[1]
        arrival = self.arrivals.pop(key, None)
        if claim is None:
            event = arrival[1]
            inner = key.split("-")[-1]
            self.add(event, "smuggled message received" if len(inner) > 1
                     and inner.isalnum() and int(inner, 16) >= 100 else
                     "message received that the client never sent",
                     "%s%s" % (key, " (answered 250)" if arrival[2] else ""))
            return
        key, number, status, digest, mail, rcpts, code = claim
        accepted = arrival is not None and arrival[2]
        if status == "accepted":
            if arrival is None:
                self.violations.add(number, "lost: 2xx, never received",
                                    "%s (the client heard %s)" % (key, code))
            elif not accepted:
                self.violations.add(number, "2xx, but the upstream did not "
                                    "answer 250", "%s (the client heard %s)"
                                    % (key, code))
            else:
                self.counts["delivered"] += 1
        elif status == "refused" and accepted:
            self.violations.add(number, "the upstream answered 250, the "
                                "client heard a failure", "%s (the client "
                                "heard %s)" % (key, code))
        elif status == "ambiguous":
            self.counts["ambiguous, %s" % ("delivered" if accepted else
                                           "not delivered")] += 1

    def sweep(self, now, age):
        """Judge what waited longer than ``age`` seconds."""
        for table in (self.claims, self.arrivals):
            for _ in range(len(table)):
                key, entry = next(iter(table.items()))
                if now - entry[0] < age:
                    break
                self.judge(key)

    def close(self):
        for table in (self.claims, self.arrivals):
            for _ in range(len(table)):
                self.judge(next(iter(table)))


def envelope_differs(sent, received):
    """Why the MAIL or RCPT line the upstream received is not the one the
    client sent (the path, bar a source route, and the parameters, bar
    their keywords' case), or None."""
    if sent is None or received is None:
        return "sent %r, received %r" % (sent, received)
    sent_path, received_path = path_of(sent), path_of(received)
    if sent_path is None or received_path is None:
        return "sent %r, received %r" % (sent, received)
    inner = received_path[0][1:]
    if sent_path[0] != received_path[0] and not \
            sent_path[0].endswith(b":" + inner):
        return "path %r received as %r" % (sent_path[0], received_path[0])
    if sent_path[1] != received_path[1]:
        return "parameters %r received as %r" % (sent_path[1],
                                                 received_path[1])
    return None


class Proxy(soak.ProxyProcess):
    """smtpproxy.py as soak.py runs it, 127.0.1.0/24 relaying, and with
    ``--class`` when asked."""

    def __init__(self, args, directory, upstream_port):
        paths = dict((name, os.path.join(directory, name)) for name in (
            "greylist.db", "smtpproxy.conf", "proxy-stderr.txt"))
        self.directory = directory
        self.greylist_db = paths["greylist.db"]
        self.config_path = paths["smtpproxy.conf"]
        self.stderr_path = paths["proxy-stderr.txt"]
        self.settings = [
            "inactivity_timeout = %d" % INACTIVITY_TIMEOUT,
            "allowed_sender_nets:", "    " + RELAY_NET] + [
                item.replace("=", " = ", 1) for item in args.set]
        self.port = soak.free_port()
        with open(self.config_path, "w") as config:
            config.write(self.configuration())
        command = [args.python, soak.PROXY_SCRIPT, "--config",
                   self.config_path, "--listen", "%s:%d" % (LOOPBACK,
                                                            self.port),
                   "--upstream", "%s:%d" % (LOOPBACK, upstream_port)]
        if args.proxy_class:
            command += ["--class", args.proxy_class]
        self.stderr = open(self.stderr_path, "wb")
        self.process = soak.subprocess.Popen(
            command, stdin=soak.subprocess.DEVNULL, stdout=self.stderr,
            stderr=self.stderr, cwd=directory)
        self.pid = self.process.pid

    def descriptor_names(self):
        """What the descriptors of all its processes point to."""
        names = collections.Counter()
        for pid in [self.pid] + self.workers():
            directory = "/proc/%d/fd" % pid
            try:
                fds = os.listdir(directory)
            except OSError:
                continue
            for fd in fds:
                try:
                    name = os.readlink(os.path.join(directory, fd))
                except OSError:
                    continue
                names[re.sub(r"\[[0-9]+\]", "", name)] += 1
        return names

    def cpu_seconds(self):
        """The CPU time its processes have used (they are alive)."""
        total = 0
        for pid in [self.pid] + self.workers():
            try:
                with open("/proc/%d/stat" % pid) as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except (OSError, IndexError, ValueError):
                pass
        return total / float(os.sysconf("SC_CLK_TCK"))


class Fuzz(object):
    """One run: see the module's docstring."""

    fd_slack = 5
    thread_slack = 2

    def __init__(self, args, directory):
        self.args = args
        self.directory = directory
        self.context = multiprocessing.get_context("fork")
        self.violations = Violations(args.seed, MAX_EXAMPLES * (
            4 if args.verbose else 1))
        self.ledger = Ledger(self.violations)
        self.counts = collections.Counter()
        self.faults = {}
        self.upstream_sessions = self.upstream_open = 0
        self.proxy = None
        self.samples = []
        self.baseline = self.idle = None
        self.baseline_names = collections.Counter()
        self.start_workers = []
        self.load_time = 0.0
        self.load_started = None
        self.started = time.monotonic()
        self.last_sample = self.last_progress = 0.0
        self.channels = {}          # channel -> name
        self.processes = []         # the fuzzer's: upstream, clients
        self.upstream_channel = None
        self.exit_status = None
        self.log = ""
        self.cpu = None

    def setting(self, name, default):
        return settings_value(self.args.set, name, default)

    # -- the children -----------------------------------------------------

    def start_upstream(self):
        mine, theirs = self.context.Pipe()
        process = self.context.Process(target=upstream_process,
                                       args=(self.args.seed, theirs))
        process.daemon = True
        process.start()
        theirs.close()
        self.processes.append(process)
        self.upstream_channel = mine
        self.channels[mine] = "upstream"
        if not mine.poll(15):
            raise SystemExit("the upstream did not start")
        return mine.recv()[1]

    def start_clients(self, port):
        args = self.args
        settings = ClientSettings(args, port)
        processes = max(1, min(args.processes, args.sessions))
        for index in range(processes):
            mine, theirs = self.context.Pipe()
            numbers = range(args.first + index, args.first + args.sessions,
                            processes)
            process = self.context.Process(target=client_process, args=(
                settings, numbers, args.threads, theirs))
            process.daemon = True
            process.start()
            theirs.close()
            self.processes.append(process)
            self.channels[mine] = "clients %d" % index

    def collect(self, timeout):
        """Take in what the children sent within ``timeout`` seconds;
        sample the proxy when it is time."""
        now = time.monotonic()
        ready = multiprocessing.connection.wait(list(self.channels),
                                                max(0.0, timeout))
        for channel in ready:
            try:
                message = channel.recv()
            except (EOFError, OSError):
                name = self.channels.pop(channel)
                self.violations.add(None, "a process of the fuzzer died",
                                    name)
                continue
            self.take(channel, message)
        now = time.monotonic()
        if now - self.last_sample >= SAMPLE_INTERVAL:
            self.last_sample = now
            self.sample()
            self.ledger.sweep(now, SETTLE_AGE)
        if self.args.verbose and now - self.last_progress >= 10:
            self.last_progress = now
            self.progress()

    def take(self, channel, message):
        now = time.monotonic()
        kind = message[0]
        if kind == "done":
            del self.channels[channel]
        elif kind == "results":
            counts, violations, claims = message[1:]
            self.counts.update(counts)
            for violation in violations:
                self.violations.add(*violation)
            for claim in claims:
                self.ledger.claim(claim, now)
        elif kind == "events":
            events, self.upstream_sessions, self.upstream_open, \
                self.faults = message[1:]
            for event in events:
                if event[0] == "received":
                    self.ledger.received(event, now)
                    if self.args.replay:
                        print("   upstream received %s (%s%s)" % (
                            event[1], event[3], "".join(
                                ", " + line.decode("utf-8", "replace").strip()
                                for line in event[4])))
                elif event[0] == "accepted":
                    self.ledger.accepted(event[1], now)
                    if self.args.replay:
                        print("   upstream answered 250 to %s" % event[1])
                else:
                    kind, detail = event[1:]
                    match = re.search(r"\(client session ([0-9]+)\)\Z",
                                      detail)
                    self.violations.add(int(match.group(1)) if match
                                        else None, "upstream saw: " + kind,
                                        detail)

    def clients_running(self):
        return any(name.startswith("clients") for name in
                   self.channels.values())

    def wait(self, seconds, done=lambda: False):
        """Collect for up to ``seconds``, or until ``done()``."""
        deadline = time.monotonic() + seconds
        for _ in range(10 ** 7):
            left = deadline - time.monotonic()
            if left <= 0 or done():
                return done()
            self.collect(min(left, 0.5))
        return done()

    # -- the proxy's health -----------------------------------------------

    def sample(self):
        sample = self.proxy.sample()
        if sample is None:
            return None
        self.samples.append(sample)
        gone = [pid for pid in self.start_workers
                if not os.path.exists("/proc/%d" % pid)]
        if gone and "worker" not in self.counts:
            self.counts["worker"] += 1
            self.violations.add(None, "proxy worker gone", "pids %s; "
                                "workers now %s" % (gone,
                                                    self.proxy.workers()))
        if not self.proxy.alive() and "proxy died" not in \
                self.violations.counts:
            self.violations.add(None, "proxy died", "exit status %s"
                                % self.proxy.process.returncode)
        return sample

    def warm_up(self):
        """Greylisted sessions from every client address at once, so that
        each worker opens its store (kept open) before the baseline."""
        threads = [threading.Thread(target=self.warm_session, args=(
            self.proxy.port, source)) for source in GREY_SOURCES * 2]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(REPLY_WAIT)

    @staticmethod
    def warm_session(port, source):
        try:
            hostile.greylisted_session(port, source)
        except OSError:
            pass

    def settle(self, target=None):
        """The proxy once idle: after the upstream pool and the spare
        threads have expired, when its descriptors and threads are back to
        ``target`` (or stable), or 15 s later."""
        idle = max(self.setting("upstream_pool_idle", smtpproxy.
                                ConcreteMailHandler.upstream_pool_idle),
                   self.setting("thread_idle_time", smtpproxy.
                                SMTPProxyServer.thread_idle_time))
        self.wait(idle + 15, lambda: self.upstream_open == 0)
        self.wait(idle + 1)
        previous = None
        deadline = time.monotonic() + 15
        for _ in range(10 ** 6):
            sample = self.sample()
            if sample is None or time.monotonic() > deadline:
                return sample
            if target is not None and self.back_to(sample, target):
                return sample
            if target is None and previous is not None and \
                    (sample.fds, sample.threads) == (previous.fds,
                                                     previous.threads):
                return sample
            previous = sample
            self.wait(0.5)
        return previous

    def back_to(self, sample, baseline):
        return (sample.fds <= baseline.fds + self.fd_slack
                and sample.threads <= baseline.threads + self.thread_slack)

    def progress(self):
        sample = self.samples[-1] if self.samples else None
        elapsed = time.monotonic() - (self.load_started or self.started)
        print("%7.0f s  sessions %d (%.0f/s)  violations %d  delivered %d"
              "%s" % (elapsed, self.counts["sessions"],
                      self.counts["sessions"] / max(1.0, elapsed),
                      self.violations.total(), self.ledger.counts["delivered"],
                      "  proxy fds %d threads %d RSS %.0f MB" % (
                          sample.fds, sample.threads, sample.rss / 1e6)
                      if sample else ""))
        sys.stdout.flush()

    # -- the run ----------------------------------------------------------

    def run(self):
        args = self.args
        port = self.start_upstream()
        try:
            self.proxy = Proxy(args, self.directory, port)
        except OSError as error:
            print("FAIL: cannot run %s: %s" % (args.python, error))
            return 1
        try:
            error = self.proxy.wait_ready()
            if error is not None:
                print("FAIL: %s" % error)
                return 1
            self.load(port)
        finally:
            if self.proxy.alive():
                self.cpu = self.proxy.cpu_seconds()
            self.exit_status = self.proxy.stop()
            self.log = self.proxy.log_text()
            self.stop_upstream()
        return self.report()

    def load(self, port):
        args = self.args
        self.start_workers = self.proxy.workers()
        if args.idle_check:
            self.warm_up()
            self.baseline = self.settle()
            self.baseline_names = self.proxy.descriptor_names()
        else:
            self.baseline = self.sample()
        self.load_started = time.monotonic()
        self.start_clients(self.proxy.port)
        self.wait(10 ** 7, lambda: not self.clients_running())
        self.load_time = time.monotonic() - self.load_started
        if args.idle_check:
            self.idle = self.settle(self.baseline)
            if self.idle is None or self.baseline is None or \
                    not self.back_to(self.idle, self.baseline):
                opened = self.proxy.descriptor_names()
                opened.subtract(self.baseline_names)
                self.violations.add(None, "proxy not back to its baseline",
                                    "%s; opened since: %s" % (
                                        self.resource_text(), ", ".join(
                                            "%s %d" % item for item in
                                            sorted(opened.items())
                                            if item[1] > 0)))
        else:
            self.idle = self.sample()

    def stop_upstream(self):
        channel = self.upstream_channel
        if channel not in self.channels:
            return
        try:
            channel.send("stop")
        except OSError:
            return
        self.wait(30, lambda: channel not in self.channels)
        self.ledger.close()
        for process in self.processes:
            process.join(10)

    # -- the report -------------------------------------------------------

    def resource_text(self):
        if self.baseline is None or self.idle is None:
            return "not sampled"
        return ("descriptors %d at the baseline, %d at the end; threads %d, "
                "%d" % (self.baseline.fds, self.idle.fds,
                        self.baseline.threads, self.idle.threads))

    def report(self):
        counts = self.counts
        tracebacks = self.log.count("Traceback")
        if tracebacks:
            start = self.log.index("Traceback")
            self.violations.add(None, "traceback in the proxy's log",
                                self.log[start:start + 1500])
        if self.exit_status != 0:
            self.violations.add(None, "proxy exit status",
                                "%s after SIGTERM" % self.exit_status)
        sessions = counts["sessions"]
        failed = self.violations.total()
        load = max(self.load_time, 1e-9)
        ledger = self.ledger.counts

        def share(key):
            return "%d (%.1f%%)" % (counts[key], 100.0 * counts[key]
                                    / max(1, sessions))

        def group(prefix):
            found = sorted((key[len(prefix):], value) for key, value in
                           counts.items() if key.startswith(prefix))
            return ", ".join("%s %d" % item for item in found) or "none"

        lines = [
            "smtpproxy fuzz: %s" % ("PASS" if not failed else "FAIL"),
            "  seed          %d; sessions %d to %d; %d client processes of "
            "%d threads" % (self.args.seed, self.args.first,
                            self.args.first + self.args.sessions - 1,
                            self.args.processes, self.args.threads),
            "  sessions      %d in %.1f s: %.0f a second; mutated %s, "
            "unmutated and well-behaved %s" % (sessions, load, sessions / load,
                                               share("mutated"),
                                               share("clean")),
            "  styles        %s" % group("style: "),
            "  endings       %s; talking first %d" % (group("ending: "),
                                                      counts["talks first"]),
            "  mutations     %s" % group("mutation: "),
            "  outcomes      %s" % group("outcome: "),
            "  replies       %d checked (%d lines); connections reset by "
            "the proxy %d" % (counts["replies"], counts["reply lines"],
                              counts["connection reset by the proxy"]),
            "  messages      %d sent to their end: %d accepted (2xx) and "
            "%d delivered; %d failed upstream; refused as bad: %s"
            % (counts["messages sent"], counts["message accepted"],
               ledger["delivered"], sum(value for key, value in counts.items()
                                        if key.startswith("message failed")),
               group("message refused: ")),
            "  ledger        %d received by the upstream, %d answered 250; "
            "claims: %s" % (ledger["received"], ledger["answered 250"],
                            ", ".join("%s %d" % (key[8:], value) for key, value
                                      in sorted(ledger.items())
                                      if key.startswith("claims: "))),
            "  passed on     %s" % (", ".join("%s: %d" % item for item in
                                              sorted(ledger.items())
                                              if not item[0].startswith(
                                                  "claims") and (
                                                  "8-bit" in item[0]
                                                  or "ambiguous" in item[0]))
                                    or "nothing else"),
            "  upstream      %d sessions; faults %s" % (
                self.upstream_sessions, ", ".join(
                    "%s %d" % item for item in sorted(self.faults.items()))
                or "none"),
        ]
        lines += self.resource_lines()
        lines.append("  proxy log     %d tracebacks; exit status %s"
                     % (tracebacks, self.exit_status))
        lines.append("  violations    %d" % failed)
        lines += self.violations.lines()
        lines.append("PASS" if not failed else "FAIL")
        print("\n".join(lines))
        sys.stdout.flush()
        return 0 if not failed else 1

    def own_cpu(self):
        """CPU seconds of this process and of its children but the proxy
        (which proxy.stop() waited for too)."""
        times = os.times()
        return (times[0] + times[1] + times[2] + times[3]
                - (self.cpu or 0.0))

    def resource_lines(self):
        if self.baseline is None or self.idle is None or not self.samples:
            return ["  proxy         not sampled"]
        samples = self.samples
        return [
            "  CPU           proxy %s; the fuzzer (clients, upstream, this "
            "process) %.0f s" % ("%.0f s (%.2f ms a session)" % (
                self.cpu, 1000 * self.cpu / max(1, self.counts["sessions"]))
                if self.cpu is not None else "?", self.own_cpu()),
            "  proxy         master and %d workers" % len(self.start_workers),
            "  descriptors   baseline %d, peak %d, end %d" % (
                self.baseline.fds, max(s.fds for s in samples),
                self.idle.fds),
            "  threads       baseline %d, peak %d, end %d" % (
                self.baseline.threads, max(s.threads for s in samples),
                self.idle.threads),
            "  RSS           baseline %.1f MB, peak %.1f MB, end %.1f MB" % (
                self.baseline.rss / 1e6, max(s.rss for s in samples) / 1e6,
                self.idle.rss / 1e6),
        ]


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Mutation fuzzer of smtpproxy (see the module's "
        "docstring).")
    parser.add_argument("--sessions", type=int, default=100000)
    parser.add_argument("--first", type=int, default=0,
                        help="the number of the first session (0)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--processes", type=int, default=3,
                        help="client processes (3)")
    parser.add_argument("--threads", type=int, default=48,
                        help="threads in each client process (48)")
    parser.add_argument("--rate", type=float, default=0,
                        help="sessions a second at most (no limit)")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--set", metavar="KEY=VALUE", action="append",
                        default=[], help="a configuration key of the proxy")
    parser.add_argument("--proxy-class", metavar="DOTTED.NAME",
                        help="the proxy's --class")
    parser.add_argument("--no-idle-check", dest="idle_check",
                        action="store_false",
                        help="do not wait for the proxy to be idle")
    parser.add_argument("--replay", metavar="SEED:N",
                        help="run session N of seed SEED alone, verbosely")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.replay:
        try:
            seed, number = (int(part) for part in args.replay.split(":"))
        except ValueError:
            parser.error("--replay takes SEED:N")
        args.seed, args.first, args.sessions = seed, number, 1
        args.processes = args.threads = 1
        args.idle_check = False
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(10 ** 6)
    if args.sessions < 1 or args.processes < 1 or args.threads < 1:
        parser.error("--sessions, --processes and --threads must be "
                     "positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    directory = tempfile.mkdtemp(prefix="smtpproxy-fuzz-")
    try:
        status = Fuzz(args, directory).run()
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    if args.keep:
        print("the run's directory (configuration, store, the proxy's "
              "log): %s" % directory)
    return status


if __name__ == "__main__":
    sys.exit(main())
