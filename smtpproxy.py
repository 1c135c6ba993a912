#!/usr/bin/env python3
"""smtpproxy: a strict, greylisting SMTP proxy that forwards faithfully.

Usage: %(program)s [options]

smtpproxy listens on the SMTP port in front of an organisation's real mail
server (Postfix, Exim, ...), which is moved to another port (8025 by
default).  It enforces the SMTP dialogue strictly, asks its policy about
every recipient and every message, and forwards what it takes to the real
server ("the upstream") while the client is still connected, so that the
client always hears the upstream's own verdict: a client is told 2xx only
after the upstream said 2xx.

Nothing reaches the upstream until a RCPT passes the local checks and the
policy: then the upstream session is opened, the client's HELO/EHLO name
and MAIL FROM are replayed, and every further accepted RCPT is relayed
live, the upstream's reply being the client's.  At DATA the message is
streamed to the upstream line by line, in constant memory, and the
upstream's reply to the final dot is the client's reply.  If the client
goes away before the end of the data, the upstream session is closed
without the final dot, so that the upstream discards what it got.

With policy_listen, the same process also answers Postfix's
check_policy_service (SMTPD_POLICY_README), for sites that keep Postfix on
port 25, with the same greylisting and the same store; with smtp_proxy =
no, that is all it serves.

What EHLO offers follows the upstream (SIZE, 8BITMIME, SMTPUTF8, DSN:
only what it can carry, learnt from its own EHLO).  STARTTLS is offered to
clients with tls_cert, and used with the upstream per upstream_tls; with
xclient, XCLIENT or XFORWARD tell the upstream (Postfix) the real client;
with proxy_protocol, HAProxy's PROXY header gives the client's address.

The end of the data is CR LF . CR LF and nothing else: a bare CR, a bare
LF or a NUL anywhere in the message makes the whole message refused after
its real end (SMTP smuggling), and it is never forwarded in a form the
upstream could read as an end of data.

Options:

    --config FILE, -c FILE
        Read the configuration from FILE (Kamaelia Grey's greylist.conf
        format).  Without it the first file found of these is read, if
        any (CONFIG_SEARCH_PATH):
%(search_path)s
    --listen [HOST:]PORT, -l [HOST:]PORT
        Address to listen on (keys listen_ip and port).  IPv6 addresses go
        in brackets: [::1]:25.
    --upstream HOST[:PORT], -u HOST[:PORT]
        The real mail server (keys smtp_ip and smtp_port); an IPv6
        address with a port in brackets too: [::1]:8025.
    --class DOTTED.NAME
        The handler class to run, such as mymodule.MyPolicy (the module is
        imported from PYTHONPATH).  Defaults to %(default_class)s:
        mail for allowed_domains is greylisted, clients of allowed_senders
        and allowed_sender_nets may relay, anything else is refused.
        smtpproxy.ConcreteMailHandler forwards nothing (451 at DATA, as
        Kamaelia Grey's class of that name); subclass it and override
        shouldWeAcceptRecipient() and shouldWeAcceptMail() to decide.
    --debug, -d
        Log the SMTP dialogue to greylist_debuglog (key debug).
    -o KEY=VALUE
        Set any configuration key, over the file (list items separated by
        commas); an unknown KEY is an error naming the keys nearest to it
        (postgrey's delay: min_defer_time).  These set the key of their
        name too, such as
        --user nobody:
%(key_options)s
    --daemon
        Detach (double fork, new session, umask 022, working directory /,
        standard streams to /dev/null).  The command returns once the
        daemon serves, with status 0, or with the status of its failure
        (its message on standard error).  Relative file names are read
        from the directory it started in.
    --foreground
        Stay attached (the default), for supervisors such as systemd.
    --check-config
        Check the configuration as a start would (values, user and group,
        root without a user, TLS certificate and key, the PROXY protocol's
        balancers, the greylisting store as the serving user, the pidfile
        and logs; a port below 1024 run by a user who may not bind it,
        a listening address that is none of this host's; a warning if the
        real server does not answer EHLO within upstream_timeout), print
        every key's effective value and exit: 0 if the service would
        start, else the status of its failure, with why.
    --quiet, -q
        With --check-config: print only warnings and errors.
    --sample-config
        Print a configuration file of every key with its default and its
        help (contrib/greylist.conf.dist is one), and exit.
    --version, -V
        Print the version and exit.
    --help, -h
        Print this message and exit.

Working on the greylisting store (greylist_db) of the configuration, also
while the proxy runs; keys are "client-network sender recipient":

    --db-list        List entries: state (GREY, WHITE, CLIENT), key,
                     first and last seen (UTC), passes; then the
                     greytraps: TRAPPED, the client's key, when it
                     sprang the trap, until when, and the trap.  With
                     hash_keys, a key shows the hashes of its sender
                     and recipient (hmac:...): it cannot show the
                     addresses.
    --db-stats       Count entries by state.
    --db-purge       Delete expired entries now.
    --db-pass KEY    Pass (whitelist) a triplet now: client address (or
                     network), sender, recipient, quoted or not, such as
                     --db-pass 192.0.2.7 a@example.net b@example.org.
    --db-delete KEY  Forget a triplet or a client network (or name key):
                     its greytrap too, if it is trapped.
    --db-hash-keys   With hash_keys: hash the store's clear keys in
                     place, keeping their passes (run once, as the
                     admin, when hash_keys is turned on; keys already
                     hashed are left).
    --db-report [--since DURATION] [--json]
                     What greylisting did in the last DURATION (7d by
                     default; 24h, 90m, 2w, 1h30m, 3600 seconds: units
                     s m h d w): triplets first seen, passed, never
                     retried, still waiting; the median, 90th percentile
                     and longest wait of the passes; the clients
                     auto-whitelisted; the clients that sprang a
                     greytrap, those trapped now, the latest ten; the
                     top client keys of each kind (IPv4, IPv6, names,
                     unknown) by triplets seen.  --json: one JSON
                     object (fields: README).  Writes nothing (the
                     store is opened read-only).
Each names the store it opened on standard error; only --db-pass makes
one where there is none.  With hash_keys, --db-pass and --db-delete take
the addresses and act on the key the proxy makes of them (or take the
hashed key as --db-list shows it).

As a service: the pidfile is locked first (a running instance makes the
start fail; a stale pidfile is replaced), then the logs are opened (never
through a link; in a directory another user can write, as the serving
user) and the port bound, as root if port 25 needs it; then the process
detaches (--daemon), writes its pid, switches to ``user`` and ``group``
(serving as root is refused unless run_as_root is set) and checks, as that
user, that it can use the greylisting store (made 0640 the first time).
Signals:

    SIGTERM, SIGINT  Stop: the port closes at once, sessions without a
                     transaction get 421 4.3.2, open transactions get
                     grace_period seconds to finish, then 421 4.3.2 too.
                     Mail is never acknowledged unless the real server took
                     it.  A second signal ends the grace period at once.
    SIGHUP           Read the configuration again (new sessions get it,
                     sessions in progress keep theirs; a broken file keeps
                     the one in force and logs why) and reopen the logs
                     (also after a broken file; a log that cannot be
                     reopened stays open as it was).
    SIGUSR1          Log the counters: connections, refused connections,
                     recipients and messages accepted, deferred, refused,
                     upstream errors.  With metrics_listen, the same
                     counts and more, for the whole service, are served
                     to Prometheus (GET /metrics, to metrics_clients).
    SIGUSR2          Reopen the logs, whatever the configuration (for
                     logrotate).

With ``workers`` above 1 (the default, auto: one more than the CPUs, 2
to 8), the process started is the master: it binds the port, writes the
pidfile, forks that many workers (after the privilege drop), which serve
the port and share its limits, starts again one that dies, and passes
each signal on to them (SIGUSR1: each logs its own counters); it serves
no client itself.  A worker whose master is gone stops by itself.  The
metrics are the service's: each process counts into its own row of a
table they share, a scrape sums the rows, and a worker started again
goes on in its row, so no counter goes back.  On glibc, the command
line first starts itself again (the same pid) with
GLIBC_TUNABLES=glibc.malloc.tcache_count=0: a thread kept for the next
client (spare_threads) would otherwise pin memory in its cache for good.

Exit status: 0 after a stop, 1 when the service could not start (port in
use, already running, store not writable), 2 for a bad configuration;
an admin command whose reader stopped reading (--db-list | head) ends
quietly with 141, as a tool that SIGPIPE ends.

Configuration keys, by section, with their defaults (class attributes of
the handler, or of SMTPProxyServer for the limits; set in the file, by
subclassing, or on the command line, which overrides the file).  A time
is in seconds, or with units s m h d w: 300, 5m, 2d, 1h30m.  Each
key's help: --sample-config, the commented file of every key.

%(config_keys)s

Files: the configuration file (--config, else the first of the search
path above); the store, the logs, the pidfile, the allow-list files and
the policy service's socket are where their keys say, relative names
from the directory the service started in.  contrib/greylist.conf.dist
is the output of --sample-config: every key, its default and its help.

Subclassing: the hooks are listed in the comment "# Hooks" at the top of
smtpproxy.py; the README's "Writing a policy" shows one.
"""

import argparse
import base64
import bisect
import collections
import contextlib
import difflib
import errno
import fcntl
import functools
import grp
import hashlib
import heapq
import hmac
import http.server
import importlib
import io
import ipaddress
import json
import logging
import logging.handlers
import math
import mmap
import os
import pwd
import queue
import re
import select
import signal
import socket
import socketserver
import sqlite3
import ssl
import stat
import struct
import sys
import textwrap
import threading
import time
import unicodedata
import urllib.parse

# == The map ==
#
# The developer's part of the manual (--help, the module docstring, is
# the admin's).  The sections, in the order they stand; each opens with
# what it owns, where to enter and what it uses, and its banner is its
# grep token (# == N. Title ==):
#
#   1. Text: what a client may write, and how it reaches a log
#       (log_escape, parse_path, addresses)
#   2. Sockets: deadlines, line reading, TLS contexts, descriptors
#       (Expired, _LineReader, send_within, TLS)
#   3. Shared by the sessions of a process: caches, threads, list files
#       (Cache, ReusedThreads, ListFiles)
#   4. The upstream: a plain-socket SMTP client, the pool, the relay
#       (UpstreamSession, UpstreamPool, UpstreamRelay)
#   5. The SMTP session: MailHandler
#       (lines, verbs, replies, deadlines)
#   6. The forwarding handler: ConcreteMailHandler
#       (the state machine, TLS, outcomes, DataScanner)
#   7. Names and DNS lists
#       (FCrDNS, generic names, DNSLists, LookupThreads)
#   8. Greylisting: the engine and its handler
#       (Greylister, Decision, GreyListingPolicy)
#   9. Greylisting: the store's rules
#       (triplet_step, StoreBase: passes, traps, the report; Stores)
#  10. Greylisting: the sqlite store
#       (GreylistStore)
#  11. Greylisting: the PostgreSQL store
#       (PostgreSQLStore, its URI and password)
#  12. The server: SMTPProxyServer, and the metrics
#       (threads, limits, stress, counters, stop; Metrics, MetricsServer)
#  13. Postfix's policy service (check_policy_service)
#       (PolicyHandler, PolicyServer)
#  14. Configuration: what a value may be
#       (the parsers, parse_duration)
#  15. Configuration: the keys and the file
#       (Key, KEYS, the file, the sample)
#  16. The service's files and privileges, as root
#       (logs, pidfile, links, the user)
#  17. Checks
#       (check_*, warnings, the policy service's socket)
#  18. The admin commands: the store's --db-*
#       (administer_store, format_report)
#  19. The service: start, signals, reloads, workers
#       (Service, the master and its workers)
#  20. The command line
#       (--help, main())
#
# Design.  The command line's service is a master and worker processes that
# share the port (workers = auto: one more than the CPUs; 1: one process,
# which is also what programmatic use below gets).  In each process,
# SMTPProxyServer is a socketserver.ThreadingTCPServer: one thread per
# client, kept for the next (spare_threads).  Each thread runs a handler, a
# StreamRequestHandler subclass:
#
#     MailHandler          reads client lines with enforced limits and
#                          dispatches each command to handleHelo(),
#                          handleMail(), ...; writes replies with netPrint().
#     ConcreteMailHandler  the strict SMTP state machine and the hooks; its
#                          UpstreamRelay forwards through an UpstreamSession
#                          (a plain socket), its DataScanner finds the end of
#                          each message.
#     GreyListingPolicy    the default policy: asks a Greylister (allow-lists,
#                          relay refusal, greylisting in a GreylistStore, an
#                          sqlite3 file, or a PostgreSQLStore shared by
#                          several MX hosts), which needs no socket.
#
# With policy_listen, PolicyServer (or UnixPolicyServer) and PolicyHandler
# answer Postfix's check_policy_service with the same greylisting, through
# the same Greylister and store.  With metrics_listen, MetricsServer
# serves ``metrics`` (Metrics): what the sections count, summed over the
# service's processes.
#
# Hooks: what a subclass may override or call; everything else has a
# leading underscore.  Kamaelia Grey's names keep their camelCase; every
# name new in smtpproxy is PEP 8.
#
#   policy    shouldWeAcceptRecipient(recipient) -> True, False (defer) or
#             a reply string; shouldWeAcceptMail() -> bool (at DATA);
#             extra_headers() -> header lines put in front of the message;
#             GreyListingPolicy: now() -> the clock, greylister_class (a
#             Greylister subclass), store_failed(error)
#   lookups   reverse_lookup(address) -> [names]; forward_lookup(name) ->
#             {addresses}; client_names() -> (reverse, confirmed);
#             client_hostname() -> the confirmed name or None
#   replies   timeout_reply(), shutdown_reply() -> the 421 texts;
#             ehlo_lines() -> the lines of our EHLO reply; defer_reply and
#             relay_reply (attributes)
#   events    handleConnect(), handleTimeout(), handleShutdown(),
#             handleDisconnect(), logResult() (the transaction line),
#             upstream_failed(error)
#   verbs     handleHelo, handleEhlo, handleMail, handleRcpt, handleData,
#             handleQuit, handleRset, handleNoop, handleVrfy, handleHelp,
#             handleStarttls (args: the text after the verb);
#             handleUnknown(command); a new verb: add it to ``commands`` and
#             write handleVerb
#   Postfix   PolicyHandler (check_policy_service): answer(request) -> the
#             action, now(), greylister(), store_failed(error);
#             PolicyServer and UnixPolicyServer (policy_* attributes)
#   plumbing  netPrint(reply), refuse(reply, protocol_error),
#             close_connection(), log_dialogue(message, *args),
#             count(counter), busy(); upstream_class (UpstreamSession),
#             relay_class (UpstreamRelay); learn_upstream() and
#             server_tls_context() (class methods, run at the start);
#             SMTPProxyServer.service_hooks (callables its
#             service_actions() runs after its own work)
#   metrics   metrics.add(name, *labels), metrics.observe(name, value),
#             metrics.set(name, value) on a series of METRIC_FAMILIES (a
#             new series goes there); MetricsServer (metrics_listen)
#   relay     client_attributes(command, announced),
#             upstream_tls_context()
#
# Programmatic use, configured by subclassing:
#
#     import smtpproxy
#
#     class MyProxy(smtpproxy.ConcreteMailHandler):
#         smtp_port = 10025
#         def shouldWeAcceptMail(self):
#             return True
#
#     smtpproxy.SMTPProxyServer(('', 1025), MyProxy).serve_forever()

__version__ = "0.1.0"

# What the hooks table and the README name: the handlers, the engine, the
# stores, the relay, the servers, the exceptions they raise, and the
# functions a policy or a tool may call.
__all__ = [
    "MailHandler", "ConcreteMailHandler", "GreyListingPolicy",
    "UpstreamSession", "UpstreamRelay", "DataScanner", "UpstreamError",
    "UpstreamTLSError", "EnvelopeSyntaxError", "UNKNOWN_CLIENT",
    "Greylister", "Decision", "triplet_step", "Step", "StoreBase",
    "GreylistStore",
    "PostgreSQLStore", "open_store", "StoreError", "StoreConfigError",
    "redact_uri", "hide_secrets", "parse_dns_list", "key_hash",
    "SMTPProxyServer", "PolicyHandler", "PolicyServer", "UnixPolicyServer",
    "Metrics", "MetricsServer", "METRIC_FAMILIES",
    "ConfigError", "load_config", "read_config_file", "parse_path",
    "parse_duration",
    "log_escape", "normalise_sender", "worker_count", "main",
]

log = logging.getLogger("smtpproxy")

transaction_log = logging.getLogger("smtpproxy.transactions")

dialogue_log = logging.getLogger("smtpproxy.dialogue")


# ===========================================================================
# == 1. Text: what a client may write, and how it reaches a log ==
# ===========================================================================
#
# Owns:  log_escape() (no client octet reaches a log unescaped); the RFC 5321
#        path grammar and its limits (parse_path); IPv4-mapped addresses
#        (unmapped) and networks (_in_network).
# Enter: parse_path(text, utf8), log_escape(text).
# Uses:  nothing of this module.


_UNSAFE_FOR_LOG = re.compile(r"[^\x20-\x5b\x5d-\x7e]")


def _escape_char(match):
    char = match.group()
    if char == "\\":
        return "\\\\"
    code = ord(char)
    if code < 0x100:
        return "\\x%02x" % code
    return "\\u%04x" % code if code < 0x10000 else "\\U%08x" % code


def log_escape(value):
    """Return ``value`` (bytes or str) as printable ASCII for a log line.

    Control characters, non-ASCII and backslash are written as Python
    escapes, so that no client byte (CR, LF, ESC, ...) reaches a log
    unescaped and every escape can be read back unambiguously.
    """
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    elif not isinstance(value, str):
        value = str(value)
    return _UNSAFE_FOR_LOG.sub(_escape_char, value)


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"


_DOT_STRING = r"%s+(?:\.%s+)*" % (_ATEXT, _ATEXT)


_QUOTED_STRING = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'


_SUB_DOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"


_DOMAIN = r"%s(?:\.%s)*" % (_SUB_DOMAIN, _SUB_DOMAIN)


_ADDRESS_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"


# RFC 6531: with SMTPUTF8, UTF-8 (non-ASCII, not a control) in atoms,
# quoted strings and domain labels (U-labels).
_UTF8 = "\u00a0-\U0010ffff"


_ATEXT_UTF8 = r"[A-Za-z0-9!#$%%&'*+/=?^_`{|}~%s-]" % _UTF8


_DOT_STRING_UTF8 = r"%s+(?:\.%s+)*" % (_ATEXT_UTF8, _ATEXT_UTF8)


_QUOTED_STRING_UTF8 = (r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e%s]|\\[\x20-\x7e])*"'
                       % _UTF8)


_SUB_DOMAIN_UTF8 = r"[A-Za-z0-9%s](?:[A-Za-z0-9%s-]*[A-Za-z0-9%s])?" % (
    (_UTF8,) * 3)


_DOMAIN_UTF8 = r"%s(?:\.%s)*" % (_SUB_DOMAIN_UTF8, _SUB_DOMAIN_UTF8)


_MAILBOX_UTF8_RE = re.compile(r"(%s|%s)@(%s|%s)\Z" % (
    _DOT_STRING_UTF8, _QUOTED_STRING_UTF8, _DOMAIN_UTF8, _ADDRESS_LITERAL))


# RFC 3461: xtext, for ENVID and ORCPT.
_XTEXT = r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})"


_XTEXT_RE = re.compile(r"%s*\Z" % _XTEXT)


_ORCPT_RE = re.compile(r"[A-Za-z0-9-]+;%s+\Z" % _XTEXT)


_MAILBOX_RE = re.compile(r"(%s|%s)@(%s|%s)\Z" % (
    _DOT_STRING, _QUOTED_STRING, _DOMAIN, _ADDRESS_LITERAL))


_ROUTE_RE = re.compile(r"@%s(?:,@%s)*:" % (_DOMAIN, _DOMAIN))


_HELO_RE = re.compile(r"[\x21-\x7e]{1,255}\Z")


_PARAM_RE = re.compile(
    r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?\Z")


# A path up to its closing ">": a ">" or '"' inside a quoted local-part,
# escaped or not, does not end it.
_PATH_END_RE = re.compile(r'<(?:[^">]|%s)*>' % _QUOTED_STRING)


MAX_LOCAL_PART = 64     # RFC 5321 section 4.5.3.1.1


MAX_DOMAIN = 255        # section 4.5.3.1.2


MAX_PATH = 256          # section 4.5.3.1.3, with the angle brackets


class EnvelopeSyntaxError(ValueError):
    """An envelope command that is not RFC 5321 syntax; ``str()`` says why."""


def _valid_address_literal(literal):
    content = literal[1:-1]
    try:
        if content[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(content[5:])
        else:
            ipaddress.IPv4Address(content)
    except ValueError:
        return False
    return True


def parse_path(text, null_allowed=False, postmaster_allowed=False,
               utf8=False):
    """Parse an RFC 5321 path and its parameters, as after ``MAIL FROM:``.

    ``text`` is what follows the colon: ``<local@domain> PARAM=VALUE ...``.
    Returns ``(mailbox, route, params)``: ``mailbox`` is the address without
    angle brackets ("" for the null reverse-path ``<>``, "Postmaster" for
    the bare ``<Postmaster>`` of RFC 5321 section 4.5.1); ``route`` is the
    obsolete source route (``@a,@b:``) or "" (it is not forwarded, as
    section 3.6.1 asks); ``params`` is a list of ``(KEYWORD, value or
    None)`` with the keyword upper-cased.  Raises EnvelopeSyntaxError.
    With ``utf8`` (SMTPUTF8 offered), the address may hold UTF-8 as RFC
    6531 extends RFC 5321; lengths are counted in octets all the same.

    Written for strictness, not borrowed from email.utils: no spaces
    inside the path, no comments, no display names, length limits of
    RFC 5321 section 4.5.3.1 enforced.
    """
    if not text.startswith("<"):
        raise EnvelopeSyntaxError("the address must be in angle brackets")
    match = _PATH_END_RE.match(text)
    if not match:
        raise EnvelopeSyntaxError("no closing angle bracket")
    path, rest = match.group(), text[match.end():]
    if len(path.encode("utf-8")) > MAX_PATH:
        raise EnvelopeSyntaxError("path longer than %d octets" % MAX_PATH)
    inner = path[1:-1]
    route = ""
    if inner.startswith("@"):
        match = _ROUTE_RE.match(inner)
        if not match:
            raise EnvelopeSyntaxError("bad source route")
        route, inner = inner[:match.end()], inner[match.end():]
    if inner == "":
        if route or not null_allowed:
            raise EnvelopeSyntaxError("empty address")
        mailbox = ""
    elif postmaster_allowed and inner.lower() == "postmaster" and not route:
        mailbox = inner
    else:
        match = (_MAILBOX_UTF8_RE if utf8 else _MAILBOX_RE).match(inner)
        if not match:
            raise EnvelopeSyntaxError("bad address syntax")
        local, domain = match.group(1), match.group(2)
        if len(local.encode("utf-8")) > MAX_LOCAL_PART:
            raise EnvelopeSyntaxError("local-part longer than %d octets"
                                      % MAX_LOCAL_PART)
        if len(domain.encode("utf-8")) > MAX_DOMAIN:
            raise EnvelopeSyntaxError("domain longer than %d octets"
                                      % MAX_DOMAIN)
        if domain.startswith("["):
            if not _valid_address_literal(domain):
                raise EnvelopeSyntaxError("bad address literal")
        elif any(len(label.encode("utf-8")) > 63
                 for label in domain.split(".")):
            raise EnvelopeSyntaxError("domain label longer than 63 octets")
        mailbox = inner
    params = []
    if rest:
        if not rest.startswith(" ") or len(rest) < 2:
            raise EnvelopeSyntaxError("garbage after the address")
        seen = set()
        for word in rest[1:].split(" "):
            match = _PARAM_RE.match(word)
            if not match:
                raise EnvelopeSyntaxError("bad parameter syntax")
            keyword = match.group(1).upper()
            if keyword in seen:
                raise EnvelopeSyntaxError("parameter %s given twice"
                                          % keyword)
            seen.add(keyword)
            params.append((keyword, match.group(2)))
    return mailbox, route, params


def unmapped(address):
    """An address as text, an IPv4-mapped IPv6 one (::ffff:192.0.2.7, as
    a dual-stack socket reports IPv4 clients) as plain IPv4."""
    if not isinstance(address, str):            # an ipaddress object
        mapped = getattr(address, "ipv4_mapped", None)
        return str(mapped if mapped is not None else address)
    if address.startswith("::ffff:") and "." in address:
        return address[7:]
    return address


# The client of a connection whose address nobody knows (a PROXY header
# that names none; Postfix's own word for it in XCLIENT and policy
# requests): it matches no address or network, whitelists nothing by
# address, is never auto-whitelisted, and is greylisted under this key,
# which no network ("192.0.2.0/24") or host-name key can be.
UNKNOWN_CLIENT = "unknown"


def _in_network(address, network):
    """Is ``address`` in ``network``: a CIDR network, a single address, or
    a textual prefix of whole octets such as ``192.168.2``?"""
    try:
        if not isinstance(address, (ipaddress.IPv4Address,
                                    ipaddress.IPv6Address)):
            address = ipaddress.ip_address(address)
        if "/" in network:
            return address in ipaddress.ip_network(network, strict=False)
        if ":" in network or network.count(".") == 3:
            return address == ipaddress.ip_address(network)
    except ValueError:
        return False
    octets = network.rstrip(".").split(".")
    return (address.version == 4
            and str(address).split(".")[:len(octets)] == octets)


# ===========================================================================
# == 2. Sockets: deadlines, line reading, TLS contexts, descriptors ==
# ===========================================================================
#
# Owns:  every wait on a socket has a deadline (Expired), lines are read
#        within limits (_LineReader) and written within a time (send_within);
#        the TLS contexts; running out of descriptors (ResourceShortage).
# Enter: _LineReader(sock, ...).readline(), send_within(sock, data, seconds).
# Uses:  section 1 (log_escape).


class ClientGone(Exception):
    """The client closed the connection (or broke it)."""


class Expired(socket.timeout):
    """A wait that reached one of its limits.  ``reason`` says which:
    "idle" (silence between two reads), "stress" (the same, shortened
    under stress), "line" (a line not complete within its deadline),
    "session" (max_session_time), "write" (a client not reading),
    "header" (the PROXY header), "handshake" (TLS); ``seconds`` is the
    limit that was reached."""

    def __init__(self, reason, seconds):
        socket.timeout.__init__(self, "%s limit of %s seconds reached"
                                % (reason, _seconds(seconds)))
        self.reason = reason
        self.seconds = seconds


# recv() flags for a look at what is there, without waiting: a plain int,
# not the enum that socket's "|" makes at every call.
PEEK_NOW = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)


def _seconds(value):
    return ("%.1f" % value).rstrip("0").rstrip(".") if value else "0"


def _kernel_timeout(sock, option, seconds):
    """Set SO_RCVTIMEO or SO_SNDTIMEO to ``seconds`` (None: no limit);
    False if the system would not."""
    seconds = seconds or 0
    whole = int(seconds)
    micro = int((seconds - whole) * 1e6)
    if seconds and not (whole or micro):
        micro = 1                   # zero would mean no limit at all
    try:
        sock.setsockopt(socket.SOL_SOCKET, option,
                        struct.pack("@ll", whole, micro))
    except (AttributeError, OSError, struct.error):
        return False
    return True


def set_timeout(sock, seconds):
    """Make each read and write on ``sock`` give up after ``seconds``
    (never, if ``seconds`` is 0 or None).

    Why not sock.settimeout(): a Python-level timeout turns every recv and
    send into a poll() and the call, each releasing and retaking the GIL;
    with many sessions those GIL hand-offs cost more than the I/O.  The
    kernel's SO_RCVTIMEO and SO_SNDTIMEO give the same limit in one call:
    the socket stays blocking and a timeout surfaces as BlockingIOError
    (EAGAIN), which the readers here turn into socket.timeout.
    """
    if sock.gettimeout() is not None:
        sock.settimeout(None)       # a system call: only when it changes
    if not seconds:
        return
    if not (_kernel_timeout(sock, socket.SO_RCVTIMEO, seconds)
            and _kernel_timeout(sock, socket.SO_SNDTIMEO, seconds)):
        sock.settimeout(seconds)


def clear_timeout(sock):
    """Undo set_timeout()'s kernel timeouts: a TLS socket needs Python's
    own (a kernel timeout would look like a TLS error to it)."""
    _kernel_timeout(sock, socket.SO_RCVTIMEO, None)
    _kernel_timeout(sock, socket.SO_SNDTIMEO, None)


class _LineReader(object):
    """Reads LF-terminated lines from a socket, never more than ``limit``,
    and never waits longer than its limits allow.

    Unlike a file object it can hand over the whole buffer at once (for
    message data) and take back what was not used, so that no pipelined
    byte is lost (RFC 2920), and it calls ``before_wait`` before it blocks
    on the socket, so that the replies to pipelined commands are sent in
    one write.

    Every wait ends, with Expired, at the first of: ``idle`` seconds of
    silence (reason ``idle_reason``); ``line_timeout`` seconds after the
    reader began waiting for the rest of a line that is not complete yet
    (``line_started``: at its first octet, unless the session was busy
    then, with the upstream or its policy, whose time is not the
    client's; kept across the chunks of an overlong line; reason "line");
    ``deadline``,
    a time of time.monotonic() (reason ``deadline_reason``).  None is no
    limit.  A plain socket waits with the kernel's SO_RCVTIMEO, set only
    when the limit changes: the common wait costs no extra system call.

    With ``stop`` (a callable), the wait is cut in ``tick`` seconds long
    slices and ends as at the end of input when ``stop()`` turns true:
    for a TLS socket, which cannot be shut for reading from another thread
    without breaking its TLS (and which keeps Python's own timeout).

    ``waiting_since`` is the time.monotonic() at which the current wait
    began (None when not waiting): a server under stress sheds sessions
    that have waited too long.
    """

    def __init__(self, sock, before_wait=None, bufsize=65536, stop=None,
                 idle=None, tick=0.25):
        self.sock = sock
        self.before_wait = before_wait
        self.bufsize = bufsize
        self.buffer = b""
        self.position = 0
        self.stop = stop
        self.tick = tick
        self.idle = idle
        self.idle_reason = "idle"
        self.line_timeout = idle
        self.line_started = None
        self.deadline = None
        self.deadline_reason = "session"
        self.received_at = time.monotonic()
        self.waiting_since = None
        self._plain = not isinstance(sock, ssl.SSLSocket)
        # The timeout the socket has now; False: not known.  Whoever set
        # it already (set_timeout()) says so, saving a system call.
        self.applied = False

    def limit(self):
        """``(seconds, reason)`` of the next wait: the nearest limit; raise
        Expired if it is reached already."""
        now = time.monotonic()
        seconds, reason, limit = self.idle or None, self.idle_reason, None
        if self.line_started is not None and self.line_timeout:
            left = self.line_started + self.line_timeout - now
            if seconds is None or left < seconds:
                seconds, reason = left, "line"
                limit = self.line_timeout
        if self.deadline is not None:
            left = self.deadline - now
            if seconds is None or left < seconds:
                seconds, reason, limit = left, self.deadline_reason, None
        if seconds is not None and seconds <= 0:
            raise Expired(reason, limit)
        return seconds, reason, limit

    def _receive(self):
        """Wait for more bytes; b"" at end of input."""
        if self.before_wait is not None:
            self.before_wait()
        seconds, reason, limit = self.limit()
        self.waiting_since = time.monotonic()
        try:
            if self.stop is not None:
                data = self._receive_in_ticks(seconds)
            else:
                if seconds != self.applied:
                    if not (self._plain and _kernel_timeout(
                            self.sock, socket.SO_RCVTIMEO, seconds)):
                        self.sock.settimeout(seconds)
                    self.applied = seconds
                data = self.sock.recv(self.bufsize)
        except (BlockingIOError, socket.timeout):
            # SO_RCVTIMEO (BlockingIOError) or Python's timeout expired.
            raise Expired(reason, limit if limit is not None else seconds)
        finally:
            self.waiting_since = None
        if data:
            self.received_at = time.monotonic()
        return data

    def _receive_in_ticks(self, seconds):
        deadline = time.monotonic() + (seconds or float("inf"))
        while True:
            if self.stop():
                return b""
            self.sock.settimeout(max(0.001, min(self.tick,
                                                deadline - time.monotonic())))
            try:
                return self.sock.recv(self.bufsize)
            except socket.timeout:
                if time.monotonic() >= deadline:
                    raise
            finally:
                self.sock.settimeout(self.idle or None)

    def readline(self, limit):
        """Return the next line with its LF, or ``limit`` bytes of a longer
        line, or the unterminated remainder at end of input, or b""."""
        while True:
            buffer, position = self.buffer, self.position
            end = buffer.find(b"\n", position, position + limit)
            if end >= 0:
                self.position = end + 1
                self.line_started = None
                return buffer[position:end + 1]
            if len(buffer) - position >= limit:
                self.position = position + limit
                return buffer[position:position + limit]
            if position < len(buffer) and self.line_started is None:
                # Not received_at: a pipelined line's first octets may
                # have waited here while the session was busy.
                self.line_started = time.monotonic()
            data = self._receive()
            self.buffer, self.position = buffer[position:] + data, 0
            if not data:
                self.buffer = b""
                return buffer[position:]

    def read_available(self):
        """Return every byte buffered, or wait for some; b"" at end.  The
        caller keeps ``line_started`` (it knows where lines end)."""
        buffer, position = self.buffer, self.position
        self.buffer, self.position = b"", 0
        if position < len(buffer):
            return buffer[position:]
        return self._receive()

    def unread(self, data):
        """Put ``data`` back in front of what is buffered."""
        self.buffer = data + self.buffer[self.position:]
        self.position = 0

    def read_exact(self, size):
        """Return the next ``size`` bytes, fewer only at end of input."""
        while len(self.buffer) - self.position < size:
            data = self._receive()
            if not data:
                break
            self.buffer = self.buffer[self.position:] + data
            self.position = 0
        data = self.buffer[self.position:self.position + size]
        self.position += len(data)
        return data

    def buffered(self):
        """True if bytes were received and not read yet."""
        return self.position < len(self.buffer)


def send_within(sock, data, seconds, deadline=None):
    """Write all of ``data`` to ``sock`` within ``seconds`` (None: no
    limit) and before ``deadline`` (time.monotonic(), or None), or raise
    Expired("write").  Not sendall(): with the kernel's SO_SNDTIMEO (what
    set_timeout() sets) and on a TLS socket (ssl's sendall() loops on
    send()), each blocked send() gets the whole timeout again, so that a
    client that reads a byte now and then could hold the session for
    ever.  (Python's own settimeout() bounds a plain socket's sendall()
    as a whole, but costs what set_timeout() avoids.)  The common case is
    one send()."""
    start = time.monotonic()
    try:
        sent = sock.send(data)
    except (BlockingIOError, socket.timeout):
        raise Expired("write", seconds)
    if sent == len(data):
        return
    view = memoryview(data)[sent:]
    end = start + seconds if seconds else None
    if deadline is not None and (end is None or deadline < end):
        end = deadline
    plain = not isinstance(sock, ssl.SSLSocket)
    try:
        while view:
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                raise Expired("write", seconds)
            if plain:
                _kernel_timeout(sock, socket.SO_SNDTIMEO, left)
            else:
                sock.settimeout(left)
            try:
                sent = sock.send(view)
            except (BlockingIOError, socket.timeout):
                raise Expired("write", seconds)
            view = view[sent:]
    finally:
        if plain:
            _kernel_timeout(sock, socket.SO_SNDTIMEO, seconds)
        else:
            sock.settimeout(seconds or None)


def tls_server_context(cert, key=None):
    """An SSLContext for STARTTLS towards clients: TLS 1.2 at least, the
    ssl module's default (forward-secret, AEAD-first) ciphers, no
    renegotiation."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _tls12_at_least(context)
    # No renegotiation asked by a client (TLS 1.2): a handshake costs
    # the server far more than the client.
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    context.load_cert_chain(cert, key or None)
    return context


def tls_client_context(verify=False, ca_file=None):
    """An SSLContext for STARTTLS towards the upstream: TLS 1.2 at least;
    the certificate checked (against ``ca_file``, or the system's
    authorities) only if ``verify``, since most mail servers' are
    self-signed (RFC 7435, opportunistic security)."""
    if verify:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                             cafile=ca_file or None)
    else:
        # No authorities to load (they cost megabytes) for no check.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    _tls12_at_least(context)
    return context


def _tls12_at_least(context):
    if hasattr(ssl, "TLSVersion"):
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    else:                                   # Python 3.6
        context.options |= ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1


def _exhaustion(error):
    """True for an OSError that says the process or the system is out of
    descriptors or memory: a local shortage, not the peer's fault."""
    return getattr(error, "errno", None) in (
        errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def out_of_descriptors():
    """True if this process cannot open a file now (EMFILE, ENFILE)."""
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
    except OSError as error:
        return _exhaustion(error)
    os.close(fd)
    return False


class ResourceShortage(Exception):
    """A session could not open what it needs (descriptors exhausted):
    it answers ``OUT_OF_RESOURCES`` and ends, never falling back to a
    policy's fail-open path because of a local shortage."""


# ===========================================================================
# == 3. Shared by the sessions of a process: caches, threads, list files ==
# ===========================================================================
#
# Owns:  the registries one process's sessions share (a Cache, ReusedThreads,
#        the allow-list files), log_once(), log_every() (at most once an
#        interval), and reset_registries(), which empties every registry of
#        every section (tests, a worker's start).
# Enter: the instances: list_files, tls_contexts; reset_registries().
# Uses:  sections 1 and 2.


class Cache(object):
    """A process-wide dict with its own lock, so that no mutable class
    attribute is shared by every subclass without its knowing.  With a
    ``size``, it keeps at most that many items, the least recently used
    going first: for caches whose keys clients choose."""

    def __init__(self, size=None):
        self._lock = threading.Lock()
        self._items = collections.OrderedDict()
        self.size = size

    def get(self, key, make=None):
        """The item of ``key``; made by ``make()`` and kept if missing
        and ``make`` is given, else None."""
        with self._lock:
            item = self._items.get(key)
            if item is None and make is not None:
                item = self._items[key] = make()
                self._trim()
            elif item is not None and self.size is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key, item):
        with self._lock:
            self._items[key] = item
            if self.size is not None:
                self._items.move_to_end(key)
                self._trim()

    def _trim(self):
        while self.size is not None and len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self):
        with self._lock:
            return len(self._items)

    def items(self):
        """The items kept now."""
        with self._lock:
            return list(self._items.values())

    def reset(self):
        """Forget everything (tests; a reload needs nothing of it)."""
        with self._lock:
            items = list(self._items.values())
            self._items.clear()
        return items


class ReusedThreads(object):
    """Daemon threads that run jobs and, a job done, wait up to
    ``idle_time`` seconds for the next instead of ending, so that a job
    costs no thread start while jobs come.  At most ``spare`` wait at once
    (None: no bound; 0: a thread per job) and at most ``limit`` are alive
    (None: no bound; past it submit() refuses).  ``count`` threads are
    alive, ``idle`` of them waiting.  close() ends the waiting ones and
    every thread after its job."""

    limit = None
    spare = None
    idle_time = 60

    def __init__(self, name="worker"):
        self.name = name
        self._jobs = queue.Queue()
        self._lock = threading.Lock()
        self.idle = 0               # waiting for a job, none promised
        self.count = 0
        self._closed = False

    def submit(self, job):
        """Run ``job()`` in a thread; False if none may take it (limit)."""
        with self._lock:
            waiting = self.idle > 0
            if waiting:
                self.idle -= 1      # that thread is promised this job
            elif self.limit is not None and self.count >= self.limit:
                return False
            else:
                self.count += 1
        if waiting:
            self._jobs.put(job)
            return True
        try:
            threading.Thread(target=self._work, args=(job,), name=self.name,
                             daemon=True).start()
        except BaseException:
            with self._lock:
                self.count -= 1
            raise
        return True

    def close(self):
        """End the waiting threads; the busy ones end after their job."""
        with self._lock:
            self._closed = True
            idle, self.idle = self.idle, 0
        for _ in range(idle):
            self._jobs.put(None)

    def after_fork(self):
        """In a child process: the parent's threads are not there."""
        self.__init__(self.name)

    def _work(self, job):
        try:
            while job is not None:
                job()
                job = None          # nothing of it kept while waiting
                with self._lock:
                    if self._closed or (self.spare is not None
                                        and self.idle >= self.spare):
                        return
                    self.idle += 1
                try:
                    job = self._jobs.get(timeout=self.idle_time)
                except queue.Empty:
                    with self._lock:
                        if self.idle > 0:
                            self.idle -= 1      # not promised: end
                            return
                    job = self._jobs.get()      # promised: on its way
        finally:
            with self._lock:
                self.count -= 1


class ListFiles(object):
    """Lists read from files in postgrey's formats, read again when they
    change: ``get(path)`` is a ListFile.  One entry a line, '#' starts a
    comment; an entry is an address or network (CIDR or whole-octet
    prefix), a name (a domain: it and its subdomains), ``user@domain``,
    ``user@``, or ``/regular expression/`` (case-insensitive, searched)."""

    def __init__(self):
        self._cache = Cache()

    def lists(self, files, what="whitelist"):
        """The ListFiles of a list key's value, ``files`` (list_paths()):
        each file's, then its ``.local``'s if there is one (postgrey's
        /etc/postgrey/whitelist_clients.local)."""
        found = []
        for path in list_paths(files):
            found.append(self.get(path, what))
            found.append(self.get(path + ".local", what, optional=True))
        return found

    def get(self, path, what="whitelist", optional=False):
        """The ListFile of ``path``; an empty one if it cannot be read
        (logged once), or silently if ``optional`` and missing."""
        try:
            mtime = os.stat(path).st_mtime
            cached = self._cache.get(path)
            if cached is not None and cached[0] == mtime:
                return cached[1]
            with open(path, "rb") as list_file:
                lines = list_file.read().decode("utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            if not (optional and isinstance(error, FileNotFoundError)):
                log_once("%s %s: %s; nothing is listed by it"
                         % (what, path, error))
            return ListFile([])
        listed = ListFile(lines, path)
        self._cache.put(path, (mtime, listed))
        return listed

    def reset(self):
        self._cache.reset()


class ListFile(object):
    """The entries of one list file, by kind: ``networks``, ``names``
    (domains, matched with their subdomains), ``addresses``
    (``user@domain``), ``locals`` (``user@``), ``patterns`` (compiled
    regular expressions)."""

    def __init__(self, lines, path="-"):
        self.networks, self.names, self.addresses = [], [], set()
        self.locals, self.patterns = set(), []
        for number, line in enumerate(lines, 1):
            entry = line.split("#", 1)[0].strip()
            if not entry:
                continue
            if len(entry) > 1 and entry.startswith("/") and \
                    entry.endswith("/"):
                try:
                    self.patterns.append(re.compile(entry[1:-1], re.I))
                except re.error as error:
                    log_once("%s:%d: bad regular expression: %s"
                             % (path, number, error))
                continue
            entry = entry.lower()
            if "@" in entry:
                if entry.endswith("@"):
                    self.locals.add(entry[:-1])
                else:
                    self.addresses.add(entry)
            elif re.match(r"\A[0-9.:/a-f]+\Z", entry) and (
                    "/" in entry or ":" in entry
                    or re.match(r"\A[0-9.]+\Z", entry)):
                self.networks.append(entry)
            else:
                self.names.append(entry.strip("."))

    def has_client(self, address, hostname):
        """``address`` is in a network, or ``hostname()`` (a callable:
        looked up only if needed) under a name or a pattern."""
        if any(_in_network(address, network) for network in self.networks):
            return True
        if not (self.names or self.patterns):
            return False
        name = hostname() if callable(hostname) else hostname
        return name is not None and self.has_name(name)

    def has_name(self, name, key=str.lower):
        name = key(name)
        return (any(name == suffix or name.endswith("." + suffix)
                    for suffix in self.names)
                or any(pattern.search(name) for pattern in self.patterns))

    def has_recipient(self, recipient):
        """``user@domain``, ``user@``, the domain (or a parent), or a
        pattern.  As postgrey's (1.37, which follows Postfix's access(5)):
        ``user@domain`` and ``user@`` also match ``user+extension@...``
        (the extension anything up to the "@"), the delimiter always
        "+" whatever Postfix's recipient_delimiter; so ``a+b@`` matches
        ``a+b+c@...`` too.  Patterns see the whole recipient."""
        recipient = _recipient_key(recipient)
        local, _, domain = recipient.rpartition("@")
        # The local-part, then each of it that ends before a "+": every
        # user an entry may name (postgrey: ^user(\+[^@]+)?@).
        users = [local] + [local[:at] for at, char in enumerate(local)
                           if char == "+"]
        return (any(user + "@" + domain in self.addresses
                    or user in self.locals for user in users)
                or (domain and self.has_name(domain, _domain_key))
                or any(pattern.search(recipient)
                       for pattern in self.patterns))


def list_paths(files):
    """The file names of a list key's value (whitelist_clients,
    whitelist_recipients, greytrap_recipients): a list of names, or one
    name as a string (a handler's attribute, the configuration's
    ``key = FILE``); "", empty or None (a handler without the key):
    none."""
    if not files:
        return []
    if isinstance(files, str):
        return [files]
    return [path for path in files if path]


list_files = ListFiles()    # whitelist_clients, _recipients, greytraps


tls_contexts = Cache()              # SSLContexts, of clients and upstream


# The clients' names (ConcreteMailHandler.client_names()), kept for
# client_name_cache_time: (handler class, address) -> (until, names); the
# addresses are the clients', so the last 10000 at most.
client_names = Cache(10000)


_logged = Cache()


def log_once(message):
    """Log an error the first time this process meets it."""
    first = []
    _logged.get(message, lambda: first.append(True) or True)
    if first:
        log.error("%s", log_escape(message))


# log_every()'s memory: key -> [when it was last logged], at most this
# many keys, the least recently met forgotten first.
_log_times = Cache(1000)

_log_times_lock = threading.Lock()


def log_every(key, interval, level, message, *args, now=None):
    """Log ``message % args`` at ``level`` (logging.WARNING, ...) unless
    the line of ``key`` was logged less than ``interval`` seconds ago: a
    condition that lasts is logged once per interval, and again when it
    comes back days later.  ``now``: the monotonic clock's time
    (time.monotonic() if None).  True if the line was logged.  What
    clients choose (an address) belongs in ``args``, not in ``key``: the
    memory keeps the last 1,000 keys, and a key forgotten is logged at
    once the next time."""
    if now is None:
        now = time.monotonic()
    last = _log_times.get(key, list)
    with _log_times_lock:
        due = not last or now - last[0] >= interval
        if due:
            last[:] = [now]
    if due:
        log.log(level, message, *args)
    return due


def reset_registries():
    """Forget what the process shared: stores (closed), the networks' new
    triplets, whitelist files, clients' names,
    TLS contexts, upstream capabilities, pooled upstream sessions
    (closed), errors logged, hash_keys' secrets.  For tests."""
    for registry in (stores, new_triplets, list_files, dns_lists,
                     client_names, tls_contexts, upstream_capabilities,
                     upstream_pool, _logged, _log_times, key_secrets):
        registry.reset()


# ===========================================================================
# == 4. The upstream: a plain-socket SMTP client, the pool, the relay ==
# ===========================================================================
#
# Owns:  the one SMTP client (UpstreamSession), what each upstream offers
#        (UpstreamCapabilities), warm sessions (UpstreamPool), and the relay
#        that replays a session to the upstream (UpstreamRelay).
# Enter: UpstreamRelay(handler): the handler's interface is in its docstring.
# Uses:  sections 1 to 3.


class UpstreamError(Exception):
    """The upstream could not be reached, timed out or broke the session.

    ``reply`` is what the client is told: always a 4xx, since the client
    should try again later.
    """

    def __init__(self, message, reply):
        Exception.__init__(self, message)
        self.reply = reply


class UpstreamTLSError(UpstreamError):
    """STARTTLS with the upstream failed: the session is gone."""


# The 421s of a server over its limits, and of one that is stopping.
TOO_MANY_CONNECTIONS = ("421 4.7.0 %s Error: too many connections, try "
                        "again later")


SHUTTING_DOWN = ("421 4.3.2 %s Service shutting down, closing transmission "
                 "channel")


UNREACHABLE = "451 4.4.1 Upstream mail server unavailable, try again later"


LOST = "451 4.4.2 Connection to the upstream mail server lost, try again later"


NO_TLS = "451 4.7.5 No TLS with the upstream mail server, try again later"


NO_XCLIENT = ("451 4.3.0 The upstream mail server refused to learn the "
              "client, try again later")


# A session that cannot have what it needs (descriptors): it ends.
OUT_OF_RESOURCES = ("421 4.3.2 Service temporarily unavailable: out of "
                    "resources, try again later")

# A reply line (RFC 5321 section 4.2): its code, "-" if more follow, text.
_REPLY_LINE_RE = re.compile(br"([2-5][0-9][0-9])([ -]?)([^\r\n]*)")
_NOT_PRINTABLE_RE = re.compile(r"[^\x20-\x7e]")
_LINE_BREAK_RE = re.compile(r"[\r\n\x00]")


class UpstreamSession(object):
    """One SMTP session with the real mail server, over a plain socket.

    ``command()`` sends one command line and returns the reply as
    ``(code, lines)``; ``send()`` writes raw message data.  Every failure
    (refused, timed out, dropped, garbage) raises UpstreamError.  Replies
    are capped at ``max_reply_lines`` lines of ``max_reply_line_length``
    octets; control characters in reply text are replaced, so that what
    the client is told is clean.  ``start_tls()`` turns the session to TLS
    (``tls`` is then true), ``xclient()`` tells Postfix who the client
    really is (``xclient_done``).

    ``undelivered`` counts what the upstream may hold against the session
    since its last delivered message (``delivered()`` sets it back to 0):
    each of the ``junk_commands`` and each command answered 4xx or 5xx.
    Postfix keeps such counts per connection and forgives them only when
    a message is delivered (smtpd_junk_command_limit, then
    smtpd_soft_error_limit: a delay of smtpd_error_sleep_time before every
    reply, smtpd_hard_error_limit: 421), so a pooled session must not
    carry many of them to its next client: UpstreamRelay pools it again
    only while ``undelivered`` is below ``max_undelivered``.
    """

    max_reply_lines = 100
    max_reply_line_length = 512
    # Commands that Postfix takes after a HELO as well as after an EHLO.
    session_commands = ("XFORWARD",)
    # The commands Postfix's smtpd counts against smtpd_junk_command_limit
    # (its SMTPD_CMD_FLAG_LIMIT).
    junk_commands = ("HELO", "EHLO", "RSET", "NOOP", "VRFY", "ETRN",
                     "XCLIENT", "XFORWARD")
    # Far below Postfix's smallest default limit (smtpd_soft_error_limit
    # = 10; the junk limit is 100): the next client of a pooled session
    # starts with fewer than 5 things counted against it.
    max_undelivered = 5

    def __init__(self, address, timeout):
        self.address = address
        self.timeout = timeout
        self.extensions = {}
        self.tls = False
        self.xclient_done = False
        self.undelivered = 0
        try:
            # A timeout of 0 is no limit, as for set_timeout(); to Python
            # it would mean a non-blocking socket.
            self.sock = socket.create_connection(address, timeout or None)
        except OSError as error:
            metrics.add("smtpproxy_upstream_connect_failures_total")
            raise UpstreamError("cannot connect to %s:%s: %s"
                                % (address[0], address[1], error),
                                OUT_OF_RESOURCES if _exhaustion(error)
                                else UNREACHABLE)
        metrics.add("smtpproxy_upstream_connects_total")
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_timeout(self.sock, timeout)
        self.reader = self._reader()

    def _reader(self):
        reader = _LineReader(self.sock, idle=self.timeout or None)
        reader.applied = self.timeout or None
        return reader

    def _fail(self, error):
        self.abort()
        if isinstance(error, (socket.timeout, BlockingIOError)):
            raise UpstreamError("upstream timed out", LOST)
        raise UpstreamError("upstream connection lost: %s" % (error,), LOST)

    def read_reply(self):
        """Read one (possibly multi-line) reply: ``(code, [text, ...])``.

        The whole reply must come within ``timeout`` seconds and
        ``max_reply_lines`` times ``max_reply_line_length`` octets, the
        dropped rest of overlong lines included."""
        lines = []
        reader = self.reader
        length = self.max_reply_line_length
        budget = self.max_reply_lines * length
        if self.timeout:
            reader.deadline = time.monotonic() + self.timeout
        try:
            while True:
                line = tail = reader.readline(length)
                if not line:
                    raise ClientGone("closed")
                budget -= len(line)
                while not tail.endswith(b"\n"):    # overlong: drop the rest
                    if budget < 0:
                        break
                    tail = reader.readline(length)
                    if not tail:
                        raise ClientGone("closed in a reply line")
                    budget -= len(tail)
                if budget < 0:
                    raise ClientGone("reply of more than %d octets"
                                     % (self.max_reply_lines * length))
                match = _REPLY_LINE_RE.match(line)
                if not match:
                    raise ClientGone("garbage reply %s" % log_escape(line))
                text = match.group(3).decode("ascii", "replace")
                lines.append(_NOT_PRINTABLE_RE.sub("?", text))
                if len(lines) > self.max_reply_lines:
                    raise ClientGone("reply of more than %d lines"
                                     % self.max_reply_lines)
                if match.group(2) != b"-":
                    return int(match.group(1)), lines
        except (OSError, ClientGone) as error:
            self._fail(error)
        finally:
            reader.deadline = None

    def send(self, data):
        """Write ``data`` (bytes) to the upstream."""
        try:
            send_within(self.sock, data, self.timeout)
        except OSError as error:
            self._fail(error)

    def command(self, line):
        """Send one command (str, with no CR, LF or NUL) and read its reply."""
        if _LINE_BREAK_RE.search(line):
            raise ValueError("refusing to send a line break upstream")
        self.send(line.encode("utf-8") + b"\r\n")
        reply = self.read_reply()
        self._tally(line, reply[0])
        return reply

    def commands(self, lines):
        """Send several commands and return their replies, in one write
        when the upstream announced PIPELINING (RFC 2920)."""
        if "PIPELINING" not in self.extensions:
            return [self.command(line) for line in lines]
        for line in lines:
            if _LINE_BREAK_RE.search(line):
                raise ValueError("refusing to send a line break upstream")
        self.send("".join(line + "\r\n" for line in lines).encode("utf-8"))
        replies = [self.read_reply() for _ in lines]
        for line, reply in zip(lines, replies):
            self._tally(line, reply[0])
        return replies

    def _tally(self, line, code):
        # What Postfix counts: a junk command, a command that failed.
        if code >= 400 or line.split(" ", 1)[0].upper() in (
                self.junk_commands):
            self.undelivered += 1

    def delivered(self, code):
        """The upstream answered ``code`` to a message's final dot: a
        delivery forgives the session everything (as Postfix does), a
        refusal counts like any failed command."""
        if code < 400:
            self.undelivered = 0
        else:
            self.undelivered += 1

    def greet(self, helo_name, esmtp):
        """Read the greeting and introduce ourselves with the client's name.

        With ``esmtp`` EHLO is tried first (HELO if refused) and the
        upstream's extensions are kept in ``extensions``.
        """
        code, lines = self.read_reply()
        if code != 220:
            self.abort()
            raise UpstreamError("upstream greeted with %d %s"
                                % (code, " ".join(lines)), UNREACHABLE)
        self.introduce(helo_name, esmtp)

    def introduce(self, helo_name, esmtp):
        """Send EHLO (falling back to HELO) or HELO with ``helo_name``.
        After a HELO, of what an EHLO announced only ``session_commands``
        stay in ``extensions``."""
        kept = dict((keyword, value)
                    for keyword, value in self.extensions.items()
                    if keyword in self.session_commands)
        self.extensions = {}
        if esmtp:
            code, lines = self.command("EHLO " + helo_name)
            if code == 250:
                for line in lines[1:]:
                    words = line.split(None, 1)
                    if words:
                        self.extensions[words[0].upper()] = (
                            words[1] if len(words) > 1 else "")
                return
        code, lines = self.command("HELO " + helo_name)
        if code != 250:
            self.abort()
            raise UpstreamError("upstream refused HELO: %d %s"
                                % (code, " ".join(lines)), UNREACHABLE)
        self.extensions = kept

    def start_tls(self, context, server_hostname, helo_name, esmtp=True):
        """STARTTLS (RFC 3207), if the upstream offers it, then HELO/EHLO
        again; return whether the session is now TLS.  UpstreamTLSError if
        the handshake (or the certificate check) failed."""
        if "STARTTLS" not in self.extensions:
            return False
        code, lines = self.command("STARTTLS")
        if code != 220:
            return False
        try:
            clear_timeout(self.sock)
            self.sock.settimeout(self.timeout or None)
            self.sock = context.wrap_socket(self.sock,
                                            server_hostname=server_hostname)
        except (ssl.SSLError, ssl.CertificateError, OSError) as error:
            self.abort()
            raise UpstreamTLSError("TLS with the upstream failed: %s"
                                   % (error,), NO_TLS)
        # Nothing said before TLS holds after it: not a pipelined reply
        # (the reader's buffer), not an extension (RFC 3207 section 4.2).
        self.reader = self._reader()
        self.extensions = {}
        self.tls = True
        self.introduce(helo_name, esmtp)
        return True

    def xclient(self, attributes):
        """XCLIENT (Postfix): the session is now the client's, as if it
        had connected itself; it must say HELO/EHLO again.  A refusal is
        an UpstreamError (451 4.3.0): going on would make the upstream
        take the client for the proxy, which it may trust."""
        code, lines = self.command("XCLIENT " + format_xattributes(
            attributes))
        if code != 220:
            self.abort()
            raise UpstreamError("upstream refused XCLIENT: %d %s"
                                % (code, " ".join(lines)), NO_XCLIENT)
        self.extensions = {}
        self.xclient_done = True

    def reusable(self):
        """True if another client may have this session: plain, not told
        of a client by XCLIENT, nothing unread, and nothing come from the
        upstream meanwhile (a 421, the end of the connection)."""
        if self.tls or self.xclient_done or self.reader.buffered():
            return False
        try:
            self.sock.recv(1, PEEK_NOW)
        except BlockingIOError:
            return True             # nothing to read: still ours
        except OSError:
            return False
        return False                # a reply nobody asked for, or the end

    def quit(self):
        """End the session politely; errors are of no interest any more."""
        try:
            self.command("QUIT")
        except UpstreamError:
            pass
        self.abort()

    def abort(self):
        """Close the connection at once, without QUIT.  Closing in the middle
        of DATA makes the upstream discard the partial message."""
        try:
            self.sock.close()
        except OSError:
            pass


def xtext(value):
    """RFC 3461 xtext: "+", "=", and what is not printable ASCII as +XX."""
    return "".join(
        char if "!" <= char <= "~" and char not in "+=" else
        "".join("+%02X" % octet for octet in char.encode("utf-8"))
        for char in value)


def format_xattributes(attributes):
    """``NAME=value ...`` of XCLIENT and XFORWARD, the values in xtext."""
    return " ".join("%s=%s" % (name, xtext(value))
                    for name, value in attributes)


def format_reply(code, lines):
    """Format a reply as SMTP lines (no final CRLF): ``250-a\\r\\n250 b``."""
    if not lines:
        lines = [""]
    last = len(lines) - 1
    return "\r\n".join("%d%s%s" % (code, " " if i == last else "-", text)
                       for i, text in enumerate(lines))


class UpstreamCapabilities(object):
    """What each upstream (address, port) announced in its EHLO, and when,
    for the EHLO the proxy offers its clients: {KEYWORD: parameters}, or
    None while it could not be asked."""

    def __init__(self):
        self._lock = threading.Lock()
        self._known = {}            # address -> (time learnt, keywords)
        self._asking = set()

    def remember(self, address, extensions):
        """Keep ``extensions``; None (it could not be asked) keeps what
        was known, with a new time, so that it is not asked at once
        again."""
        with self._lock:
            known = self._known.get(address)
            if extensions is None and known is not None:
                extensions = known[1]
            self._known[address] = (time.time(),
                                    None if extensions is None
                                    else dict(extensions))

    def get(self, address, ttl, ask):
        """The keywords of ``address`` ({} if unknown); if they are older
        than ``ttl`` seconds, ``ask()`` first, in one thread only (the
        others use what is known meanwhile)."""
        with self._lock:
            known = self._known.get(address)
            stale = known is None or time.time() - known[0] > ttl
            asking = stale and address not in self._asking
            if asking:
                self._asking.add(address)
        if asking:
            try:
                ask()
            finally:
                with self._lock:
                    self._asking.discard(address)
                    known = self._known.get(address)
        return dict(known[1] or {}) if known else {}

    def reset(self):
        with self._lock:
            self._known.clear()


upstream_capabilities = UpstreamCapabilities()


class UpstreamPool(object):
    """Warm upstream sessions, kept when their client session ended
    cleanly, for the next clients of the same upstream (``upstream_pool``,
    used by UpstreamRelay): a session costs a new EHLO instead of a new
    connection, its greeting and a QUIT.  At most ``size`` per upstream,
    each for at most ``idle`` seconds (the upstream_pool_* keys): expire()
    closes older ones with QUIT, before the upstream's own idle timeout;
    the warmest is taken first."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pooled = {}           # key -> [(session, expires), ...]

    def put(self, key, session, size, idle):
        """Keep ``session``; False if the pool of ``key`` is full."""
        with self._lock:
            pooled = self._pooled.setdefault(key, [])
            if len(pooled) >= size:
                return False
            pooled.append((session, time.monotonic() + idle))
            return True

    def take(self, key):
        """The warmest pooled session of ``key`` that has not expired and
        still looks usable, or None."""
        while True:
            with self._lock:
                pooled = self._pooled.get(key)
                if not pooled:
                    return None
                session, expires = pooled.pop()
            if expires > time.monotonic() and session.reusable():
                return session
            session.abort()

    def expire(self):
        """Close (QUIT) the sessions that waited too long."""
        now = time.monotonic()
        expired = []
        with self._lock:
            for key, pooled in self._pooled.items():
                expired += [session for session, expires in pooled
                            if expires <= now]
                pooled[:] = [entry for entry in pooled if entry[1] > now]
        for session in expired:
            session.quit()

    def reset(self):
        """Close every pooled session (QUIT)."""
        with self._lock:
            pooled, self._pooled = self._pooled, {}
        for sessions in pooled.values():
            for session, _ in sessions:
                session.quit()

    def __len__(self):
        with self._lock:
            return sum(len(pooled) for pooled in self._pooled.values())


upstream_pool = UpstreamPool()


class UpstreamRelay(object):
    """One client session's forwarding to the upstream
    (ConcreteMailHandler.relay_class): it owns the UpstreamSession, opened
    at the first RCPT that passes the policy and kept for the session's
    later transactions, and knows where the upstream's transaction is.

    ``session``: the UpstreamSession, or None; ``in_transaction``: the
    upstream has our MAIL; ``lost``: once the upstream broke, the 4xx (or
    421) the transaction ends with.  A failure drops the session, sets
    ``lost``, tells ``handler.upstream_failed()`` and raises the
    UpstreamError.

    Its interface with the session, ``handler``, is these public names;
    it reads no other:

    configuration   smtp_ip, smtp_port, upstream_timeout, upstream_class,
                    upstream_tls, upstream_tls_name, xclient, servername,
                    upstream_pool_size, upstream_pool_idle
    the client      helo_name, esmtp, inbox_log[0] (its HELO/EHLO line),
                    mail_from, mail_params, smtputf8
    hooks           client_attributes(command, announced) (XCLIENT,
                    XFORWARD), upstream_tls_context(), upstream_failed(),
                    count(), log_dialogue()

    What an upstream session announced goes to the process's
    ``upstream_capabilities``, and a session another client may have to
    its ``upstream_pool``, both keyed by the upstream's address.
    """

    # MAIL and RCPT parameters, and the extension each belongs to.
    parameter_extensions = {"SIZE": "SIZE", "BODY": "8BITMIME",
                            "SMTPUTF8": "SMTPUTF8", "RET": "DSN",
                            "ENVID": "DSN", "NOTIFY": "DSN", "ORCPT": "DSN"}

    def __init__(self, handler):
        self.handler = handler
        self.session = None
        self.helo = None            # the HELO/EHLO line the session heard
        self.in_transaction = False
        self.lost = None

    def new_transaction(self):
        self.in_transaction = False
        self.lost = None

    def fail(self, error):
        """The upstream broke: drop it; the transaction cannot complete."""
        self.abort()
        self.lost = error.reply
        self.handler.upstream_failed(error)

    def open(self):
        """Open the session, or follow the client's new HELO/EHLO."""
        handler = self.handler
        if self.session is None:
            self.session = self.connect()
        elif self.helo != handler.inbox_log[0]:
            # The client said HELO/EHLO again, with another name.
            self.session.introduce(handler.helo_name, handler.esmtp)
        else:
            return
        self.helo = handler.inbox_log[0]
        # After XCLIENT the upstream answers as to this client alone.
        if handler.esmtp and not self.session.xclient_done:
            upstream_capabilities.remember(
                (handler.smtp_ip, handler.smtp_port), self.session.extensions)

    def connect(self, tls=None):
        """A new upstream session, ready for MAIL: greeted, turned to TLS
        per ``upstream_tls``, told the real client with XCLIENT when
        ``xclient`` is on and the upstream offers it, and introduced with
        the client's HELO/EHLO name."""
        handler = self.handler
        tls = handler.upstream_tls if tls is None else tls
        xclient = handler.xclient
        if self._poolable(tls):
            session = self._from_pool()
            if session is not None:
                return session
            metrics.add("smtpproxy_upstream_pool_total", "miss")
        session = handler.upstream_class(
            (handler.smtp_ip, handler.smtp_port), handler.upstream_timeout)
        # TLS and XCLIENT need EHLO; with XCLIENT, the first name is ours
        # and the client's comes after it.
        name = handler.servername if xclient else handler.helo_name
        esmtp = handler.esmtp or tls != "no" or xclient
        session.greet(name, esmtp)
        if tls != "no" and "STARTTLS" in session.extensions:
            try:
                session.start_tls(handler.upstream_tls_context(),
                                  handler.upstream_tls_name
                                  or handler.smtp_ip, name)
            except UpstreamTLSError as error:
                if tls != "opportunistic":
                    raise
                log.warning("upstream %s:%s: %s; going on without TLS",
                            handler.smtp_ip, handler.smtp_port, error)
                return self.connect(tls="no")
        if tls == "required" and not session.tls:
            session.abort()
            raise UpstreamError("the upstream offers no STARTTLS", NO_TLS)
        if xclient and "XCLIENT" in session.extensions:
            session.xclient(handler.client_attributes(
                "XCLIENT", session.extensions["XCLIENT"]))
            name, esmtp = None, None            # must be said again
        if (name, esmtp) != (handler.helo_name, handler.esmtp):
            session.introduce(handler.helo_name, handler.esmtp)
        return session

    def parameters(self, params):
        """`` KEY=VALUE ...`` of the ``params`` whose extension the upstream
        session announced."""
        extensions = self.session.extensions
        return "".join(
            " %s=%s" % (keyword, value) if value is not None
            else " " + keyword
            for keyword, value in params
            if self.parameter_extensions.get(keyword) in extensions)

    def needs(self):
        """The extensions the upstream must have for this transaction,
        which cannot be passed on without them: SMTPUTF8 for MAIL ...
        SMTPUTF8, 8BITMIME for BODY=8BITMIME."""
        handler = self.handler
        needs = ["SMTPUTF8"] if handler.smtputf8 else []
        if any(keyword == "BODY" and value.upper() == "8BITMIME"
               for keyword, value in handler.mail_params):
            needs.append("8BITMIME")
        return needs

    def rcpt(self, recipient, params=()):
        """Relay one RCPT; return the upstream's reply ``(code, lines)``.
        Opens the session and replays MAIL FROM first if needed: MAIL and
        the first RCPT go together (pipelined when the upstream can)."""
        try:
            return self._rcpt(recipient, params)
        except UpstreamError as error:
            self.fail(error)
            raise

    def _rcpt(self, recipient, params):
        self.open()
        session = self.session
        for keyword in self.needs():
            if keyword not in session.extensions:
                # It had it when our EHLO offered it, no longer.
                return 451, ["4.3.0 The upstream mail server lost %s, try "
                             "again later" % keyword]
        rcpt = "RCPT TO:<%s>%s" % (recipient, self.parameters(params))
        if self.in_transaction:
            return session.command(rcpt)
        # If MAIL fails, the RCPT's reply (503) means nothing and the
        # client hears MAIL's.  XFORWARD, which holds for one transaction,
        # goes in front.
        handler = self.handler
        commands = ["MAIL FROM:<%s>%s" % (
            handler.mail_from, self.parameters(handler.mail_params)), rcpt]
        xforward = (handler.xclient and "XFORWARD" in session.extensions
                    and not session.xclient_done)
        if xforward:
            commands.insert(0, "XFORWARD " + format_xattributes(
                handler.client_attributes(
                    "XFORWARD", session.extensions["XFORWARD"])))
        replies = session.commands(commands)
        if xforward and replies[0][0] != 250:
            log.warning("upstream refused XFORWARD: %d %s", replies[0][0],
                        " ".join(replies[0][1]))
        mail_reply, rcpt_reply = replies[-2:]
        if mail_reply[0] != 250:
            return mail_reply
        self.in_transaction = True
        return rcpt_reply

    def data(self):
        """DATA: the upstream's reply ``(code, lines)``.  Its transaction
        stays open after a refusal (Postfix's does): reset() ends it."""
        try:
            return self.session.command("DATA")
        except UpstreamError as error:
            self.fail(error)
            raise

    def send(self, data):
        """Message data, as it is."""
        try:
            self.session.send(data)
        except UpstreamError as error:
            self.fail(error)
            raise

    def end(self, data=b""):
        """The last ``data`` and the final dot: the upstream's reply to the
        message, which ends its transaction."""
        try:
            self.session.send(data + b".\r\n")
            reply = self.session.read_reply()
        except UpstreamError as error:
            self.fail(error)
            raise
        self.session.delivered(reply[0])
        self.in_transaction = False
        return reply

    def reset(self):
        """End the upstream's transaction, if it has one (RSET)."""
        if self.session is not None and self.in_transaction:
            try:
                self.session.command("RSET")
            except UpstreamError as error:
                self.handler.log_dialogue("upstream: %s", error)
                self.session = None
        self.new_transaction()

    def abort(self):
        """Close the session at once, without QUIT: in the middle of DATA,
        the upstream discards the partial message."""
        if self.session is not None:
            self.session.abort()
            self.session = None

    def quit(self):
        """End the session: into the pool if another client may have it
        (``upstream_pool_size``), else politely (QUIT).  One with too much
        counted against it since its last delivered message
        (UpstreamSession.max_undelivered) is retired instead, since the
        upstream would hold that against the next client (counter
        ``upstream_retired``)."""
        session, self.session = self.session, None
        if session is None:
            return
        if (not self.in_transaction and self.lost is None
                and self._poolable(self.handler.upstream_tls)
                and session.reusable()):
            if session.undelivered >= session.max_undelivered:
                self.handler.count("upstream_retired")
                self.handler.log_dialogue(
                    "upstream session retired: %s commands counted since "
                    "its last delivered message", str(session.undelivered))
            elif upstream_pool.put(self._pool_key(), session,
                                   self.handler.upstream_pool_size,
                                   self.handler.upstream_pool_idle):
                return
        session.quit()

    # -- warm sessions ---------------------------------------------------

    def _poolable(self, tls):
        # Only plain sessions are pooled: never for upstream_tls =
        # required, nor with XCLIENT, which makes a session one client's.
        handler = self.handler
        return bool(handler.upstream_pool_size and tls != "required"
                    and not handler.xclient)

    def _pool_key(self):
        handler = self.handler
        return (handler.upstream_class, handler.smtp_ip, handler.smtp_port,
                handler.upstream_timeout)

    def _from_pool(self):
        """A pooled session introduced with this client's HELO/EHLO name
        (which resets it, and tells what the upstream offers now), or
        None.  One that went away while pooled is closed and the next one
        tried: the client never hears of it."""
        handler = self.handler
        while True:
            session = upstream_pool.take(self._pool_key())
            if session is None:
                return None
            try:
                session.introduce(handler.helo_name, handler.esmtp)
            except UpstreamError as error:
                handler.log_dialogue("pooled upstream session lost: %s",
                                     error)
                session.abort()
                continue
            if (handler.upstream_tls == "opportunistic"
                    and "STARTTLS" in session.extensions):
                # It offers TLS now: a new session will use it.
                session.quit()
                return None
            handler.count("upstream_reused")
            return session


# ===========================================================================
# == 5. The SMTP session: MailHandler ==
# ===========================================================================
#
# Owns:  the socketserver handler: reading command lines within their limits,
#        dispatching each verb to handleVerb(), writing replies (netPrint),
#        the session's deadlines, stress, and the dialogue log.
# Enter: MailHandler.handle() (socketserver calls it, one thread a client).
# Uses:  sections 1 to 3.

# What makes a command line more than printable ASCII (then UTF-8 or wrong).
_NOT_PRINTABLE_BYTES_RE = re.compile(b"[^\x20-\x7e]")


class MailHandler(socketserver.StreamRequestHandler):
    """Reads an SMTP client's command lines and dispatches each command.

    One instance serves one client connection, in its own thread.  Each
    command line is checked (length, CRLF ending, no control or 8-bit
    bytes, unless ``_decode_utf8_command`` takes them) and passed to the
    method named after its verb: ``handleHelo``, ``handleEhlo``,
    ``handleMail``, ``handleRcpt``, ``handleData``, ``handleQuit``,
    ``handleRset``, ``handleNoop``, ``handleVrfy``, ``handleHelp``,
    ``handleStarttls``; anything else to ``handleUnknown``.  Each method
    gets ``args``, the text after the verb and its space ("" if none).
    With ``proxy_protocol``, the PROXY header is read first.
    ``handleConnect`` greets, ``handleTimeout`` says goodbye to a silent
    client, ``handleShutdown`` to one the stopping server closes,
    ``handleDisconnect`` runs when the client is gone.  Replies go out
    through ``netPrint``, buffered until the handler needs more input, so
    that pipelined commands (RFC 2920) get their replies in one write.

    Set per connection: ``peer``, ``peerport`` (the client's address and
    port, or those a PROXY protocol header gave; an IPv4-mapped IPv6
    address is written as plain IPv4), ``local``, ``localport``;
    ``connection``, the socket (a TLS one after STARTTLS; ``request``
    stays the plain one); ``inbox_log``, the command lines of the
    current envelope as received (the HELO/EHLO line, MAIL, RCPTs), from
    which the upstream session is replayed; ``interrupted``, set by a
    stopping SMTPProxyServer before it shuts the connection for reading.

    Class attributes (configuration keys):

    servername          name in the greeting and replies
    serverid            software name in the greeting
    inactivity_timeout  seconds a client may stay silent: then 421 4.4.2;
                        also the deadline of each line, from its first
                        octet (a client trickling a byte at a time does
                        not hold a session), of the PROXY header, of the
                        TLS handshake, and of a write to a client that
                        does not read (as Postfix's smtpd_timeout with
                        smtpd_per_record_deadline)
    max_session_time    seconds from the connection to its end (0: no
                        limit): then 421 4.4.2
    max_message_size    largest message in octets (ConcreteMailHandler);
                        the octets of an overlong line, which are read
                        and dropped, count against it: a command line
                        not ended within it closes the session, and a
                        refused message is read for its end for as many
                        octets again, then refused and the session closed
    greet_pause         seconds to wait before the greeting; a client that
                        sends anything before the greeting gets 554 and is
                        dropped (0: only bytes already waiting are caught)
    strict              after a protocol error (unknown command, command out
                        of order, malformed MAIL or RCPT) close the
                        connection, as Kamaelia Grey did; with False follow
                        RFC 5321 and go on
    max_errors          refused or deferred commands before the client
                        gets 421 4.7.0 and is dropped: every refuse(), so
                        in ConcreteMailHandler every RCPT the policy or
                        the upstream did not accept (not the 452 of
                        max_recipients), as Postfix counts
                        smtpd_hard_error_limit; pipelined
                        commands after the 421 are not read.  A delivered
                        message starts the count again ("errors without
                        delivering mail", Postfix's words)
    max_command_line    longest command line in octets, CRLF included
                        (RFC 5321: 512)
    max_text_line       longest line of message text, CRLF included
                        (RFC 5321: 1000)
    proxy_protocol      "no"; or "v1", "v2", "any": every connection must
                        begin with a PROXY protocol header (HAProxy's, of
                        that version), whose client address and port
                        become ``peer`` and ``peerport``; a connection
                        without a valid one is closed without a word.  A
                        header that names no TCP client (v1 UNKNOWN, v2
                        LOCAL, AF_UNSPEC, AF_UNIX) makes ``peer``
                        UNKNOWN_CLIENT ("unknown", ``peerport`` 0): not
                        the balancer's address, which may be trusted
    proxy_protocol_from the load balancers' addresses or networks allowed
                        to send the header; empty: any (then whoever can
                        reach the port can claim any address: the command
                        line refuses to start so)
    """

    servername = "mail.example.com"
    serverid = "smtpproxy " + __version__
    inactivity_timeout = 60
    greet_pause = 0
    strict = True
    max_errors = 20
    max_command_line = 512
    max_text_line = 1000
    proxy_protocol = "no"
    proxy_protocol_from = []
    # The largest PROXY v2 header taken (addresses and TLVs): more is not
    # an address, it is an attack.
    max_proxy_header = 1024
    max_session_time = 3600
    max_message_size = 50 * 1024 * 1024

    # The verbs handled by a method of their own, handleVerb.
    commands = ("HELO", "EHLO", "MAIL", "RCPT", "DATA", "QUIT", "RSET",
                "NOOP", "VRFY", "HELP", "STARTTLS")

    def setup(self):
        socketserver.StreamRequestHandler.setup(self)
        set_timeout(self.connection, self.inactivity_timeout)
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP,
                                       socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.peer, self.peerport = self.client_address[:2]
        self.peer = unmapped(self.peer)
        self.local, self.localport = self.connection.getsockname()[:2]
        self.local = unmapped(self.local)
        self.phase = "CONNECT"      # the last command, as Postfix logs it
        self.shed = None            # the Expired of a server shedding us
        self.writable = True        # False once a write timed out
        self.session_deadline = (time.monotonic() + self.max_session_time
                                 if self.max_session_time else None)
        self.reader = self._reader(self.connection)
        self.reader.applied = self.inactivity_timeout or None
        self.output = []
        self.inbox_log = []
        self.running = True
        self.errors = 0
        self.interrupted = False

    def _reader(self, sock, **options):
        """A _LineReader of the client's socket, with this session's
        limits (and the server's stress, if it is under stress now)."""
        reader = _LineReader(sock, before_wait=self._flush,
                             idle=self.inactivity_timeout or None,
                             **options)
        reader.deadline = self.session_deadline
        if getattr(self.server, "stressed", False):
            self._under_stress(True, reader)
        return reader

    def _under_stress(self, stressed, reader=None):
        """The server entered (or left) stress: idle waits are cut to its
        ``stress_timeout``, when that is shorter (Postfix's
        smtpd_timeout = ${stress?10})."""
        reader = reader or self.reader
        short = getattr(self.server, "stress_timeout", 0)
        if stressed and short and (not self.inactivity_timeout
                                   or short < self.inactivity_timeout):
            reader.idle, reader.idle_reason = short, "stress"
        else:
            reader.idle = self.inactivity_timeout or None
            reader.idle_reason = "idle"

    def handle(self):
        # Only now, once the setup() of every class is done, may a
        # stopping server look at this handler (busy(), interrupted).
        attach = getattr(self.server, "attach_session", None)
        if attach is not None:
            attach(self)
        try:
            if self.proxy_protocol != "no" and not self._read_proxy_header():
                self.close_connection()
            else:
                self.handleConnect()
            while self.running:
                line = self.reader.readline(self.max_command_line)
                if not line:
                    if self.shed is not None:
                        raise self.shed
                    if self.interrupted:
                        self.handleShutdown()
                    break
                self._handle_line(line)
        except socket.timeout as error:
            self._timed_out(error)
        except (ClientGone, OSError) as error:
            if self.shed is not None:
                self._timed_out(self.shed)
            elif self.interrupted:
                self.handleShutdown()
            else:
                self.log_dialogue("connection lost: %s", error)
        if self.writable:
            try:
                self._flush()
            except OSError:
                pass

    # What the log says of each limit (Expired.reason) that ended a wait.
    expiry_texts = {
        "idle": "idle for %(inactivity_timeout)s s",
        "stress": "idle for %(stress_timeout)s s under stress",
        "line": "line not complete within %(inactivity_timeout)s s",
        "session": "session longer than %(max_session_time)s s",
        "write": "write blocked for %(inactivity_timeout)s s: the client "
                 "does not read",
        "header": "PROXY header not complete within "
                  "%(inactivity_timeout)s s",
        "handshake": "TLS handshake not complete within "
                     "%(inactivity_timeout)s s",
    }

    def _timed_out(self, error):
        """A wait of this session reached a limit (``error``, socket.timeout
        or Expired): log which, in which phase, then handleTimeout()."""
        reason = getattr(error, "reason", "idle")
        if reason == "write":
            self.writable = False
        limits = {"inactivity_timeout": self.inactivity_timeout,
                  "max_session_time": self.max_session_time,
                  "stress_timeout": _seconds(getattr(error, "seconds", 0))}
        text = self.expiry_texts.get(reason, reason) % limits
        log.info("timeout after %s from %s:%s: %s", self.phase,
                 log_escape(self.peer), self.peerport, text)
        if reason not in ("header", "handshake"):
            self.handleTimeout()

    def finish(self):
        try:
            self.handleDisconnect()
        finally:
            try:
                socketserver.StreamRequestHandler.finish(self)
            except OSError:
                pass
            if self.connection is not self.request:     # TLS
                self.connection.close()

    # -- output --------------------------------------------------------

    def netPrint(self, line):
        """Queue one reply (one or more lines joined by CRLF) for the
        client; it is sent before the handler next waits for input."""
        self.output.append(line + "\r\n")
        self.log_dialogue("> %s", line)

    def _flush(self):
        """Send the queued replies now, within ``inactivity_timeout``."""
        if self.output:
            data = "".join(self.output).encode("ascii", "replace")
            del self.output[:]
            send_within(self.connection, data, self.reader.idle,
                        self.session_deadline)

    def count(self, name):
        """Add one to the server's counter ``name`` (logged on SIGUSR1)."""
        count = getattr(self.server, "count", None)
        if count is not None:
            count(name)

    def log_dialogue(self, message, *args):
        """Log a line of this session's dialogue to the debug log."""
        if dialogue_log.isEnabledFor(logging.DEBUG):
            dialogue_log.debug("%s:%s " + message, self.peer, self.peerport,
                               *[log_escape(arg) for arg in args])

    def close_connection(self):
        """Stop reading commands: the connection closes once replies are
        flushed."""
        self.running = False

    def refuse(self, reply, protocol_error=False):
        """Send an error reply and count it.  A protocol error closes the
        connection when ``strict`` is set; ``max_errors`` errors always
        do."""
        self.netPrint(reply)
        self.errors += 1
        if protocol_error and self.strict:
            self.close_connection()
        elif self.errors >= self.max_errors and self.running:
            self.netPrint("421 4.7.0 %s Error: too many errors"
                          % self.servername)
            self.close_connection()

    # -- input ---------------------------------------------------------

    def _discard_rest_of_line(self, limit):
        """Read and drop, ``limit`` octets at a time, what is left of an
        overlong line; return False if ``max_message_size`` octets went
        without its end.  The line's deadline runs on meanwhile."""
        budget = self.max_message_size
        while budget > 0:
            chunk = self.reader.readline(limit)
            if not chunk:
                raise ClientGone("closed in mid-line")
            if chunk.endswith(b"\n"):
                return True
            budget -= len(chunk)
        return False

    def _decode_utf8_command(self, text):
        """A command line with octets beyond ASCII, as str if this session
        takes UTF-8 in it (see ConcreteMailHandler), else None."""
        return None

    def _server_stopping(self):
        """True once the server was told to stop (SIGTERM)."""
        return getattr(self.server, "stopping", False)

    def busy(self):
        """True while a transaction is open: a stopping server lets it
        finish, for up to its grace period.  Never, in MailHandler."""
        return False

    def _handle_line(self, line):
        """Check one raw command line and dispatch it."""
        if not line.endswith(b"\n"):
            if len(line) < self.max_command_line:
                raise ClientGone("closed in mid-line")
            self.log_dialogue("< %s...", line[:80])
            ended = self._discard_rest_of_line(self.max_command_line)
            self.refuse("500 5.5.6 Line too long (%d octets at most)"
                        % self.max_command_line)
            if not ended:
                # Its end is out of sight: what follows is no command.
                self.close_connection()
            return
        self.log_dialogue("< %s", line)
        if not line.endswith(b"\r\n"):
            self.refuse("500 5.5.2 Syntax error: bare <LF> received",
                        protocol_error=True)
            return
        text = line[:-2]
        if _NOT_PRINTABLE_BYTES_RE.search(text):
            text = self._decode_utf8_command(text)
            if text is None:
                self.refuse("500 5.5.2 Syntax error: control or 8-bit "
                            "characters in command", protocol_error=True)
                return
        else:
            text = text.decode("ascii")
        verb, _, args = text.partition(" ")
        verb = verb.upper()
        self.phase = verb if verb in self.commands else "UNKNOWN"
        if verb != "QUIT" and not self.busy() and self._server_stopping():
            # A transaction in progress may finish; none may start.
            self.handleShutdown()
            return
        if verb in self.commands:
            getattr(self, "handle" + verb.capitalize())(args)
        else:
            self.handleUnknown(text)

    # -- the PROXY protocol --------------------------------------------

    def _read_proxy_header(self):
        """Read the PROXY protocol header of ``proxy_protocol``; set
        ``peer`` and ``peerport`` from it.  Return False (after logging
        why) if the connection must be closed."""
        balancer = "%s:%s" % (self.peer, self.peerport)
        if self.proxy_protocol_from and not any(
                _in_network(self.peer, network)
                for network in self.proxy_protocol_from):
            log.warning("PROXY protocol: %s is not in proxy_protocol_from",
                        log_escape(balancer))
            return False
        # The whole header within inactivity_timeout, not each read.
        self.phase = "PROXY"
        reader = self.reader
        if self.inactivity_timeout:
            end = time.monotonic() + self.inactivity_timeout
            if reader.deadline is None or end < reader.deadline:
                reader.deadline, reader.deadline_reason = end, "header"
        try:
            start = self.reader.read_exact(6)
            if start == b"PROXY " and self.proxy_protocol in ("v1", "any"):
                address = self._proxy_v1(start)
            elif (start == b"\r\n\r\n\x00\r"
                  and self.proxy_protocol in ("v2", "any")):
                address = self._proxy_v2()
            else:
                raise ValueError("no PROXY %s header: %s" % (
                    "" if self.proxy_protocol == "any"
                    else self.proxy_protocol, log_escape(start)))
        except Expired as error:
            self._timed_out(error)
            return False
        except (ValueError, OSError) as error:
            log.warning("PROXY protocol from %s: %s", log_escape(balancer),
                        error)
            return False
        finally:
            reader.deadline = self.session_deadline
            reader.deadline_reason = "session"
            self.phase = "CONNECT"
        if not isinstance(address, tuple):
            # No client address: the connection's own is the balancer's,
            # which may be in allowed_senders (127.0.0.1 by default) and
            # would relay anywhere.  The client is unknown and trusted
            # with nothing; it stays counted under the balancer.
            (log.info if address != "v2 LOCAL" else self.log_dialogue)(
                "PROXY %s through %s: an unknown client, trusted with "
                "nothing", address, log_escape(balancer))
            self.peer, self.peerport = UNKNOWN_CLIENT, 0
            return True
        peer, peerport = address
        move = getattr(self.server, "move_session", None)
        if move is not None and not move(self, peer):
            self.netPrint(TOO_MANY_CONNECTIONS % self.servername)
            return False
        self.peer, self.peerport = peer, peerport
        self.log_dialogue("PROXY: client %s:%s, through %s", self.peer,
                          self.peerport, balancer)
        return True

    def _proxy_v1(self, start):
        """The rest of a version 1 header: ``(address, port)``, or "v1
        UNKNOWN" for PROXY UNKNOWN (no client address)."""
        line = start + self.reader.readline(107 - len(start))
        if not line.endswith(b"\r\n"):
            raise ValueError("PROXY v1 line without CRLF within 107 octets")
        words = line[6:-2].decode("ascii", "replace").split(" ")
        if words[0] == "UNKNOWN":
            return "v1 UNKNOWN"
        if words[0] not in ("TCP4", "TCP6") or len(words) != 5:
            raise ValueError("bad PROXY v1 line: %s" % log_escape(line))
        version = 4 if words[0] == "TCP4" else 6
        try:
            # No IPv6 zone (fe80::1%eth0): Python 3.9 and later would read
            # one, and no mail server takes it in XCLIENT.
            if any("%" in word for word in words[1:3]):
                raise ValueError("zone")
            addresses = [ipaddress.ip_address(word) for word in words[1:3]]
        except ValueError:
            raise ValueError("bad address in PROXY v1 line: %s"
                             % log_escape(line))
        ports = words[3:5]
        if (any(address.version != version for address in addresses)
                or not all(re.match(r"(?:0|[1-9][0-9]{0,4})\Z", port)
                           and int(port) < 65536 for port in ports)):
            raise ValueError("bad PROXY v1 line: %s" % log_escape(line))
        return unmapped(addresses[0]), int(ports[0])

    def _proxy_v2(self):
        """The rest of a version 2 header (RFC-like spec of HAProxy,
        section 2.2): ``(address, port)``; for LOCAL and for families
        other than TCP over IPv4 or IPv6, which give no client address,
        what it was ("v2 LOCAL", "v2 AF_UNSPEC", "v2 AF_UNIX", ...)."""
        rest = self.reader.read_exact(10)
        if len(rest) < 10 or rest[:6] != b"\nQUIT\n":
            raise ValueError("bad PROXY v2 signature")
        command, family, length = struct.unpack("!BBH", rest[6:])
        if command >> 4 != 2 or command & 0x0f > 1:
            raise ValueError("bad PROXY v2 version or command 0x%02x"
                             % command)
        if length > self.max_proxy_header:
            raise ValueError("PROXY v2 header of %d octets" % length)
        # UNSPEC, or INET, INET6, UNIX over STREAM or DGRAM: any other
        # value "must be rejected as invalid by receivers".
        if family not in (0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32):
            raise ValueError("bad PROXY v2 family 0x%02x" % family)
        body = self.reader.read_exact(length)
        if len(body) < length:
            raise ValueError("PROXY v2 header cut short")
        if command & 0x0f == 0:             # LOCAL: the balancer's own
            return "v2 LOCAL"
        if family == 0x11 and length >= 12:
            return (unmapped(ipaddress.IPv4Address(body[:4])),
                    struct.unpack("!H", body[8:10])[0])
        if family == 0x21 and length >= 36:
            return (unmapped(ipaddress.IPv6Address(body[:16])),
                    struct.unpack("!H", body[32:34])[0])
        if family in (0x11, 0x21):
            raise ValueError("PROXY v2 addresses cut short")
        return "v2 %s%s" % (
            {0: "AF_UNSPEC", 1: "AF_INET", 2: "AF_INET6", 3: "AF_UNIX"}[
                family >> 4], " over DGRAM" if family & 0x0f == 2 else "")

    # -- the commands: overridden by ConcreteMailHandler ---------------

    def handleConnect(self):
        """The client has connected: greet it, or drop it if it talks
        first (the pre-greet test of Postfix's postscreen)."""
        if self._server_stopping():
            self.handleShutdown()
            return
        if self._client_talks_first():
            self.netPrint("554 5.5.1 %s Protocol error: talking before "
                          "the greeting" % self.servername)
            self.log_dialogue("dropped: talked before the greeting")
            self.close_connection()
            return
        self.netPrint("220 %s ESMTP %s %s" % (self.servername, self.serverid,
                                               time.ctime()))

    def _client_talks_first(self):
        """True if the client sent anything (or hung up) before our
        greeting, waiting ``greet_pause`` seconds for it."""
        if self.reader.buffered():
            return True         # sent along with the PROXY header
        if not self.greet_pause:
            # A look at what came with the connection, nothing waited
            # for: no timeout to set and set back.
            try:
                return self.connection.recv(1, PEEK_NOW) is not None
            except (BlockingIOError, InterruptedError):
                return False
        self.connection.settimeout(self.greet_pause)
        try:
            self.connection.recv(1, socket.MSG_PEEK)
        except (socket.timeout, BlockingIOError):
            return False
        finally:
            set_timeout(self.connection, self.inactivity_timeout)
        return True     # bytes waiting, or the client hung up already

    def handleTimeout(self):
        """The client was silent for ``inactivity_timeout`` seconds: tell
        it, before the connection closes."""
        self.netPrint(self.timeout_reply())
        self.log_dialogue("timeout after %s seconds", self.inactivity_timeout)

    def timeout_reply(self):
        """The 421 sent to a client silent for too long."""
        return "421 4.4.2 %s Error: timeout exceeded" % self.servername

    def handleShutdown(self):
        """The server is stopping and this session may not go on: say 421
        4.3.2, and the connection closes."""
        self.netPrint(self.shutdown_reply())
        self.log_dialogue("closed: the server is stopping")
        self.close_connection()

    def shutdown_reply(self):
        """The 421 sent to a client when the server stops."""
        return SHUTTING_DOWN % self.servername

    def handleDisconnect(self):
        """The session is over (QUIT, error, timeout or client gone)."""

    def handleUnknown(self, command):
        """Any other verb, or an empty line: 500, and close when strict."""
        self.refuse("500 5.5.1 Sorry we don't like broken mailers",
                    protocol_error=True)

    def handleHelo(self, args):
        """MailHandler knows no command: ConcreteMailHandler has them."""
        self.handleUnknown("HELO")

    handleEhlo = handleMail = handleRcpt = handleData = handleHelo
    handleRset = handleNoop = handleVrfy = handleHelp = handleHelo
    handleStarttls = handleHelo

    def handleQuit(self, args):
        """QUIT: 221, and the connection closes."""
        self.netPrint("221 2.0.0 %s closing connection" % self.servername)
        self.close_connection()

    def logResult(self):
        """Write the transaction's line to the transaction log."""


# ===========================================================================
# == 6. The forwarding handler: ConcreteMailHandler ==
# ===========================================================================
#
# Owns:  the strict state machine and the policy hooks; STARTTLS (_TLSSession),
#        the outcome of each transaction (_TransactionOutcomes), and the end of
#        a message (DataScanner, pure).
# Enter: ConcreteMailHandler.handleRcpt(), handleData(); the hooks table.
# Uses:  sections 1 to 5 (the relay of section 4).


class _TLSSession(object):
    """ConcreteMailHandler's TLS (a mixin of it): STARTTLS with the client
    (RFC 3207), the SSLContexts of the server and of the upstream
    (upstream_tls_context(), for the relay), and their keys, which
    ConcreteMailHandler's docstring documents.  It works on the session's
    state (MailHandler's ``connection``, ``reader`` and ``inbox_log``;
    ConcreteMailHandler's ``helo_name``, ``esmtp``, ``offered``,
    ``mail_from`` and ``message_size_limit``) and sets ``tls``.
    """

    tls_cert = ""
    tls_key = ""
    tls_required = False
    upstream_tls = "opportunistic"
    upstream_tls_verify = False
    upstream_tls_ca = ""
    upstream_tls_name = ""

    @classmethod
    def server_tls_context(cls, files=None):
        """The SSLContext of tls_cert and tls_key, or None without
        tls_cert; read again when the files change.  Raises OSError or
        ssl.SSLError when they cannot be used.  ``files`` (check_tls(),
        started as root): the names to read them by instead, (cert,
        key or None), and their stamp (modification times).

        Keys are often readable by root alone (/etc/ssl/private): the
        context read at the start, as root, stays in use when the user
        serving cannot even look at the files."""
        if not cls.tls_cert:
            return None
        paths = (cls.tls_cert, cls.tls_key or cls.tls_cert)
        names = (cls.tls_cert, cls.tls_key)
        known = tls_contexts.get(paths)
        try:
            if files is None:
                stamp = tuple(os.stat(path).st_mtime for path in paths)
            else:
                names, stamp = files
        except PermissionError:
            if known is None:
                raise
            return known[1]
        if known is None or known[0] != stamp:
            try:
                context = tls_server_context(*names)
            except PermissionError:
                if known is None:
                    raise
                return known[1]
            known = (stamp, context)
            tls_contexts.put(paths, known)
        return known[1]

    def upstream_tls_context(self):
        """The SSLContext for the relay's STARTTLS with the upstream, of
        upstream_tls_verify and upstream_tls_ca (one a process)."""
        key = ("upstream", self.upstream_tls_verify, self.upstream_tls_ca)
        return tls_contexts.get(key, lambda: tls_client_context(
            self.upstream_tls_verify, self.upstream_tls_ca))

    def handleStarttls(self, args):
        """STARTTLS (RFC 3207): 220, the TLS handshake, and the session
        begins again: the client must say EHLO again.  What the client sent
        after STARTTLS and before the handshake is thrown away, never read
        as commands (the command injection of CVE-2011-0411)."""
        if args:
            self.refuse("501 5.5.4 Syntax: STARTTLS")
            return
        if self.tls:
            self.refuse("503 5.5.1 TLS already active")
            return
        if "STARTTLS" not in self.offered:
            if not self.esmtp or not self.tls_cert:
                self.refuse("503 5.5.1 STARTTLS not offered")
            else:
                self.refuse("454 4.7.0 TLS not available now")
            return
        if self.mail_from is not None:
            self.refuse("503 5.5.1 Mail transaction in progress")
            return
        try:
            context = self.server_tls_context()
        except (OSError, ssl.SSLError) as error:
            log.error("no STARTTLS: %s", error)
            self.refuse("454 4.7.0 TLS not available now")
            return
        self.netPrint("220 2.0.0 Ready to start TLS")
        self._flush()
        if self.reader.buffered():
            log.warning("client %s sent commands after STARTTLS, before "
                        "TLS: thrown away", self.peer)
            self.log_dialogue("thrown away: %s", self.reader.read_available())
        clear_timeout(self.connection)
        # The ssl module's handshake keeps one deadline for the whole of
        # it: this timeout is the handshake's, not each read's.
        seconds, _, _ = self.reader.limit()
        self.connection.settimeout(seconds)
        try:
            self.connection = context.wrap_socket(
                self.connection, server_side=True,
                do_handshake_on_connect=False)
            self.connection.do_handshake()
        except (OSError, ValueError) as error:
            if isinstance(error, socket.timeout):
                self._timed_out(Expired("handshake", seconds))
            self.log_dialogue("TLS handshake failed: %s", error)
            self.count("tls_failures")
            self.close_connection()
            return
        # The session may be read by the other side of a socket that a
        # stopping server cannot shut: it is watched every quarter second.
        self.reader = self._reader(
            self.connection,
            stop=lambda: self.interrupted or self.shed is not None)
        self.tls = True
        self.log_dialogue("TLS: %s %s", self.connection.version(),
                          self.connection.cipher()[0])
        # Nothing said before TLS holds after it (RFC 3207 section 4.2).
        self.helo_name = None
        self.esmtp = False
        self.offered = {}
        self.message_size_limit = self.max_message_size
        del self.inbox_log[:]


class _TransactionOutcomes(object):
    """ConcreteMailHandler's outcomes (a mixin of it): what each
    transaction came to, for its line in the transaction log
    (logResult()), and the server's counters of replies and of upstream
    failures.  It reads the session's ``mail_from``, ``helo_name``,
    ``peer``, ``rcpt_seen`` and ``relay``, counts with count(), and keeps
    ``final_reply`` and ``rcpt_outcome``, which ConcreteMailHandler's
    _start_transaction() clears.
    """

    # The statuses of the transaction log, from the least to the most
    # telling: a deferral says more than a refusal of some recipients, an
    # upstream fault more than either.
    outcomes = ("REFUSED", "DEFERRED", "FAILED")

    def logResult(self):
        """Write the transaction line of Kamaelia Grey's format:
        time | HELO name | client IP | sender | recipients | status |
        followed by our own field, the reply that decided.  The status
        (transaction_status()) is ACCEPTED, DEFERRED or REFUSED after the
        reply to the message, or to the recipients when it did not get
        that far, FAILED when the upstream failed; empty when the client
        ended the transaction before any verdict."""
        if self.mail_from is None:
            return
        status, reply = self._transaction_status()
        now = time.time()
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
        fields = [
            "%s.%03d" % (stamp, int((now - int(now)) * 1000)),
            self.helo_name or "",
            self.peer,
            "<%s>" % self.mail_from,
            ", ".join("<%s>" % r for r in self.rcpt_seen),
            status,
            reply,
        ]
        transaction_log.info("%s | ", " | ".join(
            log_escape(field).replace("|", "\\x7c") for field in fields))

    def _count_transaction(self):
        """Count the transaction's end in the metrics, by its status
        (NONE: ended before any verdict), whatever logResult() does."""
        if self.mail_from is not None:
            metrics.add("smtpproxy_transactions_total",
                        self._transaction_status()[0] or "NONE")

    def _note_outcome(self, reply, failed=False):
        """A recipient was not accepted with ``reply``: keep the most
        telling (``outcomes``) for the transaction's log line, should it
        end before its message does."""
        status = "FAILED" if failed else (
            "DEFERRED" if reply.startswith("4") else "REFUSED")
        known = self.rcpt_outcome
        if known is None or (self.outcomes.index(status)
                             > self.outcomes.index(known[0])):
            self.rcpt_outcome = (status, reply)

    def _transaction_status(self):
        """``(status, reply)`` of the transaction's log line: the final
        reply to its message, if it got that far, else the most telling
        refusal of a recipient; ("", "") when the client ended it before
        any verdict (or left in the middle of the data)."""
        reply = self.final_reply
        if reply:
            if self.relay.lost and reply == self.relay.lost:
                return "FAILED", reply
            status = {"2": "ACCEPTED", "4": "DEFERRED",
                      "5": "REFUSED"}.get(reply[:1], "")
            return status, reply
        return self.rcpt_outcome or ("", "")

    def _end_message(self, reply):
        """``reply`` is the message's final reply (DATA's, or the one to
        its data): kept for the transaction's log line, and counted.  A
        delivered message clears the session's errors, as Postfix's
        smtpd_hard_error_limit counts errors "without delivering mail"."""
        self.final_reply = reply
        self._count_reply("messages", reply)
        if reply.startswith("2"):
            self.errors = 0

    def _count_reply(self, what, reply):
        """Count a reply to RCPT ("rcpt") or to a message ("messages"):
        the counters what_accepted, what_deferred, what_refused."""
        outcome = {"2": "accepted", "4": "deferred", "5": "refused"}.get(
            reply[:1])
        if outcome is not None:
            self.count("%s_%s" % (what, outcome))

    def upstream_failed(self, error):
        """The upstream broke (the relay dropped it; the transaction
        cannot complete): count and log it."""
        self.count("upstream_errors")
        log.warning("upstream %s:%s: %s", self.smtp_ip, self.smtp_port, error)
        self.log_dialogue("upstream: %s", error)
        if error.reply.startswith("421"):
            self.close_connection()     # 421: this session ends


class DataScanner(object):
    """Finds the end of a message's data, and what is wrong with it, in
    the bytes a client sends after DATA: no socket, no I/O, so that the
    rule that matters most for safety is tested on its own.

    ``feed(data)`` takes the next bytes read and returns those that may
    go to the upstream as they are: the client's own lines, dot-stuffing
    included, up to (not including) the final ``.``; nothing once the
    message is bad.  Only CR LF . CR LF ends the data (the CR LF that
    ended the DATA command counts), wherever the reads split it.
    Attributes after each feed:

    ended       the end was found; ``leftover`` is what came after it
                (pipelined commands, to be read as such)
    problem     the refusal, once the message is bad: a NUL, a bare CR
                or LF (SMTP smuggling), a line over ``max_line`` octets
                (the transparency dot not counted, RFC 5321 section
                4.5.3.1.6), more than ``max_size`` octets; None if clean
    size        octets of the message so far, dropped ones included
    hopeless    more than twice ``max_size`` octets without the end: the
                end is not worth waiting for
    mid_line    the bytes so far end inside a line; ``new_line``: that
                line began in the last feed (for each line's deadline)
    """

    def __init__(self, max_line=1000, max_size=50 * 1024 * 1024):
        self.max_line = max_line
        self.max_size = max_size
        self.ended = False
        self.leftover = b""
        self.problem = None
        self.size = 0
        self.hopeless = False
        self.mid_line = False
        self.new_line = False
        self._partial = b""         # an unfinished line, for the next feed
        self._previous = b"\r\n"    # the two octets before ``_partial``

    def feed(self, data):
        """Scan the next ``data``; return what may be forwarded of it."""
        window = self._partial + data
        last_lf = window.rfind(b"\n")
        self.mid_line = last_lf < len(window) - 1
        self.new_line = last_lf >= 0
        if last_lf < 0:
            self._partial = window
            if len(window) >= self.max_line + window.startswith(b"."):
                self.problem = self.problem or self.line_too_long()
                self.size += len(window)
                # Keep what tells where the line ends, not the line.
                self._previous, self._partial = window[-2:], b""
                self.hopeless = self.size > 2 * self.max_size
            return b""
        lines = window[:last_lf + 1]
        self._partial = window[last_lf + 1:]
        # The end: the first CR LF . CR LF, its CR LF possibly in
        # ``_previous``; ``end`` is where its "." is in ``lines``.
        previous = self._previous
        if previous == b"\r\n" and lines.startswith(b".\r\n"):
            end = 0
        elif previous[-1:] == b"\r" and lines.startswith(b"\n.\r\n"):
            end = 1
        else:
            end = lines.find(b"\r\n.\r\n")
            if end >= 0:
                end += 2
        if end >= 0:
            self.ended = True
            self.leftover = lines[end + 3:] + self._partial
            self._partial = b""
            self.mid_line = False
            lines = lines[:end]
        else:
            self._previous = (previous + lines[-2:])[-2:]
        self.size += len(lines)
        if self.problem is None and lines:
            self.problem = self.check_lines(lines)
            if self.problem is None and self.size > self.max_size:
                self.problem = self.too_big()
        if not self.ended:
            self.hopeless = self.size > 2 * self.max_size
        return lines if self.problem is None else b""

    def check_lines(self, lines):
        """The refusal for a run of whole lines, or None if they are
        clean: every line ends with CR LF and holds no other CR, LF or NUL,
        and none is longer than ``max_line``."""
        if b"\x00" in lines:
            return "550 5.5.2 Error: NUL received"
        line_ends = lines.count(b"\r\n")
        if lines.count(b"\n") != line_ends:
            return "550 5.5.2 Error: bare <LF> received"
        if lines.count(b"\r") != line_ends:
            return "550 5.5.2 Error: bare <CR> received"
        limit = self.max_line
        if len(lines) < limit:
            return None
        split = lines.split(b"\n")
        # The raw lengths first (in C): only a run with a line that long
        # needs the transparency dot taken off each line's count.
        if max(map(len, split)) >= limit and max(
                len(line) - line.startswith(b".") for line in split) >= limit:
            return self.line_too_long()
        return None

    def line_too_long(self):
        return ("552 5.5.6 Message line too long (%d octets at most)"
                % self.max_line)

    def too_big(self):
        return ("552 5.3.4 Message size exceeds fixed limit of %d octets"
                % self.max_size)


class ConcreteMailHandler(_TLSSession, _TransactionOutcomes, MailHandler):
    """The strict SMTP state machine, and forwarding to the real server.

    On its own it forwards nothing: ``shouldWeAcceptMail()`` returns False,
    so every DATA is answered ``451 4.7.1`` and the connection closed, as in
    Kamaelia Grey.  A subclass decides with two hooks:

    ``shouldWeAcceptRecipient(recipient)``
        called for each RCPT that passed the syntax and limit checks, with
        the address as written, without angle brackets ("Postmaster" for
        the bare ``<Postmaster>``).  Return True to relay the RCPT to the
        upstream (whose reply the client gets), False to defer it with
        ``defer_reply``, or a reply string (such as "550 5.7.1 Relaying
        denied") to send that instead.  True by default.
    ``shouldWeAcceptMail()``
        called at DATA, once at least one recipient was accepted.  True
        streams the message to the upstream; False answers ``defer_reply``
        and closes the connection.  False by default.

    A subclass that returns True from both is a plain, faithful proxy.

    Per transaction (the relay reads the first five): ``helo_name``,
    ``esmtp`` (EHLO rather than HELO), ``mail_from`` (None before MAIL, ""
    for the null sender), ``mail_params`` (its [(KEYWORD, value)]),
    ``smtputf8`` (MAIL ... SMTPUTF8), ``recipients`` (accepted by the
    upstream), ``rcpt_seen`` (every well-formed RCPT address, for the log).

    Class attributes (configuration keys), besides MailHandler's:

    smtp_ip, smtp_port  the real mail server
    upstream_timeout    seconds to wait for it to connect or answer; past
                        that the client gets 451 4.4.2
    max_message_size    largest message in octets, announced with SIZE
                        (or the upstream's SIZE, if smaller); larger:
                        552 5.3.4 and nothing is delivered
    max_recipients      recipients per message; more: 452 4.5.3
    defer_reply         the reply of a deferral
    upstream_capabilities_ttl
                        seconds the upstream's EHLO keywords are trusted;
                        every upstream session renews them, and past this
                        age a client's EHLO asks the upstream again
    tls_cert, tls_key   certificate (chain) and key files, PEM: STARTTLS
                        is offered to clients (TLS 1.2 at least); the key
                        may be in the certificate's file
    tls_required        MAIL before STARTTLS: 530 5.7.0
    upstream_tls        "no", "opportunistic" (STARTTLS when the upstream
                        offers it; if the handshake fails, plain text on
                        a new connection) or "required" (no TLS: 451)
    upstream_tls_verify check the upstream's certificate and name
                        (smtp_ip, or upstream_tls_name) against
                        upstream_tls_ca (or the system's authorities); a
                        failed check is a failed handshake, so only with
                        "required" does it stop plain text
    xclient             tell the upstream the real client (address, port,
                        HELO name, reverse and forward-confirmed host
                        names, looked up once a session by
                        ``client_names()``) with XCLIENT, or XFORWARD, when
                        it offers them (Postfix:
                        smtpd_authorized_xclient_hosts and
                        smtpd_authorized_xforward_hosts); an XCLIENT the
                        upstream refuses is 451 4.3.0, not a session in
                        which it takes the client for the proxy

    What EHLO offers follows the upstream: PIPELINING is the proxy's own;
    SIZE is the smaller of the two; 8BITMIME, SMTPUTF8 (RFC 6531: UTF-8
    addresses), DSN (RFC 3461: RET, ENVID, NOTIFY, ORCPT) and
    ENHANCEDSTATUSCODES (its replies, which the client hears, have the
    codes) only when the upstream has them, learnt from its EHLO reply
    (``learn_upstream()``), so that nothing is promised that the upstream
    cannot carry.  MAIL and RCPT parameters reach the upstream only when
    its session announced them; a transaction that needs SMTPUTF8 or
    8BITMIME of an upstream session without them is deferred (451 4.3.0).

    Two of its parts are classes of their own, mixins that it inherits
    before MailHandler, so that their hooks and keys are its own as ever:
    _TLSSession (STARTTLS, the SSLContexts, the TLS keys) and
    _TransactionOutcomes (the transaction's log line, the counters of
    replies, upstream_failed()).
    """

    smtp_ip = "127.0.0.1"
    smtp_port = 8025
    upstream_timeout = 120
    upstream_pool_size = 10
    upstream_pool_idle = 30
    max_recipients = 100
    defer_reply = "451 4.7.1 Please try again later"
    upstream_class = UpstreamSession
    relay_class = UpstreamRelay
    upstream_capabilities_ttl = 600
    xclient = False
    dns_timeout = 5
    client_name_cache_time = 600
    # The reverse names whose forward lookup is tried, at most.
    max_forward_lookups = 3

    # The extensions offered only when the upstream has them.
    upstream_dependent = ("8BITMIME", "SMTPUTF8", "DSN",
                          "ENHANCEDSTATUSCODES")
    # MAIL and RCPT parameters, and the extension each belongs to.
    parameter_extensions = UpstreamRelay.parameter_extensions

    # Size of the chunks in which message data is written upstream.
    data_chunk_size = 65536

    def setup(self):
        MailHandler.setup(self)
        self.helo_name = None
        self.esmtp = False
        self.relay = self.relay_class(self)
        self.final_reply = ""
        self.offered = {}
        self.message_size_limit = self.max_message_size
        self.tls = False
        self._client_names = None       # (peer, client_names())
        self._start_transaction()

    def _start_transaction(self):
        self.mail_from = None
        self.mail_params = []
        self.smtputf8 = False
        self.recipients = []
        self.rcpt_seen = []
        self.relay.new_transaction()
        self.final_reply = ""
        self.rcpt_outcome = None       # (status, reply): note_outcome()
        del self.inbox_log[1:]

    # -- policy hooks ----------------------------------------------------

    def shouldWeAcceptRecipient(self, recipient):
        """Policy at RCPT: True, False (defer) or a reply string."""
        return True

    def shouldWeAcceptMail(self):
        """Policy at DATA: True to forward the message."""
        return False

    def extra_headers(self):
        """Header lines (str, ASCII, without CRLF) to put in front of the
        message forwarded; none by default."""
        return []

    # -- the transaction's end -------------------------------------------

    def _reset_transaction(self):
        """End the current transaction (RSET, HELO, after DATA): log it and
        reset the upstream's transaction too."""
        self._count_transaction()
        self.logResult()
        self.relay.reset()
        self._start_transaction()

    def handleTimeout(self):
        """Also record the 421 as the transaction's final reply."""
        MailHandler.handleTimeout(self)
        if self.mail_from is not None:
            self.final_reply = self.timeout_reply()

    def handleShutdown(self):
        """Also record the 421 as the transaction's final reply."""
        MailHandler.handleShutdown(self)
        if self.mail_from is not None:
            self.final_reply = self.shutdown_reply()

    def busy(self):
        """True from MAIL to the end of the transaction."""
        return self.mail_from is not None

    def handleDisconnect(self):
        """Log the open transaction, if any, and QUIT the upstream."""
        self._count_transaction()
        self.logResult()
        self.mail_from = None
        self.relay.quit()

    # -- what the upstream can carry -------------------------------------

    @classmethod
    def learn_upstream(cls):
        """Ask the upstream for its EHLO keywords now (a session of EHLO
        and QUIT) and remember them; return them, or None if it could not
        be asked (what was known before is then kept)."""
        key = (cls.smtp_ip, cls.smtp_port)
        extensions = None
        try:
            # A client's EHLO may be waiting: a healthy upstream answers in
            # milliseconds, so a hung one is not waited for long.
            session = cls.upstream_class(key, min(cls.upstream_timeout, 10))
            session.greet(cls.servername, esmtp=True)
            extensions = session.extensions
            session.quit()
        except UpstreamError as error:
            log.warning("upstream %s:%s: cannot learn its extensions: %s",
                        key[0], key[1], error)
        upstream_capabilities.remember(key, extensions)
        return extensions

    def _upstream_extensions(self):
        """The upstream's EHLO keywords as last learnt, asking it first if
        that was more than ``upstream_capabilities_ttl`` seconds ago (one
        session asks; the others meanwhile use what is known); {} if they
        are not known."""
        return upstream_capabilities.get((self.smtp_ip, self.smtp_port),
                                         self.upstream_capabilities_ttl,
                                         self.learn_upstream)

    def _offered_extensions(self):
        """What our EHLO offers, {KEYWORD: parameters}: see the class
        docstring."""
        upstream = self._upstream_extensions()
        offered = {"PIPELINING": ""}
        limit = self.max_message_size
        size = upstream.get("SIZE", "")
        if size.isdigit() and 0 < int(size) < limit:
            limit = int(size)
        offered["SIZE"] = str(limit)
        for keyword in self.upstream_dependent:
            if keyword in upstream:
                offered[keyword] = ""
        if not self.tls:
            try:
                if self.server_tls_context() is not None:
                    offered["STARTTLS"] = ""
            except (OSError, ssl.SSLError) as error:
                log.error("no STARTTLS: %s", error)
        return offered

    # -- who the client is (XCLIENT, XFORWARD, whitelists) ---------------

    def client_attributes(self, command, announced=""):
        """The real client, as XCLIENT or XFORWARD (``command``) name it,
        for the relay: [(NAME, value)], of the names ``announced`` (the
        parameters of the upstream's EHLO keyword; all when it lists
        none).  NAME is the client's host name if forward-confirmed,
        REVERSE_NAME its reverse name (XCLIENT only), as Postfix would
        have looked them up."""
        address = self.peer
        if ":" in address:
            address = "IPV6:" + address
        unknown = "[UNAVAILABLE]"
        known = self.peer != UNKNOWN_CLIENT
        reverse_name, confirmed_name = self.client_names()
        attributes = [("NAME", confirmed_name or unknown),
                      ("ADDR", address if known else unknown),
                      ("PORT", str(self.peerport) if known else unknown),
                      ("HELO", self.helo_name or unknown),
                      ("PROTO", "ESMTP" if self.esmtp else "SMTP")]
        if command == "XCLIENT":
            attributes.append(("REVERSE_NAME", reverse_name or unknown))
        else:
            attributes.append(("SOURCE", "REMOTE"))
        names = set(announced.upper().split())
        return [attribute for attribute in attributes
                if not names or attribute[0] in names]

    def client_hostname(self):
        """The client's host name for XCLIENT and XFORWARD if its reverse
        lookup is confirmed by its forward lookup, else None."""
        return self.client_names()[1]

    def client_names(self):
        """``(reverse name, confirmed name)`` of the client (``peer``):
        its first reverse (PTR) name, and the first of them whose forward
        lookup gives ``peer`` back (FCrDNS), so that nobody can name
        himself with a PTR record alone; None where there is none.  Looked
        up once a session, with ``reverse_lookup`` and ``forward_lookup``.
        """
        known = self._client_names
        if known is not None and known[0] == self.peer:
            return known[1]
        if self.peer == UNKNOWN_CLIENT:
            return None, None           # no address to look up
        # Kept for the client's next sessions (by this class: a reload or
        # another policy may look up otherwise).
        cache_key = (type(self), self.peer)
        cached = client_names.get(cache_key)
        if cached is not None and cached[0] > time.monotonic():
            self._client_names = (self.peer, cached[1])
            return cached[1]
        why = []
        answered, reverse, confirmed = confirmed_names(
            self.peer, self.reverse_lookup, self.forward_lookup,
            self.max_forward_lookups, self.dns_timeout or None, why)
        if not answered:
            # What happened: a lookup that was never made waited for
            # nothing.
            log.info("reverse lookup of %s: %s", self.peer, {
                "late": "no answer within %s s"
                % _seconds(self.dns_timeout),
                "refused": "not made: no lookup thread free for it (the "
                "lookup threads' warning says why)",
                "silent": "not asked: a lookup of its network timed out "
                "in the last %s s" % _seconds(lookup_threads.silent_time),
            }[why[0]])
        names = (reverse[0].lower().rstrip(".") if reverse else None,
                 confirmed)
        self._client_names = (self.peer, names)
        if answered and self.client_name_cache_time:
            client_names.put(cache_key, (time.monotonic()
                                         + self.client_name_cache_time,
                                         names))
        return names

    def reverse_lookup(self, address):
        """Names of ``address`` (PTR), from the system's resolver;
        override to ask another (the tests do)."""
        try:
            name, aliases, _ = socket.gethostbyaddr(address)
        except (OSError, UnicodeError):
            return []
        return [name] + aliases

    def forward_lookup(self, name):
        """Addresses of ``name``, a set of str, from the system's
        resolver; override to ask another (the tests do).  The DNS
        lists of GreyListingPolicy ask it too."""
        return resolve_addresses(name)

    # -- the commands ----------------------------------------------------

    def handleHelo(self, args):
        """HELO name: 250 with the seed's wording."""
        self._greet(args, esmtp=False)

    def handleEhlo(self, args):
        """EHLO name: 250 with the extensions of ehlo_lines()."""
        self._greet(args, esmtp=True)

    def _greet(self, args, esmtp):
        """HELO and EHLO: one argument; a repeated one resets like RSET."""
        if not _HELO_RE.match(args):
            verb = "EHLO" if esmtp else "HELO"
            self.refuse("501 5.5.4 Syntactically invalid %s argument(s)"
                        % verb, protocol_error=True)
            return
        self._reset_transaction()
        self.helo_name = args
        self.esmtp = esmtp
        self.inbox_log[:] = [("EHLO " if esmtp else "HELO ") + args]
        self.offered = self._offered_extensions() if esmtp else {}
        self.message_size_limit = int(self.offered.get(
            "SIZE", self.max_message_size))
        if esmtp:
            self.netPrint(format_reply(250, self.ehlo_lines()))
        else:
            self.netPrint("250 %s Hello %s %s" % (self.servername, args,
                                                  self.peer))

    def ehlo_lines(self):
        """The lines of our EHLO reply: the greeting line, then the
        keywords of ``offered``, the extensions offered to this client."""
        order = ("PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "DSN",
                 "ENHANCEDSTATUSCODES", "STARTTLS")
        keywords = sorted(self.offered, key=lambda keyword: (
            order.index(keyword) if keyword in order else len(order),
            keyword))
        return (["%s Hello %s [%s]" % (self.servername, self.helo_name,
                                       self.peer)]
                + [("%s %s" % (keyword, self.offered[keyword])).rstrip()
                   for keyword in keywords])

    def handleMail(self, args):
        """MAIL FROM:<path> [SIZE=n] [BODY=7BIT|8BITMIME]: checked here;
        the upstream hears it with the first accepted RCPT."""
        if self.helo_name is None:
            self.refuse("503 5.5.2 Send hello first")
            return
        if self.mail_from is not None:
            self.refuse("503 5.5.1 Sender already given")
            return
        if self.tls_required and not self.tls:
            self.refuse("530 5.7.0 Must issue a STARTTLS command first")
            return
        if args[:5].upper() != "FROM:":
            self.refuse("501 5.5.4 Syntax: MAIL FROM:<address>",
                        protocol_error=True)
            return
        try:
            sender, route, params = parse_path(
                args[5:], null_allowed=True,
                utf8="SMTPUTF8" in self.offered)
        except EnvelopeSyntaxError as error:
            self.refuse("501 5.1.7 Bad sender address syntax: %s" % error,
                        protocol_error=True)
            return
        utf8 = any(keyword == "SMTPUTF8" for keyword, _ in params)
        if not utf8 and re.search(r"[^\x00-\x7f]", sender):
            self.refuse("553 5.6.7 Non-ASCII address without SMTPUTF8")
            return
        if params and not self.esmtp:
            self.refuse("555 5.5.4 MAIL parameters need EHLO")
            return
        for keyword, value in params:
            problem = self._check_parameter("MAIL", keyword, value)
            if problem:
                self.refuse(problem)
                return
        self.mail_from = sender
        self.mail_params = params
        self.smtputf8 = utf8
        self.inbox_log.append("MAIL FROM:" + args[5:])
        self.netPrint("250 2.1.0 OK")

    def _decode_utf8_command(self, text):
        """MAIL and RCPT may hold UTF-8 when SMTPUTF8 was offered: valid
        UTF-8, and no control character (C0, DEL or C1) in it."""
        if "SMTPUTF8" not in self.offered or text[:5].upper() not in (
                b"MAIL ", b"RCPT "):
            return None
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if re.search("[\x00-\x1f\x7f-\x9f]", text):
            return None
        return text

    def _check_parameter(self, command, keyword, value):
        """The refusal of a MAIL or RCPT parameter, or None if it is
        well-formed and belongs to an extension offered to this client."""
        if keyword not in self.parameter_extensions or (
                self.parameter_extensions[keyword] not in self.offered) or (
                (keyword in ("NOTIFY", "ORCPT")) != (command == "RCPT")):
            return "555 5.5.4 Unsupported parameter %s" % keyword
        if keyword == "SMTPUTF8":
            if value is not None:
                return "501 5.5.4 SMTPUTF8 takes no value"
            return None
        if value is None:
            return "501 5.5.4 %s needs a value" % keyword
        if keyword == "SIZE":
            if not re.match(r"[0-9]{1,20}\Z", value):
                return "501 5.5.4 Bad SIZE parameter"
            if int(value) > self.message_size_limit:
                return ("552 5.3.4 Message size exceeds fixed limit of %d "
                        "octets" % self.message_size_limit)
        elif keyword == "BODY":
            if value.upper() not in ("7BIT", "8BITMIME"):
                return "555 5.5.4 Unsupported BODY type"
        elif keyword == "RET":
            if value.upper() not in ("FULL", "HDRS"):
                return "501 5.5.4 RET must be FULL or HDRS"
        elif keyword == "NOTIFY":
            words = value.upper().split(",")
            if not (words == ["NEVER"] or (
                    len(set(words)) == len(words) and
                    set(words) <= {"SUCCESS", "FAILURE", "DELAY"})):
                return "501 5.5.4 Bad NOTIFY parameter"
        elif keyword == "ENVID":
            if len(value) > 100 or not _XTEXT_RE.match(value):
                return "501 5.5.4 Bad ENVID parameter"
        elif keyword == "ORCPT":
            if len(value) > 500 or not _ORCPT_RE.match(value):
                return "501 5.5.4 Bad ORCPT parameter"
        return None

    def handleRcpt(self, args):
        """RCPT TO:<path>: limits, policy, then the upstream's own reply."""
        if self.mail_from is None:
            self.refuse("503 5.5.1 Sender not yet given",
                        protocol_error=True)
            return
        if args[:3].upper() != "TO:":
            self._rcpt_refused("501 5.5.4 Syntax: RCPT TO:<address>",
                              protocol_error=True)
            return
        try:
            recipient, route, params = parse_path(
                args[3:], postmaster_allowed=True,
                utf8="SMTPUTF8" in self.offered)
        except EnvelopeSyntaxError as error:
            self._rcpt_refused("501 5.1.3 Bad recipient address syntax: %s"
                              % error, protocol_error=True)
            return
        if not self.smtputf8 and re.search(r"[^\x00-\x7f]", recipient):
            self._rcpt_refused("553 5.6.7 Non-ASCII address without SMTPUTF8")
            return
        for keyword, value in params:
            problem = self._check_parameter("RCPT", keyword, value)
            if problem:
                self._rcpt_refused(problem)
                return
        if len(self.recipients) >= self.max_recipients:
            # Not an error (RFC 5321 4.5.3.1.10: the client sends the
            # message and the rest later), as Postfix's recipient
            # overshoot; and it adds nothing to the store.
            self._note_outcome("452 4.5.3 Too many recipients")
            self.netPrint("452 4.5.3 Too many recipients")
            return
        if len(self.rcpt_seen) < self.max_recipients:
            self.rcpt_seen.append(recipient)
        if self.relay.lost:
            self._note_outcome(self.relay.lost, failed=True)
            self.refuse(self.relay.lost)
            return
        verdict = self.shouldWeAcceptRecipient(recipient)
        if verdict is not True:
            self.log_dialogue("policy refused recipient %s", recipient)
            reply = verdict if isinstance(verdict, str) else self.defer_reply
            self._count_reply("rcpt", reply)
            self._note_outcome(reply, failed=reply == OUT_OF_RESOURCES)
            if reply.startswith("421"):
                self.netPrint(reply)
                self.close_connection()     # 421: this session ends
            else:
                # A deferral is an error too: one session must not
                # greylist (and add to the store) without end.
                self.refuse(reply)
            return
        try:
            code, lines = self.relay.rcpt(recipient, params)
        except UpstreamError as error:
            self._count_reply("rcpt", error.reply)
            self._note_outcome(error.reply, failed=True)
            self.refuse(error.reply)
            return
        self._count_reply("rcpt", str(code))
        if code // 100 == 2:
            self.netPrint(format_reply(code, lines))
            self.recipients.append(recipient)
            self.inbox_log.append("RCPT TO:" + args[3:])
        else:
            self._note_outcome(format_reply(code, lines[-1:]))
            self.refuse(format_reply(code, lines))

    def _rcpt_refused(self, reply, protocol_error=False):
        """Refuse a RCPT of ours (syntax, parameters), for the log too."""
        self._note_outcome(reply)
        self.refuse(reply, protocol_error)

    def handleData(self, args):
        """DATA: policy, then the message streamed to the upstream, whose
        reply to the final dot is the client's."""
        if args:
            self.refuse("501 5.5.4 Syntax: DATA", protocol_error=True)
            return
        if self.mail_from is None:
            self.refuse("503 5.5.1 Sender not yet given",
                        protocol_error=True)
            return
        if self.relay.lost:
            self._end_message(self.relay.lost)
            self.netPrint(self.relay.lost)
            self._reset_transaction()
            return
        if not self.recipients:
            self.refuse("503 5.5.1 Valid RCPT command must precede DATA",
                        protocol_error=True)
            return
        if not self.shouldWeAcceptMail():
            self._end_message(self.defer_reply)
            self.netPrint(self.defer_reply)
            self.close_connection()
            return
        try:
            code, lines = self.relay.data()
        except UpstreamError as error:
            self._end_message(error.reply)
            self.netPrint(error.reply)
            self._reset_transaction()
            return
        if code != 354:
            # Its transaction stays open (Postfix's does): the RSET of
            # reset_transaction() ends it, or the next MAIL would be
            # refused as nested.
            self._end_message(format_reply(code, lines[-1:]))
            self.netPrint(format_reply(code, lines))
            self._reset_transaction()
            return
        self.netPrint("354 End data with <CR><LF>.<CR><LF>")
        self._end_message(self._receive_message())
        self.netPrint(self.final_reply)
        self._reset_transaction()

    def _receive_message(self):
        """Read the message to its real end, streaming it upstream; return
        the reply for the client.

        A DataScanner finds the end and what is wrong (SMTP smuggling,
        overlong lines, size); this loop only reads, keeps each line's
        deadline, and forwards the clean lines in chunks.  A bad message
        stops the forwarding at once; the rest is read and dropped to the
        real end, the upstream session is aborted without the final dot,
        and the client is refused.
        """
        reader = self.reader
        scanner = DataScanner(self.max_text_line, self.message_size_limit)
        relay = self.relay
        outgoing = [("".join(line + "\r\n" for line in self.extra_headers())
                     .encode("ascii"))]
        outgoing_size = len(outgoing[0])
        try:
            while not scanner.ended:
                # Each line must be complete within its deadline, counted
                # from when the reading of it began (its first octet, unless
                # forwarding the lines before it to the upstream took a
                # while: the upstream's time is not the client's), an
                # overlong one's too.
                if not scanner.mid_line:
                    reader.line_started = None
                elif scanner.new_line or reader.line_started is None:
                    reader.line_started = time.monotonic()
                data = reader.read_available()
                if not data:
                    raise ClientGone("closed during DATA")
                lines = scanner.feed(data)
                if scanner.hopeless:
                    return self._give_up(scanner.too_big())
                if lines and relay.session is not None:
                    outgoing.append(lines)
                    outgoing_size += len(lines)
                    if outgoing_size >= self.data_chunk_size:
                        try:
                            relay.send(b"".join(outgoing))
                        except UpstreamError:
                            pass        # the relay is lost; read on
                        outgoing, outgoing_size = [], 0
            reader.unread(scanner.leftover)
        except (ClientGone, OSError):
            # Client gone or timed out mid-DATA: no final dot upstream.
            relay.abort()
            self.final_reply = "(client lost during DATA)"
            raise
        finally:
            reader.line_started = None
        if scanner.problem is not None:
            self.log_dialogue("message refused: %s", scanner.problem)
            relay.abort()
            return scanner.problem
        if relay.session is None:
            return relay.lost or LOST
        try:
            code, lines = relay.end(b"".join(outgoing))
        except UpstreamError as error:
            return error.reply
        return format_reply(code, lines)

    def _give_up(self, reply):
        """A refused message went on for ``max_message_size`` octets more
        without its end: refuse it now and close, since nothing that
        follows can be read as commands."""
        self.log_dialogue("message refused, its end not found: %s", reply)
        self.relay.abort()
        self.close_connection()
        return reply

    def handleRset(self, args):
        """RSET: end the transaction here and upstream; 250."""
        if args:
            self.refuse("501 5.5.4 Syntax: RSET")
            return
        self._reset_transaction()
        self.netPrint("250 2.0.0 OK")

    def handleNoop(self, args):
        """NOOP: 250."""
        self.netPrint("250 2.0.0 OK")

    def handleVrfy(self, args):
        """VRFY: 252, as RFC 5321 section 3.5.3 allows; nothing is verified."""
        if not args:
            self.refuse("501 5.5.4 Syntax: VRFY <address>")
            return
        self.netPrint("252 2.5.0 Cannot VRFY user, but will accept message "
                      "and attempt delivery")

    def handleHelp(self, args):
        """HELP: 502; a protocol error (Kamaelia Grey closed on it)."""
        self.refuse("502 5.5.1 HELP not implemented", protocol_error=True)

    def handleQuit(self, args):
        """QUIT: end the transaction, 221, close."""
        if args:
            self.refuse("501 5.5.4 Syntax: QUIT")
            return
        self._reset_transaction()
        MailHandler.handleQuit(self, args)


# ===========================================================================
# == 7. Names and DNS lists ==
# ===========================================================================
#
# Owns:  who a client is by its names (FCrDNS: confirmed_names), generic
#        names and registrable domains (the name keys), the DNS lists and
#        their answers, and the bounded lookup threads they all run on.
# Enter: confirmed_names(address, ...), DNSLists.listing(address, ...).
# Uses:  sections 1 and 3 (ReusedThreads, Cache).


def resolve_addresses(name):
    """The addresses of ``name`` (a set of str), from the system's
    resolver (so /etc/hosts and nsswitch apply); empty if none."""
    try:
        return set(unmapped(info[4][0]) for info in socket.getaddrinfo(
            name, None, 0, socket.SOCK_STREAM))
    except (OSError, UnicodeError):
        return set()


class LookupThreads(ReusedThreads):
    """The threads that make the system resolver's calls for
    confirmed_names() and the DNS lists (``lookup_threads``, through
    _lookups_within()): one that has had nothing to do for
    ``idle_time`` seconds (1) ends.  At most ``limit`` (100) at once,
    those stuck in a resolver that does not answer included: past it, a
    lookup is not made (as if it had timed out), and that is logged (at
    most once a minute).

    A lookup made for an owner (``submit(job, owner, kind)``: a client's
    network, lookup_owner(), for its names; a DNS list's zone for the
    list's queries, which a client cannot slow) may take a thread only
    while that owner holds fewer than ``share`` (10) of them, and the
    last ``reserve`` (20) only if it holds none, so that clients whose
    reverse zone never answers, or a list that is down, cannot take
    every thread from the others: past it, that owner's lookups fail at
    once, logged at most once a minute.  A
    network whose lookup timed out (``timed_out(owner)``) is
    ``silent(owner)`` for ``silent_time`` seconds (60), so that its next
    sessions need not take a thread each to learn the same (at most
    ``silent_size`` networks are remembered)."""

    limit = 100
    idle_time = 1
    share = 10
    reserve = 20
    silent_time = 60
    silent_size = 10000

    def __init__(self, name="lookup"):
        ReusedThreads.__init__(self, name)
        self._held = {}             # owner -> threads busy for it
        self._silent = Cache(self.silent_size)  # owner -> silent until

    def submit(self, job, owner=None, kind="client network"):
        """Run ``job()`` in a thread; False (logged) if none may take it:
        all busy, or ``owner`` (a ``kind``, as the log names it) holds
        its share."""
        if owner is not None:
            with self._lock:
                held = self._held.get(owner, 0)
                # The last ``reserve`` threads are for networks that
                # hold none: many networks that each hang leave them.
                refused = held >= self.share or held and (
                    self.limit is not None and
                    self.count - self.idle >= self.limit - self.reserve)
                if not refused:
                    self._held[owner] = held + 1
            if refused:
                log_every("lookup threads: a share held", 60,
                          logging.WARNING, "lookup threads: %s %s holds %d "
                          "(its share: %d, and only those holding none "
                          "take the last %d); its lookups fail at once "
                          "until one is free (a zone that never answers?)",
                          kind, log_escape(owner), held, self.share,
                          self.reserve)
                return False
            unowned = job

            def job():
                try:
                    unowned()
                finally:
                    self._release(owner)
        try:
            submitted = ReusedThreads.submit(self, job)
        except BaseException:
            if owner is not None:
                self._release(owner)
            raise
        if not submitted:
            if owner is not None:
                self._release(owner)
            log_every("lookup threads: all busy", 60, logging.ERROR,
                      "lookup threads: all %d busy (a resolver that does "
                      "not answer?); lookups fail until one is free "
                      "(logged at most once a minute)", self.limit)
        return submitted

    def _release(self, owner):
        with self._lock:
            held = self._held.pop(owner) - 1
            if held:
                self._held[owner] = held

    def held(self, owner):
        """The threads busy for ``owner`` now."""
        with self._lock:
            return self._held.get(owner, 0)

    def timed_out(self, owner):
        """A lookup for ``owner`` got no answer in time."""
        self._silent.put(owner, time.monotonic() + self.silent_time)

    def silent(self, owner):
        """True while a timeout of ``owner``'s lookups is recent."""
        until = self._silent.get(owner)
        return until is not None and until > time.monotonic()

    def forget_timeouts(self):
        """No network is silent any more (tests)."""
        self._silent.reset()


def lookup_owner(address):
    """Whose lookups a lookup for ``address`` counts as (LookupThreads'
    share): its /24, or its /48 for IPv6 (the reverse zones of a site:
    one client's addresses are many /64s)."""
    return network_key(address, 24, 48)


lookup_threads = LookupThreads()


def _lookups_within(jobs, seconds):
    """Run each ``(job, owner, kind)`` of ``jobs`` in a lookup thread
    (LookupThreads.submit()), all at once, and wait until each has
    finished or none has made progress for ``seconds`` (0 or None: no
    limit): the system's resolver has no timeout of its own that a
    caller can set, and a lookup goes on in its thread until the
    resolver gives up.  ``job(progress)`` returns its answer; after each
    lookup but its last it may call ``progress(partial)``, so that the
    next lookup has ``seconds`` of its own and a late job still gives
    what it learnt.  A job that raises (a resolver's failure) answers
    None.  Returns, per job in order, ``(state, answer)``: ("answered",
    its answer), ("late", its last ``partial`` or None), or ("refused",
    None) when no thread might take it (LookupThreads logs why)."""
    condition = threading.Condition(threading.Lock())
    results = [None] * len(jobs)
    partial = [None] * len(jobs)
    moved = [time.monotonic()]          # the last progress, or the start

    def run(index, job):
        def progress(value):
            with condition:
                partial[index] = value
                moved[0] = time.monotonic()
        try:
            answer = job(progress)
        except Exception:               # a resolver's failure: none
            answer = None
        with condition:
            results[index] = ("answered", answer)
            condition.notify()

    for index, (job, owner, kind) in enumerate(jobs):
        if not lookup_threads.submit(functools.partial(run, index, job),
                                     owner, kind):
            with condition:
                results[index] = ("refused", None)
    with condition:
        while None in results:
            if not seconds:
                condition.wait()
                continue
            left = moved[0] + seconds - time.monotonic()
            if left <= 0:
                break
            condition.wait(left)
        return [result or ("late", partial[index])
                for index, result in enumerate(results)]


def confirmed_names(address, reverse_lookup, forward_lookup, tries,
                    seconds, why=None):
    """FCrDNS of ``address``: ``(answered, reverse names, confirmed
    name)``.  ``reverse_lookup(address)`` gives its names (those a mail
    server takes: a PTR record can hold any octets, or an address to pass
    for another client); ``forward_lookup(name)`` is tried on the first
    ``tries`` of them until one gives ``address`` back, which is then the
    confirmed name (lower case, no final dot).  Each lookup within
    ``seconds`` (0 or None: no limit); one that takes longer ends the
    search (``answered`` is False if it was the reverse one).  If
    ``answered`` is False and ``why`` is a list, the reason is appended
    to it: "late" (no answer in time), "refused" (no lookup thread might
    take it) or "silent" (not asked, below).

    All of it is one job of a lookup thread, which the caller waits for
    once: two lookups that answer at once cost one hand-over between
    threads each way, not two.  The job counts against the share of the
    address's network (lookup_owner()); a network whose lookup timed out
    lately is not asked (LookupThreads.silent()): no answer."""
    owner = lookup_owner(address)
    if lookup_threads.silent(owner):
        if why is not None:
            why.append("silent")
        return False, [], None

    def job(progress):
        try:
            names = [name for name in reverse_lookup(address) or ()
                     if _host_name(name)]
        except Exception:                   # a resolver's failure: none
            names = []
        for name in names[:tries]:
            progress((names, None))
            try:
                addresses = forward_lookup(name)
            except Exception:
                addresses = None
            if address in (addresses or ()):
                return names, name.lower().rstrip(".")
        return names, None

    [(state, answer)] = _lookups_within([(job, owner, "client network")],
                                        seconds)
    if state == "answered":
        names, confirmed = answer or ([], None)
        return True, names, confirmed
    if state == "late":
        lookup_threads.timed_out(owner)
    if answer is None:
        if why is not None:
            why.append(state)
        return False, [], None
    return True, list(answer[0]), None


_HOST_NAME_RE = re.compile(
    r"[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*\.?\Z")


def _host_name(name):
    """True for a host name of letters, digits, "-" and "_" (labels of
    63 octets at most, 255 in all) that is not an address."""
    if len(name) > 255 or not _HOST_NAME_RE.match(name):
        return False
    try:
        ipaddress.ip_address(name.rstrip("."))
    except ValueError:
        return True
    return False


def dns_list_query(address, zone):
    """The name asked of a DNSBL or DNSWL ``zone`` for ``address``: the
    IPv4 octets reversed, or the IPv6 nibbles reversed, under it."""
    address = ipaddress.ip_address(unmapped(address))
    if address.version == 4:
        labels = str(address).split(".")[::-1]
    else:
        labels = address.exploded.replace(":", "")[::-1]
    return "%s.%s" % (".".join(labels), zone.strip(".").lower())


def parse_dns_list(entry):
    """A ``dnsbl`` or ``dnswl`` entry, in Postfix's syntax
    (reject_rbl_client, permit_dnswl_client): ``zone`` or
    ``zone=d.d.d.d``, the filter of the answers that list, each ``d`` a
    number, or ``[...]`` of numbers and ranges ``n..m`` separated by
    ``;`` (``127.0.[0..255].[1..3]``, ``127.0.0.[2;4;9..11]``).  Returns
    ``(zone, filter)``: the zone in lower case without a final dot, the
    filter a tuple of four tuples of (low, high) octets, or None if none
    is written.  ValueError says what is wrong."""
    zone, equals, written = entry.partition("=")
    zone = zone.strip().lower().rstrip(".")
    if not _DOMAIN_NAME_RE.match(zone) or "." not in zone:
        raise ValueError("expected a DNS list's zone such as "
                         "zen.spamhaus.org, got %r" % entry)
    if not equals:
        return zone, None
    example = ("such as %s=127.0.0.2 or %s=127.0.[0..255].[1..3]"
               % (zone, zone))
    if "*" in written:
        raise ValueError("%r: a weight (*n) is postscreen's; write the "
                         "answers alone, %s" % (entry, example))
    octets = re.findall(r"\[[^\]]*\]|[^.\[\]]+", written.strip())
    if len(octets) != 4 or ".".join(octets) != written.strip():
        raise ValueError("%r: expected four octets after '=', %s"
                         % (entry, example))
    parsed = []
    for octet in octets:
        if octet.startswith("[") and octet.endswith("]"):
            parts = octet[1:-1].split(";")
        else:
            parts = [octet]
        ranges = []
        for part in parts:
            low, dots, high = part.partition("..")
            if not dots:
                high = low
            if not (re.match(r"\A[0-9]{1,3}\Z", low)
                    and re.match(r"\A[0-9]{1,3}\Z", high)
                    and int(low) <= int(high) <= 255):
                raise ValueError("%r: %r is no octet, [n..m] range or "
                                 "[a;b] list of them, %s"
                                 % (entry, octet, example))
            ranges.append((int(low), int(high)))
        parsed.append(tuple(ranges))
    return zone, tuple(parsed)


def dns_list_zone(entry):
    """The zone of a ``dnsbl`` or ``dnswl`` entry, as rules name it."""
    return entry.partition("=")[0].strip().lower().rstrip(".")


def _answer_matches(address_filter, address):
    try:
        octets = [int(octet) for octet in address.split(".")]
    except ValueError:
        return False
    return len(octets) == 4 and all(
        any(low <= octet <= high for low, high in ranges)
        for octet, ranges in zip(octets, address_filter))


# What the answers of a zone mean when its entry writes no filter, by
# zone suffix: (the answers that list, those that say our queries are
# refused).  dnswl.org: 127.0.X.1 to 3 are its trust levels (low,
# medium, high), 127.0.X.0 is "none", 127.0.0.255 "query blocked"
# (public resolvers, sites over the free limit).  Spamhaus: 127.0.0.2 to
# 11 list; 127.255.255.252 to 255 refuse (a bad DQS key, a public
# resolver, too many queries).  Other zones: any answer in 127.0.0.0/8
# lists (Postfix's rule), but for Spamhaus's refusals, which other lists
# copy.
DNS_LIST_ANSWERS = (
    ("list.dnswl.org", "127.0.[0..255].[1..3]", "127.0.[0..255].255"),
    ("spamhaus.org", "127.0.0.[2..255]", "127.255.255.[252..255]"),
    ("spamhaus.net", "127.0.0.[2..255]", "127.255.255.[252..255]"),
    ("", "127.[0..255].[0..255].[0..255]", "127.255.255.[252..255]"),
)


def _dns_list_defaults(zone):
    """The row of DNS_LIST_ANSWERS for ``zone`` (its suffix "": none
    known)."""
    for row in DNS_LIST_ANSWERS:
        if zone == row[0] or zone.endswith("." + row[0]) or not row[0]:
            return row


@functools.lru_cache(maxsize=256)
@functools.lru_cache(maxsize=256)
def _dns_list_rules(entry):
    """``(zone, answers that list, answers that refuse)`` of an entry:
    read once per entry, not at every answer."""
    zone, written = parse_dns_list(entry)
    _, listing, refusing = _dns_list_defaults(zone)
    return (zone, written or parse_dns_list("x.x=" + listing)[1],
            parse_dns_list("x.x=" + refusing)[1])


def dns_list_answer(entry, answers):
    """What the addresses ``answers`` of a DNS list's ``entry`` (a
    ``dnsbl`` or ``dnswl`` item, see parse_dns_list()) say:
    ``(listed, refusal)``.  ``listed`` is True if one is accepted by the
    entry's filter, or, for an entry without one, by the zone's
    (DNS_LIST_ANSWERS).  ``refusal`` is the first answer that is not a
    listing but an error, or None: one that refuses our queries (dnswl's
    127.0.0.255, Spamhaus's 127.255.255.254), or one outside
    127.0.0.0/8, which no list gives (a resolver that makes up answers
    for names that do not exist).  An error never lists, whatever the
    filter: a list that refuses our queries must not whitelist every
    client, nor greylist them as listed."""
    zone, listing, refusing = _dns_list_rules(entry)
    listed, refusal = False, None
    for address in sorted(answers):
        if (not address.startswith("127.")
                or _answer_matches(refusing, address)):
            refusal = refusal or address
        elif _answer_matches(listing, address):
            listed = True
    return listed and refusal is None, refusal


class DNSListing(set):
    """The entries of the DNS lists that list a client (a set), and, as
    ``unasked``, a frozenset of those that could not be asked: no lookup
    thread was free for them.  Such a list lists nobody, but a dnsbl
    that was not asked must not let its clients pass as if asked
    (Greylister.decide())."""

    def __init__(self, listed=(), unasked=()):
        set.__init__(self, listed)
        self.unasked = frozenset(unasked)


class DNSLists(object):
    """DNSBL and DNSWL lookups through the system's resolver: each a job
    of the lookup threads (``lookup_threads``, counted for the list's
    zone: its slowness is the list's, and a client that holds its
    network's share must not leave the lists unasked), with a deadline,
    all of one client at once, the answers cached for
    ``dns_cache_time``, at most ``cache_size`` (10000) of them, the least
    recently used going first.  ``listing(address, entries, resolve,
    timeout, cache_time)`` is the DNSListing of the entries that list it
    (dns_list_answer()) and of those not asked.  Timeouts, refusals,
    errors and lists not asked are logged at most once per zone and
    ``log_interval`` (600 s)."""

    cache_size = 10000
    log_interval = 600

    def __init__(self):
        self._cache = Cache(self.cache_size)

    def listing(self, address, entries, resolve, timeout, cache_time):
        if not entries:
            return DNSListing()
        try:
            queries = dict((entry, dns_list_query(address,
                                                  dns_list_zone(entry)))
                           for entry in entries)
        except ValueError:
            return DNSListing()             # no address: nothing to ask
        zones = dict((query, dns_list_zone(entry))
                     for entry, query in queries.items())
        now = time.monotonic()
        answers = {}
        for query in set(queries.values()):
            cached = self._cache.get(query)
            if cached is not None and cached[0] > now:
                answers[query] = cached[1]
        asking = sorted(set(queries.values()) - set(answers))

        def job(query):
            return lambda progress: frozenset(resolve(query) or ())
        # Each counted as its zone's: busy threads or the zone's share
        # used, not asked, not listed, nothing kept (LookupThreads logs
        # it); a resolver's failure is no answer.
        states = _lookups_within([(job(query), zones[query], "DNS list")
                                  for query in asking], timeout)
        results = dict((query, answer or frozenset())
                       for query, (state, answer) in zip(asking, states)
                       if state == "answered")
        asked = [query for query, (state, _) in zip(asking, states)
                 if state != "refused"]
        unasked = set(asking) - set(asked)
        for query in sorted(unasked):
            self._log(zones[query], "unasked", "lookup of %s not asked: no "
                      "lookup thread free (the lookup threads' warning says "
                      "why); meanwhile a client it would list is not "
                      "whitelisted by it (dnswl), nor passed by the "
                      "auto-whitelist (dnsbl): it is greylisted" % query)
        for query in asked:
            zone = zones[query]
            if query not in results:
                self._log(zone, "timeout", "lookup of %s timed out after "
                          "%s s: not listed" % (query, _seconds(timeout)))
                # Not asked again for a minute: a list that is down must
                # not hold every session for its timeout.
                self._cache.put(query, (now + min(60, cache_time),
                                        frozenset()))
                continue
            answers[query] = results[query]
            self._cache.put(query, (now + cache_time, results[query]))
        listed = set()
        for entry, query in queries.items():
            found, refusal = dns_list_answer(entry, answers.get(query, ()))
            if query in asking:
                metrics.add("smtpproxy_dns_list_lookups_total",
                            "unasked" if query in unasked
                            else "timeout" if query not in results
                            else "error" if refusal is not None
                            else "listed" if found else "not_listed")
            if found:
                listed.add(entry)
            if refusal is not None:
                self._log(dns_list_zone(entry), "refusal",
                          "it answered %s, which is no listing: it "
                          "refuses our queries (a public resolver, or "
                          "over its free limit?) or the resolver made "
                          "the answer up; every client counts as not "
                          "listed on it until it answers again; use a "
                          "resolver of your own" % refusal, logging.ERROR)
        return DNSListing(listed, [entry for entry, query in queries.items()
                                   if query in unasked])

    def __len__(self):
        """The answers kept now."""
        return len(self._cache)

    def _log(self, zone, what, message, level=logging.WARNING):
        """Logged at most once per ``log_interval`` per zone and what."""
        log_every(("DNS list", zone, what), self.log_interval, level,
                  "DNS list %s: %s", zone, log_escape(message))

    def reset(self):
        self._cache.reset()


dns_lists = DNSLists()              # DNSBL and DNSWL answers


# Dynamic words of generic host names (access networks, pools), each
# followed by digits: "dsl-12", "pool123", "dyn.4".
_DYNAMIC_WORDS = ("dyn", "dynamic", "dhcp", "dsl", "adsl", "vdsl", "xdsl",
                  "pool", "ppp", "pppoe", "cable", "cpe", "dialup", "dial",
                  "broadband", "client", "host", "ip", "static", "cust",
                  "customer", "user", "res", "mobile", "wireless", "nat",
                  "ftth", "fttx")


_DYNAMIC_RE = re.compile(r"(?:^|[^a-z])(?:%s)[-_.]?[0-9]"
                         % "|".join(_DYNAMIC_WORDS))


@functools.lru_cache(maxsize=1024)
def generic_name(name, address):
    """True if host ``name`` looks given to an address, not to a mail
    server: it holds the address's octets in a common form (1-2-3-4,
    1.2.3.4 or 4.3.2.1, with - . _ or nothing between them, zero-padded,
    in hex), or a dynamic word followed by digits."""
    name = name.lower().rstrip(".")
    if _DYNAMIC_RE.search(name):
        return True
    try:
        address = ipaddress.ip_address(unmapped(address))
    except ValueError:
        return False
    if address.version == 6:
        # The interface identifier's hex, or a long run of hex digits.
        return bool(re.search(r"[0-9a-f]{12,}", name.replace("-", "")))
    octets = str(address).split(".")
    forms = set()
    for order in (octets, octets[::-1]):
        for separator in ("-", ".", "_", ""):
            forms.add(separator.join(order))
            forms.add(separator.join(octet.zfill(3) for octet in order))
    forms.add("%08x" % int(address))
    flat = re.sub(r"[^0-9a-f._-]", " ", name)
    # One search for all the forms (longest first: "001" before "1").
    return bool(re.search(r"(?:^|[^0-9])(?:%s)(?:[^0-9]|$)" % "|".join(
        re.escape(form) for form in sorted(forms, key=len, reverse=True)),
        flat))


# Suffixes under which registrations are made (a small list of those that
# matter for mail): a key is never one of them alone, nor shorter than a
# name registered under them.  Single labels (com, de, ...) are suffixes
# anyway.
PUBLIC_SUFFIXES = frozenset("""
    co.uk org.uk ac.uk gov.uk ltd.uk plc.uk me.uk net.uk sch.uk nhs.uk
    com.au net.au org.au edu.au gov.au asn.au id.au
    co.nz net.nz org.nz ac.nz govt.nz
    co.jp ne.jp or.jp ac.jp ad.jp ed.jp go.jp gr.jp lg.jp
    co.kr ne.kr or.kr ac.kr go.kr
    com.br net.br org.br gov.br edu.br
    com.cn net.cn org.cn gov.cn edu.cn ac.cn
    com.tw net.tw org.tw edu.tw idv.tw
    com.hk net.hk org.hk edu.hk
    co.in net.in org.in firm.in gen.in ind.in ac.in
    co.za org.za net.za ac.za gov.za
    com.mx net.mx org.mx gob.mx edu.mx
    com.ar net.ar org.ar gob.ar
    com.tr net.tr org.tr gov.tr
    com.sg net.sg org.sg edu.sg
    co.il org.il net.il ac.il
    com.ua net.ua org.ua
    com.pl net.pl org.pl
    co.id or.id ac.id web.id
    com.my net.my org.my
    co.th or.th ac.th in.th
    com.ru net.ru org.ru
""".split())


def registrable_domain(name):
    """The name registered under a public suffix that ``name`` belongs
    to (mx.example.co.uk: example.co.uk), or None if it has none
    (localhost, co.uk)."""
    labels = name.lower().rstrip(".").split(".")
    size = 3 if ".".join(labels[-2:]) in PUBLIC_SUFFIXES else 2
    if len(labels) < size:
        return None
    return ".".join(labels[-size:])


def name_key(name):
    """The client part of a greylisting key for a forward-confirmed host
    name: the name minus its first label (mx-a1.out.example.com and
    mx-b7.out.example.com share out.example.com), never shorter than its
    registrable domain; None for a name that has none."""
    registrable = registrable_domain(name)
    if registrable is None:
        return None
    name = name.lower().rstrip(".")
    parent = name.split(".", 1)[1] if "." in name else name
    if len(parent) < len(registrable):
        return registrable
    return parent


# ===========================================================================
# == 8. Greylisting: the engine and its handler ==
# ===========================================================================
#
# Owns:  the rules in their order (Greylister, pure but for its store), the
#        Decision, the one rule that says whether a domain is ours
#        (_domain_key), the store's keys (network_key, normalise_sender;
#        hashed with hash_keys: key_hash, key_secret), the bound on new
#        triplets (NewTriplets), and GreyListingPolicy.
# Enter: Greylister(settings).decide(client, sender, recipient, now).
# Uses:  sections 1, 3, 7; the stores of sections 9 to 11 (through stores);
#        section 16's read_key_secret (a policy used without the service).


class Decision(object):
    """What the greylisting engine decided for one recipient.

    ``verdict``: "relay" (the client may send anywhere), "accept",
    "refuse" (not a recipient of ours), "defer", or "unavailable" (the
    store could not be opened: out of descriptors).  ``rule``: what
    decided, such as "allowed_senders", "not-local",
    "whitelisted_triples", "whitelist_clients", "auto-whitelist",
    "network:192.0.2.0/24", "store-failed", "greytrap:hit ..." (a RCPT
    to a greytrap) or "greytrap:trapped ..." (a trapped client).
    ``key``: the triplet's key, when the store was asked (the client's
    key, for the auto-whitelist and greytraps); ``delay``: how long
    greylisting held the triplet back, on the try that passed;
    ``error``: the store's error, when it failed; ``added``: True when
    the triplet was new and its row was added to the store (a deferral
    past a bound of new triplets, rule "max_new_triplets_per_session"
    or "max_new_triplets_per_network", added none); ``wait``: for a
    triplet deferred on an early retry, the seconds left until a retry
    can pass (None: min_defer_time, the clock starting now).
    """

    __slots__ = ("verdict", "rule", "key", "delay", "error", "added",
                 "wait")

    def __init__(self, verdict, rule, key=None, delay=None, error=None,
                 added=False, wait=None):
        self.verdict = verdict
        self.rule = rule
        self.key = key
        self.delay = delay
        self.error = error
        self.added = added
        self.wait = wait

    @property
    def accepted(self):
        return self.verdict in ("relay", "accept")

    def __repr__(self):
        return "Decision(%r, %r, %r)" % (self.verdict, self.rule, self.key)


def _domain_key(domain):
    """A domain as compared, by the rule the upstream applies to the
    address that is forwarded as it was written: ASCII letters in lower
    case (RFC 5321 section 2.4), no final dot, and nothing else mapped.
    A name with U-labels (SMTPUTF8) is itself: not folded by IDNA 2003's
    nameprep (which read class.org written in fullwidth letters, U+FF43
    ..., as class.org, dropped a soft hyphen, U+00AD, and made sharp s,
    U+00DF, "ss"), nor by Unicode case or NFC, so
    it is ours only if listed exactly so; an A-label (xn--...) matches
    only an A-label."""
    return domain.translate(_ASCII_LOWER).rstrip(".")


@functools.lru_cache(maxsize=64)
def _domain_keys(domains):
    """The _domain_key() of each of ``domains`` (a tuple), as a set: a
    configuration's domains are compared once, not at every RCPT."""
    return frozenset(_domain_key(domain) for domain in domains)


_ASCII_LOWER = dict((code, code + 32) for code in range(ord("A"),
                                                        ord("Z") + 1))


def _recipient_key(recipient):
    """A recipient as whitelists and greylisting keys compare it: the
    local-part in lower case, the domain by _domain_key()'s rule, so that
    no two domains the relay check tells apart are one here."""
    local, at, domain = recipient.rpartition("@")
    if not at:
        return recipient.lower()
    return local.lower() + at + _domain_key(domain)


# Pure functions of a client's address and name that the greylisting of
# each RCPT asks: their last answers are kept (functools.lru_cache).
@functools.lru_cache(maxsize=1024)
def network_key(address, ipv4_prefix, ipv6_prefix):
    """The network of ``address`` (text) of ``ipv4_prefix`` or
    ``ipv6_prefix`` bits, as the greylisting keys write it: 192.0.2.0/24;
    ``address`` itself if it is no address."""
    try:
        address = ipaddress.ip_address(unmapped(address))
    except ValueError:
        return address
    bits = ipv4_prefix if address.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network("%s/%d" % (address, bits),
                                    strict=False))


def _network_or_none(text):
    try:
        if "/" in text:
            return ipaddress.ip_network(text, strict=False)
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def parse_store_key(text, ipv4_prefix=24, ipv6_prefix=64, network=False):
    """A key of the greylisting store as an administrator writes it, in
    the form the proxy makes it: ``client sender recipient``, the client
    an address or network (made the network of ``ipv4_prefix`` or
    ``ipv6_prefix`` bits), the addresses with or without angle brackets
    (``<>`` the null sender), the sender normalised, or either as the
    key_hash() that --db-list shows (hash_keys: hash_store_key() hashes
    the others); with ``network``, a client network alone is a key too.
    ValueError says what is wrong, with an example."""
    example = ("such as '192.0.2.7 sender@example.net user@example.org' "
               "(an address becomes its network, 192.0.2.0/24)")
    words = text.split()
    if network and len(words) == 1 and _network_or_none(words[0]):
        client = words[0]
        return network_key(client.split("/")[0], ipv4_prefix, ipv6_prefix)
    if len(words) != 3:
        raise ValueError("expected three words, client sender recipient, "
                         + example)
    client, sender, recipient = words
    if not _network_or_none(client):
        if _host_name(client) and not client.replace(".", "").isdigit():
            client = client.lower().rstrip(".")     # a name key
        else:
            raise ValueError("%r is no client address, network or name: "
                             "a key is %s" % (client, example))
    elif "/" in client:
        address, bits = client.split("/")
        wanted = ipv6_prefix if ":" in address else ipv4_prefix
        if int(bits) != wanted:
            raise ValueError("%s: the store's keys hold /%d networks, as "
                             "ipv4_prefix and ipv6_prefix say" % (client,
                                                                  wanted))
        client = address
    addresses = []
    for word, what in ((sender, "sender"), (recipient, "recipient")):
        if word.startswith("<") and word.endswith(">"):
            word = word[1:-1]
        if word and (word.count("@") < 1 or re.search(r"[\x00-\x20]",
                                                       word)):
            if not (what == "recipient" and word.lower() == "postmaster"
                    or is_key_hash(word)):
                raise ValueError("%r is no %s address: a key is %s"
                                 % (word, what, example))
        if what == "recipient" and not word:
            raise ValueError("the recipient cannot be empty: a key is %s"
                             % example)
        addresses.append(word)
    if _network_or_none(client):
        client = network_key(client, ipv4_prefix, ipv6_prefix)
    return " ".join([client, normalise_sender(addresses[0]),
                     _recipient_key(addresses[1])])


_BATV_RE = re.compile(r"\Aprvs=[0-9a-z]+=(.+)\Z", re.I)


# A BATV tag-val (RFC draft-levine-smtp-batv: K DDD SSSSSS, ten
# characters), as postgrey 1.37 tells it from a local-part.
_BATV_TAG_RE = re.compile(r"\A[0-9a-z]{10}")


def _batv_user(local):
    """The local-part of a BATV ``prvs=`` sender without its tag, as
    postgrey 1.37 finds it: ``prvs=TAG=user`` is the standard, but some
    senders write ``prvs=user=TAG``; of the two, the one that does not
    begin with ten letters or digits is the user (both or neither: the
    standard's).  ``local`` is in lower case."""
    parts = local.split("=")
    if len(parts) == 3:
        if _BATV_TAG_RE.match(parts[2]) and \
                not _BATV_TAG_RE.match(parts[1]):
            return parts[1]
        return parts[2]
    match = _BATV_RE.match(local)
    return match.group(1) if match else local


# SRS0=HHH=TT=domain=local@forwarder, SRS1=HHH=fwd==HHH=TT=domain=local@...
_SRS_RE = re.compile(r"\Asrs[01][=+-].*=([^=]+)=([^=@]+)@", re.I)


def normalise_sender(sender):
    """The sender as a greylisting key: one sender counts as one sender
    whatever its tags.  Lower case; BATV ``prvs=TAG=`` (and
    ``prvs=user=TAG``, as postgrey: _batv_user()), SRS
    (``SRS0=HH=TT=domain=local@forwarder`` is ``local@domain``), the
    ``+extension`` removed and runs of digits made "#" (postgrey, every
    run that is a word of its own: two senders postgrey keys as one are
    one here too)."""
    sender = sender.lower()
    match = _SRS_RE.match(sender)
    if match:
        sender = "%s@%s" % (match.group(2), match.group(1))
    local, at, domain = sender.rpartition("@")
    if not at:
        return sender
    if local.startswith("prvs="):
        local = _batv_user(local)
    local = local.split("+", 1)[0]
    local = re.sub(r"[0-9]+", "#", local)
    return "%s@%s" % (local, domain)


# A part of a triplet key that is a keyed hash (hash_keys), not an
# address: no address is written so (a clear part holds "@", or is "" or
# the bare Postmaster), and a hashed key is told from a clear one by it.
KEY_HASH_PREFIX = "hmac:"


_KEY_HASH_RE = re.compile(r"\Ahmac:[a-z2-7]{26}\Z")


def key_hash(secret, text):
    """The keyed hash that stands for ``text`` (a normalised sender, a
    recipient key) in the store when ``hash_keys`` is set: HMAC-SHA256
    with the site's ``secret`` (bytes), its first 128 bits in base32,
    lower case, behind KEY_HASH_PREFIX ("hmac:" and 26 letters and
    digits).  A hash without a secret (postgrey's --privacy, SHA1) is
    undone by hashing a dictionary of common addresses; this one only by
    whoever holds the secret.  Hosts with the same secret make the same
    keys."""
    digest = hmac.new(secret, text.encode("utf-8", "surrogatepass"),
                      hashlib.sha256).digest()
    return KEY_HASH_PREFIX + base64.b32encode(
        digest[:16]).decode("ascii").rstrip("=").lower()


def is_key_hash(text):
    """True if ``text`` is a part of a key made by key_hash()."""
    return bool(_KEY_HASH_RE.match(text))


def hash_store_key(key, secret):
    """The triplet ``key`` with its sender and recipient parts made
    key_hash()es with ``secret``; parts already hashed are left, and so is
    a key that is no triplet (a client network).  A clear key is
    ``client sender recipient``: the client has no space, the recipient
    is taken to have none (a recipient of ours; a quoted local-part with
    a space would be hashed as two parts, and its pass lost), the sender
    is what lies between (a quoted local-part may hold a space)."""
    client, _, rest = key.partition(" ")
    sender, space, recipient = rest.rpartition(" ")
    if not space:
        return key
    parts = [part if is_key_hash(part) else key_hash(secret, part)
             for part in (sender, recipient)]
    return " ".join([client] + parts)


class NewTriplets(object):
    """How many triplets each client network added to the store in its
    current hour, for max_new_triplets_per_network: a flood from one
    network grows the store by at most that many rows an hour (per
    process; with ``workers``, per worker).

    A network's hour starts with the first triplet it adds.  At most
    ``max_networks`` networks are kept (a few hundred octets each):
    adding one more first drops those whose hour is over, then, if need
    be, the one whose hour started first; a client that holds more
    networks than that is not bounded per network anyway.  The time is
    the decisions' ``now`` (tests drive it).  A bound is asked before the
    store's decision and counted after it: decisions of one network in
    flight at once (its sessions, max_connections_per_ip) may pass it by
    as many."""

    window = 3600
    max_networks = 10000

    def __init__(self):
        self._lock = threading.Lock()
        # network -> [hour's start, triplets added, refusal logged], in
        # the order the hours started.
        self._networks = collections.OrderedDict()

    def _current(self, network, now):
        """The network's entry, if its hour is not over (with the lock)."""
        entry = self._networks.get(network)
        if entry is not None and not 0 <= now - entry[0] < self.window:
            del self._networks[network]
            entry = None
        return entry

    def allows(self, network, now, limit):
        """True if ``network`` added fewer than ``limit`` triplets (0: no
        limit) in its current hour."""
        if not limit:
            return True
        with self._lock:
            entry = self._current(network, now)
            return entry is None or entry[1] < limit

    def added(self, network, now):
        """``network`` added a triplet at ``now``."""
        with self._lock:
            entry = self._current(network, now)
            if entry is None:
                networks = self._networks
                while networks and (
                        len(networks) >= self.max_networks
                        or not 0 <= now - next(iter(networks.values()))[0]
                        < self.window):
                    networks.popitem(last=False)
                entry = networks[network] = [now, 0, False]
            entry[1] += 1

    def refused(self, network, now, limit):
        """A new triplet of ``network`` was deferred past ``limit``:
        logged once per network and hour."""
        with self._lock:
            entry = self._current(network, now)
            if entry is None or entry[2]:
                return
            entry[2] = True
        log.warning("client network %s: %d new triplets within an hour "
                    "(max_new_triplets_per_network); further new ones are "
                    "deferred without a row until %s", log_escape(network),
                    limit, time.strftime("%H:%M:%S", time.localtime(
                        entry[0] + self.window)))

    def __len__(self):
        return len(self._networks)

    def reset(self):
        with self._lock:
            self._networks.clear()


new_triplets = NewTriplets()        # per client network, for the store


key_secrets = Cache()               # hash_keys' secrets read, by file


def key_secret(settings):
    """The secret of ``settings.hash_keys`` (bytes): the one
    check_hash_keys() read for this configuration at the start or the
    reload (as root, before the privilege drop), else the one read
    before from that file, else read now (read_key_secret(): a policy
    used without the service).  StoreConfigError if it cannot be read:
    no key can be made, as when the store fails."""
    secret = getattr(settings, "_key_secret", None)
    if secret is not None:
        return secret
    path = settings.hash_keys
    secret = key_secrets.get(path)
    if secret is None:
        try:
            secret = read_key_secret(path)
        except (OSError, StartError) as error:
            raise StoreConfigError("hash_keys %s: %s" % (
                path, getattr(error, "strerror", None) or error))
        key_secrets.put(path, secret)
    return secret


def defer_text(reply, wait, recipient):
    """``reply`` (defer_reply) with postgrey's --greylist-text
    placeholders, as postgrey 1.37 replaces them: the first ``%s`` by
    ``wait``, the seconds left until a retry can pass (whole, rounded
    up), then the first ``%r`` by the recipient's domain (what follows
    its last "@"; all of it without one).  Nothing else: a second
    ``%s``, ``%%`` or any other "%" stays as written.  A domain with
    other than printable ASCII is written in A-labels (xn--): a reply's
    text is ASCII (RFC 5321 section 4.2)."""
    reply = reply.replace("%s", str(int(math.ceil(wait))), 1)
    if "%r" not in reply:
        return reply
    domain = recipient.rpartition("@")[2]
    if re.search(r"[^\x21-\x7e]", domain):
        domain = _a_labels(domain)
    return reply.replace("%r", domain, 1)


def x_greylist(delay, servername, rule, now):
    """The X-Greylist: header line of a message that greylisting delayed
    ``delay`` seconds, by ``rule``, at ``now``."""
    return ("X-Greylist: delayed %d seconds by smtpproxy-%s at %s (%s); %s"
            % (delay, __version__, servername, rule,
               time.strftime("%a, %d %b %Y %H:%M:%S +0000",
                             time.gmtime(now))))


def log_store_failure(settings, error, shortage):
    """Log a store's failure once per incident (first_of_incident): what
    decisions fall back to (``settings.greylist_fail_mode``), or, for
    ResourceShortage, ``shortage``: what happens instead."""
    if not getattr(error, "first_of_incident", True):
        return
    if isinstance(error, ResourceShortage):
        log.error("%s; %s", log_escape(error), shortage)
    else:
        log.error("greylisting store %s: %s; decisions fall back to %s",
                  log_escape(redact_uri(settings.greylist_db)),
                  log_escape(error), settings.greylist_fail_mode)


class Greylister(object):
    """The greylisting decisions, free of any socket.

    ``decide(client, sender, recipient, now)`` answers for one recipient,
    in the order GreyListingPolicy's docstring gives: allow-lists, our
    domains, the administrator's whitelists, DNSWL, the client's key
    (name or network), DNSBL, greytraps, the auto-whitelist,
    suspicious-only, the store's timings, and the fail mode if the store
    fails.

    ``settings`` is anything whose attributes are the configuration keys:
    a GreyListingPolicy (class or instance), so that
    ``class Ours(GreyListingPolicy): min_defer_time = 3600`` configures
    this engine too.  The stores are shared by the process (``stores``).
    Methods that may be overridden: the rules, ``client_may_relay``,
    ``is_local_recipient``, ``recipient_is_whitelisted``,
    ``recipient_is_trap``, ``spring_trap``,
    ``is_whitelisted``, ``client_is_whitelisted``, ``dns_listing``,
    ``client_identity``, ``suspicion``, ``client_network``,
    ``triplet_key``, ``new_triplet_bound``, ``flood_network``;
    ``hashed(text)`` is what the store holds for an address with
    ``hash_keys`` (for whatever else keeps addresses in the store).

    ``recipient_rule``, if given, is a callable (recipient -> bool) that
    says which recipients are greylisted, in place of
    ``is_local_recipient`` (the others are refused, rule "not-local"):
    the policy service passes its PolicyHandler.greylisted_recipient,
    since there Postfix did the relay control (a subclass that overrides
    ``__init__`` takes it too).
    """

    def __init__(self, settings, recipient_rule=None):
        self.settings = settings
        self.recipient_rule = recipient_rule

    def decide(self, client, sender, recipient, now, helo=None,
               hostname=None, resolve=None, session_added=None):
        """The Decision for ``recipient`` of a message from ``sender``
        ("" for the null sender) sent by the client at address
        ``client``, at ``now``.  ``helo`` is its HELO name; ``hostname``
        its forward-confirmed host name, or a callable that looks it up
        (called only if a rule needs it); ``resolve(name)`` the
        addresses of a name, for the DNS lists (the system's resolver by
        default); ``session_added``: how many triplets the client's
        session added so far, for max_new_triplets_per_session (None: no
        session, no such bound).  A ``client`` of UNKNOWN_CLIENT has no
        name either, and is greylisted under that key, never
        auto-whitelisted."""
        settings = self.settings
        unknown = client == UNKNOWN_CLIENT
        if unknown:
            hostname = None
        if self.client_may_relay(client):
            return Decision("relay", "allowed_senders")
        if not (self.recipient_rule or self.is_local_recipient)(recipient):
            return Decision("refuse", "not-local")
        if self.recipient_is_whitelisted(recipient):
            return Decision("accept", "whitelist_recipients")
        if self.is_whitelisted(client, helo, sender, recipient):
            return Decision("accept", "whitelisted_triples")
        if self.client_is_whitelisted(client, hostname):
            return Decision("accept", "whitelist_clients")
        listed = self.dns_listing(client, resolve or resolve_addresses)
        allowed = [entry for entry in settings.dnswl if entry in listed]
        if allowed:
            return Decision("accept", "dnswl:" + dns_list_zone(allowed[0]))
        # A dnsbl that could not be asked (no lookup thread free) counts
        # as a listing for the trust below: whoever holds the lookup
        # threads must not leave his listing unasked and himself trusted.
        unasked = getattr(listed, "unasked", ())
        blocked = (["dnsbl:" + dns_list_zone(entry)
                    for entry in settings.dnsbl if entry in listed]
                   or ["dnsbl-not-asked:" + dns_list_zone(entry)
                       for entry in settings.dnsbl if entry in unasked]
                   or [None])[0]
        name = hostname
        if callable(hostname):
            # Looked up only for the rules that read it: a network key
            # with greylist_clients = all needs no DNS.
            name = hostname() if (settings.client_key == "name" or
                                  settings.greylist_clients ==
                                  "suspicious") else None
        client_key, key_rule = ((UNKNOWN_CLIENT, "unknown-client")
                                if unknown
                                else self.client_identity(client, name))
        key = None
        suspicious = settings.greylist_clients == "suspicious"
        suspicion = (blocked if blocked
                     else self.suspicion(client, name) if suspicious
                     else None)
        rule = key_rule if suspicion is None else "%s %s" % (suspicion,
                                                             key_rule)
        if self.recipient_is_trap(recipient):
            return self.spring_trap(client, client_key, key_rule, recipient,
                                    now)
        asked = time.monotonic()
        try:
            key = self.triplet_key(client_key, sender, recipient)
            store = stores.get(settings)
            with store._budget():       # one greylist_db_timeout for all
                # Before any trust: a trapped client is never whitelisted,
                # nor are its triplets that passed before accepted.
                if settings.greytrap_recipients and \
                        store.client_is_trapped(client_key, now):
                    return Decision("defer", "greytrap:trapped " + key_rule,
                                    client_key)
                # A listed client (or one whose dnsbl was not asked) is
                # always greylisted, trusted or not; one whose address is
                # unknown is never trusted, nor counted.
                if (not blocked and not unknown
                        and store.client_is_trusted(client_key, now)):
                    return Decision("accept", "auto-whitelist " + key_rule,
                                    client_key)
                if suspicious and suspicion is None:
                    return Decision("accept", "not-suspicious " + key_rule)
                network = self.flood_network(client)
                bound = self.new_triplet_bound(network, now, session_added)
                step = store.step(
                    key, now, client=None if unknown else client_key,
                    add=bound is None)
                accepted, delay, new = step
        except ResourceShortage as error:
            # Not the fail mode: out of descriptors is no reason to let
            # mail through.
            return Decision("unavailable", "store", key, error=error)
        except sqlite3.Error as error:
            verdict = ("accept" if settings.greylist_fail_mode
                       == "accept" else "defer")
            return Decision(verdict, "store-failed", key, error=error)
        finally:
            metrics.observe("smtpproxy_store_decision_seconds",
                            time.monotonic() - asked)
        if new and bound is not None:
            if bound == "max_new_triplets_per_network":
                new_triplets.refused(network, now,
                                     settings.max_new_triplets_per_network)
                bound += " " + network
            return Decision("defer", bound, key)
        if new and settings.max_new_triplets_per_network:
            new_triplets.added(network, now)
        return Decision("accept" if accepted else "defer", rule, key, delay,
                        added=new, wait=step.wait)

    def spring_trap(self, client, client_key, key_rule, recipient, now):
        """The Decision for ``recipient``, a greytrap, written to by the
        client at address ``client``, keyed ``client_key`` (by the rule
        ``key_rule``): deferred as greylisting defers (the client cannot
        tell), rule "greytrap:hit ...", and the client key trapped in the
        store for greytrap_time.  Deferred also if the store fails,
        whatever greylist_fail_mode says: a trap is no mailbox."""
        rule = "greytrap:hit " + key_rule
        try:
            stores.get(self.settings).spring_trap(
                client_key, now, self.trap_name(recipient))
        except ResourceShortage as error:
            return Decision("unavailable", "store", client_key, error=error)
        except sqlite3.Error as error:
            return Decision("defer", rule, client_key, error=error)
        log.info("greytrap <%s> sprung by client %s (%s): trapped for %d s",
                 log_escape(recipient), log_escape(client),
                 log_escape(key_rule), self.settings.greytrap_time)
        return Decision("defer", rule, client_key)

    def trap_name(self, recipient):
        """The trap ``recipient`` as the store's traps table holds it: its
        recipient key, hashed() with ``hash_keys``, as the triplets'
        recipients are (no address in the store)."""
        name = _recipient_key(recipient)
        return self.hashed(name) if self.settings.hash_keys else name

    def new_triplet_bound(self, network, now, session_added):
        """None if a new triplet of the client ``network`` (its session
        added ``session_added``, or None) may add a row to the store at
        ``now``; else the bound that forbids it,
        "max_new_triplets_per_session" or "max_new_triplets_per_network"
        (NewTriplets: per hour, per process)."""
        settings = self.settings
        limit = settings.max_new_triplets_per_session
        if limit and session_added is not None and session_added >= limit:
            return "max_new_triplets_per_session"
        if not new_triplets.allows(network, now,
                                   settings.max_new_triplets_per_network):
            return "max_new_triplets_per_network"
        return None

    def flood_network(self, client):
        """The network whose bound of new triplets an hour
        (max_new_triplets_per_network, new_triplet_bound()) a new
        triplet of ``client`` counts against: the key's network
        (``ipv4_prefix``), but an IPv6 site's /48 at most, since one
        client holds 65,536 /64s of it."""
        settings = self.settings
        return network_key(client, settings.ipv4_prefix,
                           min(settings.ipv6_prefix, 48))

    def client_identity(self, client, name):
        """``(the key's client part, the rule naming it)``: with
        ``client_key = name``, a forward-confirmed ``name`` that does not
        look generic is keyed by name_key() ("name:out.example.com"), so
        that a sender's pool retrying from other networks passes once;
        otherwise the client's network ("network:192.0.2.0/24")."""
        if (self.settings.client_key == "name" and name
                and not generic_name(name, client)):
            key = name_key(name)
            if key is not None:
                return key, "name:" + key
        network = self.client_network(client)
        return network, "network:" + network

    def suspicion(self, client, name):
        """Why the client looks suspicious, or None: no forward-confirmed
        name ("suspicious:no-name"), or a generic one
        ("suspicious:generic-name")."""
        if not name:
            return "suspicious:no-name"
        if generic_name(name, client):
            return "suspicious:generic-name"
        return None

    def dns_listing(self, client, resolve):
        """The entries of ``dnswl`` and ``dnsbl`` that list ``client``
        (their zones, with the filter if one is written), all asked at
        once (DNSLists): a set, or a DNSListing, whose ``unasked`` are
        the entries that could not be asked (a dnsbl among them keeps
        the client from the auto-whitelist and, with greylist_clients =
        suspicious, greylists it: rule "dnsbl-not-asked:ZONE")."""
        settings = self.settings
        return dns_lists.listing(client, list(settings.dnswl)
                                 + list(settings.dnsbl), resolve,
                                 settings.dns_timeout,
                                 settings.dns_cache_time)

    def recipient_is_whitelisted(self, recipient):
        """True if ``recipient`` is in the ``whitelist_recipients`` file
        (postgrey's format: user@domain, user@, a domain, /regex/)."""
        return any(listed.has_recipient(recipient)
                   for listed in list_files.lists(
                       self.settings.whitelist_recipients,
                       "whitelist_recipients"))

    def recipient_is_trap(self, recipient):
        """True if ``recipient`` is in the ``greytrap_recipients`` file
        (postgrey's format, as whitelist_recipients)."""
        return any(listed.has_recipient(recipient)
                   for listed in list_files.lists(
                       self.settings.greytrap_recipients,
                       "greytrap_recipients"))

    def client_may_relay(self, client):
        """True if ``client`` is in allowed_senders or
        allowed_sender_nets."""
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return False
        for allowed in self.settings.allowed_senders:
            try:
                if address == ipaddress.ip_address(allowed):
                    return True
            except ValueError:
                continue
        return any(_in_network(address, net)
                   for net in self.settings.allowed_sender_nets)

    def is_local_recipient(self, recipient):
        """True for ``local@domain`` with a domain of allowed_domains and a
        plain local-part, and for the bare Postmaster."""
        if recipient.lower() == "postmaster":
            return True
        local, _, domain = recipient.rpartition("@")
        if not local or local.startswith('"') or re.search(r"[%!@]", local):
            return False
        return _domain_key(domain) in _domain_keys(
            tuple(self.settings.allowed_domains))

    def is_whitelisted(self, client, helo, sender, recipient):
        """True for a whitelisted triple or non-standard triple."""
        sender = "<%s>" % sender.lower()
        target = "<%s>" % _recipient_key(recipient)
        for ip, triple_sender, triple_recipient in \
                self.settings.whitelisted_triples:
            if (ip == client and triple_sender.lower() == sender
                    and _recipient_key(triple_recipient) == target):
                return True
        for triple_helo, prefix, triple_recipient in \
                self.settings.whitelisted_nonstandard_triples:
            if (triple_helo.lower() == (helo or "").lower()
                    and _in_network(client, prefix)
                    and _recipient_key(triple_recipient) == target):
                return True
        return False

    def client_is_whitelisted(self, client, hostname=None):
        """True if ``client`` matches ``whitelist_clients``, a file of
        addresses, networks (CIDR or whole-octet prefixes) and host-name
        suffixes, one a line, '#' comments.  A name matches only the
        client's forward-confirmed name (``hostname``), so that nobody
        whitelists himself with a PTR record.  The files (and their
        ``.local``) of a list key are one list: ``hostname()`` is asked
        once for them all."""
        if callable(hostname):
            ask, known = hostname, []

            def hostname():
                if not known:
                    known.append(ask())
                return known[0]
        return any(listed.has_client(client, hostname)
                   for listed in list_files.lists(
                       self.settings.whitelist_clients,
                       "whitelist_clients"))

    def client_network(self, client):
        """The client's network, the key's first part."""
        return network_key(client, self.settings.ipv4_prefix,
                           self.settings.ipv6_prefix)

    def triplet_key(self, client, sender, recipient):
        """The store's key: ``client normalised-sender recipient``, the
        client its network or name key (client_identity()); with
        ``hash_keys``, the sender and the recipient are hashed()."""
        sender, recipient = normalise_sender(sender), _recipient_key(
            recipient)
        if self.settings.hash_keys:
            sender, recipient = self.hashed(sender), self.hashed(recipient)
        return " ".join([client, sender, recipient])

    def hashed(self, text):
        """``text`` (a normalised sender, a recipient key) as the store
        holds it with ``hash_keys``: key_hash() with the site's secret,
        key_secret()."""
        return key_hash(key_secret(self.settings), text)


class GreyListingPolicy(ConcreteMailHandler):
    """Greylisting on (client, sender, recipient), per recipient.

    ``shouldWeAcceptRecipient`` asks the engine, ``greylister_class``
    (Greylister), configured by this class's attributes, so that the
    upstream never sees a recipient that is refused or deferred.  In
    order:

    1. a client in ``allowed_senders`` (addresses) or ``allowed_sender_nets``
       (Kamaelia's textual prefixes such as ``192.168.2``, read as whole
       octets, or CIDR networks) is accepted: it may relay anywhere;
    2. a recipient that is not a plain ``local@domain`` for a domain of
       ``allowed_domains`` (ASCII letters case-insensitive, a name with
       non-ASCII letters only as listed: _domain_key(); a subdomain only
       if listed)
       gets ``relay_reply``: source routes, ``%`` and ``!`` paths, quoted
       local-parts, address literals are all refused; the bare
       ``<Postmaster>`` (RFC 5321 section 4.5.1) is ours and accepted;
    3. a recipient of ``whitelist_recipients``, a triple of
       ``whitelisted_triples`` (ip sender recipient) or of
       ``whitelisted_nonstandard_triples`` (HELO name, IP prefix,
       recipient), a client of the ``whitelist_clients`` file, or a client
       listed on a ``dnswl`` zone is accepted (each list key is a file
       name or a list of them, ``FILE.local`` read beside each that has
       one: list_paths(), ListFiles.lists());
    4. the client is keyed (``client_key``) by its forward-confirmed,
       non-generic name minus its first label, or by its network of
       ``ipv4_prefix`` (24) or ``ipv6_prefix`` (64) bits (an unknown
       address: UNKNOWN_CLIENT).  Greytraps (spamd's), after the
       administrator's choices above, before any trust below: a recipient
       of the ``greytrap_recipients`` file gets ``defer_reply``, as
       greylisting gives it, and its client's key is trapped in the store
       for ``greytrap_time`` (rule "greytrap:hit ..."); a trapped client
       gets ``defer_reply`` for every recipient, however long its
       triplets waited or whether they passed before (rule
       "greytrap:trapped ...").  Traps are rows of the store: the MX
       hosts sharing it know them at once, but for what a process keeps
       in memory (greylist_cache_time at most: client_is_trapped()).  A
       RCPT to a trap is deferred even when the store fails.  Then a
       client that
       passed greylisting ``auto_whitelist_clients`` times (0: never;
       each triplet once, the client at most once an hour) is accepted,
       but not one listed on a ``dnsbl`` zone, nor one whose ``dnsbl``
       zone could not be asked (no lookup thread free); with
       ``greylist_clients = suspicious``, a client that is not listed
       (nor unasked) and has a confirmed, non-generic name is accepted;
    5. otherwise the triplet goes through the greylisting store
       (``greylist_db``, timings ``too_soon``, ``min_defer_time``,
       ``max_defer_time``, ``max_grey``): accepted, or ``defer_reply``.
       A triplet seen for the first time adds a row, at most
       ``max_new_triplets_per_session`` in a session and
       ``max_new_triplets_per_network`` an hour from a client network
       (NewTriplets); past either, it is deferred without a row (each
       bound logged once per session, or per network and hour).  Every
       deferral counts towards ``max_errors``.  If the store fails,
       ``greylist_fail_mode`` decides ("accept" or "defer") and the
       error is logged once per incident; out of descriptors, the
       session ends with 421 4.3.2.

    ``shouldWeAcceptMail()`` is true once a recipient was accepted.  The
    sender is keyed without case, brackets, ``+extension``, BATV
    (``prvs=...=``), SRS and VERP-style numbers (``normalise_sender``).
    With ``hash_keys`` (a file holding the site's secret), the store's
    keys hold keyed hashes of the sender and the recipient, never the
    addresses (Greylister.hashed(), key_hash()); the client part stays.
    With ``x_greylist_header``, mail that greylisting delayed gets an
    ``X-Greylist:`` header saying for how long, and by which rule.
    ``now()`` is the clock the policy reads; tests override it.
    """

    allowed_senders = ["127.0.0.1"]
    allowed_sender_nets = []
    allowed_domains = []
    whitelisted_triples = []
    whitelisted_nonstandard_triples = []
    greylist_db = "greylist.db"
    # Kamaelia Grey's timings, but for min_defer_time (its 3600 s):
    # every common MTA's first retry of a 4xx comes 5 minutes or more
    # after the first try (Postfix's minimal_backoff_time 300 s; Exim's,
    # Exchange's and Sendmail's queue runs every 15 minutes or more), so
    # 300 s lets each pass at its first retry, as postgrey's --delay does;
    # 3600 s held a Postfix sender back 60 to 80 minutes (README: "How
    # long a new sender waits").
    too_soon = 180
    min_defer_time = 300
    max_defer_time = 25000
    max_grey = 3000000
    auto_whitelist_clients = 5
    # A session's first sightings: one message's worth of recipients (RFC
    # 5321 section 4.5.3.1.8: 100 at least), and max_errors cuts a
    # session that delivers nothing at 20 anyway.  A network's, an hour:
    # more than a list server new to us sends to one site at once; the
    # rest of such a burst waits for the sender's next retry.
    max_new_triplets_per_session = 100
    max_new_triplets_per_network = 1000
    ipv4_prefix = 24
    ipv6_prefix = 64
    relay_reply = "550 5.7.1 Relaying denied"
    defer_reply = "451 4.7.1 Greylisted, please try again later"
    greylist_fail_mode = "accept"
    greylist_db_timeout = 5
    greylist_cache_time = 60
    x_greylist_header = False
    whitelist_clients = []          # files; one may be a string
    whitelist_recipients = []
    greytrap_recipients = []
    greytrap_time = 86400       # spamd's: a day
    client_key = "name"
    greylist_clients = "all"
    dnsbl = []
    dnswl = []
    dns_cache_time = 600
    hash_keys = ""
    # hash_keys' secret, set by check_hash_keys() on the configuration's
    # class (read as root at the start, again at a reload).
    _key_secret = None
    # The engine that decides; a subclass of Greylister changes how.
    greylister_class = Greylister

    def now(self):
        """The time, in seconds since the epoch, that the policy reads."""
        return time.time()

    def store_failed(self, error):
        """The store cannot be used: the decision falls back to
        ``greylist_fail_mode`` ("accept", as Kamaelia Grey did, or
        "defer"), or, when the process is out of descriptors
        (ResourceShortage), the session ends with 421 4.3.2.  Logged once
        per incident, not per message: the store says when it works
        again."""
        log_store_failure(self, error, "sessions end with 421 4.3.2")

    def setup(self):
        ConcreteMailHandler.setup(self)
        self.triplets_added = 0     # rows this session added to the store
        self.triplets_bounded = False   # max_new_triplets_per_session hit

    def _start_transaction(self):
        ConcreteMailHandler._start_transaction(self)
        self.greylist_delay = None
        self.greylist_rule = None

    def shouldWeAcceptMail(self):
        """True once at least one recipient was accepted."""
        return bool(self.recipients)

    def extra_headers(self):
        """With ``x_greylist_header``, an X-Greylist: header for a message
        that greylisting delayed, saying for how long (as postgrey's) and
        by which rule (as name:out.example.com)."""
        if not self.x_greylist_header or self.greylist_delay is None:
            return []
        return [x_greylist(self.greylist_delay, self.servername,
                           self.greylist_rule, self.now())]

    def shouldWeAcceptRecipient(self, recipient):
        """The engine's decision (greylister_class, configured by this
        handler's attributes) as a reply: True, relay_reply, False
        (defer_reply; with placeholders, its text for this deferral:
        defer_text()), or 421 4.3.2 when the process is out of
        descriptors."""
        decision = self.greylister_class(self).decide(
            self.peer, self.mail_from, recipient, self.now(),
            helo=self.helo_name, hostname=self.client_hostname,
            resolve=self.forward_lookup, session_added=self.triplets_added)
        metrics.decision(decision)
        self.log_dialogue("%s %s: %s%s", decision.verdict, recipient,
                          decision.rule, " " + decision.key
                          if decision.key else "")
        if decision.added:
            self.triplets_added += 1
        elif (decision.rule == "max_new_triplets_per_session"
              and not self.triplets_bounded):
            self.triplets_bounded = True
            log.warning("client %s: %d new triplets in one session "
                        "(max_new_triplets_per_session); further new ones "
                        "are deferred without a row", log_escape(self.peer),
                        self.triplets_added)
        if decision.error is not None:
            self.store_failed(decision.error)
        if decision.delay is not None and decision.delay > (
                self.greylist_delay or -1):
            self.greylist_delay = decision.delay
            self.greylist_rule = decision.rule
        if decision.verdict == "refuse":
            return self.relay_reply
        if decision.verdict == "unavailable":
            return OUT_OF_RESOURCES
        if decision.verdict == "defer":
            # With placeholders (%s, %r): this deferral's text.
            reply = defer_text(self.defer_reply, self.min_defer_time
                               if decision.wait is None else decision.wait,
                               recipient)
            return False if reply == self.defer_reply else reply
        return decision.accepted


# ===========================================================================
# == 9. Greylisting: the store's rules ==
# ===========================================================================
#
# Owns:  the timing table (triplet_step, pure), what every store does
#        (StoreBase: the passes in memory, the incidents, the fail flow, the
#        traps, the report's figures), which store a location names
#        (open_store) and the process's stores (Stores).
# Enter: open_store(location, settings); stores.get(settings).
# Uses:  sections 2 and 3; section 10 for an sqlite file, 11 for a
#        PostgreSQL location.


class StoreError(sqlite3.Error):
    """The greylisting store cannot be used: not reached within
    ``greylist_db_timeout``, or a PostgreSQL store's error, its message
    without the password (hide_secrets()) and its ``sqlstate`` the
    server's SQLSTATE, if known (the driver's exception is not chained:
    a traceback would show its message).  A subclass of sqlite3.Error, so
    that code written for the sqlite store, which raises sqlite3.Error,
    catches it too."""

    sqlstate = None


class StoreConfigError(StoreError):
    """The PostgreSQL store's answer says that the configuration is
    wrong, not that the database is away: the server refused the login
    or the database (see PostgreSQLStore.configuration_sqlstates), libpq
    refused a connection parameter, or the tables are of a newer
    smtpproxy.  The same answer comes until the configuration (or the
    database) changes: --check-config and the start stop on it (exit 2),
    a reload keeps the configuration in force; while the service runs, it
    is an outage as any other (greylist_fail_mode decides), logged as an
    error once."""


# The changes triplet_step() asks of a store.
RESTART = "restart"     # seen now: first_seen := now, no pass, 0 passes


PASS = "pass"           # passed now: passed := now, passes + 1


class Step(collections.namedtuple("Step", "accepted delay new")):
    """One greylisting decision on a triplet, as a store's step() and
    triplet_step() give it: ``accepted`` True, or False (deferred);
    ``delay`` the seconds the triplet was held back when this try is the
    one that passed greylisting, else None; ``new`` True when the triplet
    was unknown (a first sighting, deferred).  A tuple: ``accepted,
    delay, new = store.step(...)`` reads it too.  Not of the tuple (it
    compares as one of three): ``wait``, for a retry deferred as too
    early, the seconds left until one can pass; else None (for a
    deferral: the clock starts now, min_defer_time)."""

    wait = None


_ACCEPTED = Step(True, None, False)


_DEFERRED = Step(False, None, False)


_FIRST_SIGHTING = Step(False, None, True)


# The kinds of a key's client part, as report() groups them.
CLIENT_KINDS = ("ipv4", "ipv6", "name", "unknown")


def client_kind(client):
    """The kind of ``client``, the client part of a triplet key: "ipv4"
    or "ipv6" for a network (192.0.2.0/24, 2001:db8::/64), "unknown" for
    UNKNOWN_CLIENT, "name" for a name key (out.example.com, client_key =
    name) and anything else."""
    if client == UNKNOWN_CLIENT:
        return "unknown"
    if ":" in client:
        return "ipv6"
    if "/" in client:
        return "ipv4"
    return "name"


def _whole(seconds):
    """``seconds`` rounded to a whole number (None stays None)."""
    return None if seconds is None else int(round(seconds))


def _nearest_rank(ordered, tenths):
    """The percentile ``tenths``/10 of the sorted list ``ordered`` by
    nearest rank (PostgreSQL's percentile_disc): the smallest value that
    at least that share of the values do not exceed; None if empty."""
    if not ordered:
        return None
    return ordered[max(1, -(-len(ordered) * tenths // 10)) - 1]


def triplet_step(first_seen, passed, now, timings):
    """One decision of Kamaelia Grey's timing table, with no store: the
    triplet was first seen at ``first_seen`` (None: never) and last passed
    at ``passed`` (None: never); ``timings`` has ``too_soon``,
    ``min_defer_time``, ``max_defer_time`` and ``max_grey``.  Return
    ``(step, change)``: the Step (for the try that passes, ``delay`` is
    the seconds it waited; ``new``: never seen), and the change, None,
    RESTART or PASS, which the store applies in the same transaction.

    | state of the triplet                    | step     | change            |
    | passed less than max_grey ago           | accepted | PASS              |
    | passed more than max_grey ago           | deferred | RESTART (as new)  |
    | never seen                              | new      | RESTART           |
    | seen less than too_soon ago             | deferred | RESTART           |
    | seen less than min_defer_time ago       | deferred | none (wait)       |
    | seen more than max_defer_time ago       | deferred | RESTART           |
    | otherwise (retried inside the window)   | waited   | PASS              |
    """
    if first_seen is None:
        return _FIRST_SIGHTING, RESTART
    if passed is not None:
        if now - passed < timings.max_grey:
            return _ACCEPTED, PASS
        return _DEFERRED, RESTART           # forgotten: as if never seen
    waited = now - first_seen
    if waited < timings.too_soon or waited > timings.max_defer_time:
        # Too hasty, or too late: the retry clock starts again.
        return _DEFERRED, RESTART
    if waited < timings.min_defer_time:
        step = Step(False, None, False)
        step.wait = timings.min_defer_time - waited
        return step, None
    return Step(True, waited, False), PASS


def _merged_triplets(one, other):
    """Two rows ``(first_seen, last_seen, passed, passes, delay)`` of one
    triplet (rekey(): its clear and its hashed key) as one: the first
    sighting that came first (the sender's retries count from it), the
    later last sighting and pass (a pass of either stands), the passes
    added up, the wait of a greylisting pass of either (--db-report)."""
    passes = [row[2] for row in (one, other) if row[2] is not None]
    return (min(one[0], other[0]), max(one[1], other[1]),
            max(passes) if passes else None, one[3] + other[3],
            one[4] if one[4] is not None else other[4])


class StoreBase(object):
    """What every greylisting store shares: its settings, the passes kept
    in memory, the turn of its one connection, failure incidents, the
    check and trust flow and the purge's interval.  Its kinds are
    GreylistStore (an sqlite3 file) and PostgreSQLStore; open_store()
    picks one by ``greylist_db``.

    ``step(key, now)`` applies Kamaelia Grey's timing table to one
    triplet key and records the outcome in the same transaction, so that
    threads and processes sharing the store get the decisions a serial
    run would give; decide() and check() give parts of its Step.  The
    table is triplet_step()'s, a pure function; the store reads the
    triplet, asks it, and writes the change it names.  Timings, in
    seconds, are attributes, taken from ``settings`` (a GreyListingPolicy
    class or instance, whose configuration keys they are) when given:
    ``too_soon``, ``min_defer_time``, ``max_defer_time``, ``max_grey``,
    ``auto_whitelist_clients``; their defaults are the policy's, written
    there.

    Clients (networks or name keys) that passed greylisting
    ``auto_whitelist_clients`` times (0: never) are trusted
    (``client_is_trusted``) until unseen for ``max_grey``.  Only a
    greylisting pass counts (a triplet that waited and came back: once
    per triplet, not its resends), and a client's count grows at most
    once per ``client_pass_interval`` seconds (an hour, as postgrey's
    auto-whitelist): a sender's burst of retries is one pass.
    Every ``purge_interval`` seconds a decision also purges what has
    expired (``purge``): it would be decided as never seen anyway.

    Greytraps: ``spring_trap`` traps a client key for ``greytrap_time``
    seconds, ``client_is_trapped`` asks (both answers kept in memory for
    greylist_cache_time), ``traps`` lists them, delete() lifts one.

    The process has one connection to the store (``_db``), opened at the
    first use and used by one thread at a time (the decisions of a
    process are serial anyway): its descriptors do not grow with the
    sessions served.  A decision waits at most ``greylist_db_timeout``
    seconds for its turn in this process (then StoreError).  A failure
    is a sqlite3.Error (StoreError is one); the first error of an
    incident is marked (``first_of_incident`` on the exception;
    ``failing`` holds the incident's texts), and the end of an incident
    is logged, so that a store that is gone is logged once, not once per
    session.  A store that cannot be used because the process is out of
    descriptors raises ResourceShortage, not sqlite3.Error: no policy
    should fail open for a local shortage.

    Decisions that would change nothing that matters write nothing: a
    triplet this store saw pass (or a client it saw trusted) less than
    ``greylist_cache_time`` seconds ago is accepted (trusted) from memory,
    without a turn or a transaction.  What that leaves out is a renewal
    of a pass or a trust that has months to run, and the triplet's own
    pass count.  At most ``cache_size`` entries are kept (then they are
    all forgotten), and checkpoint() (the server calls it about once a
    second: stores.maintain(), from service_actions()) drops those older
    than greylist_cache_time; delete() and pass_key() on this store take
    effect at once, another process's after greylist_cache_time at most.

    A kind of store is a subclass that writes what raises
    NotImplementedError here: ``_transact`` (its connection, opened as it
    needs, and its transactions) and the works run in a transaction, its
    SQL (``_decide_and_count``, ``_client_is_trusted``, ``_purge``,
    ``_entries``, ``_pass_key``, ``_delete``, ``_stats``,
    ``_spring_trap``, ``_trap_left``, ``_traps``, ``_report``,
    ``_rekey``); it may extend checkpoint() and ``_disconnect()`` (with
    ``_lock`` held: close()).

    A store made ``read_only`` (open_store(..., read_only=True): the
    report) makes, migrates and writes nothing, and reads in one
    snapshot; it is only for report(), entries() and stats().  The wait
    of each greylisting pass is kept with its triplet (``delay``), and
    the purge tallies the grey triplets it deletes, per hour of their
    first sighting (``tally_interval``), kept for max_grey, so that
    report() can tell what greylisting did.
    """

    too_soon = GreyListingPolicy.too_soon
    min_defer_time = GreyListingPolicy.min_defer_time
    max_defer_time = GreyListingPolicy.max_defer_time
    max_grey = GreyListingPolicy.max_grey
    auto_whitelist_clients = GreyListingPolicy.auto_whitelist_clients
    greylist_db_timeout = GreyListingPolicy.greylist_db_timeout
    greylist_cache_time = GreyListingPolicy.greylist_cache_time
    greytrap_time = GreyListingPolicy.greytrap_time
    cache_size = 10000
    purge_interval = 3600
    client_pass_interval = 3600
    # The expired triplets are tallied per hour of their first sighting:
    # report() is exact to that, and the tallies stay few (max_grey /
    # 3600 rows at most).
    tally_interval = 3600

    # The attributes a policy sets on its store (configure()).
    settings = ("too_soon", "min_defer_time", "max_defer_time", "max_grey",
                "auto_whitelist_clients", "greylist_db_timeout",
                "greylist_cache_time", "greytrap_time")

    def __init__(self, path, settings=None, read_only=False):
        self.path = path
        self.read_only = read_only      # see report()
        if settings is not None:
            self.configure(settings)
        self._lock = threading.Lock()
        self._db = None             # the connection, opened at first use
        self._deadline = None       # of the decision that has the turn
        self._local = threading.local()     # a decision's deadline (_budget)
        # ("triplet", key) or ("client", network) -> when it was written
        # as passed (trusted); read and written without a lock (single
        # dict operations).
        self._known = {}
        # client -> (when the store said it is trapped, until when): the
        # greytraps this process sprang or read (client_is_trapped()).
        self._trapped = {}
        self.failing = None     # texts of the errors of an incident
        self.last_purge = None
        self.checkpoints = 0    # made by this store (sqlite's WAL)

    def __str__(self):
        return self.path

    def configure(self, source):
        """Take the ``settings`` from ``source`` (a policy class or
        instance, whose configuration keys they are)."""
        for name in self.settings:
            setattr(self, name, getattr(source, name))

    # -- the turn, and incidents ----------------------------------------

    def _use(self, work, *args, **options):
        """Run ``work`` in a transaction (_transact()), alone in this
        process; ``read_only``: a transaction that writes nothing.  Its
        failure is marked as part of an incident, its success ends one."""
        # One deadline for the whole decision: the wait for a connection,
        # the turn, the statements.  The threads of this process queue
        # on a lock for the one connection (for sqlite, waiting for its
        # write lock instead means its busy handler's sleeps of up to
        # 100 ms); they wait for a connection being made before it, each
        # on its own, so that none waits behind another's wait.
        deadline = getattr(self._local, "deadline", None) or (
            time.monotonic() + self.greylist_db_timeout)
        try:
            self._await_connection(deadline)
        except (sqlite3.Error, ResourceShortage) as error:
            self._incident(error)
            raise
        if not self._lock.acquire(
                timeout=max(0.0, deadline - time.monotonic())):
            raise self._incident(StoreError(
                "no turn within greylist_db_timeout (%s s)"
                % self.greylist_db_timeout))
        try:
            try:
                self._deadline = deadline
                result = self._transact(work, args,
                                        options.get("read_only", False))
            except (sqlite3.Error, ResourceShortage) as error:
                self._incident(error)
                raise
            self._recovered()
        finally:
            self._lock.release()
        return result

    @contextlib.contextmanager
    def _budget(self):
        """One deadline, greylist_db_timeout from now, for every use of
        the store by this thread inside (a decision's: the auto-whitelist,
        the purge that is due, the triplet), so that a store that cannot
        be reached holds a decision that long in all, not once per use."""
        outer = getattr(self._local, "deadline", None)
        if outer is None:
            self._local.deadline = (time.monotonic()
                                    + self.greylist_db_timeout)
        try:
            yield
        finally:
            if outer is None:
                self._local.deadline = None

    def _warm(self):
        """At the start of a process that serves: open what the first
        decision needs without waiting for it (PostgreSQLStore's
        connector starts connecting)."""

    def _await_connection(self, deadline):
        """Before the turn: wait, until ``deadline`` at most, for a
        connection being made (PostgreSQLStore's); sqlite's is opened at
        once, in the turn."""

    def _transact(self, work, args, read_only):
        """Return ``work(transaction, *args)``, run in one transaction on
        the connection (opened if need be), so that what it reads and
        what it writes are one step for every process sharing the store;
        ``read_only``: it writes nothing.  Called with ``_lock`` held; a
        failure is a sqlite3.Error (a StoreError for stores other than
        sqlite) or a ResourceShortage."""
        raise NotImplementedError

    def _incident(self, error):
        """``error``, marked ``first_of_incident`` if it is the first of
        its kind since the store last worked: each distinct error is
        logged once (store_failed()), not once per session."""
        text = str(error)
        if self.failing is None:
            self.failing = []
        error.first_of_incident = (text not in self.failing
                                   and len(self.failing) < 10)
        if error.first_of_incident:
            self.failing.append(text)
        return error

    def _recovered(self):
        """The store worked: an incident in progress ends, logged."""
        if self.failing is not None:
            log.warning("greylisting store %s: usable again", self)
            self.failing = None

    # -- decisions --------------------------------------------------------

    def decide(self, key, now, client=None):
        """Return True to accept the triplet ``key`` at time ``now``; an
        acceptance counts as a pass of the network ``client``, if given."""
        return self.step(key, now, client).accepted

    def check(self, key, now, client=None):
        """Like decide(), but return ``(accepted, delay)``: ``delay`` is
        how long the triplet was held back when this try is the one that
        passed greylisting, else None."""
        step = self.step(key, now, client)
        return step.accepted, step.delay

    def step(self, key, now, client=None, add=True):
        """Like check(), but return the Step ``(accepted, delay, new)``:
        ``new`` is True when the triplet was unknown (a first sighting,
        deferred).  Its row is added only if ``add`` is true: with
        ``add`` false a new triplet is deferred and nothing is written
        (the bounds of new triplets, Greylister.new_triplet_bound)."""
        if self._cached(("triplet", key), now):
            return _ACCEPTED
        with self._budget():
            if self.last_purge is None or now - self.last_purge > \
                    self.purge_interval:
                self.last_purge = now
                self._purge_when_due(now)
            step = self._use(self._decide_and_count, key, now, client, add)
        if step.accepted:
            self._remember(("triplet", key), now)
        return step

    def _decide_and_count(self, transaction, key, now, client, add=True):
        """The Step of the triplet ``key`` (triplet_step()), its change
        written, its row added only if ``add``; a greylisting pass (a
        ``delay``) counts as one of the network ``client``, if given, and
        if the client's last one is ``client_pass_interval`` old."""
        raise NotImplementedError

    def _cached(self, entry, now):
        """True if ``entry`` was written as passed (trusted) less than
        greylist_cache_time ago (and not in the future: tests and clocks
        go back)."""
        written = self._known.get(entry)
        return (written is not None
                and 0 <= now - written < self.greylist_cache_time)

    def _remember(self, entry, now):
        if self.greylist_cache_time > 0:
            if len(self._known) >= self.cache_size:
                self._known.clear()
            self._known[entry] = now

    def forget(self):
        """Forget every pass, trust and trap kept in memory."""
        self._known.clear()
        self._trapped.clear()

    def _forget_old(self):
        """Drop what is kept longer than greylist_cache_time (by the
        clock of the decisions: the newest time written); the traps
        too."""
        trapped = self._trapped
        try:
            if trapped:
                newest = max(checked for checked, _ in trapped.values())
                for client in [client for client, (checked, _)
                               in list(trapped.items())
                               if newest - checked >=
                               self.greylist_cache_time]:
                    trapped.pop(client, None)
        except RuntimeError:            # changed meanwhile: next time
            pass
        known = self._known
        if not known:
            return
        try:
            newest = max(known.values())
            old = [entry for entry, written in list(known.items())
                   if newest - written >= self.greylist_cache_time]
        except RuntimeError:            # changed meanwhile: next time
            return
        for entry in old:
            known.pop(entry, None)

    def client_is_trusted(self, client, now):
        """True if the network ``client`` passed greylisting
        ``auto_whitelist_clients`` times and was seen within ``max_grey``;
        being trusted counts as being seen."""
        if not self.auto_whitelist_clients:
            return False
        if self._cached(("client", client), now):
            return True
        trusted = self._use(self._client_is_trusted, client, now)
        if trusted:
            self._remember(("client", client), now)
        return trusted

    def _client_is_trusted(self, transaction, client, now):
        """client_is_trusted()'s answer from the store; a trusted client's
        last_seen renewed."""
        raise NotImplementedError

    # -- greytraps --------------------------------------------------------

    def spring_trap(self, client, now, recipient):
        """The client ``client`` (a network or name key) wrote to the
        greytrap ``recipient`` at ``now``: it is trapped until
        ``greytrap_time`` seconds from now (again from now, if it was
        already), for every process and host that shares the store; this
        process knows it at once."""
        self._use(self._spring_trap, client, now, recipient)
        self._known.pop(("untrapped", client), None)
        self._known.pop(("client", client), None)
        self._note_trap(client, now, now + self.greytrap_time)

    def _spring_trap(self, transaction, client, now, recipient):
        """spring_trap()'s row: the client's trap, sprung now by
        ``recipient``, expiring greytrap_time from now."""
        raise NotImplementedError

    def client_is_trapped(self, client, now):
        """True if ``client`` sprang a greytrap that has not expired (nor
        been lifted: delete()).  Either answer the store gives is kept in
        memory for greylist_cache_time, as passes are, so that a client's
        decisions do not each ask the store: a trap sprung through this
        store object (this process) counts at once, one sprung by
        another process or host after greylist_cache_time at most, and so
        does a trap lifted by another process (--db-delete)."""
        known = self._trapped.get(client)
        if known is not None:
            checked, until = known
            if 0 <= now - checked < self.greylist_cache_time and now < until:
                return True
            self._trapped.pop(client, None)
        if self._cached(("untrapped", client), now):
            return False
        left = self._use(self._trap_left, client, now, read_only=True)
        if left is None:
            self._remember(("untrapped", client), now)
            return False
        self._note_trap(client, now, now + left)
        return True

    def _trap_left(self, transaction, client, now):
        """The seconds the trap of ``client`` has left at ``now``; None if
        it has none (or it expired)."""
        raise NotImplementedError

    def _note_trap(self, client, now, until):
        if self.greylist_cache_time > 0:
            if len(self._trapped) >= self.cache_size:
                self._trapped.clear()
            self._trapped[client] = (now, until)

    def _purge_when_due(self, now):
        # Once every purge_interval, in the decision that comes then; a
        # failure is logged, and is no reason to fail that decision.
        try:
            self._use(self._purge, now, True)
        except (sqlite3.Error, ResourceShortage) as error:
            log.warning("greylisting store %s: purge: %s", self,
                        log_escape(error))

    def purge(self, now):
        """Delete what has expired; return how many entries went."""
        return self._use(self._purge, now)

    def _purge(self, transaction, now, when_due=False):
        """purge()'s deletions: the grey triplets first seen more than
        max_defer_time ago, the passed ones and the clients not seen
        within max_grey, the greytraps that expired; how many went.
        ``when_due``: the purge of a decision, once every purge_interval
        (a store shared by several processes skips it when another did
        it within that time)."""
        raise NotImplementedError

    # -- administration (smtpproxy --db-...) ------------------------------

    def entries(self):
        """Every triplet and client network, as tuples ``(state, key,
        first_seen, last_seen, passes)``; state is GREY, WHITE (passed)
        or CLIENT (a network's passes, for the auto-whitelist)."""
        triplets, clients = self._use(self._entries, read_only=True)
        for key, first, last, passed, count in triplets:
            yield ("GREY" if passed is None else "WHITE", key, first, last,
                   count)
        for network, count, last in clients:
            yield ("CLIENT", network, None, last, count)

    def _entries(self, transaction):
        """The rows ``(key, first_seen, last_seen, passed, passes)`` of the
        triplets and ``(network, passes, last_seen)`` of the clients, each
        list in the order of its key."""
        raise NotImplementedError

    def traps(self):
        """The greytraps sprung, expired or not (the purge removes those
        that expired), as tuples ``(client, sprung, until, recipient)``
        in the order of the client key: when the client last wrote to
        the trap ``recipient``, and when its trap expires."""
        return self._use(self._traps, read_only=True)

    def _traps(self, transaction):
        raise NotImplementedError

    def pass_key(self, key, now):
        """Mark the triplet ``key`` as passed now (whitelist it)."""
        self._use(self._pass_key, key, now)
        self._known.pop(("triplet", key), None)

    def _pass_key(self, transaction, key, now):
        raise NotImplementedError

    def delete(self, key):
        """Forget the triplet or client network ``key`` (a client's
        greytrap too: it is lifted); True if it was there."""
        self._known.pop(("triplet", key), None)
        self._known.pop(("client", key), None)
        self._trapped.pop(key, None)
        return self._use(self._delete, key)

    def _delete(self, transaction, key):
        raise NotImplementedError

    def rekey(self, change, address=None):
        """Give every triplet the key ``change(key)`` returns (its own:
        left as it is; ``change`` must leave a key it made as it is),
        keeping its first_seen, last_seen, passed and passes, all in one
        transaction; a triplet whose new key is there already is merged
        with it (_merged_triplets()).  With ``address``, each greytrap's
        recipient becomes ``address(recipient)`` too (the same rule).
        Return how many keys changed.  The clients are left.  What
        --db-hash-keys runs."""
        changed = self._use(self._rekey, change, address)
        self._known.clear()
        return changed

    def _rekey(self, transaction, change, address):
        raise NotImplementedError

    def stats(self):
        """Counts: {"GREY": n, "WHITE": n, "CLIENT": n}."""
        grey, white, clients = self._use(self._stats, read_only=True)
        return {"GREY": grey, "WHITE": white, "CLIENT": clients}

    def _stats(self, transaction):
        """How many grey and passed triplets and clients there are."""
        raise NotImplementedError

    def report(self, period, now=None, top=10):
        """What greylisting did in the last ``period`` seconds before
        ``now`` (the store's clock if None: the system's, or the
        database's), for --db-report: a dict of plain values, the JSON
        object that ``--db-report --json`` prints (REPORT_FIELDS says
        what each field is).  Read only: one snapshot, nothing written.

        The triplets counted are those first seen in the period: seen,
        passed (greylisting's pass, or --db-pass), never retried (grey,
        their retry window, max_defer_time, closed without a pass: those
        still in the store and those the purge tallied before deleting
        them, per hour, so that the hour that holds the period's start
        counts whole), and still waiting (grey, window open); seen =
        passed + never_retried + waiting.  The waits of the greylisting
        passes among them: their number, median and 90th percentile
        (nearest rank: the smallest wait that at least that share of
        the passes did not exceed) and maximum, whole seconds (None
        without a pass; a pass by hand, or written before the store kept
        waits, has none).  The clients auto-whitelisted: with
        auto_whitelist_clients passes or more, and seen in the period.
        The ``top`` client keys of each kind (client_kind(): ipv4, ipv6,
        name, unknown) by triplets seen, then passed.  A period longer
        than max_grey reaches only what the store still holds.

        The greytraps (``traps``): the client keys that sprang one in the
        period (``sprung``: a trap's time is the client's last write to a
        trap, so a client that sprang traps several times counts once, if
        its last write was in the period), those trapped at ``now``
        (``trapped_now``), and the ``top`` of the client keys trapped now
        or sprung in the period, the latest sprung first, with when and
        until when (``top``); never the trap's address (with hash_keys a
        hash: the report is about clients).  The purge deletes the traps
        that expired: these count what the store holds.  A store of the
        earlier version, read as it is, has no traps: 0, 0 and []."""
        figures = self._use(self._report, period, now, read_only=True)
        clients = {kind: [] for kind in CLIENT_KINDS}
        for client, seen, passed in figures["clients"]:
            clients[client_kind(client)].append((-seen, -passed, client))
        waits = figures["waits"]
        return collections.OrderedDict([
            ("store", str(self)),
            ("now", _whole(figures["now"])),
            ("since", _whole(figures["now"] - period)),
            ("period", _whole(period)),
            ("max_defer_time", self.max_defer_time),
            ("auto_whitelist_clients", self.auto_whitelist_clients),
            ("triplets", collections.OrderedDict([
                ("seen", figures["seen"]), ("passed", figures["passed"]),
                ("never_retried", figures["never_retried"]),
                ("waiting", figures["waiting"])])),
            ("wait", collections.OrderedDict([
                ("passes", waits[0]), ("median", _whole(waits[1])),
                ("p90", _whole(waits[2])), ("max", _whole(waits[3]))])),
            ("auto_whitelisted_clients", figures["auto_whitelisted"]),
            ("top_by", "seen"),
            ("top_clients", collections.OrderedDict(
                (kind, [collections.OrderedDict([
                    ("client", client), ("seen", -seen),
                    ("passed", -passed)])
                    for seen, passed, client in heapq.nsmallest(
                        top, clients[kind])])
                for kind in CLIENT_KINDS)),
            ("traps", self._report_traps(figures, period, top)),
        ])

    def _report_traps(self, figures, period, top):
        """report()'s ``traps``, from the rows ``(client, sprung,
        expires)`` of the traps sprung in the period or not expired."""
        now = figures["now"]
        since = now - period
        traps = figures["traps"]
        latest = heapq.nsmallest(top, ((-sprung, client, expires)
                                       for client, sprung, expires in traps))
        return collections.OrderedDict([
            ("sprung", sum(1 for _, sprung, _ in traps if sprung >= since)),
            ("trapped_now", sum(1 for _, _, expires in traps
                                if expires > now)),
            ("top", [collections.OrderedDict([
                ("client", client), ("sprung", _whole(-sprung)),
                ("until", _whole(expires))])
                for sprung, client, expires in latest]),
        ])

    def _report(self, transaction, period, now):
        """report()'s figures, read in one snapshot: a dict of ``now``
        (the clock used), ``seen``, ``passed``, ``never_retried``,
        ``waiting``, ``waits`` (passes, median, p90, max: percentiles
        by nearest rank, None without a pass), ``auto_whitelisted``,
        ``clients``, (client key, seen, passed) for every client key of
        the triplets first seen in the period, and ``traps``, (client
        key, sprung, expires) for every trap sprung in the period or
        not expired at ``now`` (none in a store of the earlier
        version)."""
        raise NotImplementedError

    def _window_closed(self, first_seen, passed, now):
        """True if a triplet of that row is grey and its retry window is
        over: a try now starts again, the earlier sighting never passed
        (tallied as expired)."""
        return (first_seen is not None and passed is None
                and now - first_seen > self.max_defer_time)

    def _tally_hour(self, first_seen):
        return int(first_seen // self.tally_interval * self.tally_interval)

    # -- upkeep -----------------------------------------------------------

    def checkpoint(self):
        """What the server has a store do between decisions (about once a
        second): forget old passes kept in memory."""
        self._forget_old()

    def close(self):
        """Close the connections (the next use opens them again)."""
        with self._lock:
            self._disconnect()

    def _disconnect(self):
        # With _lock held.
        if self._db is not None:
            self._db.close()
            self._db = None


def open_store(location, settings=None, read_only=False):
    """The greylisting store at ``location`` (greylist_db), with the
    timings of ``settings``: a PostgreSQLStore for a postgresql:// URI,
    else a GreylistStore (an sqlite3 file); ``read_only``: one that
    writes nothing, for a report."""
    if is_database_uri(location):
        return PostgreSQLStore(location, settings, read_only)
    return GreylistStore(location, settings, read_only)


class Stores(object):
    """The greylisting stores of the process, one per file and timings,
    shared by every session and engine."""

    def __init__(self):
        self._cache = Cache()
        self._maintained = 0.0

    def get(self, settings):
        """The store of ``settings.greylist_db``, with its timings."""
        key = (settings.greylist_db,) + tuple(
            getattr(settings, name) for name in StoreBase.settings)

        def make():
            return open_store(settings.greylist_db, settings)
        return self._cache.get(key, make)

    def reset(self):
        for store in self._cache.reset():
            store.close()

    def maintain(self):
        """What the stores do between decisions (a server's
        service_actions() calls it, at most once a second): their
        checkpoints."""
        now = time.monotonic()
        if now - self._maintained < 1:
            return
        self._maintained = now
        for store in self._cache.items():
            store.checkpoint()


# The registries (module-level, each with its lock).
stores = Stores()                   # GreylistStore per file and timings


# ===========================================================================
# == 10. Greylisting: the sqlite store ==
# ===========================================================================
#
# Owns:  the store of one host's processes, an sqlite3 file (GreylistStore:
#        WAL mode, its checkpoints kept off the decisions, its tables and
#        their columns added in place, a reader that writes nothing).
# Enter: GreylistStore(path, settings), via open_store().
# Uses:  sections 2 and 9 (StoreBase).


class GreylistStore(StoreBase):
    """The greylisting triplets, in the sqlite3 database file ``path``:
    a StoreBase for the processes of one host.

    The file is in WAL mode (readers never block the writer, and a killed
    process leaves no corrupt state).  Copying the WAL back into the file
    (a checkpoint, which waits for the disk) is kept off the decisions:
    the server calls checkpoint() about once a second (stores.maintain(),
    from service_actions()), on a connection of its own, which decisions
    do not wait for; a decision checkpoints only when the WAL has grown
    to ``checkpoint_pages`` without one (a store used without a server).
    The tables are made by the constructor; after an error the connection
    is opened again at the next use.  A decision waits for sqlite's lock
    at most ``busy_timeout`` seconds.  A file made before the triplets
    had a ``delay`` gets the column at its first connection (ALTER
    TABLE, NULL in the rows there), and the table ``expired`` (the
    purge's tallies).  Made ``read_only``, the store opens the file
    read-only (a ``mode=ro`` URI): it makes, changes and checkpoints
    nothing, works on a file it may only read, and reads a file of an
    older version as it is.
    """

    busy_timeout = 10.0
    # WAL pages after which a decision itself checkpoints (sqlite's
    # wal_autocheckpoint): only if checkpoint() was not called meanwhile.
    checkpoint_pages = 10000

    def __init__(self, path, settings=None, read_only=False):
        StoreBase.__init__(self, path, settings, read_only)
        self._checkpointer = None   # checkpoint()'s own connection
        self.written = False        # by a decision since the checkpoint
        if read_only:
            return                  # nothing made: the first use opens
        try:
            with self._lock:
                self._connection()          # the tables, made at once
        except sqlite3.Error:
            pass                            # the first use says why

    def _connection(self):
        """The connection, opened (and the tables made) if need be; with
        ``_lock`` held."""
        if self._db is None and self.read_only:
            self._db = self._reader()
        if self._db is None:
            if self.path not in ("", ":memory:"):
                # Made here, not by sqlite (0644): who reads it reads every
                # sender and recipient.  sqlite gives its -wal and -shm
                # files the mode of this one.  Never through a link.
                try:
                    os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT
                                     | os.O_EXCL | os.O_NOFOLLOW
                                     | os.O_CLOEXEC, 0o640))
                except OSError:
                    pass            # there already, or sqlite says why
            connection = sqlite3.connect(
                self.path, timeout=self.busy_timeout, isolation_level=None,
                check_same_thread=False)
            try:
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=NORMAL")
                connection.execute("PRAGMA wal_autocheckpoint=%d"
                                   % self.checkpoint_pages)
                connection.execute(
                    "CREATE TABLE IF NOT EXISTS triplets ("
                    " key TEXT PRIMARY KEY,"
                    " first_seen REAL NOT NULL,"  # starts the retry clock
                    " last_seen REAL NOT NULL,"   # last change, for listings
                    " passed REAL,"               # last pass, NULL while grey
                    " passes INTEGER NOT NULL DEFAULT 0,"
                    " delay REAL)")       # the wait of greylisting's pass
                connection.execute(
                    "CREATE TABLE IF NOT EXISTS clients ("
                    " network TEXT PRIMARY KEY,"
                    " passes INTEGER NOT NULL,"
                    " last_seen REAL NOT NULL)")
                connection.execute(
                    "CREATE TABLE IF NOT EXISTS traps ("
                    " client TEXT PRIMARY KEY,"   # a network or name key
                    " sprung REAL NOT NULL,"      # the last write to a trap
                    " expires REAL NOT NULL,"
                    " recipient TEXT NOT NULL)")  # the trap that sprang
                # The grey triplets deleted after their window closed,
                # per hour (tally_interval) of their first sighting.
                connection.execute(
                    "CREATE TABLE IF NOT EXISTS expired ("
                    " hour INTEGER PRIMARY KEY,"
                    " triplets INTEGER NOT NULL)")
                if "delay" not in _sqlite_columns(connection, "triplets"):
                    self._add_delay(connection)
            except BaseException:
                connection.close()
                raise
            self._db = connection
            if self._checkpointer is None:
                try:
                    self._checkpointer = sqlite3.connect(
                        self.path, timeout=0, isolation_level=None,
                        check_same_thread=False)
                except sqlite3.Error:
                    pass                # checkpoint() tries again
        return self._db

    def _reader(self):
        """A read-only connection (``read_only``): no WAL mode, no
        tables, no migration, no checkpointer; the file as the service
        left it.  sqlite reads the WAL of a service that runs (its -shm
        and -wal are there); with no service, a reader that may not
        make the -shm file in the directory reads the file as immutable
        (no -wal: nothing else to read), else it could not open it."""
        uri = "file:%s?mode=ro" % urllib.parse.quote(
            os.path.abspath(self.path))
        for attempt in ("", "&immutable=1"):
            connection = sqlite3.connect(
                uri + attempt, uri=True, timeout=self.busy_timeout,
                isolation_level=None, check_same_thread=False)
            try:
                connection.execute("SELECT count(*) FROM sqlite_master")
                return connection
            except sqlite3.OperationalError:
                connection.close()
                if attempt or os.path.exists(self.path + "-wal"):
                    raise
        return None     # not reached

    @staticmethod
    def _add_delay(connection):
        # A file of an earlier version: its triplets get their delay
        # (NULL: not known), once, whichever process comes first.
        connection.execute("BEGIN IMMEDIATE")
        try:
            if "delay" not in _sqlite_columns(connection, "triplets"):
                connection.execute(
                    "ALTER TABLE triplets ADD COLUMN delay REAL")
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise

    def _transact(self, work, args, read_only):
        """Run ``work(connection, *args)`` in a transaction that writes at
        once (BEGIN IMMEDIATE) unless ``read_only``; after an error the
        connection is closed."""
        try:
            connection = self._connection()
            if read_only:
                return work(connection, *args)
            # IMMEDIATE: the read and the write are one step for every
            # process sharing the file.
            connection.execute("BEGIN IMMEDIATE")
            try:
                result = work(connection, *args)
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
            self.written = True
            return result
        except sqlite3.Error as error:
            if self._db is not None:
                self._db.close()
                self._db = None
            if out_of_descriptors():
                raise ResourceShortage("greylisting store %s: %s (out of "
                                       "descriptors)" % (self.path, error))
            raise

    def _decide_and_count(self, connection, key, now, client, add=True):
        step = self._decide(connection, key, now, add)
        if step.delay is not None and client is not None:
            # A greylisting pass (not a resend of a passed triplet): it
            # counts, if the client's last one is client_pass_interval
            # old.  last_seen is when it last counted: being trusted
            # renews it, but then the count no longer matters.
            row = connection.execute(
                "SELECT last_seen FROM clients WHERE network = ?",
                (client,)).fetchone()
            if row is None:
                connection.execute(
                    "INSERT INTO clients (network, passes, last_seen)"
                    " VALUES (?, 1, ?)", (client, now))
            elif now - row[0] >= self.client_pass_interval:
                connection.execute(
                    "UPDATE clients SET passes = passes + 1, last_seen = ?"
                    " WHERE network = ?", (now, client))
        return step

    def _decide(self, connection, key, now, add=True):
        # The Step of the triplet, its change written; new: it was
        # unknown (its row added only if add).
        row = connection.execute(
            "SELECT first_seen, passed FROM triplets WHERE key = ?",
            (key,)).fetchone()
        if row is None and not add:
            return _FIRST_SIGHTING
        first_seen, passed = row or (None, None)
        step, change = triplet_step(first_seen, passed, now, self)
        if change == RESTART:
            if self._window_closed(first_seen, passed, now):
                # Retried too late: the sighting that expired is
                # tallied, as the purge would have.
                self._tally(connection,
                            [(self._tally_hour(first_seen), 1)])
            connection.execute(
                "INSERT OR REPLACE INTO triplets (key, first_seen, last_seen)"
                " VALUES (?, ?, ?)", (key, now, now))
        elif change == PASS and step.delay is not None:
            connection.execute(
                "UPDATE triplets SET passed = ?, last_seen = ?,"
                " passes = passes + 1, delay = ? WHERE key = ?",
                (now, now, step.delay, key))
        elif change == PASS:
            connection.execute(
                "UPDATE triplets SET passed = ?, last_seen = ?,"
                " passes = passes + 1 WHERE key = ?", (now, now, key))
        return step

    @staticmethod
    def _tally(connection, counts):
        # (hour, triplets) added to the expired tallies (no upsert: the
        # sqlite of older systems has none).
        for hour, count in counts:
            connection.execute("INSERT OR IGNORE INTO expired"
                               " (hour, triplets) VALUES (?, 0)", (hour,))
            connection.execute("UPDATE expired SET triplets = triplets + ?"
                               " WHERE hour = ?", (count, hour))

    def _client_is_trusted(self, connection, client, now):
        row = connection.execute(
            "SELECT passes, last_seen FROM clients WHERE network = ?",
            (client,)).fetchone()
        if (row is None or row[0] < self.auto_whitelist_clients
                or now - row[1] >= self.max_grey):
            return False
        connection.execute("UPDATE clients SET last_seen = ?"
                           " WHERE network = ?", (now, client))
        return True

    def _purge(self, connection, now, when_due=False):
        # The grey triplets about to go are tallied first (report()).
        self._tally(connection, connection.execute(
            "SELECT CAST(first_seen / ? AS INTEGER) * ?, count(*)"
            " FROM triplets WHERE passed IS NULL AND first_seen < ?"
            " GROUP BY 1", (self.tally_interval, self.tally_interval,
                            now - self.max_defer_time)).fetchall())
        connection.execute("DELETE FROM expired WHERE hour < ?",
                           (now - self.max_grey,))
        deleted = connection.execute(
            "DELETE FROM triplets WHERE (passed IS NULL AND first_seen < ?)"
            " OR passed < ?", (now - self.max_defer_time,
                               now - self.max_grey)).rowcount
        deleted += connection.execute(
            "DELETE FROM clients WHERE last_seen < ?",
            (now - self.max_grey,)).rowcount
        deleted += connection.execute(
            "DELETE FROM traps WHERE expires <= ?", (now,)).rowcount
        return deleted

    def _spring_trap(self, connection, client, now, recipient):
        connection.execute(
            "INSERT OR REPLACE INTO traps (client, sprung, expires,"
            " recipient) VALUES (?, ?, ?, ?)",
            (client, now, now + self.greytrap_time, recipient))

    def _trap_left(self, connection, client, now):
        row = connection.execute("SELECT expires FROM traps WHERE client = ?",
                                 (client,)).fetchone()
        return row[0] - now if row is not None and row[0] > now else None

    # -- administration (smtpproxy --db-...) ------------------------------

    def _entries(self, connection):
        return (connection.execute(
                    "SELECT key, first_seen, last_seen, passed, passes"
                    " FROM triplets ORDER BY key").fetchall(),
                connection.execute(
                    "SELECT network, passes, last_seen FROM clients"
                    " ORDER BY network").fetchall())

    def _pass_key(self, connection, key, now):
        connection.execute(
            "INSERT OR IGNORE INTO triplets (key, first_seen, last_seen)"
            " VALUES (?, ?, ?)", (key, now, now))
        connection.execute(
            "UPDATE triplets SET passed = ?, last_seen = ?,"
            " passes = passes + 1 WHERE key = ?", (now, now, key))

    def _delete(self, connection, key):
        return (connection.execute("DELETE FROM triplets WHERE key = ?",
                                   (key,)).rowcount
                + connection.execute("DELETE FROM clients WHERE network = ?",
                                     (key,)).rowcount
                + connection.execute("DELETE FROM traps WHERE client = ?",
                                     (key,)).rowcount) > 0

    def rekey(self, change, address=None):
        """StoreBase.rekey(), and what it replaced is gone from the files:
        the deleted rows are overwritten with zeros (secure_delete) and
        the WAL, which holds the pages as they were, is emptied (a
        checkpoint that truncates it).  A process reading the store
        meanwhile keeps the WAL from being emptied: logged, for the
        admin to run it again with the proxies stopped."""
        changed = StoreBase.rekey(self, change, address)
        busy = self._use(self._empty_wal, read_only=True)
        if busy:
            log.warning("greylisting store %s: its -wal file could not be "
                        "emptied (another process was reading the store), "
                        "and may hold the old keys until sqlite reuses it: "
                        "run this again with the proxies stopped", self)
        return changed

    def _empty_wal(self, connection):
        return connection.execute(
            "PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]

    def _rekey(self, connection, change, address):
        connection.execute("PRAGMA secure_delete = ON")
        changed = 0
        for client, recipient in (connection.execute(
                "SELECT client, recipient FROM traps").fetchall()
                                  if address is not None else ()):
            if address(recipient) != recipient:
                connection.execute(
                    "UPDATE traps SET recipient = ? WHERE client = ?",
                    (address(recipient), client))
        for row in connection.execute(
                "SELECT key, first_seen, last_seen, passed, passes, delay"
                " FROM triplets").fetchall():
            new = change(row[0])
            if new == row[0]:
                continue
            connection.execute("DELETE FROM triplets WHERE key = ?",
                               (row[0],))
            there = connection.execute(
                "SELECT first_seen, last_seen, passed, passes, delay"
                " FROM triplets WHERE key = ?", (new,)).fetchone()
            values = tuple(row[1:]) if there is None else _merged_triplets(
                tuple(row[1:]), tuple(there))
            connection.execute(
                "INSERT OR REPLACE INTO triplets (key, first_seen,"
                " last_seen, passed, passes, delay)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (new,) + values)
            changed += 1
        return changed

    def _traps(self, connection):
        return connection.execute(
            "SELECT client, sprung, expires, recipient FROM traps"
            " ORDER BY client").fetchall()

    def _stats(self, connection):
        return connection.execute(
            "SELECT count(*) - count(passed), count(passed),"
            " (SELECT count(*) FROM clients) FROM triplets").fetchone()

    def _report(self, connection, period, now):
        # One read transaction: one snapshot of the file for every query.
        # A file of an earlier version (read-only: not migrated) has no
        # delays, no tallies and no traps.
        now = time.time() if now is None else now
        since, closed = now - period, now - self.max_defer_time
        triplets = _sqlite_columns(connection, "triplets")
        figures = dict(now=now, seen=0, passed=0, never_retried=0,
                       waiting=0, waits=(0, None, None, None),
                       auto_whitelisted=0, clients=[], traps=[])
        if not triplets:
            return figures                  # an empty file
        connection.execute("BEGIN")
        try:
            seen, passed, never, waiting = connection.execute(
                "SELECT count(*), count(passed),"
                " coalesce(sum(passed IS NULL AND first_seen < ?), 0),"
                " coalesce(sum(passed IS NULL AND first_seen >= ?), 0)"
                " FROM triplets WHERE first_seen >= ?",
                (closed, closed, since)).fetchone()
            delays = []
            if "delay" in triplets:
                # Only the waits of the period, each a float: the
                # percentiles need them in order.
                delays = sorted(row[0] for row in connection.execute(
                    "SELECT delay FROM triplets WHERE first_seen >= ?"
                    " AND delay IS NOT NULL", (since,)))
            tallied = 0
            if _sqlite_columns(connection, "expired"):
                tallied = connection.execute(
                    "SELECT coalesce(sum(triplets), 0) FROM expired"
                    " WHERE hour >= ?", (self._tally_hour(since),)
                ).fetchone()[0]
            trusted = 0
            if self.auto_whitelist_clients:
                trusted = connection.execute(
                    "SELECT count(*) FROM clients WHERE passes >= ?"
                    " AND last_seen >= ?",
                    (self.auto_whitelist_clients, since)).fetchone()[0]
            clients = connection.execute(
                "SELECT CASE instr(key, ' ') WHEN 0 THEN key"
                " ELSE substr(key, 1, instr(key, ' ') - 1) END AS client,"
                " count(*), count(passed) FROM triplets"
                " WHERE first_seen >= ? GROUP BY client", (since,)).fetchall()
            traps = []
            if _sqlite_columns(connection, "traps"):
                traps = connection.execute(
                    "SELECT client, sprung, expires FROM traps"
                    " WHERE sprung >= ? OR expires > ?",
                    (since, now)).fetchall()
        finally:
            connection.execute("COMMIT")
        figures.update(
            seen=seen + tallied, passed=passed, never_retried=never + tallied,
            waiting=waiting, auto_whitelisted=trusted, clients=clients,
            traps=traps,
            waits=(len(delays), _nearest_rank(delays, 5),
                   _nearest_rank(delays, 9), delays[-1] if delays else None))
        return figures

    # -- upkeep -----------------------------------------------------------

    def checkpoint(self):
        """Also copy what the decisions wrote to the WAL into the file
        (PASSIVE: no decision waits for it), if they wrote since the last
        time; errors are for the decisions to meet and log."""
        StoreBase.checkpoint(self)
        if not self.written:
            return
        self.written = False
        try:
            if self._checkpointer is None:
                self._checkpointer = sqlite3.connect(
                    self.path, timeout=0, isolation_level=None,
                    check_same_thread=False)
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self.checkpoints += 1
        except sqlite3.Error:
            if self._checkpointer is not None:
                self._checkpointer.close()
                self._checkpointer = None

    def _disconnect(self):
        StoreBase._disconnect(self)
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None


def _sqlite_columns(connection, table):
    """The column names of ``table`` in an sqlite database (none: no
    such table)."""
    return set(row[1] for row in connection.execute(
        "PRAGMA table_info(%s)" % table))


# ===========================================================================
# == 11. Greylisting: the PostgreSQL store ==
# ===========================================================================
#
# Owns:  a store shared by several MX hosts (PostgreSQLStore: its connector
#        thread, the primary it finds among the URI's hosts, the server it
#        says it is on), its URI (read as libpq reads it, never shown with
#        its password: hide_secrets), the driver (imported only here; the
#        start imports it as root: _load_postgresql_driver), and what is a
#        configuration error.
# Enter: PostgreSQLStore(location, settings), via open_store().
# Uses:  section 9 (StoreBase).


def is_database_uri(location):
    """True if the store ``location`` (greylist_db) names a PostgreSQL
    database (postgresql:// or postgres://), not an sqlite file."""
    return location.lower().startswith(("postgresql:", "postgres:"))


def redact_uri(location):
    """The store ``location`` with the password of a URI hidden, for logs
    and messages.  The user information is taken to end at the last "@"
    of the URI, not at the first as libpq reads it, so that a password
    holding "@", "/", "?" or "#" unencoded is hidden whole (at worst, a
    host or database name after it is hidden too); a ``password=``
    parameter is hidden up to the next parameter."""
    if not is_database_uri(location):
        return location
    scheme, slashes, rest = location.partition("//")
    colon, at = rest.find(":"), rest.rfind("@")
    if 0 <= colon < at:
        rest = rest[:colon] + ":***" + rest[at:]
    return _URI_PASSWORD.sub(r"\1***", scheme + slashes + rest)


# A password parameter of a URI's query, up to the next "&key=" (so that
# an unencoded "&" in the password does not show the rest of it), and of
# a keyword/value conninfo (quoted, or up to a space), as a driver's
# message may quote one.
_URI_PASSWORD = re.compile(r"(?i)([?&]password=)(.*?)(?=&[\w-]+=|\Z)")


_CONNINFO_PASSWORD = re.compile(
    r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s'&]+)")


def _uri_secrets(location):
    """The passwords (none empty) that the store ``location`` may hold:
    as libpq reads it (up to the first "@") and as
    redact_uri() hides it (up to the last), in the user information and
    in ``password=`` parameters, as written and percent-decoded."""
    if not is_database_uri(location):
        return set()
    rest = location.partition("//")[2]
    found = []
    colon, at = rest.find(":"), rest.rfind("@")
    if 0 <= colon < at:
        found.append(rest[colon + 1:at])
    # libpq: the user information ends at the first "@" before any "/".
    userinfo = re.match(r"[^@/]*(?=@)", rest)
    if userinfo and ":" in userinfo.group():
        found.append(userinfo.group().split(":", 1)[1])
    for match in re.finditer(r"(?i)[?&]password=([^&]*)", location):
        found.append(match.group(1))
    for match in _URI_PASSWORD.finditer(location):
        found.append(match.group(2))
    secrets = set()
    for secret in found:
        secrets.update((secret, urllib.parse.unquote(secret)))
    secrets.discard("")
    return secrets


def hide_secrets(text, location):
    """``text`` (a driver's message about the store ``location``) with
    nothing of its password: the drivers quote the URI, or a token of
    it (``invalid percent-encoded token: "S3cret%zzPW"``), or a host or
    port that is a piece of a password libpq read otherwise.  The whole
    URI is shown redacted; each password, as written or decoded, is
    replaced by ***; so is a quoted piece of one, and any password=."""
    if not is_database_uri(location):
        return text
    secrets = _uri_secrets(location)
    text = text.replace(location, redact_uri(location))
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) > 3:         # a shorter one only when quoted
            text = text.replace(secret, "***")

    # The pieces of a password that libpq read otherwise (the host of
    # "user:pass@word@host" is "word@host").
    pieces = set(piece for secret in secrets
                 for piece in re.split(r"[@/?#:&]", secret)
                 if len(piece) > 2)

    def quoted(match):
        inside = match.group(2)
        if inside and (any(inside in secret for secret in secrets)
                       or any(piece in inside for piece in pieces)):
            return match.group(1) + "***" + match.group(1)
        return match.group()
    text = re.sub(r"([\"'])(.*?)\1", quoted, text)
    return _CONNINFO_PASSWORD.sub(r"\1***", _URI_PASSWORD.sub(r"\1***", text))


def _parse_database_uri(location, module=None):
    """libpq's own reading of the PostgreSQL URI ``location`` (its
    PQconninfoParse, through the driver ``module``, else the one
    PostgreSQLStore uses): a dict of its parameters.  The driver's error
    if libpq cannot read it; StoreError if no driver is installed."""
    module = module or postgresql_driver(PostgreSQLStore.driver)
    if module.__name__ == "psycopg":
        parse = importlib.import_module("psycopg.conninfo").conninfo_to_dict
    else:
        parse = importlib.import_module(
            module.__name__ + ".extensions").parse_dsn
    return parse(location)


def _database_uri_problem(location):
    """Why the PostgreSQL URI ``location`` can never work, without its
    password; None if libpq reads it, with hosts and ports that can be
    (or if no driver is installed to ask: the start says to install
    one).  A URI that cannot work is a configuration error, not a
    database that is down."""
    try:
        parameters = _parse_database_uri(location)
    except StoreError:
        return None
    except Exception as error:      # the driver's ProgrammingError
        return ("%s: libpq cannot read this URI: %s (a user name or "
                "password must write %% as %%25, @ as %%40, / as %%2F, "
                "? as %%3F, # as %%23; or keep the password in a passfile: "
                "?passfile=/etc/smtpproxy/pgpass)"
                % (redact_uri(location), hide_secrets(
                    re.sub(r"\Ainvalid dsn: ", "", _one_line(error)),
                    location)))   # psycopg2's prefix
    # Neither is checked by libpq's parse, and both fail every connection
    # (the value is not shown: it may be a piece of the password).
    for host in parameters.get("host", "").split(","):
        if "@" in host and not host.startswith(("/", "@")):
            return ("%s: its host name holds \"@\": a password that holds "
                    "@ must be written %%40" % redact_uri(location))
    for port in parameters.get("port", "").split(","):
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            return ("%s: its port is not a number from 1 to 65535: a "
                    "password that holds / must be written %%2F"
                    % redact_uri(location))
    return None


def postgresql_driver(name=None):
    """The PostgreSQL driver module, imported now: ``name`` ("psycopg",
    version 3, or "psycopg2"), or the first of them that is installed.
    None that can be imported: StoreError, saying whether one is installed
    but cannot be imported (and why: a library it needs, files the user
    cannot read), or what to install."""
    broken = []
    for candidate in [name] if name else ["psycopg", "psycopg2"]:
        try:
            module = importlib.import_module(candidate)
            if getattr(module, "__file__", None) is not None:
                return module
            # A namespace package: the driver's directory, whose
            # __init__.py this user cannot reach (else what an uninstall
            # left behind: not installed).
            del sys.modules[candidate]
            hidden = [path for path in module.__path__
                      if not os.access(path, os.R_OK | os.X_OK)]
            if hidden:
                broken.append("%s cannot be imported (%s: this user cannot "
                              "read it)" % (candidate, ", ".join(hidden)))
        except ImportError as error:
            if getattr(error, "name", None) == candidate:
                continue                    # not installed
            broken.append("%s cannot be imported (%s)"
                          % (candidate, _one_line(error)))
        except Exception as error:          # unreadable, or its own bug
            broken.append("%s cannot be imported (%s: %s)" % (
                candidate, error.__class__.__name__, _one_line(error)))
    if broken:
        raise StoreError(
            "greylist_db is a PostgreSQL database, but its driver %s, for "
            "%s: install it again, or make its files readable by the "
            "serving user" % ("; ".join(broken), sys.executable))
    raise StoreError(
        "greylist_db is a PostgreSQL database, but %s for %s: %s" % (
            "%s is not installed" % name if name else
            "neither psycopg nor psycopg2 is installed", sys.executable,
            _driver_advice(name)))


def _driver_advice(name):
    """How to install the driver ``name`` (None: either) for this
    interpreter: Debian's package for Debian's own python3 (whose pip
    refuses to install into it), else pip."""
    package = name or "psycopg"
    if sys.prefix == sys.base_prefix == "/usr" and os.path.exists(
            "/etc/debian_version"):
        return ("apt install python3-%s%s (or, in a venv: pip install "
                "'smtpproxy[postgresql]')" % (
                    package, "" if name else " (or python3-psycopg2)"))
    return "pip install 'smtpproxy[postgresql]' (or pip install %s)" % {
        "psycopg2": "psycopg2-binary"}.get(name, "'psycopg[binary]'")


def _warm_store(handler_class):
    """In a process about to serve: a PostgreSQL store of
    ``handler_class`` starts connecting now, in its connector's thread,
    so that the first RCPT does not wait for the connection (nor, on a
    busy host, fall back for want of it).  Its failure is the first
    decision's to report."""
    location = getattr(handler_class, "greylist_db", None)
    if location and is_database_uri(location):
        try:
            stores.get(handler_class)._warm()
        except (sqlite3.Error, ResourceShortage):
            pass


def _load_postgresql_driver(location):
    """Before the switch to the serving user (as root): import the driver
    of the PostgreSQL store ``location``, and what it imports only when
    used, so that the store works for a user who cannot read the
    interpreter's files (an interpreter under /root, a driver installed
    for root alone).  Nothing for an sqlite store; a driver that cannot
    be imported is left to the store's check to report."""
    if not is_database_uri(location):
        return
    try:
        module = postgresql_driver(PostgreSQLStore.driver)
        _libpq_version(module)
        _parse_database_uri(location, module)
    except Exception:
        pass


def _libpq_version(module):
    """The version of the libpq the driver ``module`` uses, as libpq
    writes it (150004 is 15.4); 0 if unknown."""
    try:
        if module.__name__ == "psycopg":
            return module.pq.version()
        return importlib.import_module(
            module.__name__ + ".extensions").libpq_version()
    except Exception:           # an old driver: assume an old libpq
        return 0


def _one_line(error):
    """A driver's message on one line (libpq's have several)."""
    return " ".join(str(error).split()) or error.__class__.__name__


# libpq gives no SQLSTATE for a connection that the server refused, only
# its message, "connection to server at ... failed: FATAL:  TEXT": the
# severity and two spaces in any language, TEXT in the server's
# (lc_messages).  These are the English TEXTs of the refusals that say
# the configuration is wrong, with their SQLSTATEs (PostgreSQL's
# src/backend/libpq/auth.c and utils/init/postinit.c).  A server that
# speaks another language is not understood: its refusal is taken for an
# outage, as is every failure not known to be something else.
_REFUSALS = [(re.compile(pattern), sqlstate) for pattern, sqlstate in (
    (r"password authentication failed for user ", "28P01"),
    (r"\S+ authentication failed for user ", "28000"),
    (r"no pg_hba\.conf entry for ", "28000"),
    (r"pg_hba\.conf rejects connection ", "28000"),
    (r"role \".*\" does not exist", "28000"),
    (r"role \".*\" is not permitted to log in", "28000"),
    (r"database \".*\" does not exist", "3D000"),
    (r"permission denied for database ", "42501"))]


# libpq's own refusals of a connection parameter (before any network),
# and of a login without a password (none in the URI, no passfile it
# may read: a passfile that others may read is ignored), in English:
# Python leaves LC_MESSAGES at "C".
_PARAMETER_REFUSAL = re.compile(
    r"invalid \S+ value|invalid integer value|invalid port number|"
    r"could not match \d+ |invalid connection option")


_NO_PASSWORD = "fe_sendauth: no password supplied"


# What to do about each configuration error (by SQLSTATE or its class).
_CONFIGURATION_HINTS = {
    "28": "the server refuses the login: check the user name and "
          "password of greylist_db (or its passfile) and the server's "
          "pg_hba.conf",
    "3D000": "no such database: make it (createdb --owner USER NAME) or "
             "correct its name in greylist_db",
    "3F000": "no schema to make the tables in: set the user's "
             "search_path, or let the database's owner make the tables",
    "42501": "permission denied: grant the user CONNECT on the database "
             "and, for the first start, CREATE on its schema (or let the "
             "database's owner make the tables)",
    _NO_PASSWORD: "the server asks for a password: name a passfile in "
                  "greylist_db (?passfile=PATH), mode 0600, owned by the "
                  "serving user",
    None: "libpq refuses this URI or one of its parameters",
}


def _server_refusal(text):
    """The SQLSTATE of the server's refusal that the message ``text`` of
    a connection that failed (as the driver gives it, on several lines)
    quotes; None if no refusal is recognised."""
    for match in re.finditer(r"\S:  ([^\n]*)", text):
        for pattern, sqlstate in _REFUSALS:
            if pattern.match(match.group(1)):
                return sqlstate
    return None


# PostgreSQL's clock, in seconds since the epoch, unless a time is given.
_PG_CLOCK = "COALESCE(%s::float8, EXTRACT(EPOCH FROM CURRENT_TIMESTAMP)::float8)"


class _Transaction(object):
    """One transaction of a PostgreSQLStore on its autocommit connection,
    in as few round trips as its statements allow: BEGIN goes with the
    first statement and COMMIT with the last (``last``), in one query
    string (the drivers bind parameters on the client side).  A statement
    run ``alone`` is a transaction by itself."""

    def __init__(self, cursor, several_results, deadline=None, timeout=0,
                 read_only=False):
        self.cursor = cursor
        # A reader's statements see one snapshot, and may write nothing.
        self._begin = ("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; "
                       if read_only else "BEGIN; ")
        self._several = several_results     # psycopg 3: one per statement
        self.begun = self.ended = False
        self._deadline = deadline           # of the decision
        self._timeout = timeout             # the session's statement_timeout

    def execute(self, sql, params=(), last=False, alone=False):
        prefix = ""
        if not (alone or self.begun):
            prefix = self._begin
            self.begun = True
        if self.begun and not alone and self._deadline is not None:
            # The decision waited (for a connection, its turn, the first
            # statement): this statement may take only what is left.
            left = self._deadline - time.monotonic()
            if left < self._timeout - 0.05:
                prefix += "SET LOCAL statement_timeout = %d; " % max(
                    1, int(left * 1000))
        sql = prefix + sql
        if last:
            sql += "; COMMIT"
            self.ended = True
        self.cursor.execute(sql, params)
        if self._several and ";" in sql:
            while self.cursor.nextset():    # to the last statement's
                pass

    def fetchone(self):
        return self.cursor.fetchone()

    def fetchall(self):
        return self.cursor.fetchall()

    @property
    def rowcount(self):
        return self.cursor.rowcount

    def commit(self):
        if self.begun and not self.ended:
            self.cursor.execute("COMMIT")
            self.ended = True


class PostgreSQLStore(StoreBase):
    """The greylisting triplets in a PostgreSQL database, shared by the MX
    hosts of a domain: a client deferred by one and retrying on another
    is accepted there after the delay.  ``greylist_db`` is a libpq URI
    (postgresql://user:password@host:port/dbname, or
    postgresql:///dbname?host=/run/postgresql for a local socket).  The
    decisions are StoreBase's (triplet_step), as the sqlite store's, with
    the same attributes and methods, and:

    - time is the database's clock, so hosts whose clocks differ agree;
      the ``now`` given is used only with ``database_clock`` false (tests
      that drive time);
    - a decision locks its triplet's row (SELECT ... FOR UPDATE; a first
      sighting is INSERT ... ON CONFLICT DO NOTHING), so that decisions
      from any number of processes and hosts are those of a serial run;
    - expired entries are purged by one instance at a time (an advisory
      lock), once per ``purge_interval`` for all instances together (the
      last purge's time is in the database); an error of that purge is
      logged and decides nothing;
    - the tables (smtpproxy_triplets, smtpproxy_clients, smtpproxy_traps)
      are made at the first use, under an advisory lock, with the
      schema's version in smtpproxy_schema, so that a later version can
      migrate them (``_migrate``; version 2 added smtpproxy_traps); a
      schema newer than ``schema_version`` is refused.
      Made by the database's administrator, they need no CREATE right.
      Version 2 added the triplets' ``delay`` and smtpproxy_expired (the
      purge's tallies, for report());
    - made ``read_only`` (the report), its sessions are read only
      (default_transaction_read_only), each use one REPEATABLE READ
      snapshot, and it makes and migrates no table: it reads tables of
      an earlier version as they are.

    A decision takes two round trips: BEGIN with the triplet's row
    (inserted, or read and locked, in one statement), then its change
    with COMMIT.  With ``synchronous_commit`` false (the default; true
    keeps the server's own setting), the store's sessions commit without
    waiting for the server's disk: a
    crash of the database server may forget the decisions of its last
    fraction of a second, whose triplets are then greylisted once more;
    no mail is lost, and no decision waits for an fsync.

    The process has one connection, used by one thread at a time, as the
    sqlite store's.  ``greylist_db_timeout`` bounds each decision in all:
    the wait for a connection, the turn in this process, and its
    statements (statement_timeout, also row locks, set to what is left);
    TCP keepalives find a server that vanished.  Connections are made by
    a thread of the store's own (the connector), never by a decision:
    libpq tries the hosts of the URI one after the other, each for up to
    connect_timeout (greylist_db_timeout, 2 s at least, libpq's floor),
    and a decision waits for the connector until its deadline only (so
    do all that arrive meanwhile, side by side).  A server that is read
    only (a standby) is refused: target_session_attrs=read-write is added
    to the URI unless it names one, so that libpq finds the primary among
    the hosts, and a server that turns read-only (SQLSTATE 25006) is left
    at once.  The server the store is on (host, port, the cluster's
    system identifier, the primary's timeline) is logged, and each
    change of it; a timeline older than one seen before is a former
    primary come back after a failover, logged as an error.

    An answer that says the
    configuration is wrong (``configuration_sqlstates``: the login or the
    database refused) is a StoreConfigError, which stops --check-config
    and the start; while serving, it is an outage as any other.  Every
    message is shown without the password (hide_secrets()).  While the
    database cannot be reached, decisions fail at once with the last
    failure (StoreError) until the connector's next attempt,
    ``retry_min`` seconds after a failure, doubling up to ``retry_max``
    while the failure stays the same, and ``retry_min`` again when it
    changes (the server answers again, starting up: it is coming back);
    so decisions work again within about ``retry_max`` of the database
    being usable.  The connector tries only while decisions ask; each
    distinct error is marked ``first_of_incident`` once.  A connection
    the server closed (a restart, a failover, an idle timeout) is opened
    again at once and the decision tried once more.

    ``driver``: the driver module, "psycopg" (3) or "psycopg2"; None: the
    first installed, psycopg first.  It is imported by the constructor,
    never by the module's import: smtpproxy without PostgreSQL needs
    nothing outside the standard library.
    """

    schema_version = 2
    # Version 2 adds the greytraps: made with the other tables, or by
    # _migrate() from version 1.
    _SCHEMA_2_TRAPS = (
        "CREATE TABLE smtpproxy_traps ("
        " client text PRIMARY KEY,"
        " sprung double precision NOT NULL,"
        " expires double precision NOT NULL,"
        " recipient text NOT NULL)",)
    # And --db-report's part (run after the traps' by _migrate from
    # version 1; a new database gets the same from the CREATE TABLEs).
    _SCHEMA_2_REPORT = (
        "ALTER TABLE smtpproxy_triplets"
        " ADD COLUMN IF NOT EXISTS delay double precision",
        "CREATE TABLE IF NOT EXISTS smtpproxy_expired ("
        " hour bigint PRIMARY KEY,"
        " triplets bigint NOT NULL)",
    )
    # The SQLSTATEs (or their classes, two characters) that say the
    # configuration is wrong (StoreConfigError): the login refused (class
    # 28: a wrong password, no such role, no pg_hba.conf entry), no such
    # database (3D000), no schema for the tables (3F000), no permission
    # (42501: to connect, or to make or use the tables).
    configuration_sqlstates = ("28", "3D000", "3F000", "42501")
    database_clock = True
    synchronous_commit = False
    retry_min = 0.25
    retry_max = 1.0
    driver = None
    application_name = "smtpproxy"
    _SCHEMA_LOCK = 0x736d7470           # advisory lock keys: "smtp"
    _PURGE_LOCK = 0x736d7471            # and one more

    def __init__(self, uri, settings=None, read_only=False):
        # No connection yet: the first use makes it, and says why not.
        self._module = postgresql_driver(self.driver)
        StoreBase.__init__(self, uri, settings, read_only)
        self._version = None        # of the tables found (read_only)
        # The connector's state, under _ready's lock (see _connect_loop).
        self._ready = threading.Condition(threading.Lock())
        self._fresh = None          # a connection made, not yet taken
        self._wanted = False        # a decision asked for a connection
        self._attempting = False    # the connector is connecting now
        self._connector = None      # its thread, while it has work
        self._generation = 0        # close() makes earlier ones stale
        self._retry_at = 0.0
        self._retry_delay = 0.0
        self._last_error = None     # of the last attempt, if it failed
        self._server = None         # where the last connection went
        self._timelines = {}        # system identifier -> (timeline, where)

    def __str__(self):
        return redact_uri(self.path)

    # -- the connection -----------------------------------------------------
    #
    # Connections are made by a thread of the store's own, the connector,
    # never by a decision: libpq's connect_timeout counts per host of the
    # URI, so a connection may take that long times the hosts, and a
    # decision may wait only greylist_db_timeout in all.  A decision that
    # finds no connection asks the connector for one and waits for it
    # until its deadline; all that wait are let go together, by the
    # connection or by the attempt's failure.  Between failed attempts
    # the connector pauses retry_min seconds, doubling up to retry_max,
    # back to retry_min when the failure changes (the server answers
    # something else: it is coming back); meanwhile decisions fail at once
    # with the last failure.  It makes attempts only while decisions ask,
    # and its thread ends when none does.

    def _warm(self):
        with self._ready:
            if self._db is None and self._fresh is None:
                self._wanted = True
                self._start_connector()

    def _await_connection(self, deadline):
        if self._db is None:        # a glance: _connection() makes sure
            self._wait_for_connection(deadline, take=False)

    def _connection(self):
        """The connection, with ``_lock`` held: the one in use, or the one
        the connector made; else wait for the connector until the
        decision's deadline.  StoreError if there is none."""
        if self._db is None:
            self._wait_for_connection(
                self._deadline or time.monotonic() + self.greylist_db_timeout,
                take=True)
        return self._db

    def _wait_for_connection(self, deadline, take):
        """Until ``deadline``: return when a connection is there (taken
        into ``_db`` if ``take``: with ``_lock`` held); raise the last
        attempt's failure if the connector is pausing after it, or a
        StoreError at the deadline."""
        with self._ready:
            while self._db is None and self._fresh is None:
                now = time.monotonic()
                if self._last_error is not None and not self._attempting \
                        and now < self._retry_at:
                    self._wanted = True     # the connector tries again
                    self._start_connector()
                    raise self._again(self._last_error)
                if now >= deadline:
                    raise StoreError(
                        "no connection within greylist_db_timeout (%s s): "
                        "still connecting to %s" % (
                            self.greylist_db_timeout, self))
                self._wanted = True
                self._start_connector()
                self._ready.wait(deadline - now)
            if take and self._db is None:
                self._db, self._fresh = self._fresh, None

    @staticmethod
    def _again(error):
        # The failure of the last attempt, raised once more for another
        # decision: a copy, so that each has its own traceback and marks.
        if isinstance(error, StoreError):
            again = type(error)(str(error))
            again.sqlstate = error.sqlstate
            return again
        return error

    def _start_connector(self):
        # With _ready's lock held.
        if self._connector is None or not self._connector.is_alive():
            self._connector = threading.Thread(
                target=self._connect_loop, name="smtpproxy-store-connector")
            self._connector.daemon = True
            self._connector.start()
        self._ready.notify_all()

    def _connect_loop(self):
        """The connector: an attempt whenever a decision asked for a
        connection and the pause after the last failure is over; ends
        when none asks (or a connection waits to be taken)."""
        while True:
            with self._ready:
                while True:
                    if self._connector is not threading.current_thread():
                        return              # replaced (or a fork's copy)
                    if not self._wanted or self._fresh is not None:
                        self._connector = None
                        return
                    pause = self._retry_at - time.monotonic()
                    if pause <= 0:
                        break
                    self._ready.wait(pause)
                self._wanted = False
                self._attempting = True
                generation = self._generation
            connection, error = None, None
            try:
                connection = self._open()
            except BaseException as failure:    # handed to the decisions
                error = failure
            with self._ready:
                self._attempting = False
                if error is None and generation != self._generation:
                    connection.close()      # closed meanwhile: stale
                elif error is None:
                    self._fresh = connection
                    self._last_error = None
                    self._retry_delay = 0.0
                else:
                    changed = (self._last_error is None
                               or str(error) != str(self._last_error))
                    self._retry_delay = self.retry_min if changed else min(
                        self.retry_max, max(self.retry_min,
                                            2 * self._retry_delay))
                    self._retry_at = time.monotonic() + self._retry_delay
                    self._last_error = error
                self._ready.notify_all()

    def _connect_options(self):
        """What the connection is opened with, beside the URI: its
        timeouts, its name, and a primary only (target_session_attrs
        read-write, libpq 10 and later), unless the URI says otherwise."""
        timeout = self.greylist_db_timeout
        options = dict(
            connect_timeout=max(2, int(math.ceil(timeout))),
            application_name=self.application_name, keepalives=1,
            keepalives_idle=max(1, int(timeout)),
            keepalives_interval=1, keepalives_count=3)
        if "target_session_attrs" not in self.path and \
                _libpq_version(self._module) >= 100000:
            options["target_session_attrs"] = "read-write"
        return options

    def _open(self):
        """A new connection, ready for decisions (_prepare()), made by the
        connector: a StoreError (or ResourceShortage) if it cannot be."""
        connection = None
        try:
            connection = self._module.connect(
                self.path, **self._connect_options())
            # Transactions are _Transaction's: BEGIN and COMMIT travel
            # with the statements, parameters bound by the driver.
            connection.autocommit = True
            if hasattr(self._module, "ClientCursor"):
                connection.cursor_factory = self._module.ClientCursor
            self._prepare(connection)
        except Exception as error:
            if connection is not None:
                connection.close()
            if out_of_descriptors():
                raise ResourceShortage(
                    "greylisting store %s: %s (out of descriptors)"
                    % (self, hide_secrets(_one_line(error), self.path))) \
                    from None
            if isinstance(error, StoreError) or \
                    not isinstance(error, self._module.Error):
                raise
            raise self._failure(error, connection is None) from None
        return connection

    def _failure(self, error, connecting=False):
        """The StoreError of the driver's ``error``, its message without
        the password; a StoreConfigError if the answer says that the
        configuration is wrong: by its SQLSTATE, or, when ``connecting``
        (the drivers give none then), by the server's refusal in the
        message, libpq's refusal of a parameter, or a URI the driver
        cannot read (its ProgrammingError)."""
        raw = str(error)
        text = hide_secrets(_one_line(error), self.path)
        sqlstate = self._sqlstate(error)
        if sqlstate is None and connecting:
            sqlstate = _server_refusal(raw)
        configuration = (
            sqlstate is not None
            and sqlstate.startswith(self.configuration_sqlstates))
        hint = None
        if sqlstate is None and connecting:
            if _NO_PASSWORD in raw:
                configuration, hint = True, _NO_PASSWORD
            elif (_PARAMETER_REFUSAL.search(raw)
                  or isinstance(error, self._module.ProgrammingError)):
                configuration = True
        if configuration:
            hint = _CONFIGURATION_HINTS.get(
                hint or sqlstate, _CONFIGURATION_HINTS.get(
                    sqlstate and sqlstate[:2]))
            failure = StoreConfigError("%s (%s%s)" % (
                text, "SQLSTATE %s: " % sqlstate if sqlstate else "",
                hint or "the configuration is wrong"))
        else:
            failure = StoreError(text)
        failure.sqlstate = sqlstate
        return failure

    def _prepare(self, connection):
        """Bound each statement, refuse a server that is read-only, say
        when the server changed (_arrived()), and make the tables or check
        their version, under the schema's advisory lock."""
        cursor = connection.cursor()
        cursor.execute("SET statement_timeout = %d"
                       % max(1, int(self.greylist_db_timeout * 1000)))
        if not self.synchronous_commit:
            cursor.execute("SET synchronous_commit = off")
        self._arrived(connection, cursor)
        if self.read_only:
            cursor.execute("SET default_transaction_read_only = on")
            self._check_version(cursor)
            cursor.close()
            return
        cursor.execute("BEGIN")
        cursor.execute("SELECT pg_advisory_xact_lock(%d),"
                       " to_regclass('smtpproxy_schema') IS NOT NULL"
                       % self._SCHEMA_LOCK)
        if not cursor.fetchone()[1]:
            for statement in (
                    "CREATE TABLE smtpproxy_schema ("
                    " version integer NOT NULL,"
                    " last_purge double precision)",
                    "CREATE TABLE smtpproxy_triplets ("
                    " key text PRIMARY KEY,"
                    " first_seen double precision NOT NULL,"
                    " last_seen double precision NOT NULL,"
                    " passed double precision,"
                    " passes integer NOT NULL DEFAULT 0,"
                    " delay double precision)",
                    "CREATE TABLE smtpproxy_clients ("
                    " network text PRIMARY KEY,"
                    " passes integer NOT NULL,"
                    " last_seen double precision NOT NULL)",
                    "CREATE TABLE smtpproxy_expired ("
                    " hour bigint PRIMARY KEY,"
                    " triplets bigint NOT NULL)"):
                cursor.execute(statement)
            for statement in self._SCHEMA_2_TRAPS:
                cursor.execute(statement)
            cursor.execute("INSERT INTO smtpproxy_schema (version)"
                           " VALUES (%d)" % self.schema_version)
        else:
            cursor.execute("SELECT version FROM smtpproxy_schema")
            version = cursor.fetchone()[0]
            if version > self.schema_version:
                raise StoreConfigError(
                    "the tables are of schema version %d, newer than this "
                    "smtpproxy's (%d): upgrade smtpproxy on this host too"
                    % (version, self.schema_version))
            if version < self.schema_version:
                self._migrate(cursor, version)
        cursor.execute("COMMIT")
        cursor.close()

    def _arrived(self, connection, cursor):
        """Where ``connection`` went: the host and port libpq chose, the
        cluster's system identifier and the primary's timeline (a
        promotion starts a new one).  A standby, read-only, is refused
        (StoreError): the next attempt goes on to the next host (libpq's
        target_session_attrs), or waits for a primary.  The first server
        of the process is logged, and so is each change, so that two
        primaries show in the log; a timeline older than one seen before
        of the same cluster is a former primary that came back after a
        failover: an error."""
        cursor.execute("SELECT pg_is_in_recovery(), inet_server_addr(),"
                       " inet_server_port()")
        standby, address, port = cursor.fetchone()
        info = getattr(connection, "info", None)   # psycopg2 2.8, psycopg
        host = getattr(info, "host", None) or address or "local socket"
        port = getattr(info, "port", None) or port
        where = "%s:%s" % (host, port) if port else str(host)
        if standby:
            raise StoreError(
                "the server at %s is a standby (read-only, in recovery): "
                "greylist_db must lead to the primary (list the primary "
                "and its standbys as hosts of the URI: the primary is "
                "found among them)" % where)
        system = timeline = None
        try:
            # PostgreSQL 10 and later; the timeline is that of the WAL
            # written now (a checkpoint's may be older for a while).
            cursor.execute(
                "SELECT system_identifier::text, ('x' || substr("
                "pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)"
                "::int FROM pg_control_system()")
            system, timeline = cursor.fetchone()
        except self._module.Error:
            pass                    # older, or not allowed: host alone
        server = (where, system, timeline)
        last, self._server = self._server, server
        known = self._timelines.get(system)
        if system is not None and (known is None or timeline > known[0]):
            self._timelines[system] = (timeline, where)
        text = "%s (system identifier %s, timeline %s)" % server
        if known is not None and timeline < known[0]:
            log.error(
                "greylisting store %s: the server at %s is on timeline %s "
                "of its cluster, but timeline %s was seen at %s: a former "
                "primary that came back after a failover, whose greylist "
                "is not the new primary's; stop it, or make it a standby "
                "of the new primary (pg_rewind), and keep it out of "
                "greylist_db until then" % (self, where, timeline,
                                            known[0], known[1]))
        elif last is None:
            log.info("greylisting store %s: on the server at %s"
                     % (self, text))
        elif last != server:
            log.warning("greylisting store %s: now on the server at %s; "
                        "it was %s (system identifier %s, timeline %s)"
                        % ((self, text) + last))

    def _check_version(self, cursor):
        """For a read_only store: the version of the tables there, in
        ``_version`` (None: no tables yet); a newer one than this
        smtpproxy's is refused as _prepare() refuses it.  Nothing is
        made or migrated."""
        cursor.execute("SELECT to_regclass('smtpproxy_schema') IS NOT NULL")
        self._version = None
        if cursor.fetchone()[0]:
            cursor.execute("SELECT version FROM smtpproxy_schema")
            self._version = cursor.fetchone()[0]
            if self._version > self.schema_version:
                raise StoreConfigError(
                    "the tables are of schema version %d, newer than this "
                    "smtpproxy's (%d): upgrade smtpproxy on this host too"
                    % (self._version, self.schema_version))

    def _migrate(self, cursor, version):
        """Bring the tables from schema ``version`` to
        ``schema_version``, in the transaction that holds the schema's
        lock.  Version 1 is the first; 2 adds the greytraps
        (smtpproxy_traps) and what --db-report reads (the wait of each
        pass, the tallies of smtpproxy_expired)."""
        if version < 2:
            for statement in self._SCHEMA_2_TRAPS + self._SCHEMA_2_REPORT:
                cursor.execute(statement)
        cursor.execute("UPDATE smtpproxy_schema SET version = %d"
                       % self.schema_version)

    def _transact(self, work, args, read_only):
        """Run ``work(transaction, *args)`` (a _Transaction: its work
        locks the rows it reads to write them; ``read_only``: one
        snapshot, READ ONLY); a connection the server closed, or to a
        server that turned read-only (SQLSTATE 25006), is replaced and
        the work tried once more, within the decision's deadline.  The
        database server checkpoints by itself: checkpoint() is
        StoreBase's."""
        for attempt in (1, 2):
            fresh = self._db is None
            connection = self._connection()
            try:
                cursor = connection.cursor()
                transaction = _Transaction(
                    cursor, hasattr(cursor, "nextset") and
                    self._module.__name__ == "psycopg",
                    self._deadline, self.greylist_db_timeout, read_only)
                result = work(transaction, *args)
                transaction.commit()
                cursor.close()
            except self._module.Error as error:
                # (Not ``read_only``, the kind of work: that stays.)
                turned = self._sqlstate(error) == "25006"
                if not self._discard(connection, turned) and \
                        attempt == 1 and (turned or not fresh):
                    continue            # a stale connection: once more
                raise self._failure(error) from None
            except BaseException:
                self._discard(connection)
                raise
            return result

    @staticmethod
    def _sqlstate(error):
        return getattr(error, "sqlstate", None) or getattr(
            error, "pgcode", None)

    def _discard(self, connection, close=False):
        """After an error: roll back, and close a connection that broke
        (or if ``close``).  True if the connection is still good."""
        try:
            if not (close or connection.closed):
                cursor = connection.cursor()
                cursor.execute("ROLLBACK")
                cursor.close()
                return True
        except self._module.Error:
            pass
        try:
            connection.close()
        except self._module.Error:
            pass
        self._db = None
        return False

    def _disconnect(self):
        # With _lock held: the connection in use, one made and not yet
        # taken, and one being made (closed when it is).
        StoreBase._disconnect(self)
        with self._ready:
            self._generation += 1
            fresh, self._fresh = self._fresh, None
        if fresh is not None:
            fresh.close()

    def _clock(self, now):
        # None: the database's clock (_PG_CLOCK).
        return None if self.database_clock else now

    # -- decisions ----------------------------------------------------------

    def _decide_and_count(self, tx, key, now, client, add=True):
        # Round trips: BEGIN and the triplet (inserted if new, else read
        # and locked) in one, the change and COMMIT in the other.  Both
        # halves of the union see the same snapshot: at most one row.
        clock = self._clock(now)
        if not add:
            # A new triplet may not be added: only read (and lock).
            tx.execute("SELECT first_seen, passed, " + _PG_CLOCK + ", false"
                       " FROM smtpproxy_triplets WHERE key = %s FOR UPDATE",
                       (clock, key))
            row = tx.fetchone()
            if row is None:
                return _FIRST_SIGHTING
            return self._decide_row(tx, key, client, row)
        tx.execute(
            "WITH new AS (INSERT INTO smtpproxy_triplets"
            " (key, first_seen, last_seen) SELECT %s, t, t FROM (SELECT "
            + _PG_CLOCK + " AS t) AS c ON CONFLICT (key) DO NOTHING"
            " RETURNING first_seen)"
            " SELECT first_seen, NULL::float8, first_seen, true FROM new"
            " UNION ALL SELECT first_seen, passed, " + _PG_CLOCK + ", false"
            " FROM (SELECT first_seen, passed FROM smtpproxy_triplets"
            " WHERE key = %s FOR UPDATE) AS known",
            (key, clock, clock, key))
        row = tx.fetchone()
        if row is None:
            # Inserted meanwhile by another decision, which held us back
            # until it committed: now it can be read.
            tx.execute("SELECT first_seen, passed, " + _PG_CLOCK + ", false"
                       " FROM smtpproxy_triplets WHERE key = %s FOR UPDATE",
                       (clock, key))
            row = tx.fetchone()
        return self._decide_row(tx, key, client, row)

    def _decide_row(self, tx, key, client, row):
        # The rest of _decide_and_count, for the triplet's row.
        first_seen, passed, now, inserted = row
        if inserted:
            return _FIRST_SIGHTING              # first seen now
        step, change = triplet_step(first_seen, passed, now, self)
        statements, params = [], []
        if change == RESTART:
            if self._window_closed(first_seen, passed, now):
                # Retried too late: the sighting that expired is
                # tallied, as the purge would have.
                statements.append(
                    "INSERT INTO smtpproxy_expired (hour, triplets)"
                    " VALUES (%s, 1) ON CONFLICT (hour) DO UPDATE"
                    " SET triplets = smtpproxy_expired.triplets + 1")
                params.append(self._tally_hour(first_seen))
            statements.append(
                "UPDATE smtpproxy_triplets SET first_seen = %s,"
                " last_seen = %s, passed = NULL, passes = 0, delay = NULL"
                " WHERE key = %s")
            params += [now, now, key]
        elif change == PASS:
            statements.append(
                "UPDATE smtpproxy_triplets SET passed = %s, last_seen = %s,"
                " passes = passes + 1, delay = coalesce(%s, delay)"
                " WHERE key = %s")
            params += [now, now, step.delay, key]
        if step.delay is not None and client is not None:
            # A greylisting pass: counted as the sqlite store counts it.
            statements.append(
                "INSERT INTO smtpproxy_clients (network, passes, last_seen)"
                " VALUES (%s, 1, %s) ON CONFLICT (network) DO UPDATE"
                " SET passes = smtpproxy_clients.passes + 1,"
                " last_seen = EXCLUDED.last_seen"
                " WHERE smtpproxy_clients.last_seen"
                " <= EXCLUDED.last_seen - %s")
            params += [client, now, self.client_pass_interval]
        if statements:
            tx.execute("; ".join(statements), params, last=True)
        return step

    def _client_is_trusted(self, tx, client, now):
        tx.execute(
            "UPDATE smtpproxy_clients SET last_seen = c.t FROM (SELECT "
            + _PG_CLOCK + " AS t) AS c WHERE network = %s AND passes >= %s"
            " AND last_seen > c.t - %s RETURNING network",
            (self._clock(now), client, self.auto_whitelist_clients,
             self.max_grey), alone=True)
        return tx.fetchone() is not None

    def _purge(self, tx, now, when_due=False):
        tx.execute(
            "SELECT %s(%d), " % ("pg_try_advisory_xact_lock" if when_due
                                 else "pg_advisory_xact_lock",
                                 self._PURGE_LOCK)
            + _PG_CLOCK + ", last_purge FROM smtpproxy_schema",
            (self._clock(now),))
        locked, now, last = tx.fetchone()
        if locked is False or when_due and last is not None and (
                now - last < self.purge_interval):
            return 0                    # another instance purges, or did
        # The grey triplets deleted are tallied (report()), in the same
        # statement: one scan.
        tx.execute(
            "WITH gone AS (DELETE FROM smtpproxy_triplets WHERE"
            " (passed IS NULL AND first_seen < %s) OR passed < %s"
            " RETURNING first_seen, passed),"
            " tally AS (INSERT INTO smtpproxy_expired (hour, triplets)"
            " SELECT floor(first_seen / %s) * %s, count(*) FROM gone"
            " WHERE passed IS NULL GROUP BY 1 ON CONFLICT (hour) DO UPDATE"
            " SET triplets = smtpproxy_expired.triplets + EXCLUDED.triplets)"
            " SELECT count(*) FROM gone",
            (now - self.max_defer_time, now - self.max_grey,
             self.tally_interval, self.tally_interval))
        deleted = tx.fetchone()[0]
        tx.execute("DELETE FROM smtpproxy_expired WHERE hour < %s",
                   (now - self.max_grey,))
        tx.execute("DELETE FROM smtpproxy_clients WHERE last_seen < %s",
                       (now - self.max_grey,))
        deleted += tx.rowcount
        tx.execute("DELETE FROM smtpproxy_traps WHERE expires <= %s",
                   (now,))
        deleted += tx.rowcount
        tx.execute("UPDATE smtpproxy_schema SET last_purge = %s",
                       (now,))
        return deleted

    def _spring_trap(self, tx, client, now, recipient):
        tx.execute(
            "INSERT INTO smtpproxy_traps (client, sprung, expires, recipient)"
            " SELECT %s, t, t + %s, %s FROM (SELECT " + _PG_CLOCK + " AS t)"
            " AS c ON CONFLICT (client) DO UPDATE SET"
            " sprung = EXCLUDED.sprung, expires = EXCLUDED.expires,"
            " recipient = EXCLUDED.recipient",
            (client, self.greytrap_time, recipient, self._clock(now)),
            alone=True)

    def _trap_left(self, tx, client, now):
        tx.execute(
            "SELECT expires - c.t FROM smtpproxy_traps, (SELECT "
            + _PG_CLOCK + " AS t) AS c WHERE client = %s AND expires > c.t",
            (self._clock(now), client), alone=True)
        row = tx.fetchone()
        return None if row is None else row[0]

    # -- administration -----------------------------------------------------

    def _entries(self, tx):
        tx.execute("SELECT key, first_seen, last_seen, passed, passes"
                       " FROM smtpproxy_triplets ORDER BY key")
        triplets = tx.fetchall()
        tx.execute("SELECT network, passes, last_seen"
                       " FROM smtpproxy_clients ORDER BY network")
        return triplets, tx.fetchall()

    def _pass_key(self, tx, key, now):
        tx.execute(
            "INSERT INTO smtpproxy_triplets"
            " (key, first_seen, last_seen, passed, passes)"
            " SELECT %s, t, t, t, 1 FROM (SELECT " + _PG_CLOCK + " AS t) AS c"
            " ON CONFLICT (key) DO UPDATE SET passed = EXCLUDED.passed,"
            " last_seen = EXCLUDED.last_seen,"
            " passes = smtpproxy_triplets.passes + 1",
            (key, self._clock(now)))

    def _delete(self, tx, key):
        tx.execute("DELETE FROM smtpproxy_triplets WHERE key = %s",
                       (key,))
        deleted = tx.rowcount
        tx.execute("DELETE FROM smtpproxy_clients WHERE network = %s",
                       (key,))
        deleted += tx.rowcount
        tx.execute("DELETE FROM smtpproxy_traps WHERE client = %s", (key,))
        return deleted + tx.rowcount > 0

    def _rekey(self, tx, change, address):
        # The traps' recipients (few: one row per trapped client).
        if address is not None:
            tx.execute("SELECT client, recipient FROM smtpproxy_traps"
                       " FOR UPDATE")
            for client, recipient in tx.fetchall():
                if address(recipient) != recipient:
                    tx.execute("UPDATE smtpproxy_traps SET recipient = %s"
                               " WHERE client = %s",
                               (address(recipient), client))
        # Three statements, however many rows: the rows locked and read,
        # those whose key changes deleted, and inserted again under their
        # new keys, merged (as _merged_triplets()) with one that is there.
        tx.execute("SELECT key, first_seen, last_seen, passed, passes,"
                   " delay FROM smtpproxy_triplets FOR UPDATE")
        moved = []
        for row in tx.fetchall():
            new = change(row[0])
            if new != row[0]:
                moved.append((new,) + tuple(row))
        if not moved:
            return 0
        tx.execute("DELETE FROM smtpproxy_triplets WHERE key = ANY(%s)",
                   ([row[1] for row in moved],))
        tx.execute(
            "INSERT INTO smtpproxy_triplets AS t"
            " (key, first_seen, last_seen, passed, passes, delay)"
            " SELECT * FROM unnest(%s::text[], %s::float8[], %s::float8[],"
            " %s::float8[], %s::int[], %s::float8[])"
            " ON CONFLICT (key) DO UPDATE SET"
            " first_seen = LEAST(t.first_seen, EXCLUDED.first_seen),"
            " last_seen = GREATEST(t.last_seen, EXCLUDED.last_seen),"
            " passed = GREATEST(t.passed, EXCLUDED.passed),"
            " passes = t.passes + EXCLUDED.passes,"
            " delay = COALESCE(t.delay, EXCLUDED.delay)",
            [[row[index] for row in moved]
             for index in (0, 2, 3, 4, 5, 6)],
            last=True)
        return len(moved)

    def _traps(self, tx):
        tx.execute("SELECT client, sprung, expires, recipient"
                   " FROM smtpproxy_traps ORDER BY client")
        return tx.fetchall()

    def _stats(self, tx):
        tx.execute("SELECT count(*) FILTER (WHERE passed IS NULL),"
                       " count(*) FILTER (WHERE passed IS NOT NULL),"
                       " (SELECT count(*) FROM smtpproxy_clients)"
                       " FROM smtpproxy_triplets")
        return tx.fetchone()

    def _report(self, tx, period, now):
        # In one READ ONLY snapshot (read_only).  Tables of version 1
        # (read by a read_only store, not migrated) have no delays, no
        # tallies and no traps; no tables at all, nothing.
        version = self._version if self.read_only else self.schema_version
        tx.execute("SELECT " + _PG_CLOCK, (self._clock(now),))
        now = tx.fetchone()[0]
        since, closed = now - period, now - self.max_defer_time
        figures = dict(now=now, seen=0, passed=0, never_retried=0,
                       waiting=0, waits=(0, None, None, None),
                       auto_whitelisted=0, clients=[], traps=[])
        if version is None:
            return figures
        waits = "0, NULL::float8, NULL::float8, NULL::float8"
        if version >= 2:
            waits = ("count(delay), percentile_disc(0.5) WITHIN GROUP"
                     " (ORDER BY delay), percentile_disc(0.9) WITHIN GROUP"
                     " (ORDER BY delay), max(delay)")
        tx.execute(
            "SELECT count(*), count(passed),"
            " count(*) FILTER (WHERE passed IS NULL AND first_seen < %s),"
            " count(*) FILTER (WHERE passed IS NULL AND first_seen >= %s), "
            + waits + " FROM smtpproxy_triplets WHERE first_seen >= %s",
            (closed, closed, since))
        row = tx.fetchone()
        tallied = 0
        if version >= 2:
            tx.execute("SELECT coalesce(sum(triplets), 0)"
                       " FROM smtpproxy_expired WHERE hour >= %s",
                       (self._tally_hour(since),))
            tallied = int(tx.fetchone()[0])
        trusted = 0
        if self.auto_whitelist_clients:
            tx.execute("SELECT count(*) FROM smtpproxy_clients"
                       " WHERE passes >= %s AND last_seen >= %s",
                       (self.auto_whitelist_clients, since))
            trusted = tx.fetchone()[0]
        tx.execute("SELECT split_part(key, ' ', 1) AS client, count(*),"
                   " count(passed) FROM smtpproxy_triplets"
                   " WHERE first_seen >= %s GROUP BY client", (since,))
        clients = tx.fetchall()
        traps = []
        if version >= 2:
            tx.execute("SELECT client, sprung, expires FROM smtpproxy_traps"
                       " WHERE sprung >= %s OR expires > %s", (since, now))
            traps = tx.fetchall()
        figures.update(
            seen=row[0] + tallied, passed=row[1],
            never_retried=row[2] + tallied, waiting=row[3],
            waits=tuple(row[4:8]), auto_whitelisted=trusted,
            clients=clients, traps=traps)
        return figures


# ===========================================================================
# == 12. The server: SMTPProxyServer, and the metrics ==
# ===========================================================================
#
# Owns:  the listening socket, a thread per client (reused: spare_threads),
#        the connection limits and stress (with workers, counted for the
#        service: SessionCounts), the counters, the graceful stop, and
#        service_actions() (checkpoints, the pool's expiry); the metrics:
#        their catalogue (METRIC_FAMILIES), the service's table (Metrics,
#        ``metrics``, which sections 4 to 13 count into) and the
#        Prometheus endpoint (MetricsServer, metrics_listen).
# Enter: SMTPProxyServer((host, port), handler_class).serve_forever();
#        metrics.add(name, *labels); MetricsServer((host, port)).
# Uses:  sections 2 to 10.


COUNTERS = ("connections", "connections_refused", "rcpt_accepted",
            "rcpt_deferred", "rcpt_refused", "messages_accepted",
            "messages_deferred", "messages_refused", "upstream_errors")


class SessionCounts(object):
    """The sessions open in each worker of a service (the workers key),
    in memory the master maps before its forks and every worker shares:
    each writes its own ``slot``, and reads the sum, so that
    max_connections is the whole service's however unevenly the kernel
    hands out connections (a worker may accept when another is full).
    Two workers taking the last place at the same instant may pass the
    limit by one each: at most workers - 1 sessions."""

    def __init__(self, workers):
        self.workers = workers
        self._memory = mmap.mmap(-1, 8 * workers)      # MAP_SHARED
        self.slot = None

    def set(self, count, slot=None):
        """This worker's sessions (or those of worker ``slot``, which the
        master clears when it died) are ``count`` now."""
        slot = self.slot if slot is None else slot
        struct.pack_into("q", self._memory, 8 * slot, count)

    def total(self):
        return sum(struct.unpack_from("%dq" % self.workers, self._memory))


# -- the metrics (metrics_listen) --------------------------------------------
#
# One catalogue, fixed at import, so that every process of a service (the
# master and its workers) agrees on where each series lies in the table
# they share (Metrics).  A series' labels take the values listed here
# only: what a rule or a client could make up (a rule's network or zone)
# is mapped to a kind first (rule_kind()), and a value not listed goes to
# "other", so that the exposition stays bounded whatever happens.

MetricFamily = collections.namedtuple(
    "MetricFamily", "name type help labels series buckets per_process")


def _family(name, type, help, labels=(), series=((),), buckets=(),
            per_process=False):
    return MetricFamily(name, type, help, tuple(labels),
                        tuple(tuple(values) for values in series),
                        tuple(buckets), per_process)


def _one_label(*values):
    return [(value,) for value in values]


# The kinds of a Decision's rule (rule_kind()), by the verdicts each gives:
# a rule another verdict comes with is counted under "other".
DECISION_KINDS = {
    "relay": ("allowed_senders",),
    "refuse": ("not-local", "greytrap"),
    "accept": ("whitelist_recipients", "whitelisted_triples",
               "whitelist_clients", "dnswl", "auto-whitelist",
               "not-suspicious", "network", "name", "unknown-client",
               "dnsbl", "dnsbl-not-asked", "suspicious", "store-failed"),
    "defer": ("network", "name", "unknown-client", "dnsbl",
              "dnsbl-not-asked", "suspicious", "store-failed",
              "max_new_triplets_per_session", "max_new_triplets_per_network",
              "greytrap"),
    "unavailable": ("store",),
}


# Histogram buckets: greylisting's delays from a minute (too_soon's
# order) to two days (past max_defer_time); the store's decisions from a
# millisecond (sqlite on a local disk) to greylist_db_timeout's range.
GREYLIST_DELAY_BUCKETS = (60, 300, 600, 1800, 3600, 7200, 14400, 28800,
                          43200, 86400, 172800)
STORE_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                         0.25, 0.5, 1, 2.5, 5, 10, 30)


METRIC_FAMILIES = (
    _family("smtpproxy_connections_total", "counter",
            "SMTP connections accepted from clients, refused ones too"),
    _family("smtpproxy_connections_refused_total", "counter",
            "SMTP connections refused with 421 by reason: max_connections, "
            "max_connections_per_ip (also after a PROXY header), stopping; "
            "stress: idle sessions closed under stress",
            ["reason"], _one_label("max_connections",
                                   "max_connections_per_ip", "stopping",
                                   "stress")),
    _family("smtpproxy_sessions_open", "gauge",
            "SMTP sessions open now in the whole service"),
    _family("smtpproxy_transactions_total", "counter",
            "SMTP transactions ended, by the status of their greylist_log "
            "line (NONE: the client ended it before any verdict)",
            ["status"], _one_label("ACCEPTED", "DEFERRED", "REFUSED",
                                   "FAILED", "NONE")),
    _family("smtpproxy_rcpt_replies_total", "counter",
            "replies to RCPT, ours or the upstream's, by outcome",
            ["outcome"], _one_label("accepted", "deferred", "refused")),
    _family("smtpproxy_message_replies_total", "counter",
            "replies to DATA and to messages, by outcome",
            ["outcome"], _one_label("accepted", "deferred", "refused")),
    _family("smtpproxy_decisions_total", "counter",
            "the greylisting engine's decisions, one per recipient (SMTP "
            "and policy service), by verdict and the kind of rule that "
            "decided (a greylisting pass: accept by network, name, "
            "unknown-client, dnsbl or suspicious)",
            ["verdict", "rule"],
            [(verdict, kind) for verdict in sorted(DECISION_KINDS)
             for kind in DECISION_KINDS[verdict] + ("other",)]
            + [("other", "other")]),
    _family("smtpproxy_greylist_delay_seconds", "histogram",
            "how long greylisting held a triplet back, at the try that "
            "passed", buckets=GREYLIST_DELAY_BUCKETS),
    _family("smtpproxy_store_decision_seconds", "histogram",
            "time the greylisting store took for one decision",
            buckets=STORE_SECONDS_BUCKETS),
    _family("smtpproxy_store_failures_total", "counter",
            "decisions the greylisting store failed (greylist_fail_mode "
            "applied, or out of descriptors)"),
    _family("smtpproxy_dns_list_lookups_total", "counter",
            "DNS list queries (dnsbl, dnswl; cached answers not counted) "
            "by outcome: listed, not_listed, error (an answer that is no "
            "listing), timeout, unasked (no lookup thread free)",
            ["outcome"], _one_label("listed", "not_listed", "error",
                                    "timeout", "unasked")),
    _family("smtpproxy_upstream_connects_total", "counter",
            "connections opened to the upstream"),
    _family("smtpproxy_upstream_connect_failures_total", "counter",
            "connections to the upstream that failed"),
    _family("smtpproxy_upstream_errors_total", "counter",
            "upstream sessions that broke in a transaction"),
    _family("smtpproxy_upstream_pool_total", "counter",
            "upstream sessions asked of the pool: hit (a warm one reused) "
            "or miss (a new connection)",
            ["result"], _one_label("hit", "miss")),
    _family("smtpproxy_upstream_retired_total", "counter",
            "upstream sessions not pooled for what was counted against "
            "them"),
    _family("smtpproxy_tls_failures_total", "counter",
            "TLS handshakes with clients that failed"),
    _family("smtpproxy_policy_requests_total", "counter",
            "policy service requests answered, by action",
            ["action"], _one_label("DUNNO", "DEFER_IF_PERMIT", "PREPEND",
                                   "OK", "REJECT", "DEFER", "other")),
    _family("smtpproxy_policy_bad_requests_total", "counter",
            "policy connections closed for a request that breaks the "
            "protocol"),
    _family("smtpproxy_policy_connections_refused_total", "counter",
            "policy connections refused, by the key that refused them",
            ["reason"], _one_label("policy_clients", "policy_max_connections",
                                   "policy_max_connections_per_peer")),
    _family("smtpproxy_process_threads", "gauge",
            "threads of each process (worker: its number, or master)",
            per_process=True),
    _family("smtpproxy_process_open_fds", "gauge",
            "open descriptors of each process", per_process=True),
    _family("smtpproxy_process_resident_memory_bytes", "gauge",
            "resident memory of each process", per_process=True),
)


# The counters SIGUSR1 logs (SMTPProxyServer.count(), _PolicyServing's)
# and the series each also adds to: one count() feeds both.  policy_ACTION
# is smtpproxy_policy_requests_total's ACTION.
COUNTER_SERIES = {
    "connections": ("smtpproxy_connections_total",),
    "rcpt_accepted": ("smtpproxy_rcpt_replies_total", "accepted"),
    "rcpt_deferred": ("smtpproxy_rcpt_replies_total", "deferred"),
    "rcpt_refused": ("smtpproxy_rcpt_replies_total", "refused"),
    "messages_accepted": ("smtpproxy_message_replies_total", "accepted"),
    "messages_deferred": ("smtpproxy_message_replies_total", "deferred"),
    "messages_refused": ("smtpproxy_message_replies_total", "refused"),
    "upstream_errors": ("smtpproxy_upstream_errors_total",),
    "upstream_reused": ("smtpproxy_upstream_pool_total", "hit"),
    "upstream_retired": ("smtpproxy_upstream_retired_total",),
    "tls_failures": ("smtpproxy_tls_failures_total",),
    "policy_bad_requests": ("smtpproxy_policy_bad_requests_total",),
}


def rule_kind(rule):
    """The kind of a Decision's rule, a label of bounded values: the word
    before its first space or ':' ("network:192.0.2.0/24" is "network",
    "auto-whitelist network:..." is "auto-whitelist", "dnswl:list.dnswl.org"
    is "dnswl")."""
    return re.split(r"[ :]", rule or "", 1)[0] or "other"


def _metric_number(value):
    if value == int(value) and abs(value) < 2 ** 53:
        return "%d" % value
    return repr(float(value))


def _label_text(value):
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace(
        '"', '\\"')


class Metrics(object):
    """The service's figures, for the metrics endpoint (metrics_listen):
    a table of doubles, a slot (row) per process and a cell per series of
    METRIC_FAMILIES (a histogram's buckets and sum are cells too).

    A process adds only to its own ``slot``, under its own lock; the
    exposition sums the slots, so that it shows the service's totals.  A
    single process has one slot.  With workers, share() (the master,
    before its forks) moves the table into memory every process maps, as
    SessionCounts: worker N writes slot N, the master the last; a worker
    killed and started again keeps adding to its number's slot, so that a
    counter never goes back while the service runs.  The master zeroes a
    dead worker's gauges (clear_gauges()).

    add(name, *labels, amount=1), set(name, value, *labels) (a gauge: this
    process's part, or with ``per_process``, this process's own figure),
    observe(name, value, *labels) (a histogram), count(counter) (a
    SIGUSR1 counter's series: COUNTER_SERIES), decision(decision) (a
    Decision), exposition() (Prometheus' text format, version 0.0.4).
    A label value not in the catalogue is counted as "other"; a name not
    in it raises KeyError."""

    def __init__(self, families=METRIC_FAMILIES):
        self.families = families
        self._families = dict((family.name, family) for family in families)
        self._index = {}                # (name, label values): first cell
        cells = 0
        for family in families:
            for values in family.series:
                self._index[(family.name, values)] = cells
                cells += (len(family.buckets) + 2
                          if family.type == "histogram" else 1)
        self.width = cells
        self.workers = None             # shared: the workers' number
        self.slot = 0
        self._cells = memoryview(bytearray(8 * cells)).cast("d")
        self._lock = threading.Lock()
        self._sampled = None

    def share(self, workers):
        """Move the table into shared memory (MAP_SHARED), with a slot for
        each of ``workers`` and one for this process, the master, which
        keeps what it counted so far."""
        width = self.width
        cells = memoryview(mmap.mmap(-1, 8 * width * (workers + 1))).cast(
            "d")
        with self._lock:
            start = self.slot * width
            cells[workers * width:(workers + 1) * width] = \
                self._cells[start:start + width]
            self._cells, self.workers, self.slot = cells, workers, workers

    def enter(self, slot):
        """In a forked worker: count in ``slot`` from now on (a lock of
        its own: no other thread of the master crossed the fork)."""
        self._lock = threading.Lock()
        self.slot = slot

    def _cell(self, name, labels):
        family = self._families[name]
        for values in (labels, labels[:-1] + ("other",),
                       ("other",) * len(labels)):
            cell = self._index.get((name, values))
            if cell is not None:
                return family, self.slot * self.width + cell
        return family, None

    def add(self, name, *labels, amount=1):
        """Add ``amount`` to this process's part of a series."""
        _, cell = self._cell(name, labels)
        if cell is not None:
            with self._lock:
                self._cells[cell] += amount

    def set(self, name, value, *labels):
        _, cell = self._cell(name, labels)
        if cell is not None:
            self._cells[cell] = value

    def observe(self, name, value, *labels):
        """Count ``value`` in a histogram."""
        family, cell = self._cell(name, labels)
        if cell is not None:
            bucket = bisect.bisect_left(family.buckets, value)
            with self._lock:
                self._cells[cell + bucket] += 1
                self._cells[cell + len(family.buckets) + 1] += value

    def count(self, counter):
        """Add one to the series of a SIGUSR1 counter (COUNTER_SERIES)."""
        series = COUNTER_SERIES.get(counter)
        if series is None and counter.startswith("policy_"):
            series = ("smtpproxy_policy_requests_total", counter[7:].upper())
        if series is not None:
            self.add(*series)

    def decision(self, decision):
        """Count a Decision of the greylisting engine: its verdict and
        rule's kind, a store failure, the delay of a pass."""
        self.add("smtpproxy_decisions_total", decision.verdict
                 if decision.verdict in DECISION_KINDS else "other",
                 rule_kind(decision.rule))
        if decision.error is not None:
            self.add("smtpproxy_store_failures_total")
        if decision.accepted and decision.delay is not None:
            self.observe("smtpproxy_greylist_delay_seconds", decision.delay)

    def clear_gauges(self, slot):
        """Zero the gauges of ``slot`` (a worker that died)."""
        for family in self.families:
            if family.type == "gauge":
                for values in family.series:
                    self._cells[slot * self.width
                                + self._index[(family.name, values)]] = 0

    def sample_process(self, interval=1.0):
        """Write this process's threads, descriptors and resident memory,
        at most once per ``interval`` seconds (from the service's loop)."""
        now = time.monotonic()
        if self._sampled is not None and now - self._sampled < interval:
            return
        self._sampled = now
        self.set("smtpproxy_process_threads", threading.active_count())
        try:
            # Less the one listdir() holds open.
            self.set("smtpproxy_process_open_fds",
                     len(os.listdir("/proc/self/fd")) - 1)
            with open("/proc/self/statm") as statm:
                self.set("smtpproxy_process_resident_memory_bytes",
                         int(statm.read().split()[1]) * mmap.PAGESIZE)
        except (OSError, ValueError, IndexError):
            pass                        # no /proc: not Linux

    def _slot_name(self, slot):
        return "master" if slot == self.workers else str(slot)

    def exposition(self):
        """The text format (version 0.0.4) of every series: the service's
        totals, and each process's own gauges."""
        width = self.width
        cells = self._cells.tolist()
        slots = len(cells) // width
        totals = [sum(cells[slot * width + cell] for slot in range(slots))
                  for cell in range(width)]
        lines = []
        for family in self.families:
            name = family.name
            lines.append("# HELP %s %s" % (name, family.help.replace(
                "\\", "\\\\").replace("\n", "\\n")))
            lines.append("# TYPE %s %s" % (name, family.type))
            for values in family.series:
                cell = self._index[(name, values)]
                labels = list(zip(family.labels, values))
                if family.per_process:
                    for slot in range(slots):
                        lines.append(_sample(
                            name, labels + [("worker", self._slot_name(slot))],
                            cells[slot * width + cell]))
                elif family.type == "histogram":
                    total = 0
                    for index, bound in enumerate(family.buckets
                                                  + (float("inf"),)):
                        total += totals[cell + index]
                        lines.append(_sample(
                            name + "_bucket", labels + [(
                                "le", "+Inf" if bound == float("inf")
                                else repr(float(bound)))], total))
                    lines.append(_sample(name + "_count", labels, total))
                    lines.append(_sample(
                        name + "_sum", labels,
                        totals[cell + len(family.buckets) + 1]))
                else:
                    lines.append(_sample(name, labels, totals[cell]))
        return "\n".join(lines) + "\n"


def _sample(name, labels, value):
    if labels:
        name += "{%s}" % ",".join('%s="%s"' % (label, _label_text(text))
                                  for label, text in labels)
    return "%s %s" % (name, _metric_number(value))


metrics = Metrics()                 # this process's, or the service's


def _ipv6_works():
    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        return False
    probe.close()
    return True


class SMTPProxyServer(socketserver.ThreadingTCPServer):
    """The listening socket: one daemon thread per client.

    ``server_address`` is ``(host, port)``; host "" listens on every IPv4
    and IPv6 address (one dual-stack socket where the system has IPv6), an
    IPv6 address or a name resolving to one gives an IPv6 socket.

    Class attributes (configuration keys):

    max_connections         clients served at once; one more gets
                            ``421 4.7.0`` and is closed at once, without a
                            thread of its own
    max_connections_per_ip  the same, per client (0: no limit), a client
                            being an address with its first
                            ``connection_ipv4_prefix`` (32) or
                            ``connection_ipv6_prefix`` (64) bits: an IPv6
                            host has a /64 of addresses to connect from
    stress_threshold        percent of max_connections open at which the
                            server is under stress (0: never): idle waits
                            are cut to ``stress_timeout`` seconds, and
                            sessions already waiting longer are closed
                            with 421 4.4.2, so that idle and trickling
                            clients go first and a client sending data
                            does not; stress ends below three quarters of
                            the threshold, after twice stress_timeout at
                            least; entering and leaving are logged
    grace_period            seconds stop() lets open transactions finish

    When accept() fails for want of descriptors (EMFILE, ENFILE), the
    server waits, longer each time up to ``accept_backoff_max`` seconds,
    instead of trying again at once, and logs it once per incident.

    Session threads may be reused: a thread whose session ended waits up
    to ``thread_idle_time`` seconds (60) for the next client, and at most
    ``spare_threads`` wait at once; a client finds a waiting thread or
    gets a new one, so that a new connection costs no thread start.  No
    thread holds anything of the session it served.  ``spare_threads``
    is 20 (0: a thread per client, and an idle proxy holds no thread).
    Kept threads would pin memory in glibc's per-thread caches: the
    command line turns those off (_restart_without_thread_caches()).

    Counters (``counters``, a dict; logged by log_counters(), which the
    command line runs on SIGUSR1): connections, connections_refused,
    rcpt_accepted, rcpt_deferred, rcpt_refused (replies to RCPT, ours or
    the upstream's), messages_accepted, messages_deferred,
    messages_refused (replies to DATA and to the message), upstream_errors.
    count() also adds to the process's ``metrics`` (COUNTER_SERIES), the
    figures of the metrics endpoint (MetricsServer), which are the
    service's: with workers, summed over them.

    ``stop()`` ends the service without losing mail: see there.

    ``service_hooks``: callables that ``service_actions()`` calls, with no
    argument, after its own work, in serve_forever()'s thread, at least
    once per poll_interval: the command line's Service acts on the signals
    it noted there.  A list of the instance's own, empty at first.
    """

    # No daemon_threads or block_on_close: process_request() is our own,
    # and its session threads (ReusedThreads) are daemon threads.
    allow_reuse_address = True
    request_queue_size = 1024

    max_connections = 500
    max_connections_per_ip = 50
    connection_ipv4_prefix = 32
    connection_ipv6_prefix = 64
    stress_threshold = 80
    stress_timeout = 10
    grace_period = 30
    accept_backoff_max = 1.0
    # How long stop() waits, after the grace period, for the sessions it
    # closed to say 421 and end.
    close_wait = 5
    # Refused connections are logged at most once per this many seconds.
    refusal_log_interval = 60
    spare_threads = 20
    thread_idle_time = 60
    # The number of the worker process serving (the workers key), or None;
    # with it, the service's SessionCounts.
    worker = None
    service_sessions = None

    def __init__(self, server_address, RequestHandlerClass,
                 bind_and_activate=True):
        host, port = server_address[:2]
        self.dual_stack = False
        if host == "" and socket.has_ipv6 and _ipv6_works():
            self.address_family = socket.AF_INET6
            self.dual_stack = True
            server_address = ("::", port)
        elif host:
            try:
                info = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM,
                                          0, socket.AI_PASSIVE)
            except socket.gaierror as error:
                raise OSError("cannot resolve %s: %s" % (host, error))
            self.address_family = info[0][0]
            server_address = info[0][4][:2]
        # request socket -> its handler (None until the handler is set up)
        self.sessions = {}
        self.session_ips = {}           # request socket -> client address
        self.sessions_per_ip = {}
        self.sessions_changed = threading.Condition(threading.Lock())
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.service_hooks = []
        self.stopping = False
        self.stop_now = False       # set during stop(): end the grace now
        self.stressed = False
        self._stress_began = 0.0
        self._refusals = 0
        self._refusals_logged = 0.0
        self._accept_failures = 0
        # Session threads, reused per spare_threads and thread_idle_time.
        self._session_threads = ReusedThreads("smtpproxy session")
        socketserver.ThreadingTCPServer.__init__(
            self, server_address, RequestHandlerClass, bind_and_activate)

    def server_bind(self):
        if self.dual_stack:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY,
                                   0)
        socketserver.ThreadingTCPServer.server_bind(self)

    def handle_error(self, request, client_address):
        log.exception("unexpected error with client %s",
                      log_escape(client_address[0]))

    def get_request(self):
        """accept(); out of descriptors, wait before the next try: the
        listening socket stays readable, and trying again at once would
        spin."""
        try:
            request = self.socket.accept()
        except OSError as error:
            if not _exhaustion(error):
                raise
            self._accept_failures += 1
            if self._accept_failures == 1:
                log.error("cannot accept connections: %s (%d sessions "
                          "open); trying again, less often", error,
                          len(self.sessions))
            time.sleep(min(self.accept_backoff_max,
                           0.01 * 2 ** min(self._accept_failures, 10)))
            raise
        if self._accept_failures:
            log.warning("accepting connections again, after %d failed "
                        "tries", self._accept_failures)
            self._accept_failures = 0
        return request

    def client_key(self, address):
        """What ``max_connections_per_ip`` counts ``address`` (text) as:
        its network of ``connection_ipv4_prefix`` or
        ``connection_ipv6_prefix`` bits, as text."""
        ipv6 = ":" in address
        bits = (self.connection_ipv6_prefix if ipv6
                else self.connection_ipv4_prefix)
        if bits >= (128 if ipv6 else 32):
            return address
        try:
            return str(ipaddress.ip_network("%s/%d" % (address, bits),
                                            strict=False))
        except ValueError:
            return address

    # -- counting sessions -----------------------------------------------

    def count(self, name):
        """Add one to counter ``name``, and to its series of the metrics
        (COUNTER_SERIES)."""
        with self.sessions_changed:
            self.counters[name] = self.counters.get(name, 0) + 1
        metrics.count(name)

    def log_counters(self):
        """Log the counters and the number of open sessions."""
        with self.sessions_changed:
            counters = sorted(self.counters.items())
            active = len(self.sessions)
        log.info("counters: %ssessions_open=%d %s",
                 "" if self.worker is None else "worker=%d " % self.worker,
                 active, " ".join("%s=%d" % item for item in counters))

    def process_request(self, request, client_address):
        """Start a session thread, unless a limit is reached: then the
        client gets 421 4.7.0 from this thread and is closed."""
        address = unmapped(client_address[0])
        key = self.client_key(address)
        with self.sessions_changed:
            self.counters["connections"] += 1
            per_ip = self.sessions_per_ip.get(key, 0)
            refused = ("stopping" if self.stopping
                       else "max_connections"
                       if self._sessions_open() >= self.max_connections
                       else "max_connections_per_ip"
                       if 0 < self.max_connections_per_ip <= per_ip
                       else None)
            if refused:
                self.counters["connections_refused"] += 1
            else:
                self.sessions[request] = None
                self.session_ips[request] = key
                self.sessions_per_ip[key] = per_ip + 1
                self._sessions_changed()
        metrics.add("smtpproxy_connections_total")
        if refused:
            metrics.add("smtpproxy_connections_refused_total", refused)
            self.refuse_connection(request, address)
            return
        # The keys may change on reload: the threads read them after
        # their next job.
        self._session_threads.spare = self.spare_threads
        self._session_threads.idle_time = self.thread_idle_time
        try:
            self._session_threads.submit(functools.partial(
                self.process_request_thread, request, client_address))
        except BaseException:
            self._forget(request)
            raise

    def server_close(self):
        """Close the listening socket, and end the waiting session
        threads: no client will come."""
        socketserver.ThreadingTCPServer.server_close(self)
        upstream_pool.reset()           # no client will need them
        self._session_threads.close()

    def refuse_connection(self, request, address):
        """Say 421 4.7.0 to a client over the limits (421 4.3.2 when
        stopping), without waiting for it, and close the connection."""
        # Not socket.getfqdn() as a default: a DNS lookup per refusal, in
        # the thread that accepts, would make a flood stall the server.
        servername = getattr(self.RequestHandlerClass, "servername",
                             None) or "localhost"
        reply = (SHUTTING_DOWN if self.stopping else TOO_MANY_CONNECTIONS)
        try:
            request.send((reply % servername + "\r\n").encode(
                "ascii", "replace"), socket.MSG_DONTWAIT)
        except OSError:
            pass
        self.shutdown_request(request)
        self._refusals += 1
        now = time.time()
        if now - self._refusals_logged >= self.refusal_log_interval:
            log.warning("connection limit reached (max_connections %d, "
                        "max_connections_per_ip %d): refused %d "
                        "connection(s), the last from %s",
                        self.max_connections, self.max_connections_per_ip,
                        self._refusals, log_escape(address))
            self._refusals = 0
            self._refusals_logged = now

    def process_request_thread(self, request, client_address):
        try:
            socketserver.ThreadingTCPServer.process_request_thread(
                self, request, client_address)
        finally:
            self._forget(request)

    def attach_session(self, handler):
        """Called by each MailHandler when it is set up."""
        with self.sessions_changed:
            if handler.request in self.sessions:
                self.sessions[handler.request] = handler

    def move_session(self, handler, address):
        """Count a session under another client address (the one a PROXY
        protocol header gave); False if that one is at its limit."""
        key = self.client_key(address)
        with self.sessions_changed:
            old = self.session_ips.get(handler.request)
            if old is None or old == key:
                return True
            if 0 < self.max_connections_per_ip <= self.sessions_per_ip.get(
                    key, 0):
                self.counters["connections_refused"] += 1
                metrics.add("smtpproxy_connections_refused_total",
                            "max_connections_per_ip")
                return False
            self._uncount(old)
            self.session_ips[handler.request] = key
            self.sessions_per_ip[key] = self.sessions_per_ip.get(key, 0) + 1
            return True

    def _uncount(self, address):
        left = self.sessions_per_ip.get(address, 1) - 1
        if left > 0:
            self.sessions_per_ip[address] = left
        else:
            self.sessions_per_ip.pop(address, None)

    def _forget(self, request):
        with self.sessions_changed:
            self.sessions.pop(request, None)
            address = self.session_ips.pop(request, None)
            if address is not None:
                self._uncount(address)
            self._sessions_changed()
            self.sessions_changed.notify_all()

    def _sessions_open(self):
        """The sessions open in the service: this process's, or with
        workers all of theirs (service_sessions)."""
        if self.service_sessions is None:
            return len(self.sessions)
        return self.service_sessions.total()

    def _sessions_changed(self):
        """Tell the other workers; enter or leave stress.  With
        sessions_changed held."""
        if self.service_sessions is not None:
            self.service_sessions.set(len(self.sessions))
        metrics.set("smtpproxy_sessions_open", len(self.sessions))
        self._check_stress()

    # -- stress ----------------------------------------------------------

    def _check_stress(self):
        """Enter stress when the sessions reach stress_threshold percent
        of max_connections, leave it when they fall below three quarters
        of that and twice stress_timeout has passed (so that shedding a
        few does not end it before the sessions idle since before it are
        shed, and the log does not flap); with sessions_changed held."""
        open_now = self._sessions_open()
        threshold = self.stress_threshold * self.max_connections
        if not self.stressed:
            stressed = bool(threshold) and open_now * 100 >= threshold
        else:
            stressed = bool(threshold) and (
                open_now * 400 >= threshold * 3
                or time.monotonic() - self._stress_began
                < 2 * self.stress_timeout)
        if stressed == self.stressed:
            return
        if stressed:
            self._stress_began = time.monotonic()
        self.stressed = stressed
        if stressed:
            log.warning("stress mode on: %d sessions open (stress_threshold "
                        "%d%% of max_connections %d): idle clients get %s "
                        "seconds", open_now, self.stress_threshold,
                        self.max_connections, self.stress_timeout)
        else:
            log.info("stress mode off: %d sessions open", open_now)
        for handler in self.sessions.values():
            if handler is not None:
                handler._under_stress(stressed)

    def service_actions(self):
        """Called by serve_forever() between accepts: close the pooled
        upstream sessions that waited too long; under stress, shed the
        sessions that have waited for their client longer than
        stress_timeout (they began to wait before the stress); the
        greylisting stores' checkpoints; then the ``service_hooks``."""
        upstream_pool.expire()
        stores.maintain()
        if self.stressed and self.stress_timeout:
            self._shed_waiting()
        for hook in self.service_hooks:
            hook()

    def _shed_waiting(self):
        """Under stress: close the sessions waiting for their client
        longer than stress_timeout, unless the stress ends now."""
        now = time.monotonic()
        with self.sessions_changed:
            self._check_stress()            # it may end, in time
            if not self.stressed:
                return
            for request, handler in self.sessions.items():
                if handler is None or handler.shed is not None:
                    continue
                since = handler.reader.waiting_since
                if since is not None and now - since > self.stress_timeout:
                    handler.shed = Expired("stress", self.stress_timeout)
                    metrics.add("smtpproxy_connections_refused_total",
                                "stress")
                    if handler.connection is request:   # else TLS: polled
                        try:
                            request.shutdown(socket.SHUT_RD)
                        except OSError:
                            pass

    # -- stopping --------------------------------------------------------

    def _interrupt(self, busy_too):
        """Shut open connections for reading: their handlers read the end
        and close with 421 4.3.2.  A connection whose transaction is open
        is spared unless ``busy_too``."""
        for request, handler in list(self.sessions.items()):
            if handler is not None:
                if handler.interrupted:
                    continue
                if handler.busy() and not busy_too:
                    continue
                handler.interrupted = True
                if handler.connection is not request:
                    if handler.tls:
                        continue    # its reader watches ``interrupted``
                    # In the TLS handshake, where no 421 can be said: end
                    # it (on the socket itself, not through SSLSocket).
                    try:
                        socket.socket.shutdown(handler.connection,
                                               socket.SHUT_RDWR)
                    except OSError:
                        pass
                    continue
            try:
                request.shutdown(socket.SHUT_RD)
            except OSError:
                pass

    def stop(self, grace_period=None):
        """Stop serving without losing mail; return the number of sessions
        still open when it gave up waiting.

        Call it once serve_forever() has returned.  The listening socket
        is closed at once.  Sessions without an open transaction are
        closed with 421 4.3.2 at once; sessions in a transaction get up to
        ``grace_period`` seconds to finish it, then they are closed the
        same way.  A message whose data had not all arrived is not passed
        on (the upstream session is aborted without the final dot), so the
        client, which heard no 2xx, sends it again later; a message whose
        final dot reached the upstream gets its reply relayed if it comes
        within ``close_wait`` seconds.
        """
        if grace_period is None:
            grace_period = self.grace_period
        self.stopping = True
        self.server_close()
        deadline = time.monotonic() + grace_period
        with self.sessions_changed:
            while True:
                self._interrupt(busy_too=False)
                left = deadline - time.monotonic()
                if not self.sessions or left <= 0 or self.stop_now:
                    break
                # Sessions that end notify; one that ends its transaction
                # is seen within a quarter of a second.
                self.sessions_changed.wait(min(left, 0.25))
            self._interrupt(busy_too=True)
            deadline = time.monotonic() + self.close_wait
            while self.sessions and time.monotonic() < deadline:
                self.sessions_changed.wait(deadline - time.monotonic())
            return len(self.sessions)


# -- the metrics endpoint ----------------------------------------------------

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsHandler(http.server.BaseHTTPRequestHandler):
    """One scrape: ``GET /metrics`` gets ``metrics.exposition()``; another
    path 404, another method 405.  The request is read by this module's
    reader, not the socket's file, so that it has the server's limits:
    its head within ``max_request_size`` octets and ``request_timeout``
    seconds from the connection, or the connection closes unanswered;
    then the standard parser reads it, and the reply is written within
    ``request_timeout`` too.  One request per connection (HTTP/1.0)."""

    protocol_version = "HTTP/1.0"
    server_version = "smtpproxy/" + __version__

    def version_string(self):
        return self.server_version

    def setup(self):
        self.rfile = io.BytesIO()       # the head, once read in time
        self.wfile = io.BytesIO()       # the reply, sent in time

    def handle(self):
        head = self._read_head()
        if head is None:
            return
        self.rfile = io.BytesIO(head)
        self.close_connection = True
        self.handle_one_request()
        try:
            send_within(self.request, self.wfile.getvalue(),
                        self.server.request_timeout)
        except (Expired, OSError):
            pass                        # the scraper went away

    def _read_head(self):
        """The request line and headers, up to the empty line; None if
        they are not all there within the limits."""
        server = self.server
        reader = _LineReader(self.request, idle=server.request_timeout)
        reader.deadline = time.monotonic() + server.request_timeout
        reader.deadline_reason = "request"
        head = b""
        try:
            while len(head) < server.max_request_size:
                line = reader.readline(server.max_request_size - len(head))
                head += line
                if not line.endswith(b"\n"):
                    return None         # end of input, or over the size
                if line in (b"\r\n", b"\n"):
                    return head
        except (Expired, OSError):
            pass
        return None

    def do_GET(self):
        if self.path.partition("?")[0] != "/metrics":
            self.send_error(404)
            return
        body = metrics.exposition().encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", METRICS_CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def __getattr__(self, name):
        # Every other method (do_HEAD, do_POST, ...): 405, not 501.
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    def _not_allowed(self):
        body = b"only GET /metrics\n"
        self.send_response(405)
        self.send_header("Allow", "GET")
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        log.debug("metrics: %s: %s", log_escape(self.client_address[0]),
                  log_escape(format % args))


class MetricsServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """The Prometheus endpoint (metrics_listen): ``MetricsServer((host,
    port), clients)``, a thread per scrape (MetricsHandler).

    ``clients`` (metrics_clients: addresses and networks, by default the
    loopback ones) may connect; another is closed as it is accepted,
    before anything is read, and logged once (per address, the last
    ``refused_log_size`` remembered).  At most ``max_scrapes`` (4)
    connections at once, each given ``request_timeout`` (5) seconds and
    ``max_request_size`` (8192) octets of request: one more is closed at
    once, so that slow clients never hold the endpoint.  Served by the
    single process, or by worker 0, in a thread of its own; bound as
    root at the start, as the SMTP port is."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    clients = ["127.0.0.0/8", "::1"]
    max_scrapes = 4
    request_timeout = 5
    max_request_size = 8192
    refused_log_size = 1000

    def __init__(self, address, clients=None):
        self.address_family = (socket.AF_INET6 if ":" in address[0]
                               else socket.AF_INET)
        if clients is not None:
            self.clients = clients
        self.scrapes = set()
        self.lock = threading.Lock()
        self.refused = Cache(self.refused_log_size)
        socketserver.TCPServer.__init__(self, address, MetricsHandler)

    def verify_request(self, request, client_address):
        address = unmapped(client_address[0])
        if not any(_in_network(address, network)
                   for network in self.clients):
            if self.refused.get(address) is None:
                self.refused.put(address, True)
                log.warning("metrics: connection from %s refused: not in "
                            "metrics_clients (logged once per address)",
                            log_escape(address))
            return False
        with self.lock:
            if len(self.scrapes) < self.max_scrapes:
                self.scrapes.add(request)
                return True
        log_every(("metrics busy", self.server_address), 60,
                  logging.WARNING, "metrics: connection from %s refused: "
                  "%d scrapes open (logged at most once a minute)",
                  log_escape(address), self.max_scrapes)
        return False

    def shutdown_request(self, request):
        with self.lock:
            self.scrapes.discard(request)
        socketserver.TCPServer.shutdown_request(self, request)

    def handle_error(self, request, client_address):
        log.exception("metrics: unexpected error")


def open_metrics_server(values):
    """Bind the endpoint of ``values["metrics_listen"]`` (HOST:PORT; PORT
    alone: 127.0.0.1) for ``metrics_clients``; StartError if it cannot."""
    where = values["metrics_listen"]
    host, port = _split_host_port(where)
    try:
        return MetricsServer((host or "127.0.0.1", port),
                             values.get("metrics_clients"))
    except OSError as error:
        raise _listen_error(" for metrics", where, port, error)


# ===========================================================================
# == 13. Postfix's policy service (check_policy_service) ==
# ===========================================================================
#
# Owns:  PolicyHandler (one connection's requests, answered by the engine),
#        the TCP and UNIX servers (PolicyServer, UnixPolicyServer) with who may
#        connect and their limits.
# Enter: PolicyServer((host, port), settings).serve_forever().
# Uses:  sections 2, 8 and 9.


class PolicyRequestError(Exception):
    """A request that breaks the policy protocol: logged, and the
    connection closed without an answer, as Postfix's servers do."""


_CONTROL_OCTET_RE = re.compile(b"[\\x00-\\x1f\\x7f]")


class PolicyHandler(socketserver.BaseRequestHandler):
    """One connection of Postfix's SMTPD access policy delegation
    (SMTPD_POLICY_README): many requests, each ``name=value`` lines ended
    by LF and an empty line, each answered ``action=...`` and an empty
    line.  Only ``protocol_state=RCPT`` is greylisted, by the engine of the
    server's ``settings`` (the configured GreyListingPolicy class, the
    proxy's own): a triplet that must wait gets ``DEFER_IF_PERMIT`` and
    the text of ``defer_reply`` (its enhanced code, not its reply code:
    Postfix says 450); one that passes ``DUNNO``, or, with
    ``x_greylist_header``, ``PREPEND X-Greylist: ...`` on the pass after a
    delay, once per message (``instance``).  Allowed clients and every
    other state get ``DUNNO``.  Which recipients are greylisted is
    ``greylisted_recipient()``'s: Postfix did its relay control before it
    asked, so every one, or with ``allowed_domains`` only those of its
    domains (the others get ``DUNNO``).  Postfix's ``client_name`` (its
    forward-confirmed name, or "unknown") is the client's name: the
    service looks up nothing Postfix looked up already.  A
    ``client_address`` of "unknown" (Postfix does not know it) is
    greylisted under UNKNOWN_CLIENT, as the proxy does; any other that is
    not an address closes the connection, as bad input.  An attribute
    that is not UTF-8 is data all the same: each invalid octet is read as
    its escape (\\xff), so that it can be stored and logged.

    Limits, class attributes: ``max_line_length`` (4096 octets) and
    ``max_attributes`` (100) of a request, which must be complete within
    ``request_timeout`` (10 s) of its first octet; an answer must be
    written within ``write_timeout`` (10 s); a new connection must send
    its first request within the server's ``policy_first_idle`` (5 s:
    Postfix writes it as it connects), then may stay idle between
    requests for ``policy_max_idle`` (300 s, Postfix's own max_idle).
    A line without "=", a control octet (NUL, CR, ...), a line or a
    request over its limit, a request without
    ``request=smtpd_access_policy``, or the end of input inside a request
    is logged once (escaped) and closes that connection; the others go
    on.  A store the process cannot open for want of descriptors also
    closes it without an answer: Postfix retries, then applies its
    default_action.

    Each RCPT decision is a line of greylist_log, as postgrey logs it
    (_log_transaction()), and the answer a line of the service's log.

    Hooks: ``answer(request)`` -> the action; ``now()`` -> the clock;
    ``store_failed(error)``; ``greylister()`` -> the engine;
    ``greylisted_recipient(recipient)``.
    """

    max_line_length = 4096
    max_attributes = 100
    request_timeout = 10
    write_timeout = 10

    def setup(self):
        self.reader = _LineReader(self.request,
                                  idle=self.server.policy_max_idle)
        # Until the first request: Postfix sends it as it connects, and a
        # connection that says nothing only holds a slot.
        self.reader.idle = self.server.policy_first_idle
        self.reader.deadline_reason = "request"
        self.prepended = None       # the instance given its X-Greylist
        peer = self.client_address
        self.peer = ("%s:%s" % (unmapped(peer[0]), peer[1])
                     if isinstance(peer, tuple) else "unix socket")

    def handle(self):
        try:
            while True:
                request = self.read_request()
                if request is None:
                    return
                self.reader.idle = self.server.policy_max_idle
                action = self.answer(request)
                self.server.count("policy_" + action.split()[0].lower())
                send_within(self.request, b"action=" + action.encode(
                    "utf-8", "surrogateescape") + b"\n\n",
                    self.write_timeout)
        except PolicyRequestError as error:
            self.server.count("policy_bad_requests")
            log.warning("policy client %s: %s; connection closed",
                        self.peer, error)
        except ResourceShortage:
            pass                    # logged by store_failed()
        except Expired as expired:
            if expired.reason == "idle":
                # policy_first_idle or policy_max_idle: Postfix reconnects
                return
            self.server.count("policy_bad_requests")
            log.warning("policy client %s: %s; connection closed", self.peer,
                        "request not complete within %s s"
                        % _seconds(self.request_timeout)
                        if expired.reason == "request" else expired)
        except OSError:
            pass                    # Postfix went away

    def read_request(self):
        """The next request, a dict; None at the end of input between
        requests.  PolicyRequestError for what breaks the protocol."""
        reader = self.reader
        request = {}
        count = 0
        while True:
            line = reader.readline(self.max_line_length + 1)
            if count == 0:
                if not line:
                    return None
                reader.deadline = time.monotonic() + self.request_timeout
            if not line.endswith(b"\n"):
                if len(line) > self.max_line_length:
                    raise PolicyRequestError(
                        "a line over %d octets" % self.max_line_length)
                raise PolicyRequestError("end of input inside a request")
            line = line[:-1]
            if not line:
                break
            count += 1
            if count > self.max_attributes:
                raise PolicyRequestError("over %d attributes in a request"
                                         % self.max_attributes)
            if _CONTROL_OCTET_RE.search(line):
                raise PolicyRequestError("a control octet in %s"
                                         % log_escape(line))
            name, equals, value = line.partition(b"=")
            if not equals:
                raise PolicyRequestError("a line without '=': %s"
                                         % log_escape(line))
            # Not surrogateescape: a lone surrogate cannot be stored.
            request[name.decode("utf-8", "backslashreplace")] = \
                value.decode("utf-8", "backslashreplace")
        reader.deadline = None
        if request.get("request") != "smtpd_access_policy":
            raise PolicyRequestError(
                "no request=smtpd_access_policy (request=%s)"
                % log_escape(request.get("request", "")))
        return request

    def now(self):
        """The time the engine reads."""
        return time.time()

    def greylister(self):
        """The engine, configured by the server's ``settings``, with
        ``greylisted_recipient()`` as its recipient_rule: the relay
        control was Postfix's."""
        settings = self.server.settings
        return settings.greylister_class(
            settings, recipient_rule=self.greylisted_recipient)

    def greylisted_recipient(self, recipient):
        """True if ``recipient`` is greylisted.  Postfix did its relay
        control before it asked (reject_unauth_destination comes first),
        so that every recipient is, as postgrey greylists every one;
        ``allowed_domains``, if not empty, restricts greylisting to its
        domains (compared as the SMTP proxy does) and the bare Postmaster,
        whatever the local-part: Postfix judged that."""
        domains = self.server.settings.allowed_domains
        if not domains or recipient.lower() == "postmaster":
            return True
        return _domain_key(recipient.rpartition("@")[2]) in _domain_keys(
            tuple(domains))

    def store_failed(self, error):
        """As GreyListingPolicy.store_failed: logged once per incident."""
        log_store_failure(self.server.settings, error,
                          "policy connections are closed unanswered")

    def answer(self, request):
        """The action for ``request`` (a dict of its attributes)."""
        if request.get("protocol_state", "").upper() != "RCPT":
            return "DUNNO"
        client = unmapped(request.get("client_address", ""))
        try:
            # "unknown": Postfix does not know it either; the engine
            # greylists it under that key.
            if client != UNKNOWN_CLIENT:
                ipaddress.ip_address(client)
        except ValueError:
            raise PolicyRequestError("client_address %s is not an address"
                                     % log_escape(client))
        name = request.get("client_name", "")
        sender = request.get("sender", "")
        recipient = request.get("recipient", "")
        now = self.now()
        decision = self.greylister().decide(
            client, sender, recipient, now,
            helo=request.get("helo_name") or None,
            hostname=None if name.lower() in ("", "unknown") else name)
        metrics.decision(decision)
        if decision.error is not None:
            self.store_failed(decision.error)
        action = self._action(decision, request.get("instance"), now,
                              recipient)
        # "refuse" is the engine's word for a recipient it does not
        # greylist: here Postfix decides, and the answer is DUNNO.
        rule = ("outside allowed_domains" if decision.verdict == "refuse"
                else decision.rule)
        log.info("policy %s: %s (%s); client %s, sender <%s>, recipient "
                 "<%s>", action.split()[0].lower() if action
                 else "unanswered", log_escape(rule),
                 log_escape(decision.key or "-"), log_escape(client),
                 log_escape(sender), log_escape(recipient))
        self._log_transaction(request, decision, now)
        if action is None:
            raise decision.error
        return action

    # The engine's rules that pass a triplet without greylisting it,
    # named in greylist_log as they are (postgrey says "client
    # whitelist" and so on).
    _passed_unseen = ("allowed_senders", "whitelist_", "whitelisted_",
                      "dnswl:", "auto-whitelist", "not-suspicious",
                      "store-failed")

    def _log_transaction(self, request, decision, now):
        """The decision's line in greylist_log, close to postgrey's:
        "TIME [QUEUE_ID: ]action=greylist, reason=new, client_name=...,
        client_address=..., sender=..., recipient=...", the fields that
        are empty left out; "action=pass, reason=triplet found,
        delay=N" on the try that passed after waiting N seconds."""
        info = []
        if decision.verdict == "defer":
            info.append("action=greylist")
            info.append("reason=" + (
                "new" if decision.added
                else decision.rule if decision.rule.startswith((
                    "greytrap:", "max_new_triplets", "store-failed"))
                else "early-retry"))
        elif decision.verdict == "unavailable":
            info += ["action=unanswered", "reason=store"]
        else:
            info.append("action=pass")
            info.append("reason=" + (
                "outside allowed_domains" if decision.verdict == "refuse"
                else decision.rule if decision.rule.startswith(
                    self._passed_unseen)
                else "triplet found"))
            if decision.delay is not None:
                info.append("delay=%d" % decision.delay)
        for name in ("client_name", "client_address", "sender",
                     "recipient"):
            if request.get(name):
                info.append("%s=%s" % (name, request[name]))
        queue_id = request.get("queue_id")
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
        transaction_log.info("%s.%03d %s", stamp,
                             int((now - int(now)) * 1000), log_escape(
                                 ("%s: " % queue_id if queue_id else "")
                                 + ", ".join(info)))

    def _action(self, decision, instance, now, recipient=""):
        """The action answering ``decision``; None: no answer."""
        settings = self.server.settings
        if decision.verdict == "unavailable":
            return None
        if decision.verdict == "defer":
            return "DEFER_IF_PERMIT " + _reply_text(defer_text(
                settings.defer_reply, settings.min_defer_time
                if decision.wait is None else decision.wait, recipient))
        if (decision.verdict == "accept" and decision.delay is not None
                and settings.x_greylist_header
                and (instance is None or instance != self.prepended)):
            self.prepended = instance
            return "PREPEND " + x_greylist(decision.delay,
                                           settings.servername,
                                           decision.rule, now)
        return "DUNNO"


def _reply_text(reply):
    """A reply's text without its code: "451 4.7.1 Greylisted" gives
    "4.7.1 Greylisted"."""
    return re.sub(r"\A[0-9]{3}[ -]", "", reply)


class _PolicyServing(object):
    """What the policy servers (TCP and UNIX) share: who may connect
    (``policy_clients``, on TCP; the socket's mode and group on UNIX), at
    most ``policy_max_connections`` at once and
    ``policy_max_connections_per_peer`` of one peer (each serving
    process's: with workers, each worker's), the listen backlog
    ``policy_backlog`` (given to the constructor, ``backlog``: listen()
    comes before configure_server()), the counters, and a stop that
    closes every connection.  A peer is a TCP client's address,
    or on a UNIX socket the user id of the process that connected
    (SO_PEERCRED, where the system tells it): one local user holding
    connections leaves the others theirs."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    policy_clients = ["127.0.0.1", "::1"]
    policy_first_idle = 5
    policy_max_idle = 300
    # Postfix's smtpd processes each keep a connection: up to
    # default_process_limit (100) of them, more where a site raised it.
    # A thread per connection, about 30 kB of memory each when idle.
    policy_max_connections = 1000
    policy_max_connections_per_peer = 500
    # The listen backlog, as the SMTP listener's: 100 smtpd processes
    # connecting at once must not wait for SYN retransmissions (1 s,
    # then 3 s ...), as behind socketserver's 5.  Linux caps it at
    # net.core.somaxconn.
    policy_backlog = 1024

    @property
    def request_queue_size(self):
        """What socketserver's server_activate() passes to listen()."""
        return self.policy_backlog

    def _init_policy(self, settings, backlog):
        self.settings = settings
        if backlog is not None:
            self.policy_backlog = backlog   # before listen()
        self.connections = {}           # socket: its peer
        self.counters = {}
        self.lock = threading.Lock()

    def count(self, name):
        with self.lock:
            self.counters[name] = self.counters.get(name, 0) + 1
        metrics.count(name)

    def counter_text(self):
        with self.lock:
            return " ".join("%s=%d" % item for item in sorted(
                self.counters.items()))

    def allowed(self, address):
        """True if a TCP client at ``address`` may ask."""
        address = unmapped(address)
        return any(_in_network(address, network)
                   for network in self.policy_clients)

    def verify_request(self, request, client_address):
        refused = None                  # (the key it breaks, why)
        if isinstance(client_address, tuple) and client_address and \
                not self.allowed(client_address[0]):
            refused = ("policy_clients", "%s is not in policy_clients"
                       % unmapped(client_address[0]))
        peer = _policy_peer(request, client_address)
        with self.lock:
            if refused is None and len(self.connections) >= \
                    self.policy_max_connections:
                refused = ("policy_max_connections",
                           "policy_max_connections (%d) connections open"
                           % self.policy_max_connections)
            if refused is None and peer is not None and sum(
                    1 for other in self.connections.values()
                    if other == peer) >= \
                    self.policy_max_connections_per_peer:
                refused = ("policy_max_connections_per_peer",
                           "%s has policy_max_connections_per_peer (%d) "
                           "connections open" % (
                               peer, self.policy_max_connections_per_peer))
            if refused is None:
                self.connections[request] = peer
                return True
            self.counters["policy_connections_refused"] = \
                self.counters.get("policy_connections_refused", 0) + 1
        metrics.add("smtpproxy_policy_connections_refused_total", refused[0])
        # Once a minute per key, the peer's address as data: a port that
        # scanners reach costs a line a minute and no memory per address
        # (policy_connections_refused counts them all).
        log_every(("policy service refused", self.server_address,
                   refused[0]), 60, logging.WARNING,
                  "policy service: connection refused: %s (logged at most "
                  "once a minute)", refused[1])
        return False

    def shutdown_request(self, request):
        with self.lock:
            self.connections.pop(request, None)
        socketserver.BaseServer.shutdown_request(self, request)

    def close_connections(self):
        """End every connection (the stop): Postfix opens new ones to the
        next instance."""
        with self.lock:
            connections = list(self.connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):
        log.exception("policy service: unexpected error")


def _policy_peer(request, client_address):
    """The peer a policy connection counts against: "192.0.2.7" on TCP,
    "uid 1000" on a UNIX socket (SO_PEERCRED: Linux), None where the
    system does not say."""
    if isinstance(client_address, tuple) and client_address:
        return unmapped(client_address[0])
    try:
        # struct ucred: pid_t pid, uid_t uid, gid_t gid.
        credentials = request.getsockopt(socket.SOL_SOCKET,
                                         socket.SO_PEERCRED,
                                         struct.calcsize("iII"))
    except (AttributeError, OSError):
        return None
    return "uid %d" % struct.unpack("iII", credentials)[1]


class PolicyServer(_PolicyServing, socketserver.ThreadingTCPServer):
    """The policy service on TCP: ``PolicyServer((host, port), settings)``,
    ``settings`` the GreyListingPolicy class whose keys it applies; a
    thread per connection, as SMTPProxyServer."""

    def __init__(self, address, settings, handler_class=PolicyHandler,
                 backlog=None):
        host = address[0]
        self.address_family = (socket.AF_INET6 if ":" in host
                               else socket.AF_INET)
        self._init_policy(settings, backlog)
        socketserver.ThreadingTCPServer.__init__(self, address,
                                                 handler_class)


class UnixPolicyServer(_PolicyServing,
                       socketserver.ThreadingUnixStreamServer):
    """The policy service on a UNIX socket: ``UnixPolicyServer(path,
    settings)``; who may connect is the socket's mode and group."""

    # Bound by open_policy_server(): (the descriptor of the socket's
    # directory, its name there, its (st_dev, st_ino)).
    _socket = None

    def __init__(self, path, settings, handler_class=PolicyHandler,
                 backlog=None):
        self._init_policy(settings, backlog)
        socketserver.ThreadingUnixStreamServer.__init__(self, path,
                                                        handler_class)

    def _remove_socket(self):
        """Remove the socket open_policy_server() bound, in the directory
        it bound it in, if its name there is still that socket: whoever
        may write the directory may have put something else under it."""
        if self._socket is None:
            return
        directory, name, identity = self._socket
        if identity is None:
            return
        try:
            info = os.stat(name, dir_fd=directory, follow_symlinks=False)
            if (info.st_dev, info.st_ino) == identity:
                os.unlink(name, dir_fd=directory)
        except OSError:
            pass    # the serving user may not: the next start does

    def server_close(self):
        socketserver.ThreadingUnixStreamServer.server_close(self)
        if self._socket is not None:
            os.close(self._socket[0])
            self._socket = None


# ===========================================================================
# == 14. Configuration: what a value may be ==
# ===========================================================================
#
# Owns:  the parser of each kind of value (_integer, _whole_seconds and
#        parse_duration, addresses and networks, host and port, triples,
#        ...): text in, the value or ValueError saying what is wrong.
# Enter: the parsers, named by the keys of section 15; parse_duration().
# Uses:  section 7 (DNS list entries: parse_dns_list), section 11 (a
#        store's URI: is_database_uri, redact_uri).


class ConfigError(Exception):
    """A configuration file or option that cannot be used."""


def _integer(text):
    if not re.match(r"\A[0-9]+\Z", text):
        raise ValueError("expected a whole number, got %r" % text)
    return int(text)


def _boolean(text):
    value = text.lower()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise ValueError("expected yes or no, got %r" % text)


def _positive(text):
    value = _integer(text)
    if value < 1:
        raise ValueError("expected 1 or more, got %r" % text)
    return value


def _workers(text):
    """``workers``: "auto" (see worker_count()) or a number."""
    if text.strip().lower() == "auto":
        return "auto"
    return _positive(text)


def _port(text):
    value = _integer(text)
    if not 0 < value < 65536:
        raise ValueError("expected a port from 1 to 65535, got %r" % text)
    return value


def _address(item):
    """An IPv4 or IPv6 address, as written."""
    item = _word(item)
    try:
        ipaddress.ip_address(item)
    except ValueError:
        raise ValueError("expected an IP address such as 192.0.2.7 or "
                         "2001:db8::7, got %r" % item)
    return item


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"


_OCTET_PREFIX_RE = re.compile(r"%s(?:\.%s){0,2}\.?\Z" % (_OCTET, _OCTET))


def _network(item):
    """An address, a CIDR network (host bits may be set: 192.0.2.7/24 is
    192.0.2.0/24), or Kamaelia's prefix of whole octets (192.168.2)."""
    item = _word(item)
    if _OCTET_PREFIX_RE.match(item):
        return item
    try:
        if "/" in item:
            ipaddress.ip_network(item, strict=False)
        else:
            ipaddress.ip_address(item)
    except ValueError:
        raise ValueError("expected an address, a network such as "
                         "192.0.2.0/24 or 2001:db8::/32, or whole octets "
                         "such as 192.168.2, got %r" % item)
    return item


_DOMAIN_NAME_RE = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?\Z")


def _domain(item):
    """A domain name (one a line; a subdomain is listed on its own)."""
    item = _word(item)
    if item.startswith("@"):
        raise ValueError("write the domain without '@': %s" % item[1:])
    if item.startswith("*."):
        raise ValueError("no wildcards: list %s, and each subdomain mail "
                         "is received for, on a line of its own" % item[2:])
    name = item
    if re.search(r"[^\x00-\x7f]", name):
        name = _a_labels(name)
    if len(name) > 253 or not _DOMAIN_NAME_RE.match(name):
        raise ValueError("expected a domain name such as example.org, got "
                         "%r" % item)
    return item


def _a_labels(name):
    """``name``, a domain written with U-labels, in A-labels (xn--...,
    RFC 3492 Punycode without IDNA 2003's nameprep), for its syntax
    check; "!" if a label is not as mail to it would be written: in NFC
    and lower case, of letters, marks, digits and "-" only.  A recipient
    domain is local only if it is listed as written (_domain_key()), so
    an entry that nameprep would have mapped (fullwidth letters, an
    invisible soft hyphen, capitals) could never match: it is refused
    here instead of lying unused."""
    labels = []
    for label in name.split("."):
        if re.match(r"[\x00-\x7f]*\Z", label):
            labels.append(label)
            continue
        if (unicodedata.normalize("NFKC", label) != label
                or label.lower() != label
                or not all(char == "-" or unicodedata.category(char)[0]
                           in "LMN" for char in label)):
            return "!"
        try:
            labels.append("xn--" + label.encode("punycode").decode("ascii"))
        except UnicodeError:
            return "!"
    return ".".join(labels)


def _bracketed(word, what):
    if not (word.startswith("<") and word.endswith(">")):
        raise ValueError("expected the %s in angle brackets, as "
                         "<user@example.org>, got %r" % (what, word))


def _defer_reply(text):
    if not re.match(r"4[0-9][0-9] 4\.[0-9]{1,3}\.[0-9]{1,3} [\x20-\x7e]+\Z",
                    text):
        raise ValueError("expected a 4xx reply with its enhanced code, such "
                         "as 451 4.7.1 Greylisted, please try again later; "
                         "got %r" % text)
    return text


def _choice(*choices):
    def convert(text):
        if text.lower() not in choices:
            raise ValueError("expected %s, got %r"
                             % (" or ".join(choices), text))
        return text.lower()
    return convert


def _decimal(text):
    """A time above 0, in seconds or with units (parse_duration()): a
    fraction of a second is kept (0.5, 1.5s)."""
    value = parse_duration(text)
    if not value:
        raise ValueError("expected a time above 0 (seconds, or with a "
                         "unit: 0.5, 2s, 1m), got %r" % text)
    return value


def _whole_seconds(text):
    """A time in whole seconds, 0 or more, as seconds or with units
    (parse_duration()): 300, 5m, 2d, 1h30m, 1.5h."""
    value = parse_duration(text)
    if value != int(value):
        raise ValueError("expected whole seconds (300, 5m, 2d, 1h30m), got "
                         "%r" % text)
    return int(value)


def _positive_seconds(text):
    """As _whole_seconds(), 1 or more."""
    value = _whole_seconds(text)
    if value < 1:
        raise ValueError("expected 1 second or more (30, 5m), got %r"
                         % text)
    return value


# The units of parse_duration(), in seconds, largest first.
DURATION_UNITS = collections.OrderedDict(
    [("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)])


_DURATION_PART_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([a-z]?)")


def parse_duration(text):
    """The number of seconds that ``text`` writes: a number of seconds
    (``3600``, ``0.5``), or numbers each followed by a unit, ``s``
    (seconds), ``m`` (minutes), ``h`` (hours), ``d`` (days) or ``w``
    (weeks: 7 days), largest first, each unit once, with or without
    spaces between them: ``90m``, ``24h``, ``7d``, ``2w``, ``1h30m``,
    ``1.5h``.  Units in any case; no sign (a duration is 0 or more).
    An int when the seconds are whole, else a float.  ValueError says
    what is wrong, with examples."""
    compact = re.sub(r"\s+", "", str(text)).lower()
    problem = None
    seconds = 0
    if not compact:
        problem = "it is empty"
    elif compact[0] in "+-":
        problem = "a duration has no sign"
    elif re.match(r"\A[0-9]+(?:\.[0-9]+)?\Z", compact):
        seconds = float(compact)            # seconds, no unit
    else:
        parts = []
        position = 0
        while position < len(compact) and problem is None:
            match = _DURATION_PART_RE.match(compact, position)
            if match is None or not match.group(2):
                problem = "each number needs a unit, or the whole is seconds"
            elif match.group(2) not in DURATION_UNITS:
                problem = "%r is no unit" % match.group(2)
            else:
                parts.append(match.groups())
                position = match.end()
        units = [unit for _, unit in parts]
        order = list(DURATION_UNITS)
        if problem is None and units != sorted(set(units), key=order.index):
            problem = "each unit once, the largest first"
        if problem is None:
            seconds = sum(float(number) * DURATION_UNITS[unit]
                          for number, unit in parts)
    if problem is not None:
        raise ValueError(
            "expected a duration such as 7d, 24h, 90m, 2w, 1h30m or 3600 "
            "(seconds), the units s, m, h, d, w; got %r: %s"
            % (text, problem))
    return int(seconds) if seconds == int(seconds) else seconds


def _zone(item):
    """A DNS list's zone, such as zen.spamhaus.org, with the answers that
    list if written: zen.spamhaus.org=127.0.0.[2..11] (parse_dns_list)."""
    zone, written = parse_dns_list(_word(item))
    if written is None:
        return zone
    return "%s=%s" % (zone, item.partition("=")[2].strip())


def _prefix(bits):
    def convert(text):
        value = _integer(text)
        if value > bits:
            raise ValueError("expected 0 to %d bits, got %r" % (bits, text))
        return value
    return convert


def _percent(text):
    value = _integer(text)
    if value > 100:
        raise ValueError("expected a percentage from 0 to 100, got %r"
                         % text)
    return value


def _facility(text):
    value = text.lower()
    if value in ("", "no", "false", "off", "0"):
        return ""
    if value in ("yes", "true", "on", "1"):
        return "mail"
    if value not in logging.handlers.SysLogHandler.facility_names:
        raise ValueError("expected no or a syslog facility such as mail "
                         "or local0, got %r" % text)
    return value


def _proxy_mode(text):
    if text.lower() not in ("no", "v1", "v2", "any"):
        raise ValueError("expected no, v1, v2 or any, got %r" % text)
    return text.lower()


def _upstream_tls(text):
    if text.lower() not in ("no", "opportunistic", "required"):
        raise ValueError("expected no, opportunistic or required, got %r"
                         % text)
    return text.lower()


def _string(text):
    return text


def _store_location(text):
    if is_database_uri(text):
        if not text.lower().startswith(("postgresql://", "postgres://")):
            raise ValueError("%s: a PostgreSQL URI begins postgresql://"
                             % redact_uri(text))
        problem = _database_uri_problem(text)
        if problem:
            raise ValueError(problem)
    return text


def _policy_listen(text):
    if text.startswith("unix:"):
        if not text[5:].startswith("/"):
            raise ValueError("expected unix:/ABSOLUTE/PATH, got %r" % text)
        return text
    if text:
        _split_host_port(text)
    return text


def _metrics_listen(text):
    if text:
        _split_host_port(text)
    return text


def _split_host_port(text, default_port=None):
    """Split "host:port", "[v6addr]:port", ":port", and "host" (given a
    ``default_port``) or "port" (without one)."""
    port = None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError("cannot read %r as [HOST]:PORT" % text)
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif default_port is None and text.isdigit():
        host, port = "", text
    else:
        host = text
        _bare_ipv6_with_port(text, default_port)
    if port is None:
        if default_port is None:
            raise ValueError("no port in %r" % text)
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("bad port in %r" % text)
    return host, int(port)


def _bare_ipv6_with_port(text, default_port):
    """Refuse ``text``, with more than one colon and no brackets, when it
    may be an IPv6 address and a port (::1:12901): the address's colons
    would take the port in, so RFC 3986 writes it [::1]:12901.  Without
    a ``default_port`` (a listening address) a port is needed, so such a
    text is always refused; with one, an address alone (::1,
    2001:db8::7) is the host, and one that could also be an address and
    a port (::1:8025) is refused as ambiguous."""
    address, _, port = text.rpartition(":")
    whole = _is_ipv6(text)
    if _is_ipv6(address) and port.isdigit():
        if whole and default_port is not None:
            raise ValueError(
                "%s is ambiguous: write [%s]:%s for port %s of %s, or [%s] "
                "for the address %s" % (text, address, port, port, address,
                                        text, text))
        raise ValueError("an IPv6 address with a port is written in "
                         "brackets: [%s]:%s, not %s" % (address, port, text))
    if default_port is None:
        raise ValueError(
            "no port in %r: an IPv6 address with its port is written in "
            "brackets, [%s]:PORT" % (text, text if whole else "2001:db8::1"))


def _is_ipv6(text):
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _octal_mode(text):
    if not re.match(r"\A0?[0-7]{3}\Z", text):
        raise ValueError("expected an octal mode such as 0660, got %r"
                         % text)
    return text


def _fail_mode(text):
    if text.lower() not in ("accept", "defer"):
        raise ValueError("expected accept or defer, got %r" % text)
    return text.lower()


def _word(item):
    if not isinstance(item, str):
        raise ValueError("expected one word per item, got %r"
                         % " ".join(item))
    return item


def _triple(item):
    if isinstance(item, str) or len(item) != 3:
        raise ValueError("expected three words per item, got %r"
                         % (item if isinstance(item, str)
                            else " ".join(item)))
    return tuple(item)


def _ip_triple(item):
    """``ip <sender> <recipient>``."""
    ip, sender, recipient = _triple(item)
    _address(ip)
    _bracketed(sender, "sender")
    _bracketed(recipient, "recipient")
    return (ip, sender, recipient)


def _helo_triple(item):
    """``helo-name ip-prefix <recipient>``."""
    helo, prefix, recipient = _triple(item)
    _network(prefix)
    _bracketed(recipient, "recipient")
    return (helo, prefix, recipient)


# ===========================================================================
# == 15. Configuration: the keys and the file ==
# ===========================================================================
#
# Owns:  one record per key (Key, KEYS) of the classes above, the file
#        format (read_config_file, load_config, where it is looked for), the
#        sample configuration, and turning values into a handler class.
# Enter: load_config(path), read_settings(args),
#        handler_class_for(base, values).
# Uses:  the classes whose keys these are (sections 5 to 13), the parsers
#        of section 14.


class Key(object):
    """One configuration key, the one place that knows it: its name, how
    a value is read (``parse``, of each item for a list; ``kind``
    "files": a list, or one item as ``key = FILE``), who owns it
    ("handler": a class attribute of the handler, whose class holds the
    default; "server": of SMTPProxyServer; "service": main()'s, with
    ``default`` here), its section of the sample configuration, its help
    (the --help line and the sample's comment), and whether it names a
    file (``path``: made absolute at the start), takes a restart
    (``restart``) or has an option of its own (``option``: --NAME).
    ``shown`` is what the help says of a default that is no plain value;
    ``examples`` are the commented items of a list in the sample, or
    commented other values of a scalar."""

    def __init__(self, name, parse, section, help, kind="scalar",
                 owner="handler", default=None, shown=None, path=False,
                 restart=False, option=False, examples=(), sample=None):
        self.name = name
        self.parse = parse
        self.section = section
        self.help = help
        self.kind = kind
        self.owner = owner
        self.default = default
        self.shown = shown
        self.path = path
        self.restart = restart
        self.option = option
        self.examples = examples
        self.sample = sample        # the sample's value, if not the default

    def default_value(self):
        """The default, from the owner that holds it."""
        if self.owner == "service":
            return self.default
        owner = {"server": SMTPProxyServer, "policy": _PolicyServing}.get(
            self.owner, GreyListingPolicy)
        return getattr(owner, self.name)


LISTENING = "Listening"


UPSTREAM = "The real mail server"


TLS = "TLS with clients"


DIALOGUE = "The SMTP dialogue"


LOGS = "Logs"


SENDERS = "Who may send what"


GREYLISTING = "Greylisting"


POLICY = "Postfix's policy service (check_policy_service)"


SERVICE = "Service"


KEYS = [
    Key("port", _port, LISTENING, "port to listen on", owner="service",
        default=25, restart=True),
    Key("listen_ip", _string, LISTENING,
        "address to listen on; empty: every IPv4 and IPv6 address",
        owner="service", default="", restart=True),
    Key("proxy_protocol", _proxy_mode, LISTENING,
        "no, v1, v2 or any: every connection begins with HAProxy's PROXY "
        "header, which gives the client's address"),
    Key("proxy_protocol_from", _network, LISTENING,
        "the load balancers that may send the PROXY header, addresses or "
        "networks; needed with proxy_protocol (0.0.0.0/0 and ::/0 would "
        "let anyone claim any address, 127.0.0.1 included)", kind="list",
        examples=("192.0.2.10",)),
    Key("servername", _string, LISTENING, "name in the greeting and "
        "replies"),
    Key("serverid", _string, LISTENING, "software name in the greeting",
        shown="smtpproxy VERSION", sample="smtpproxy"),
    Key("smtp_ip", _string, UPSTREAM, "the real mail server's address"),
    Key("smtp_port", _port, UPSTREAM, "the real mail server's port"),
    Key("upstream_timeout", _whole_seconds, UPSTREAM,
        "seconds to wait for the real server to connect or answer; then "
        "the client gets 451"),
    Key("upstream_pool_size", _integer, UPSTREAM,
        "upstream sessions kept open when their client has gone, for the "
        "next clients (a new EHLO, no new connection); never one that "
        "failed, in a transaction, with TLS or XCLIENT; 0: none"),
    Key("upstream_pool_idle", _positive_seconds, UPSTREAM,
        "seconds an upstream session may wait in the pool: less than the "
        "upstream's own idle timeout (Postfix: 300)"),
    Key("upstream_capabilities_ttl", _whole_seconds, UPSTREAM,
        "seconds its EHLO keywords (SIZE, 8BITMIME, SMTPUTF8, DSN) are "
        "trusted before a client's EHLO asks again; every session with it "
        "renews them"),
    Key("upstream_tls", _upstream_tls, UPSTREAM,
        "STARTTLS with it: no, opportunistic (when it offers it; plain "
        "text if the handshake fails) or required (else 451)"),
    Key("upstream_tls_verify", _boolean, UPSTREAM,
        "check its certificate and name; a failed check is a failed "
        "handshake, so only upstream_tls = required makes it a 451"),
    Key("upstream_tls_ca", _string, UPSTREAM,
        "authorities (PEM) its certificate is checked against",
        shown="the system's", path=True),
    Key("upstream_tls_name", _string, UPSTREAM,
        "the name its certificate must hold", shown="smtp_ip"),
    Key("xclient", _boolean, UPSTREAM,
        "tell it the real client (address, port, HELO and host names) with "
        "XCLIENT or XFORWARD when it offers them (Postfix: "
        "smtpd_authorized_xclient_hosts); an XCLIENT it refuses is 451"),
    Key("tls_cert", _string, TLS,
        "certificate chain (PEM) for STARTTLS with clients, read at the "
        "start as root; empty: no STARTTLS", path=True),
    Key("tls_key", _string, TLS, "its private key (PEM)",
        shown="in tls_cert's file", path=True),
    Key("tls_required", _boolean, TLS,
        "refuse MAIL before STARTTLS (530 5.7.0)"),
    Key("strict", _boolean, DIALOGUE,
        "close the connection after a protocol error (unknown command, "
        "command out of order, malformed MAIL or RCPT), as Kamaelia Grey "
        "did; no: follow RFC 5321 and go on"),
    Key("inactivity_timeout", _whole_seconds, DIALOGUE,
        "seconds a client may stay silent before 421; also the deadline "
        "of each line from its first octet (a client trickling a byte at "
        "a time holds no slot), of the PROXY header, of the TLS "
        "handshake, and of a write to a client that does not read"),
    Key("max_session_time", _whole_seconds, DIALOGUE,
        "seconds a whole session may last, from the connection; 0: no "
        "limit"),
    Key("greet_pause", _whole_seconds, DIALOGUE,
        "seconds to wait before the greeting; a client that talks first "
        "gets 554"),
    Key("max_errors", _integer, DIALOGUE,
        "refused or deferred commands, RCPTs that the policy refused or "
        "deferred included, before a client is dropped with 421 4.7.0 "
        "(Postfix's smtpd_hard_error_limit); a delivered message starts "
        "the count again"),
    Key("max_message_size", _integer, DIALOGUE,
        "largest message in octets, announced with SIZE; the octets of an "
        "overlong line count too: a command line not ended within it, or "
        "a refused message not ended within as many octets again, closes "
        "the session"),
    Key("max_recipients", _integer, DIALOGUE, "recipients per message"),
    Key("greylist_log", _string, LOGS,
        "transaction log, one line per transaction (the policy service: "
        "one per decision, as postgrey logs it); empty: none",
        owner="service", default="greylist.log", path=True),
    Key("greylist_debuglog", _string, LOGS,
        "the SMTP dialogue, written when debug is on",
        owner="service", default="greylist-debug.log", path=True),
    Key("debug", _boolean, LOGS, "log the SMTP dialogue (or --debug)",
        owner="service", default=False),
    Key("allowed_senders", _address, SENDERS,
        "client addresses that may relay to any domain", kind="list"),
    Key("allowed_sender_nets", _network, SENDERS,
        "client networks that may relay to any domain: whole-octet "
        "prefixes (192.168.2 is 192.168.2.x) or CIDR", kind="list",
        examples=("192.168.2", "2001:db8::/32")),
    Key("allowed_domains", _domain, SENDERS,
        "domains mail is received for; any other recipient is refused "
        "(550 5.7.1), so none: every recipient is.  The policy service "
        "leaves relay control to Postfix: none, it greylists every "
        "recipient it is asked about; else only those of these domains "
        "(DUNNO for others)", kind="list",
        examples=("example.org",)),
    Key("whitelisted_triples", _ip_triple, SENDERS,
        "always accepted: ip <sender> <recipient>", kind="list",
        examples=("192.0.2.7 <sender@example.net> <user@example.org>",)),
    Key("whitelisted_nonstandard_triples", _helo_triple, SENDERS,
        "always accepted: claimed-helo-name ip-prefix <recipient>",
        kind="list",
        examples=("mx-out.example.net 198.51.100 <user@example.org>",)),
    Key("greylist_db", _store_location, GREYLISTING,
        "the greylisting store: an sqlite3 file, shared safely by the "
        "threads and processes of one host, or a PostgreSQL database "
        "shared by several MX hosts, as a libpq URI "
        "(postgresql://user:password@host:port/dbname, or "
        "postgresql:///dbname?host=/run/postgresql for a local socket; "
        "a primary and its standbys as hosts, host1,host2: the primary "
        "is found among them; "
        "the password best in a passfile, ?passfile=PATH, mode 0600, "
        "owned by the serving user; it is never shown; "
        "needs pip install smtpproxy[postgresql], or on Debian's python3 "
        "apt install python3-psycopg)", path=True,
        examples=("postgresql://greylist@db.example.org/greylist"
                  "?passfile=/etc/smtpproxy/pgpass",)),
    Key("greylist_db_timeout", _decimal, GREYLISTING,
        "the longest a decision waits for the store, in all (its turn "
        "in this process; with PostgreSQL, a connection being made and "
        "its statements) before greylist_fail_mode decides"),
    Key("greylist_cache_time", _whole_seconds, GREYLISTING,
        "seconds a process accepts a triplet it saw pass, and a client it "
        "saw trusted, without asking the store again: the store's pass "
        "counts and last-seen times lag by as much, and a --db-delete "
        "reaches a running proxy after as long; 0: ask every time"),
    Key("hash_keys", _string, GREYLISTING,
        "a file holding the site's secret (make it with head -c 32 "
        "/dev/urandom | base64, mode 0600): the store's keys then hold "
        "keyed hashes (HMAC-SHA256) of the sender and the recipient, "
        "never the addresses; the client part stays; MX hosts sharing a "
        "store share the file.  Read as root at the start and again at a "
        "reload; refused through a link, in a directory others can "
        "write, readable by others, or shorter than 32 octets.  A new "
        "secret, or turning it off, loses every pass; --db-hash-keys "
        "converts a store's clear keys; empty: keys in clear", path=True),
    Key("too_soon", _whole_seconds, GREYLISTING,
        "a retry sooner than this many seconds after the first try "
        "restarts the clock"),
    Key("min_defer_time", _whole_seconds, GREYLISTING,
        "a retry is accepted from this many seconds after the first try "
        "(Kamaelia Grey's: 3600; postgrey's --delay: 300, or 5m)"),
    Key("max_defer_time", _whole_seconds, GREYLISTING,
        "a retry is accepted until this many seconds after the first "
        "try; later, the clock restarts (postgrey's --retry-window: 2d)"),
    Key("max_grey", _whole_seconds, GREYLISTING,
        "a passed triplet unseen this many seconds is forgotten "
        "(postgrey's --max-age: 35d)"),
    Key("ipv4_prefix", _integer, GREYLISTING,
        "bits of an IPv4 client's address in the key, so that a sender's "
        "pool passes once per network; 32: the exact address, as "
        "Kamaelia Grey"),
    Key("ipv6_prefix", _integer, GREYLISTING,
        "bits of an IPv6 client's address in the key; 128: the exact "
        "address"),
    Key("auto_whitelist_clients", _integer, GREYLISTING,
        "greylisting passes (a triplet that waited and came back, each "
        "once) after which a client is accepted at once; its count grows "
        "at most once an hour, as postgrey's; 0: off"),
    Key("max_new_triplets_per_session", _integer, GREYLISTING,
        "new triplets (first sightings, each a row in the store) one "
        "session may add; more RCPTs that would add one are deferred "
        "without a row; 0: no limit"),
    Key("max_new_triplets_per_network", _integer, GREYLISTING,
        "new triplets one client network (ipv4_prefix; for IPv6 its /48 "
        "at most: a site's) may add per hour, counted by each process; "
        "more are deferred without a row; 0: no limit"),
    Key("client_key", _choice("name", "network"), GREYLISTING,
        "what a client is in the key: name, its forward-confirmed host "
        "name minus the first label (mx1.out.example.com and "
        "mx7.out.example.com are out.example.com, never shorter than the "
        "registered domain) when it does not look generic, else its "
        "network; network: always its network"),
    Key("greylist_clients", _choice("all", "suspicious"), GREYLISTING,
        "greylist all clients, or only suspicious ones: listed on a dnsbl "
        "zone, without a forward-confirmed name, or with a generic name "
        "(addresses in it, dyn, dsl, pool, ... and digits); the others "
        "pass at once"),
    Key("dnsbl", _zone, GREYLISTING,
        "DNS block lists: a client they list is always greylisted, even "
        "auto-whitelisted; zone=d.d.d.d (Postfix's syntax, each d a "
        "number, [n..m] or [a;b]) names the answers that list; without "
        "it, zen.spamhaus.org and other Spamhaus zones list with "
        "127.0.0.[2..255], other zones with any answer in 127.0.0.0/8; "
        "answers that refuse our queries (127.255.255.252-255) or lie "
        "outside 127.0.0.0/8 never list and are logged", kind="list",
        examples=("zen.spamhaus.org", "bl.example.net=127.0.0.[2;4..11]")),
    Key("dnswl", _zone, GREYLISTING,
        "DNS allow lists: a client they list is never greylisted; "
        "zone=d.d.d.d as for dnsbl; without it, list.dnswl.org lists "
        "with 127.0.[0..255].[1..3] (trust low, medium, high; not .0, "
        "none), and its 127.0.0.255 (query blocked) never lists and is "
        "logged; other zones: any answer in 127.0.0.0/8, so write the "
        "answers their operator documents",
        kind="list", examples=("list.dnswl.org",
                               "list.dnswl.org=127.0.[0..255].[2..3]")),
    Key("dns_timeout", _decimal, GREYLISTING,
        "seconds one DNS lookup may take (reverse and forward names, DNS "
        "lists, asked at once); one that takes longer counts as no "
        "answer: no name, not listed"),
    Key("dns_cache_time", _whole_seconds, GREYLISTING,
        "seconds the answers of the DNS lists are kept (the last 10000 "
        "asked at most)"),
    Key("client_name_cache_time", _whole_seconds, GREYLISTING,
        "seconds a client's names (reverse, and confirmed by the forward "
        "lookup), once answered, are kept for its next sessions (the last "
        "10000 clients at most); 0: looked up in every session"),
    Key("whitelist_recipients", _word, GREYLISTING,
        "files of recipients never greylisted, and FILE.local beside each "
        "if it exists, in postgrey's format: user@domain, user@, a domain "
        "(and subdomains), /regex/", kind="files", path=True),
    Key("x_greylist_header", _boolean, GREYLISTING,
        "add 'X-Greylist: delayed N seconds ...' to mail greylisting "
        "delayed"),
    Key("whitelist_clients", _word, GREYLISTING,
        "files of clients never greylisted (but never allowed to relay), "
        "and FILE.local beside each, in postgrey's format: one address, "
        "network, host-name suffix or /regex/ a line; a name counts only "
        "if the client's reverse name resolves back to it "
        "(contrib/whitelist_clients: sender pools)", kind="files", path=True),
    Key("greytrap_recipients", _word, GREYLISTING,
        "files of trap addresses (spamd's greytraps), in postgrey's "
        "format as whitelist_recipients (FILE.local too): addresses that "
        "never receive mail; a client that writes to one is deferred as "
        "if greylisted and trapped for greytrap_time: none of its mail "
        "passes meanwhile; empty: no traps", kind="files", path=True),
    Key("greytrap_time", _positive_seconds, GREYLISTING,
        "seconds a client that wrote to a greytrap stays trapped, in the "
        "store, for every MX host sharing it"),
    Key("defer_reply", _defer_reply, GREYLISTING,
        "the reply to a recipient greylisting defers; its first %s: the "
        "seconds left until a retry can pass, then its first %r: the "
        "recipient's domain (postgrey's --greylist-text; other % stay)"),
    Key("greylist_fail_mode", _fail_mode, GREYLISTING,
        "when the store cannot be used (file gone, disk full, locked too "
        "long): accept (as Kamaelia Grey) or defer; a process out of "
        "descriptors never falls back to accept: 421 4.3.2"),
    Key("policy_listen", _policy_listen, POLICY,
        "also answer Postfix's check_policy_service here, with the same "
        "greylisting and store: HOST:PORT (PORT alone: 127.0.0.1), or "
        "unix:/PATH; empty: no policy service", owner="service",
        default="", restart=True, option=True,
        examples=("127.0.0.1:10023",
                  "unix:/var/spool/postfix/private/smtpproxy")),
    Key("policy_clients", _network, POLICY,
        "who may ask the policy service on TCP, addresses and networks; "
        "others are closed at once, for it believes what it is told",
        kind="list", owner="policy"),
    Key("policy_first_idle", _positive_seconds, POLICY,
        "seconds a new policy connection may wait before its first "
        "request (Postfix sends it as it connects); then policy_max_idle",
        owner="policy"),
    Key("policy_max_idle", _positive_seconds, POLICY,
        "seconds a policy connection may stay idle between requests "
        "(Postfix's own max_idle is 300)", owner="policy"),
    Key("policy_max_connections", _positive, POLICY,
        "policy connections at once, a thread each (about 30 kB idle); "
        "Postfix keeps one per smtpd process, up to its "
        "default_process_limit (100); with workers, each worker's",
        owner="policy"),
    Key("policy_max_connections_per_peer", _positive, POLICY,
        "policy connections at once of one peer: a TCP client's address, "
        "or on a UNIX socket the user id that connected; one Postfix is "
        "one peer: raise it (and policy_max_connections) above its "
        "default_process_limit and smtpd process_limit",
        owner="policy"),
    Key("policy_backlog", _positive, POLICY,
        "connections the system queues for the policy service before it "
        "accepts them (listen's backlog, capped by the system's "
        "net.core.somaxconn), as the SMTP listener's: Postfix's smtpd "
        "processes connecting at once are not kept waiting",
        owner="policy", restart=True),
    Key("policy_socket_mode", _octal_mode, POLICY,
        "mode of the policy service's UNIX socket", owner="service",
        default="0660", restart=True),
    Key("policy_socket_group", _string, POLICY,
        "group of the policy service's UNIX socket (postfix, for "
        "Postfix's smtpd); its owner is the user that starts the service "
        "(root)", owner="service",
        default="", shown="the user's own", restart=True),
    Key("smtp_proxy", _boolean, POLICY,
        "serve SMTP on listen_ip and port; no: run the policy service "
        "alone", owner="service", default=True, restart=True),
    Key("workers", _workers, SERVICE,
        "processes serving SMTP clients on the one port, each with its "
        "threads, its upstream sessions and its share of "
        "max_connections_per_ip (max_connections is the service's); auto: "
        "one more than the CPUs this process may use, 2 to 8; 1: a single "
        "process, no master",
        owner="service", default="auto", restart=True, option=True,
        examples=("1", "4")),
    Key("spare_threads", _integer, SERVICE,
        "session threads (of each worker) that, their client gone, wait "
        "for the next one instead of ending: a new connection then costs "
        "no thread start; 0: a new thread for every client",
        owner="server"),
    Key("thread_idle_time", _positive_seconds, SERVICE,
        "seconds a spare session thread waits for a client before it "
        "ends", owner="server"),
    Key("max_connections", _positive, SERVICE,
        "clients served at once; one more gets 421 4.7.0 and is closed at "
        "once; with workers, the whole service's", owner="server",
        option=True),
    Key("max_connections_per_ip", _integer, SERVICE,
        "clients served at once from one client, an address with its "
        "first connection_ipv4_prefix or connection_ipv6_prefix bits; "
        "0: no limit; with workers, each has its share, rounded up",
        owner="server", option=True),
    Key("connection_ipv4_prefix", _prefix(32), SERVICE,
        "bits of an IPv4 address that make one client for "
        "max_connections_per_ip", owner="server"),
    Key("connection_ipv6_prefix", _prefix(128), SERVICE,
        "bits of an IPv6 address that make one client for "
        "max_connections_per_ip: an IPv6 host has a /64", owner="server"),
    Key("stress_threshold", _percent, SERVICE,
        "percent of max_connections open at which the server is under "
        "stress: idle clients get stress_timeout seconds, those silent "
        "longer are closed, a client sending its message is not; stress "
        "ends below three quarters of it, after twice stress_timeout at "
        "least; 0: never", owner="server"),
    Key("stress_timeout", _positive_seconds, SERVICE,
        "seconds a client may stay silent under stress", owner="server"),
    Key("grace_period", _whole_seconds, SERVICE,
        "seconds a stopping server lets open transactions finish before "
        "421 4.3.2", owner="server", option=True),
    Key("pidfile", _string, SERVICE,
        "file holding the process id, locked while it runs; empty: none. "
        "Started as root: in a directory only root can write (/run)",
        owner="service", default="", path=True, restart=True, option=True),
    Key("user", _string, SERVICE,
        "user to serve as once the port is bound as root; it must be able "
        "to write the store's directory", owner="service", default="",
        restart=True, option=True),
    Key("group", _string, SERVICE, "group to serve as",
        owner="service", default="", shown="the user's own", restart=True,
        option=True),
    Key("run_as_root", _boolean, SERVICE,
        "go on serving as root when no user is set", owner="service",
        default=False, restart=True),
    Key("syslog", _facility, SERVICE,
        "send the service's log (instead of log_file) and the "
        "transaction lines (as well as greylist_log) to syslog, with "
        "this facility, such as mail; no: off", owner="service",
        default="", shown="no", option=True),
    Key("syslog_socket", _string, SERVICE,
        "syslog's socket, or HOST:PORT for UDP", owner="service",
        default="/dev/log"),
    Key("log_file", _string, SERVICE,
        "the service's own log (starts, stops, errors) when syslog is "
        "off; empty: standard error", owner="service", default="",
        path=True),
    Key("metrics_listen", _metrics_listen, SERVICE,
        "serve Prometheus metrics (GET /metrics), the whole service's "
        "figures, here: HOST:PORT (PORT alone: 127.0.0.1; an IPv6 "
        "address in brackets), bound as root at the start; empty: none",
        owner="service", default="", restart=True,
        examples=("127.0.0.1:9025", "[::1]:9025")),
    Key("metrics_clients", _network, SERVICE,
        "who may scrape the metrics, addresses and networks; others are "
        "closed as they connect, before anything is read",
        kind="list", owner="service", default=["127.0.0.0/8", "::1"]),
]


# What the rest of the module reads, derived from KEYS.
# name: (converter, kind, help); the converter of a list converts an item.
CONFIG_KEYS = dict((key.name, (key.parse, key.kind, key.help))
                   for key in KEYS)


# The service's keys (main()'s), with their defaults; the server's
# (SMTPProxyServer's attributes): none of them is copied onto the handler.
SERVICE_DEFAULTS = dict((key.name, key.default) for key in KEYS
                        if key.owner == "service")


SERVER_SETTINGS = tuple(key.name for key in KEYS if key.owner == "server")


# The policy servers' (PolicyServer's attributes).
POLICY_SETTINGS = tuple(key.name for key in KEYS if key.owner == "policy")


SERVER_KEYS = (tuple(sorted(SERVICE_DEFAULTS)) + SERVER_SETTINGS
               + POLICY_SETTINGS)


# Keys used once, at the start: a reload that changes them says so.
RESTART_KEYS = tuple(key.name for key in KEYS if key.restart)


# File names, made absolute at the start: a daemon runs in "/".
PATH_KEYS = tuple(key.name for key in KEYS if key.path)


# Options that set a key (--NAME); their values are read as in the file.
KEY_OPTIONS = tuple(key.name for key in KEYS if key.option)


def _format_value(value):
    """A value as the configuration file writes it."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(item if isinstance(item, str) else " ".join(item)
                         for item in value)
    return str(value)


def shown_default(key):
    """The default of ``key`` (a Key) as the help says it."""
    if key.shown:
        return key.shown
    return _format_value(key.default_value()) or "none"


def sample_config():
    """The sample configuration (contrib/greylist.conf.dist): every key
    with its default, by section, its help as the comment."""
    lines = ["# smtpproxy configuration (Kamaelia Grey's greylist.conf "
             "format).", "#"]
    lines.extend(textwrap.wrap(
        "'#' starts a comment, at the start of a line or after a blank; "
        "'key = value' sets a value; 'key:' "
        "starts a list whose items are the following indented lines.  A "
        "time is in seconds, or with units s, m, h, d, w (300, 5m, 2d, "
        "1h30m); it is shown in seconds.  The "
        "values below are the defaults.  Made by 'smtpproxy "
        "--sample-config'; 'smtpproxy --config FILE --check-config' checks "
        "a file and prints the values in force.", 74, initial_indent="# ",
        subsequent_indent="# "))
    section = None
    for key in KEYS:
        if key.section != section:
            section = key.section
            lines.append("")
            lines.append(("# -- %s " % section).ljust(76, "-"))
        lines.extend(textwrap.wrap(key.help[0].upper() + key.help[1:] + ".",
                                   74, initial_indent="# ",
                                   subsequent_indent="# "))
        value = key.default_value()
        if key.kind == "list":
            lines.append("%s:" % key.name)
            lines.extend("    %s" % _format_value([item]) for item in value)
            lines.extend("#    %s" % item for item in key.examples
                         if not value)
        else:
            text = key.sample if key.sample is not None else (
                _format_value(value))
            lines.append(("%s = %s" % (key.name, text)).rstrip())
            lines.extend("#%s = %s" % (key.name, item)
                         for item in key.examples)
    return "\n".join(lines) + "\n"


def format_config(handler_class, values):
    """The effective configuration, every key, in the file format."""
    lines = []
    for key in sorted(CONFIG_KEYS):
        kind = CONFIG_KEYS[key][1]
        if key in values:
            value = values[key]
        elif key in SERVICE_DEFAULTS:
            value = SERVICE_DEFAULTS[key]
        elif key in SERVER_SETTINGS:
            value = getattr(SMTPProxyServer, key)
        elif key in POLICY_SETTINGS:
            value = getattr(_PolicyServing, key)
        else:
            value = getattr(handler_class, key, None)
        if value is None:
            continue
        if key == "greylist_db":
            value = redact_uri(value)
        if kind == "list" or (kind == "files"       # one: key = FILE
                              and len(list_paths(value)) > 1):
            lines.append("%s:" % key)
            lines.extend("    %s" % (item if isinstance(item, str)
                                     else " ".join(item)) for item in value)
        elif isinstance(value, bool):
            lines.append("%s = %s" % (key, "yes" if value else "no"))
        else:
            lines.append("%s = %s" % (key, _format_value(value)))
    return "\n".join(lines)


# Whitespace then "#": the rest of the line is a comment.
CONFIG_SEARCH_PATH = [
    "/etc/smtpproxy.conf",
    "/usr/local/etc/smtpproxy.conf",
    "/usr/local/etc/Kamaelia/greylist.conf",
    "/usr/local/etc/greylist.conf",
    "/etc/Kamaelia/greylist.conf",
    "/etc/greylist.conf",
    "./greylist.conf",
]


CONFIG_SEARCH_PATH += [name + ".dist" for name in CONFIG_SEARCH_PATH]


_INLINE_COMMENT_RE = re.compile(r"\s+#.*\Z", re.DOTALL)


def read_config_file(path):
    """Read a Kamaelia Grey style configuration file.

    Returns ``(values, warnings)``: ``values`` maps each known key to its
    converted value, ``warnings`` lists messages about keys that are not
    known (they are ignored, as Postfix ignores unused parameters).
    Raises ConfigError, naming the file and line, for anything malformed.

    The format: ``#`` starts a comment line; ``key = value`` sets a scalar;
    a line ``key:`` starts a list whose items are the following indented
    lines; an item with spaces in it is a tuple of its words.  On any
    line, whitespace then ``#`` starts a comment to its end (a ``#``
    with no blank before it is part of the value).
    """
    try:
        with open(path, "rb") as config_file:
            raw = config_file.read()
    except OSError as error:
        raise ConfigError("%s: cannot read: %s" % (path, error.strerror))
    try:
        text = raw.decode("utf-8-sig")     # a byte-order mark is no key
    except UnicodeDecodeError as error:
        raise ConfigError("%s: not UTF-8 text (byte %d)"
                          % (path, error.start))
    entries = []            # (key, line number, raw value or list of items)
    current_list = None
    for number, line in enumerate(text.splitlines(), 1):
        # An inline comment is the admin's note, never part of a value:
        # "workers = 3   # processes" must read 3, and "servername = mx
        # # our MX" must not put the note in the greeting.
        line = _INLINE_COMMENT_RE.sub("", line)
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = "%s:%d" % (path, number)
        if line[0] in " \t":
            if current_list is None:
                raise ConfigError("%s: indented line outside a list" % where)
            words = stripped.split()
            current_list.append((number, words[0] if len(words) == 1
                                 else tuple(words)))
            continue
        current_list = None
        if "=" in line:
            key, value = line.split("=", 1)
            entries.append((key.strip(), number, value.strip()))
        elif stripped.endswith(":") and " " not in stripped:
            current_list = []
            entries.append((stripped[:-1], number, current_list))
        else:
            raise ConfigError("%s: expected 'key = value' or 'key:', got %s"
                              % (where, log_escape(stripped)))
    values, warnings = {}, []
    for key, number, value in entries:
        where = "%s:%d" % (path, number)
        if key not in CONFIG_KEYS:
            warnings.append("%s: unknown key %r ignored%s"
                            % (where, key, _key_hint(key)))
            continue
        convert, kind, _ = CONFIG_KEYS[key]
        if kind == "list" and not isinstance(value, list):
            raise ConfigError("%s: %s is a list: write '%s:' and one item "
                              "per indented line" % (where, key, key))
        if kind == "scalar" and isinstance(value, list):
            raise ConfigError("%s: %s takes a value: write '%s = value'"
                              % (where, key, key))
        if kind == "files" and not isinstance(value, list):   # key = FILE
            value = [(number, value)] if value else []
        try:
            if kind != "scalar":
                items = []
                for number, item in value:
                    where = "%s:%d" % (path, number)
                    items.append(convert(item))
                value = items
            values[key] = convert(value) if kind == "scalar" else value
        except ValueError as error:
            raise ConfigError("%s: %s: %s" % (where, key, error))
    return values, warnings


def load_config(path=None):
    """Find and read the configuration; return ``(values, path, warnings)``.

    With no ``path``, the first existing file of CONFIG_SEARCH_PATH is read;
    when there is none, ``values`` is empty and ``path`` is None.
    """
    if path is None:
        for candidate in CONFIG_SEARCH_PATH:
            if os.path.isfile(candidate):
                path = candidate
                break
        else:
            return {}, None, []
    values, warnings = read_config_file(path)
    return values, path, warnings


# postgrey's options (1.37), by the name of the key that does their
# work here: a postgrey user's --delay or max-age gets the key to write.
POSTGREY_OPTIONS = {
    "delay": "min_defer_time",
    "max_age": "max_grey",
    "retry_window": "max_defer_time",
    "greylist_text": "defer_reply",
    "auto_whitelist_clients": "auto_whitelist_clients",
    "whitelist_clients": "whitelist_clients",
    "whitelist_recipients": "whitelist_recipients",
    "lookup_by_subnet": "client_key",
    "lookup_by_host": "client_key",
    "ipv4cidr": "ipv4_prefix",
    "ipv6cidr": "ipv6_prefix",
    "inet": "policy_listen",
    "unix": "policy_listen",
    "dbdir": "greylist_db",
    "privacy": "hash_keys",
    "hostname": "servername",
    "syslog_facility": "syslog",
    "x_greylist_header": "x_greylist_header",
}


def _key_hint(name):
    """What to say of ``name``, a key that does not exist: "; did you
    mean K?", K the key doing the work of a postgrey option of that name
    (or of one of its words: greylist_delay has postgrey's delay), and
    the nearest names of KEYS (difflib); "" if none is near."""
    known = name.strip().lstrip("-").lower().replace("-", "_")
    words = [known] + known.split("_")
    found = ["%s (postgrey's --%s)" % (POSTGREY_OPTIONS[word],
                                       word.replace("_", "-"))
             for word in words if word in POSTGREY_OPTIONS][:1]
    found += [key for key in difflib.get_close_matches(known, CONFIG_KEYS, 2)
              if not found or not found[0].startswith(key + " ")]
    found = found[:2]
    if not found:
        return ""
    return "; did you mean %s?" % " or ".join(found)


def _option_value(text):
    """Read -o KEY=VALUE as the file would; list items split at commas."""
    key, equals, value = text.partition("=")
    key = key.strip()
    if key and key not in CONFIG_KEYS:
        raise ValueError("-o %s: unknown key %s%s" % (
            log_escape(text), log_escape(key), _key_hint(key)))
    if not equals or not key:
        raise ValueError("-o %s: expected KEY=VALUE with a configuration "
                         "key" % log_escape(text))
    convert, kind, _ = CONFIG_KEYS[key]
    try:
        if kind != "scalar":
            items = [item.split() for item in value.split(",")
                     if item.strip()]
            return key, [convert(item[0] if len(item) == 1 else tuple(item))
                         for item in items]
        return key, convert(value.strip())
    except ValueError as error:
        raise ValueError("-o %s: %s" % (key, error))


def read_settings(args):
    """The configuration file and the command line's keys over it: return
    ``(values, path, warnings)``; raise ConfigError or ValueError."""
    values, path, warnings = load_config(args.config)
    for option, keys, default in (
            ("listen", ("listen_ip", "port"), None),
            ("upstream", ("smtp_ip", "smtp_port"),
             values.get("smtp_port", 8025))):
        text = getattr(args, option)
        if text:
            try:
                values.update(zip(keys, _split_host_port(text, default)))
            except ValueError as error:
                raise ValueError("--%s %s: %s"
                                 % (option, log_escape(text), error))
    if args.debug is not None:
        values["debug"] = args.debug
    for key in KEY_OPTIONS:
        text = getattr(args, key)
        if text is not None:
            values.update([_option_value("%s=%s" % (key, text))])
    for text in args.set or ():
        values.update([_option_value(text)])
    return values, path, warnings


def handler_class_for(base, values):
    """A subclass of ``base`` whose attributes are the handler's keys."""
    attributes = dict((key, value) for key, value in values.items()
                      if key not in SERVER_KEYS)
    return type(base.__name__, (base,), attributes)


def configure_server(server, values, keys=SERVER_SETTINGS):
    """Set the server's keys (limits, grace period) from ``values``; a
    policy server's are POLICY_SETTINGS."""
    for key in keys:
        if key in values:
            setattr(server, key, values[key])
        else:
            # Back to the default, also when a reload removed the key.
            server.__dict__.pop(key, None)


# ===========================================================================
# == 16. The service's files and privileges, as root ==
# ===========================================================================
#
# Owns:  what runs as root: the logs (configure_logging), the pidfile, files
#        opened only where no other user can plant a link (open_service_file),
#        the user to serve as and the switch (drop_privileges, check_as),
#        hash_keys' secret (read_key_secret), who may bind a port below
#        1024 (privileged_port_advice), what to tell the admin to run so
#        that the user may write a file (_hand_over, a store's directory:
#        _store_directory_advice).
# Enter: open_service_file(key, path, identity), configure_logging(values).
# Uses:  section 15 (the values).


class StartError(Exception):
    """The service cannot start; ``status`` is the exit status."""

    def __init__(self, message, status=1):
        Exception.__init__(self, message)
        self.status = status


# CAP_NET_BIND_SERVICE (linux/capability.h): binding a port below
# net.ipv4.ip_unprivileged_port_start without being root.
CAP_NET_BIND_SERVICE = 10


def unprivileged_port_start():
    """The lowest port any user may bind: Linux's
    net.ipv4.ip_unprivileged_port_start (4.11), else 1024 (RFC 6335's
    System Ports, 0 to 1023, are root's on Unix)."""
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as value:
            return int(value.read())
    except (OSError, ValueError):
        return 1024


def may_bind_privileged_ports():
    """Whether this process may bind a port below
    unprivileged_port_start(): as root, or with CAP_NET_BIND_SERVICE in
    its effective set (/proc/self/status: setcap on the interpreter, or
    systemd's AmbientCapabilities)."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16)
                                >> CAP_NET_BIND_SERVICE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def privileged_port_advice(port):
    """What to do when ``port`` cannot be bound for want of privilege:
    "" if any user may bind it, or this process may."""
    start = unprivileged_port_start()
    if port >= start or may_bind_privileged_ports():
        return ""
    return ("port %d is below %d: only root, or a process with "
            "CAP_NET_BIND_SERVICE, may listen on it.  Start smtpproxy as "
            "root (it binds the port, then serves as 'user'), or give the "
            "interpreter the capability (setcap cap_net_bind_service=+ep "
            "%s), or listen on a port above %d and redirect port %d to it "
            "(nft or iptables REDIRECT)"
            % (port, start, os.path.realpath(sys.executable) or "python3",
               start - 1, port))


def _listen_error(what, where, port, error):
    """The StartError of a failed bind of ``what`` on ``where``: with
    what to do when the port is a privileged one (EACCES)."""
    advice = ""
    if getattr(error, "errno", None) in (errno.EACCES, errno.EPERM):
        advice = privileged_port_advice(port)
    return StartError("cannot listen%s on %s: %s%s" % (
        what, where, error, "; " + advice if advice else ""))


_installed_log_handlers = []      # (role, logger, handler) set up by us


# The service's log lines; syslog's are tagged as mail daemons' are.
SERVICE_LOG_FORMAT = ("%(asctime)s smtpproxy[%(process)d]: %(levelname)s "
                      "%(message)s")


SYSLOG_FORMAT = "smtpproxy[%(process)d]: %(message)s"


def _syslog_handler(values):
    address = values.get("syslog_socket", "/dev/log")
    socktype = None
    if not address.startswith("/"):
        address = _split_host_port(address, 514)
        socktype = socket.SOCK_DGRAM
    else:
        # SysLogHandler would start without its socket and lose every
        # line: a socket that is not there is a configuration error.
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            probe = socket.socket(socket.AF_UNIX, kind)
            try:
                probe.connect(address)
                break
            except OSError as error:
                problem = error
            finally:
                probe.close()
        else:
            raise OSError("syslog socket %s: %s"
                          % (address, problem.strerror))
    facility = logging.handlers.SysLogHandler.facility_names[values["syslog"]]
    handler = logging.handlers.SysLogHandler(address, facility, socktype)
    handler.setFormatter(logging.Formatter(SYSLOG_FORMAT))
    return handler


def _shared_directory(directory):
    """The first directory on the way to ``directory`` that a user other
    than root could change, or None if only root can: every directory
    passed, and every symbolic link followed on the way, is root's, and
    no directory is writable by its group or others, but for a sticky
    one (such as /tmp) whose entry on the way is root's, which nobody
    else may rename or remove.  ``directory`` itself must not be
    writable by others even with the sticky bit: they could make the
    name first.  OSError if the way is broken."""
    def changeable(info):
        return info.st_uid != 0 or info.st_mode & (stat.S_IWGRP
                                                    | stat.S_IWOTH)
    # Not abspath(): ".." after a link is the link's target's parent.
    pending = [part for part in reversed(os.path.join(
        os.getcwd(), directory).split("/")) if part]
    current, info, links = "/", os.lstat("/"), 0
    if changeable(info):
        return current
    while pending:
        part = pending.pop()
        if part == ".":
            continue
        if part == "..":
            current = os.path.dirname(current)
            info = os.lstat(current)
            continue
        entry = os.lstat(os.path.join(current, part))
        if changeable(info):
            if not info.st_mode & stat.S_ISVTX:
                return current
            if entry.st_uid != 0:       # its owner may replace it
                return os.path.join(current, part)
        if stat.S_ISLNK(entry.st_mode):
            links += 1
            if links > 40:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP),
                              directory)
            target = os.readlink(os.path.join(current, part))
            if target.startswith("/"):
                current, info = "/", os.lstat("/")
            pending.extend(part for part in reversed(target.split("/"))
                           if part)
            continue
        if not stat.S_ISDIR(entry.st_mode):
            raise NotADirectoryError(errno.ENOTDIR,
                                     os.strerror(errno.ENOTDIR), directory)
        current, info = os.path.join(current, part), entry
        if entry.st_uid != 0:
            return current
    return current if changeable(info) else None


@contextlib.contextmanager
def _effective_user(identity):
    """Within it, the effective ids and groups are ``identity``'s (uid,
    gid, name), so that the kernel checks what is opened as that user
    would be checked; root again after, also when a switch failed.
    Nothing with None.  The effective ids are the process's, every
    thread's: this runs only at the start, before any thread (a reload
    runs as the serving user and needs none of it)."""
    if identity is None:
        yield
        return
    uid, gid, name = identity
    groups, egid = os.getgroups(), os.getegid()
    try:
        os.setgroups(os.getgrouplist(name, gid))
        os.setegid(gid)
        os.seteuid(uid)
        yield
    finally:
        if os.geteuid() != 0:
            os.seteuid(0)
        os.setegid(egid)
        os.setgroups(groups)


def _hand_over(user, *paths):
    """What to do, for an error message, so that ``user`` may write
    ``paths``.  Each is looked at, never followed: one that is not there
    is left out; a symbolic link, or a file with other names (hard
    links), is to be removed, for a chown would give away what it leads
    to.  The chown is ``chown -h``, which changes a link named on its
    command line, not what it leads to, if the user swaps one in before
    the admin runs it; and there is none if another user than root can
    change a directory on the way to the file's directory (which that
    user can then swap for a link into root's files)."""
    names = []
    for path in paths:
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISLNK(info.st_mode):
            return ("%s is a symbolic link, and a chown could give away "
                    "what it leads to: remove it" % path)
        if info.st_nlink > 1:
            return ("%s has other names (hard links), and a chown would "
                    "give them away too: remove it" % path)
        names.append(path)
    if not names:
        return ("%s cannot reach it: name a file in a directory %s can "
                "write" % (user, user))
    for path in names:
        parent = os.path.dirname(os.path.dirname(os.path.join(os.getcwd(),
                                                              path)))
        try:
            shared = _shared_directory(parent)
        except OSError:
            shared = parent
        if shared is not None:
            return ("no chown is safe there: %s can be changed by a user "
                    "other than root, who could swap a directory for a "
                    "link to root's files: name a path whose directories "
                    "are root's, the last one %s's" % (shared, user))
    return "give it to %s: chown -h %s %s" % (user, user, " ".join(names))


# Directories never to give to the serving user, whatever it lacks: the
# system's own (a chown of /var/lib hands every package's state to it),
# beside the users' homes (pwd) and any directory holding other files.
_SYSTEM_DIRECTORIES = frozenset((
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32",
    "/lib64", "/media", "/mnt", "/opt", "/proc", "/root", "/run", "/sbin",
    "/srv", "/sys", "/tmp", "/usr", "/usr/bin", "/usr/lib", "/usr/local",
    "/usr/local/bin", "/usr/local/lib", "/usr/local/share", "/usr/sbin",
    "/usr/share", "/var", "/var/backups", "/var/cache", "/var/lib",
    "/var/local", "/var/lock", "/var/log", "/var/mail", "/var/opt",
    "/var/run", "/var/spool", "/var/tmp"))

# Where the README makes the serving user's directory (install -d).
_STORE_HOME = "/var/lib/smtpproxy"


def _not_to_give(directory, user, store):
    """Why ``directory`` (there) must not be given to ``user`` by a
    chown: a system directory, a user's home (not ``user``'s own), or
    one holding other files than the sqlite store ``store``'s; or None.
    A directory the user cannot list is judged by its name alone."""
    if directory in _SYSTEM_DIRECTORIES:
        return "a system directory"
    try:
        homes = set(os.path.normpath(entry.pw_dir) for entry in pwd.getpwall()
                    if entry.pw_name != user and entry.pw_dir)
    except OSError:
        homes = set()
    if directory in homes:
        return "a user's home directory"
    mine = set(os.path.basename(store + suffix)
               for suffix in ("", "-wal", "-shm", "-journal"))
    try:
        others = set(os.listdir(directory)) - mine
    except OSError:
        others = set()
    if others:
        return "a directory holding other files (%s)" % ", ".join(
            sorted(log_escape(name) for name in others)[:3])
    return None


def _store_directory_advice(path, user):
    """What to do so that ``user`` may make the sqlite store ``path`` and
    its -wal and -shm files, for an error message: never a chown of a
    system directory, a home or a shared one (_not_to_give), nor of one
    whose way another user can change (_shared_directory): a directory
    of the store's own then, made by install -d (which makes the missing
    ones on the way root's, and the last one the user's)."""
    directory = os.path.dirname(os.path.join(os.getcwd(), path))
    directory = os.path.normpath(directory)
    name = os.path.basename(path)
    make = "install -d -o %s -m 750 %%s" % user
    if not os.path.isdir(directory):
        return ("its directory %s does not exist: make it, the user's: %s"
                % (directory, make % directory))
    why = _not_to_give(directory, user, path)
    if why is None:
        try:
            shared = _shared_directory(os.path.dirname(directory))
        except OSError:
            shared = directory
        if shared is None:
            return ("its directory %s must be writable by %s, who makes "
                    "its -wal and -shm files there: chown %s %s"
                    % (directory, user, user, directory))
        why = ("on a way %s, which a user other than root can change"
               % shared)
    try:
        shared = _shared_directory(directory)
    except OSError:
        shared = directory
    own = os.path.join(directory, "smtpproxy")
    if (directory in _SYSTEM_DIRECTORIES or shared is not None
            or not os.access(directory, os.X_OK)):
        own = _STORE_HOME       # as the README makes it
    return ("its directory %s is %s, not one to give to %s: give the "
            "store a directory of its own: %s, and set greylist_db = %s"
            % (directory, why, user, make % own, os.path.join(own, name)))


def open_service_file(key, path, identity=None, create=True):
    """Open the pidfile or a log (``key`` names which, ``path`` where) at
    the start: the pidfile read-only, a log for appending; return the
    descriptor.  Without ``create`` (--check-config) nothing is made or
    kept open: the same refusals, and None.  Raise StartError.

    Started as root, nothing is opened through a link that another user
    could have planted.  A symbolic link as the file is refused, and so is
    anything but a regular file (or, for a log, a device such as
    /dev/null).  In a directory only root can change
    (see _shared_directory) root opens the file; one this run creates is
    made 0640 (the pidfile 0644) and, a log, given to ``identity`` (the
    serving user: uid, gid, name) through its descriptor, so that the user
    can reopen it after a rotation; nothing that was there is given away.
    In a directory another user can change, a log is opened as the
    serving user (the kernel checks what that user may do), or refused
    with no such user (run_as_root): root would follow the links on the
    way; and the pidfile is refused: the root init script signals the
    pid it reads.
    Not started as root, the file is opened as it is named.
    """
    pidfile = key == "pidfile"
    flags = os.O_CLOEXEC | (os.O_RDONLY if pidfile
                            else os.O_WRONLY | os.O_APPEND)
    mode = 0o644 if pidfile else 0o640
    if os.geteuid() != 0:
        if create:
            try:
                return os.open(path, flags | os.O_CREAT, mode)
            except OSError as error:
                raise StartError("cannot open %s %s: %s"
                                 % (key, path, error.strerror), 2)
        target = path if os.path.exists(path) else (
            os.path.dirname(os.path.abspath(path)))
        if not os.access(target, os.W_OK):
            raise StartError("%s %s: %s is not writable by %s" % (
                key, path, target, _user_name(os.geteuid())), 2)
        return None
    directory = os.path.dirname(os.path.join(os.getcwd(), path))
    try:
        shared = _shared_directory(directory)
    except OSError as error:
        raise StartError("cannot open %s %s: %s: %s" % (
            key, path, error.filename or directory, error.strerror), 2)
    opener = None
    if shared is not None:
        if pidfile:
            raise StartError(
                "pidfile %s: %s can be changed by a user other than root, "
                "who could make the pid one the init script signals: put "
                "the pidfile in a directory only root can write, such as "
                "/run" % (path, shared), 2)
        if identity is None:
            raise StartError(
                "%s %s: %s can be changed by a user other than root, whose "
                "links root would follow: put the log in a directory only "
                "root can write, or set user (the serving user, which then "
                "opens it)" % (key, path, shared), 2)
        opener = identity
    with _effective_user(opener):
        try:
            return _open_nofollow(key, path, flags, mode, create,
                                  None if opener or pidfile else identity)
        except OSError as error:
            if opener and error.errno in (errno.EACCES, errno.EPERM):
                raise StartError(
                    "cannot open %s %s as %s (other users than root can "
                    "change %s, so it is opened as the serving user): %s: "
                    "%s, or name a file in a directory only root can write"
                    % (key, path, opener[2], shared, error.strerror,
                       _hand_over(opener[2], path)), 2)
            raise StartError("cannot open %s %s: %s"
                             % (key, path, error.strerror), 2)


def _open_nofollow(key, path, flags, mode, create, owner):
    """open_service_file()'s opening, as whoever is effective: create the
    file (given to ``owner`` if so) or open the one there, never through a
    link."""
    created = False
    if create:
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL
                         | os.O_NOFOLLOW, mode)
            created = True
        except FileExistsError:
            pass
    if not created:
        try:
            fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            if create:
                raise
            # --check-config: can it be made there?
            directory = os.path.dirname(os.path.join(os.getcwd(), path))
            if not os.access(directory, os.W_OK | os.X_OK,
                             effective_ids=True):
                raise PermissionError(errno.EACCES,
                                      os.strerror(errno.EACCES), path)
            return None
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise StartError(
                    "%s %s is a symbolic link: started as root, smtpproxy "
                    "opens no link (another user may have planted it): "
                    "name the file itself" % (key, path), 2)
            raise
    try:
        info = os.fstat(fd)
        # A log may be a device (/dev/null, /dev/full): only root makes
        # those.  Never a FIFO or a socket, nor such a pidfile.
        if not (stat.S_ISREG(info.st_mode) or (
                key != "pidfile" and stat.S_ISCHR(info.st_mode))):
            raise StartError("%s %s is not a regular file: name a file"
                             % (key, path), 2)
        if created and owner is not None:
            os.fchown(fd, owner[0], owner[1])
        fcntl.fcntl(fd, fcntl.F_SETFL,
                    fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    if not create:
        os.close(fd)
        return None
    return fd


class _OpenedFileHandler(logging.FileHandler):
    """A FileHandler on a file open_service_file() opened."""

    def __init__(self, fd, path):
        logging.FileHandler.__init__(self, path, delay=True)
        self.stream = open(fd, "a", encoding=self.encoding,
                           errors=getattr(self, "errors", None))


def configure_logging(values, identity=None, keep_failed=False):
    """Set up the logs from the configuration, or set them up again (on
    SIGHUP: files are reopened, which is what logrotate needs).

    The service's own log (starts, stops, warnings, errors) goes to syslog
    when the ``syslog`` key names a facility, else to ``log_file``, else to
    standard error.  Transaction lines go to ``greylist_log`` and, with
    syslog, to syslog too; the dialogue goes to ``greylist_debuglog`` when
    ``debug`` is on.  Everything is opened before anything is replaced:
    if a log cannot be opened, OSError is raised and the logs in place
    stay as they were; with ``keep_failed`` (a reload), the others are
    replaced all the same, the one in place of each that failed stays,
    and the errors are returned.  Started as root, the files are opened
    as open_service_file() says, ``identity`` being the serving user.
    """
    def open_file(key, path, layout):
        fd = open_service_file(key, path, identity)
        handler = _OpenedFileHandler(fd, path)
        handler.setFormatter(logging.Formatter(layout))
        return handler

    def stderr():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(SERVICE_LOG_FORMAT))
        return handler

    # (role, logger, how to open it)
    wanted = []
    if values.get("syslog"):
        wanted.append(("service", log, lambda: _syslog_handler(values)))
        wanted.append(("transactions to syslog", transaction_log,
                       lambda: _syslog_handler(values)))
    elif values.get("log_file"):
        wanted.append(("service", log, lambda: open_file(
            "log_file", values["log_file"], SERVICE_LOG_FORMAT)))
    else:
        wanted.append(("service", log, stderr))
    path = values.get("greylist_log", "greylist.log")
    if path:
        wanted.append(("transactions", transaction_log,
                       lambda: open_file("greylist_log", path,
                                         "%(message)s")))
    debug_path = values.get("greylist_debuglog", "greylist-debug.log")
    if values.get("debug") and debug_path:
        wanted.append(("dialogue", dialogue_log, lambda: open_file(
            "greylist_debuglog", debug_path, "%(asctime)s %(message)s")))
    old = dict((role, (logger, handler))
               for role, logger, handler in _installed_log_handlers)
    new, kept, errors = [], set(), []
    for role, logger, make in wanted:
        try:
            new.append((role, logger, make()))
        except (OSError, StartError) as error:
            if not keep_failed:
                for _, _, handler in new:
                    handler.close()
                raise
            errors.append(error)
            if role in old:
                new.append((role,) + old[role])
                kept.add(role)
    for role, (logger, handler) in old.items():
        if role not in kept:
            logger.removeHandler(handler)
            handler.close()
    for role, logger, handler in new:
        logger.addHandler(handler)      # once: a kept one is there already
    _installed_log_handlers[:] = new
    log.setLevel(logging.INFO)
    transaction_log.setLevel(logging.INFO)
    transaction_log.propagate = False
    dialogue_log.setLevel(logging.DEBUG if values.get("debug")
                          else logging.WARNING)
    dialogue_log.propagate = False
    return errors


# hash_keys: the fewest octets a secret may have (32 random octets in
# base64 are 44), and the most that are read.
MIN_KEY_SECRET = 32


MAX_KEY_SECRET = 4096


MAKE_KEY_SECRET = ("make one as root with: install -m 600 /dev/null FILE "
                   "&& head -c 32 /dev/urandom | base64 > FILE (root's; "
                   "for a reload to read it again as the serving user, "
                   "chgrp GROUP FILE && chmod 640 FILE with the user's "
                   "group), and copy it to every MX host sharing the store")


def read_key_secret(path):
    """The secret in the file ``path`` (hash_keys), as bytes without the
    white space around it (a copy with or without its last newline is
    the same secret); StartError (status 2) with what to do, or OSError
    when it cannot be opened.

    The secret keeps the store's addresses from whoever reads the store:
    the file is never read through a link, nor in a directory another
    user can change (started as root: every directory on the way is
    root's alone, _shared_directory(); otherwise its own directory is
    the user's or root's and writable by nobody else), and it must be a
    regular file that no other user can read or change (a group may
    read it: the serving user's, for a reload), of MIN_KEY_SECRET octets
    at least."""
    what = "hash_keys %s" % path
    directory = os.path.dirname(os.path.join(os.getcwd(), path))
    if os.geteuid() == 0:
        shared = _shared_directory(directory)
    else:
        info = os.stat(directory)
        shared = (directory if info.st_uid not in (0, os.geteuid())
                  or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) else None)
    if shared is not None:
        raise StartError(
            "%s: %s can be changed by another user, who could swap the "
            "secret for one of his own: keep it in a directory only root "
            "can write, such as /etc/smtpproxy" % (what, shared), 2)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise StartError("%s is a symbolic link: smtpproxy reads the "
                             "secret through no link (another user may "
                             "have planted it): name the file itself"
                             % what, 2)
        if error.errno == errno.ENOENT:
            raise StartError("%s: no such file: %s" % (what, MAKE_KEY_SECRET),
                             2)
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StartError("%s is not a regular file: name the file "
                             "itself" % what, 2)
        if info.st_mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
            raise StartError(
                "%s can be read or changed by other users (mode %04o), and "
                "its secret is all that keeps the store's addresses from "
                "a dictionary of common ones: chmod 600 %s (or 640, with "
                "the serving user's group), and make a new secret if "
                "others may have read it" % (
                    what, stat.S_IMODE(info.st_mode), path), 2)
        data = os.read(fd, MAX_KEY_SECRET + 1)
    finally:
        os.close(fd)
    secret = data.strip()
    if len(data) > MAX_KEY_SECRET:
        raise StartError("%s is longer than %d octets: is it the right "
                         "file? %s" % (what, MAX_KEY_SECRET,
                                       MAKE_KEY_SECRET), 2)
    if len(secret) < MIN_KEY_SECRET:
        raise StartError("%s %s: at least %d octets are needed, which no "
                         "dictionary of secrets can guess: %s" % (
                             what, "is empty" if not secret else
                             "holds %d octets" % len(secret),
                             MIN_KEY_SECRET, MAKE_KEY_SECRET), 2)
    return secret


def lock_pidfile(path):
    """Open and lock the pidfile; return its descriptor.

    The lock (flock) is held for as long as the process runs, so that a
    pidfile left by a dead process is recognised and replaced, and one of
    a running process makes this start fail, whatever pid it holds.  It
    is held on a read-only descriptor (opened as open_service_file()
    says): the process that serves, once unprivileged, cannot change the
    pid the init script signals.
    """
    while True:
        fd = open_service_file("pidfile", path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            raise StartError("already running (pid %s, %s)"
                             % (log_escape(pid) or "?", path))
        # A stopping instance removes the file, then lets go of the lock:
        # the lock of a file no longer at ``path`` is nobody's pidfile.
        try:
            named, held = os.stat(path), os.fstat(fd)
            if (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
                break
        except OSError:
            pass
        os.close(fd)
    return fd


def write_pidfile(fd, path):
    """Write this process's id into the pidfile ``path``, locked on
    ``fd``, through a descriptor of its own, closed at once; never
    through a link (as root), nor into another file than the locked
    one."""
    flags = os.O_WRONLY | os.O_CLOEXEC
    if os.geteuid() == 0:
        flags |= os.O_NOFOLLOW
    try:
        writer = os.open(path, flags)
    except OSError as error:
        raise StartError("cannot write pidfile %s: %s"
                         % (path, error.strerror))
    try:
        named, held = os.fstat(writer), os.fstat(fd)
        if (named.st_dev, named.st_ino) != (held.st_dev, held.st_ino):
            raise StartError("pidfile %s was replaced during the start: "
                             "is another instance starting?" % path)
        os.ftruncate(writer, 0)
        os.write(writer, ("%d\n" % os.getpid()).encode("ascii"))
    finally:
        os.close(writer)


def daemonize():
    """Detach from the terminal: fork, new session, fork again, umask 022,
    chdir /.  The original process waits until the daemon reports how its
    start went (see report_start) and exits with that status.  Returns,
    in the daemon, the pipe to report on."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        status = os.read(read_end, 1)
        os._exit(status[0] if status else 1)
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.umask(0o022)
    os.chdir("/")
    return write_end


def report_start(pipe, status):
    """Tell the waiting original process the start's exit status; on
    success, let go of the terminal: standard streams to /dev/null."""
    # Before Python 3.9 standard error is block-buffered when it is not
    # a terminal: what was written must go out before it is replaced.
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(pipe, bytes([status]))
    os.close(pipe)
    if status == 0:
        null = os.open(os.devnull, os.O_RDWR)
        for stream in (0, 1, 2):
            os.dup2(null, stream)
        os.close(null)


def find_user(values):
    """The (uid, gid, name) to switch to, or None; refuse to go on as
    root unless run_as_root is set."""
    user, group = values.get("user"), values.get("group")
    if not user:
        if group:
            raise StartError("group %s needs a user: add --user NAME (or "
                             "user = NAME)" % group, 2)
        if os.geteuid() == 0 and not values.get("run_as_root"):
            raise StartError("refusing to serve as root: add --user NAME "
                             "(user = NAME), an unprivileged user the "
                             "proxy switches to once the port is bound, "
                             "or -o run_as_root=yes to mean it", 2)
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise StartError("unknown user %s: name one that exists, such as "
                         "--user nobody" % user, 2)
    try:
        gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
    except KeyError:
        raise StartError("unknown group %s: name one that exists, or none "
                         "(the user's own)" % group, 2)
    if entry.pw_uid == 0 and not values.get("run_as_root"):
        raise StartError("user %s is root: set run_as_root = yes (-o "
                         "run_as_root=yes) to mean it" % user, 2)
    if os.geteuid() != 0:
        # As nginx does: only root can switch, and whoever runs it is no
        # one to protect the host from.
        if (entry.pw_uid, gid) != (os.geteuid(), os.getegid()):
            sys.stderr.write("smtpproxy: warning: not started as root: "
                             "serving as %s, not as user %s\n"
                             % (_user_name(os.geteuid()), user))
        return None
    return entry.pw_uid, gid, user


def _user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _become_user(identity):
    """Switch to ``identity`` (uid, gid, name) for good: its groups, gid
    and uid (the saved ones too: no way back to root), and the
    environment of a login as that user (HOME, USER, LOGNAME), so that
    what finds its files by them (libpq: ~/.pgpass, ~/.postgresql/)
    reads the user's, not root's."""
    uid, gid, name = identity
    try:
        home = pwd.getpwnam(name).pw_dir
    except KeyError:
        home = "/"
    os.setgid(gid)
    os.initgroups(name, gid)
    os.setuid(uid)
    os.environ.update(HOME=home, USER=name, LOGNAME=name)


def drop_privileges(identity, check=None, timeout=None,
                    what="the check"):
    """Switch to ``identity`` (uid, gid, name) for good (_become_user);
    return what ``check()`` returned.

    ``check``, if given, runs first in a child process switched to the
    user for good (check_as, bounded by ``timeout``): it never runs with
    a way back to root, and a user's lock or FIFO stalls this start at
    most that long.  If it raises, this process is still root, and can
    clean up (its pidfile) before it exits.  Nothing is given to the user
    here: the files it needs were made its own as they were created (see
    open_service_file), or by the user itself (the store).
    """
    result = None
    if check is not None:
        result = check_as(identity, check, timeout, what)
    if os.geteuid() == 0:
        _become_user(identity)
    return result


def check_as(identity, check, timeout=None, what="the check"):
    """Run ``check()`` as ``identity`` (uid, gid, name) and return what it
    returns (None, strings, numbers and lists of them: it comes back as
    JSON).  When this process is root, the check runs in a child process
    switched to the user for good (_become_user: also HOME), so that
    nothing changes here and root opens nothing the check does; a
    StartError of the child's is raised again here, with its status.  A
    child still running after ``timeout`` seconds (a FIFO where a file
    should be, a lock held) is killed: a StartError says that ``what``
    did not finish."""
    if identity is None or os.geteuid() != 0:
        return check()
    name = identity[2]
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:                            # the child
        status = 1
        try:
            os.close(read_end)
            try:
                _become_user(identity)
                answer, status = {"value": check()}, 0
            except StartError as error:
                answer = {"error": str(error), "status": error.status}
                status = error.status
            except BaseException as error:  # nothing may escape a child
                answer = {"error": str(error) or repr(error), "status": 1}
                status = 1
            data = json.dumps(answer).encode("utf-8")
            while data:
                data = data[os.write(write_end, data):]
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)
    os.close(write_end)
    deadline = None if timeout is None else time.monotonic() + timeout
    chunks = []
    try:
        while True:
            if deadline is not None and not select.select(
                    [read_end], [], [],
                    max(0, deadline - time.monotonic()))[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise StartError(
                    "%s as %s did not finish within %g s, and was stopped: "
                    "something it reads blocks (a FIFO where a file should "
                    "be: a passfile, a certificate; a lock held on the "
                    "store): name regular files, or end what holds the "
                    "store" % (what, name, timeout))
            data = os.read(read_end, 65536)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(read_end)
    status = os.waitpid(pid, 0)[1]
    try:
        answer = json.loads(b"".join(chunks).decode("utf-8"))
    except ValueError:
        answer = {}
    if "error" in answer:
        raise StartError(answer["error"], answer.get("status") or 1)
    if status or "value" not in answer:
        raise StartError("%s as %s failed: its process ended (%s) without "
                         "an answer" % (what, name, "signal %d" % os.WTERMSIG(
                             status) if os.WIFSIGNALED(status) else
                             "status %d" % os.WEXITSTATUS(status)))
    return answer["value"]


# ===========================================================================
# == 17. Checks ==
# ===========================================================================
#
# Owns:  what --check-config and a start check (each check_*), the warnings
#        of a configuration that says what it does not mean, and the policy
#        service's socket.
# Enter: check_configuration(handler_class, values).
# Uses:  sections 9 to 11, 13 to 16.


def check_proxy_protocol(handler_class):
    """The service takes the PROXY header only from balancers it names:
    from anyone, anyone could claim any address (127.0.0.1, which may
    relay, say).  Whoever means that names 0.0.0.0/0 and ::/0."""
    if (getattr(handler_class, "proxy_protocol", "no") != "no"
            and not handler_class.proxy_protocol_from):
        raise StartError("proxy_protocol needs proxy_protocol_from: the "
                         "addresses or networks of the load balancers", 2)


def check_tls(handler_class, identity=None):
    """Read tls_cert and tls_key now, while they may still be readable
    (keys are often root's alone): a bad pair is a configuration error.
    The start and --check-config both read them here; started as root,
    through the descriptors _open_tls_files() opens, ``identity`` being
    the serving user."""
    make = getattr(handler_class, "server_tls_context", None)
    if make is None:
        return
    try:
        with _open_tls_files(handler_class, identity) as files:
            if files is None:
                make()
            else:
                make(files)
    except (OSError, ssl.SSLError) as error:
        raise StartError("tls_cert %s / tls_key %s: %s"
                         % (handler_class.tls_cert,
                            handler_class.tls_key or "(same file)", error), 2)


def check_hash_keys(handler_class):
    """Read hash_keys' secret now (read_key_secret(): as root at the
    start, before the privilege drop, as the TLS key is) and keep it on
    ``handler_class`` (its ``_key_secret``, which Greylister.hashed()
    uses) and in ``key_secrets``.  A file that cannot be used is a
    configuration error (StartError, status 2): the start, --check-config
    and a reload refuse it alike.  Return the warnings: on a reload, as
    the serving user, a file it may not read leaves the secret read
    before from it in force."""
    path = getattr(handler_class, "hash_keys", "")
    if not path:
        return []
    warnings = []
    try:
        secret = read_key_secret(path)
    except OSError as error:
        secret = key_secrets.get(path)
        if not isinstance(error, PermissionError) or secret is None:
            raise StartError("hash_keys %s: %s%s" % (
                path, error.filename + ": " if error.filename else "",
                error.strerror), 2)
        warnings.append(
            "hash_keys %s is not readable by %s: the secret read at the "
            "start stays in force (a new one takes a restart, or a file the "
            "user's group may read, mode 0640)"
            % (path, _user_name(os.geteuid())))
    key_secrets.put(path, secret)
    handler_class._key_secret = secret
    return warnings


def key_secret_change(before, after):
    """What a reload from the configuration class ``before`` to ``after``
    does to the store's keys, for a warning; None if nothing: a new
    secret, or hash_keys turned on or off, makes every key new, and no
    pass so far counts."""
    old = getattr(before, "_key_secret", None) if getattr(
        before, "hash_keys", "") else None
    new = getattr(after, "_key_secret", None) if getattr(
        after, "hash_keys", "") else None
    if old == new:
        return None
    if old is None:
        return ("hash_keys is on now: the store's clear keys are no longer "
                "found, and their passes are lost unless they are "
                "converted: smtpproxy --db-hash-keys (once, as the admin)")
    if new is None:
        return ("hash_keys is off now: hashed keys cannot be turned back "
                "into addresses, so every pass so far is lost (every "
                "triplet is greylisted again as new)")
    return ("hash_keys holds a new secret: every key changes, so every "
            "pass so far is lost (every triplet is greylisted again as "
            "new)")


@contextlib.contextmanager
def _open_tls_files(handler_class, identity):
    """Started as root, open tls_cert and tls_key for check_tls(): within
    it, the names to read them by (/proc/self/fd/N, the very files
    checked) and their stamp, as server_tls_context() takes them; None
    when not root (the names are read as they are).

    Root opens a file if every directory on the way to it is root's
    alone (_shared_directory(): links there are root's, as Let's
    Encrypt's live/ -> archive/); otherwise the serving user
    (``identity``) opens it, so that a link it planted reaches only what
    it could read anyway, never root's private key; with no such user
    (run_as_root), StartError.  Each must be a regular file after its
    links (a FIFO would block the start, a directory is no key):
    StartError otherwise, and it is not read."""
    if os.geteuid() != 0 or not handler_class.tls_cert:
        yield None
        return
    keys = [("tls_cert", handler_class.tls_cert)]
    if handler_class.tls_key:
        keys.append(("tls_key", handler_class.tls_key))
    descriptors, names, stamp = [], [], []
    try:
        for key, path in keys:
            directory = os.path.dirname(os.path.join(os.getcwd(), path))
            try:
                shared = _shared_directory(directory)
            except OSError as error:
                raise StartError("%s %s: %s: %s" % (
                    key, path, error.filename or directory, error.strerror),
                    2)
            if shared is not None and identity is None:
                raise StartError(
                    "%s %s: %s can be changed by a user other than root, "
                    "whose links root would follow: put it in a directory "
                    "only root can write, or set user (the serving user, "
                    "which then reads it)" % (key, path, shared), 2)
            reader = identity if shared is not None else None
            with _effective_user(reader):
                try:
                    # Looked at before it is opened (a device may do
                    # something on open), and again once open, in case it
                    # was swapped: O_NONBLOCK, so a FIFO does not block.
                    if stat.S_ISREG(os.stat(path).st_mode):
                        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK
                                     | os.O_CLOEXEC)
                    else:
                        fd = None
                except OSError as error:
                    if reader is None:
                        raise StartError("%s %s: %s" % (
                            key, path, error.strerror), 2)
                    raise StartError(
                        "%s %s: %s as %s (other users than root can change "
                        "%s, so it is read as the serving user): put it in "
                        "a directory only root can write"
                        % (key, path, error.strerror, reader[2], shared), 2)
            if fd is not None:
                descriptors.append(fd)
                info = os.fstat(fd)
            if fd is None or not stat.S_ISREG(info.st_mode):
                raise StartError("%s %s is not a regular file: name the "
                                 "file itself" % (key, path), 2)
            name = "/proc/self/fd/%d" % fd
            names.append(name if os.path.exists(name) else path)
            stamp.append(info.st_mtime)
        if len(names) == 1:
            names.append(None)
            stamp.append(stamp[0])
        yield tuple(names), tuple(stamp)
    finally:
        for fd in descriptors:
            os.close(fd)


def _readable_by_others(paths):
    """A warning for each file of ``paths`` that is there and readable by
    every user (left 0644 by an earlier version, or made by hand): the
    store and the logs hold mail addresses.  Looked at, never followed:
    a link is the other checks' business."""
    warnings = []
    for path in paths:
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode) and info.st_mode & stat.S_IROTH:
            warnings.append("%s is readable by every user (mode %04o) and "
                            "holds mail addresses: chmod o-r %s (smtpproxy "
                            "makes its files 0640)"
                            % (path, stat.S_IMODE(info.st_mode), path))
    return warnings


def _not_a_database(error):
    """Whether the sqlite ``error`` says the file is no sqlite database
    (SQLITE_NOTADB) or a damaged one (SQLITE_CORRUPT), which the sqlite3
    module raises as DatabaseError itself, not as the OperationalError of
    a file it cannot open or write."""
    return type(error) is sqlite3.DatabaseError


def check_store(handler_class, create=True):
    """Open the greylisting store once, as the user serving: one it cannot
    write stops the start rather than every decision later.  Without
    ``create`` (--check-config), a store that is not there yet is only
    checked for a directory the user can write.  Root (run_as_root) is
    held to a store in a directory only root can change
    (check_root_store).  Return the warnings: store files readable by
    every user."""
    path = getattr(handler_class, "greylist_db", None)
    if not path:
        return
    if is_database_uri(path):
        return check_database(handler_class, write=not create)
    user = _user_name(os.geteuid())
    if os.path.isdir(path):
        # postgrey's --dbdir habit: the directory, where a file is meant;
        # a system directory (postgrey's /var/lib/postgrey is its own) is
        # no place for it: a directory of the store's own there.
        directory = os.path.normpath(os.path.join(os.getcwd(), path))
        if directory in _SYSTEM_DIRECTORIES:
            own = os.path.join(directory, "smtpproxy")
            raise StartError(
                "greylisting store %s: greylist_db is a directory, and a "
                "system one: give the store a directory of its own: "
                "install -d -o %s -m 750 %s, and set greylist_db = %s"
                % (path, user, own, os.path.join(own, "greylist.db")), 2)
        raise StartError("greylisting store %s: greylist_db is a "
                         "directory: name a file in it, such as %s"
                         % (path, os.path.join(path, "greylist.db")), 2)
    check_root_store(path)
    # Files of the store that are there but not the user's (made by root:
    # an earlier version, an admin command) would fail every decision.
    for name in (path, path + "-wal", path + "-shm"):
        if not os.path.lexists(name):       # (or out of the user's reach)
            continue
        try:
            os.close(os.open(name, os.O_RDWR | os.O_NONBLOCK
                             | os.O_CLOEXEC))
        except FileNotFoundError:
            pass                # a dangling link: sqlite makes it, as the user
        except PermissionError:
            if os.path.islink(name):
                raise StartError("greylisting store %s: %s is a symbolic "
                                 "link to a file user %s cannot write: "
                                 "remove the link" % (path, name, user))
            raise StartError("greylisting store %s: user %s cannot write "
                             "%s: %s" % (path, user, name, _hand_over(
                                 user, path, path + "-wal", path + "-shm")))
        except OSError as error:
            raise StartError("greylisting store %s: %s: %s"
                             % (path, name, error.strerror))
    warnings = _readable_by_others((path, path + "-wal", path + "-shm"))
    directory = os.path.dirname(os.path.abspath(path))
    if not create and not os.path.exists(path):
        if not os.access(directory, os.W_OK | os.X_OK):
            raise StartError("greylisting store %s: user %s cannot create "
                             "it: %s" % (path, user, _store_directory_advice(
                                 path, user)))
        return warnings
    try:
        store = GreylistStore(path, handler_class)
        store.stats()
        if not create:
            store.pass_key("smtpproxy-check", 0)    # can it write?
            store.delete("smtpproxy-check")
        store.close()
    except sqlite3.Error as error:
        if _not_a_database(error):
            raise StartError("greylisting store %s: %s: it is no sqlite "
                             "database smtpproxy can use (not a permission "
                             "problem): name a file that is not there yet "
                             "(smtpproxy makes it), or move this one away"
                             % (path, error), 2)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise StartError("greylisting store %s: %s: user %s cannot "
                             "make it there: %s"
                             % (path, error, user, _store_directory_advice(
                                 path, user)))
        raise StartError("greylisting store %s: %s: user %s must be able to "
                         "write the file and its directory %s, where sqlite "
                         "makes its -wal and -shm files" % (
                             path, error, user, directory))
    except ResourceShortage as error:
        raise StartError("greylisting store %s: %s" % (path, error))
    return warnings


def check_root_store(path):
    """Root (serving with run_as_root, or an admin command with no user)
    opens the sqlite store ``path`` only in a directory no other user can
    change: sqlite follows links, and makes -wal and -shm files, wherever
    its names lead.  StartError otherwise."""
    if os.geteuid() != 0:
        return
    directory = os.path.dirname(os.path.join(os.getcwd(), path))
    try:
        shared = _shared_directory(directory)
    except OSError as error:
        raise StartError("greylisting store %s: %s: %s" % (
            path, error.filename or directory, error.strerror), 2)
    if shared is not None:
        raise StartError("greylisting store %s: %s can be changed by a user "
                         "other than root, whose links root would follow: "
                         "set user (the serving user, which then opens the "
                         "store), or put the store in a directory only root "
                         "can write" % (path, shared), 2)


def check_database(handler_class, write=True, notes=None):
    """A PostgreSQL store: its driver must be installed (else StartError),
    and the database is asked once (the tables made or checked, and with
    ``write`` a row written and deleted).  An answer that says the
    configuration is wrong (StoreConfigError: the login or the database
    refused, a URI libpq cannot read) is a StartError (status 2).  Return
    the warnings: one if it cannot be reached now, for the service starts
    anyway, as it goes on when the database goes away, and
    greylist_fail_mode decides until it is back.  ``notes`` gets a line
    saying it is usable."""
    location = handler_class.greylist_db
    try:
        store = open_store(location, handler_class)
    except StoreError as error:
        raise StartError("greylisting store %s: %s"
                         % (redact_uri(location), error))
    try:
        counts = store.stats()
        if write:
            store.pass_key("smtpproxy-check", 0)    # may it write?
            store.delete("smtpproxy-check")
    except StoreConfigError as error:
        raise StartError("greylisting store %s: %s"
                         % (redact_uri(location), error), 2)
    except (sqlite3.Error, ResourceShortage) as error:
        return ["greylisting store %s is not usable now: %s; the service "
                "starts, and decisions fall back to greylist_fail_mode "
                "(%s) until it is: check that the server runs and that "
                "this host reaches it" % (redact_uri(location), error,
                                          handler_class.greylist_fail_mode)]
    finally:
        store.close()
    if notes is not None:
        notes.append("greylisting store %s: usable (%s): %d GREY, %d WHITE, "
                     "%d CLIENT" % (redact_uri(location),
                                    store._module.__name__, counts["GREY"],
                                    counts["WHITE"], counts["CLIENT"]))
    return []


def _log_files(values):
    """The paths of the log files ``values`` names."""
    keys = ["greylist_log"]
    if not values.get("syslog"):
        keys.append("log_file")
    if values.get("debug"):
        keys.append("greylist_debuglog")
    return [path for path in (values.get(key, SERVICE_DEFAULTS.get(key))
                              for key in keys) if path]


def check_files(values, identity=None):
    """The pidfile and the logs can be opened as the start opens them
    (open_service_file(), with its refusals, ``identity`` being the
    serving user), without making or changing any.  Return the
    warnings: logs readable by every user."""
    keys = ["pidfile", "greylist_log"]
    if not values.get("syslog"):
        keys.append("log_file")
    if values.get("debug"):
        keys.append("greylist_debuglog")
    for key in keys:
        path = values.get(key, SERVICE_DEFAULTS.get(key))
        if path:
            open_service_file(key, path, identity, create=False)
    if values.get("syslog"):
        try:
            _syslog_handler(values).close()
        except OSError as error:
            raise StartError("syslog: %s" % error, 2)
    return _readable_by_others(_log_files(values))


def configuration_warnings(handler_class, values=None):
    """What a configuration (``handler_class``, and the service's
    ``values``) may say without meaning it."""
    values = values or {}
    warnings = []
    # Only the SMTP proxy refuses recipients outside allowed_domains: the
    # policy service leaves relay control to Postfix and greylists them.
    if (values.get("smtp_proxy", True)
            and isinstance(handler_class, type)
            and issubclass(handler_class, GreyListingPolicy)
            and not handler_class.allowed_domains):
        warnings.append(
            "allowed_domains is empty: every recipient will be refused "
            "(550 5.7.1) by the SMTP proxy, but for clients of "
            "allowed_senders and allowed_sender_nets%s"
            % ("; the policy service greylists every recipient Postfix "
               "asks about" if values.get("policy_listen") else ""))
    warnings += _policy_tcp_warnings(values)
    for entry in getattr(handler_class, "dnswl", None) or ():
        try:
            zone, written = parse_dns_list(entry)
        except ValueError:                  # check_dns_lists() says so
            continue
        if written is None and not _dns_list_defaults(zone)[0]:
            warnings.append("dnswl %s: no answers written, so any answer "
                            "in 127.0.0.0/8 whitelists a client; write "
                            "those its operator documents, as in %s="
                            "127.0.0.[2..3]" % (zone, zone))
    if (getattr(handler_class, "upstream_tls_verify", False)
            and handler_class.upstream_tls != "required"):
        warnings.append("upstream_tls_verify without upstream_tls = "
                        "required: a certificate that fails the check, or "
                        "no STARTTLS, means plain text to the upstream")
    return warnings


def _policy_tcp_warnings(values):
    """A policy service on TCP that local users can reach: they cannot be
    told from Postfix, and may hold its connections."""
    where = values.get("policy_listen") or ""
    if not where or where.startswith("unix:"):
        return []
    try:
        host = _split_host_port(where)[0] or "127.0.0.1"
        address = ipaddress.ip_address(
            "127.0.0.1" if host.lower() == "localhost" else host)
    except ValueError:
        return []
    clients = values.get("policy_clients", _PolicyServing.policy_clients)
    local = address.is_loopback or (address.is_unspecified and any(
        _in_network(loopback, client) for client in clients
        for loopback in ("127.0.0.1", "::1")))
    if not local:
        return []
    return ["policy_listen = %s is TCP on this host: every local user may "
            "connect, and policy_clients cannot tell one from Postfix; "
            "with Postfix on this host, use a UNIX socket: policy_listen = "
            "unix:/var/spool/postfix/private/smtpproxy and "
            "policy_socket_group = postfix" % where]


def check_dns_lists(handler_class):
    """The ``dnsbl`` and ``dnswl`` entries of a handler's own attributes
    (those of the configuration were read by _zone()) parse."""
    for key in ("dnsbl", "dnswl"):
        for entry in getattr(handler_class, key, None) or ():
            try:
                parse_dns_list(entry)
            except ValueError as error:
                raise StartError("%s: %s" % (key, error), 2)


def _read_list(key, path, optional=False):
    """The lines of the list file ``path`` of ``key``, its regular
    expressions compiled: StartError (status 2) if it cannot be read,
    saying what to do; none if ``optional`` (a ``.local``) and
    missing."""
    try:
        with open(path, "rb") as list_file:
            lines = list_file.read().decode("utf-8").splitlines()
    except OSError as error:
        if optional and isinstance(error, FileNotFoundError):
            return []
        raise StartError(
            "%s %s: cannot read it: %s; correct the name, make the file "
            "(it may be empty) readable, or remove it from %s"
            % (key, path, error.strerror or error, key), 2)
    except UnicodeDecodeError as error:
        raise StartError("%s %s: not UTF-8 text (byte %d); write it in "
                         "UTF-8" % (key, path, error.start), 2)
    for number, line in enumerate(lines, 1):
        entry = line.split("#", 1)[0].strip()
        if len(entry) > 1 and entry.startswith("/") and entry.endswith("/"):
            try:
                re.compile(entry[1:-1])
            except re.error as error:
                raise StartError("%s %s:%d: bad regular expression: %s"
                                 % (key, path, number, error), 2)
    return lines


# The keys whose values are list files (postgrey's format): ListFiles.
LIST_KEYS = ("whitelist_clients", "whitelist_recipients",
             "greytrap_recipients")


def read_list_files(handler_class, key):
    """``(files, listed)``: the files of list key ``key`` of
    ``handler_class`` (list_paths(); with ``FILE.local`` beside each if it
    exists, as postgrey reads /etc/postgrey/whitelist_clients.local) and
    one ListFile of all their lines.  StartError (status 2), naming the
    key and the file, if a file cannot be read (a missing ``.local`` is
    no error) or has a bad regular expression."""
    files, lines = [], []
    for path in list_paths(getattr(handler_class, key, "")):
        for name, optional in ((path, False), (path + ".local", True)):
            if optional and not os.path.lexists(name):
                continue
            lines += _read_list(key, name, optional)
            files.append(name)
    return files, ListFile(lines, key)


def check_list_files(handler_class):
    """Every file of whitelist_clients, whitelist_recipients and
    greytrap_recipients (and each ``.local`` there is) can be read, and
    its regular expressions compile: at the start, by --check-config and
    on a reload, not at the first RCPT.  StartError (status 2)."""
    for key in LIST_KEYS:
        read_list_files(handler_class, key)


# The longest the check of the list files and greytraps may take, as the
# serving user: reading the files, and the real server's answers about
# the traps (each within upstream_timeout, 10 s at most).
_LIST_CHECK_TIMEOUT = 120


def check_lists_as(identity, handler_class, upstream=False):
    """check_list_files() and check_greytraps() run as the serving user
    ``identity`` (check_as(): in a child process that is the user, when
    started as root): root reads no list file, which may lie in a
    directory another user can write (a planted link, or a FILE.local
    beside it), and a file the user cannot read is found now, not at the
    first RCPT.  StartError as they raise it; return the warnings."""
    def check():
        check_list_files(handler_class)
        return check_greytraps(handler_class, upstream=upstream)
    return check_as(identity, check, _LIST_CHECK_TIMEOUT,
                    "the check of the list files") or []


def check_greytraps(handler_class, upstream=False):
    """``greytrap_recipients``, if set, can be read, and none of its traps
    is a real recipient: a trap that is also a recipient of
    ``whitelist_recipients`` or of a whitelisted triple would never
    spring, or would trap the clients that write to a real address; one
    outside ``allowed_domains`` (when set) never reaches greylisting; the
    Postmaster is a real recipient by RFC 5321 section 4.5.1; with
    ``upstream`` (the proxy forwards to one), the real server does not
    take a trap address as a mailbox (_traps_the_upstream_takes()).
    StartError (status 2) says which and what to do; return the
    warnings."""
    files, traps = read_list_files(handler_class, "greytrap_recipients")
    if not files:
        return []
    path = ", ".join(files)

    def refuse(trap, why, advice="remove it from one of the two"):
        raise StartError(
            "greytrap_recipients %s: %s %s: a trap must be an address that "
            "never receives mail; %s" % (path, trap, why, advice), 2)
    for trap in sorted(traps.addresses):
        if trap.split("@")[0] == "postmaster":
            refuse(trap, "is the Postmaster, a real recipient (RFC 5321 "
                   "section 4.5.1)", "remove it from the traps")
    files, listed = read_list_files(handler_class, "whitelist_recipients")
    if files:
        whitelist = ", ".join(files)
        for trap in sorted(traps.addresses):
            if listed.has_recipient(trap):
                refuse(trap, "is also in whitelist_recipients %s"
                       % whitelist)
        for address in sorted(listed.addresses):
            if traps.has_recipient(address):
                refuse(address, "is in whitelist_recipients %s and a trap"
                       % whitelist)
    for key in ("whitelisted_triples", "whitelisted_nonstandard_triples"):
        for triple in getattr(handler_class, key, None) or ():
            recipient = triple[-1].strip("<>")
            if traps.has_recipient(recipient):
                refuse(recipient, "is also the recipient of %s %s"
                       % (key, " ".join(triple)))
    domains = _domain_keys(tuple(getattr(handler_class, "allowed_domains",
                                         None) or ()))
    if domains:
        # A trap elsewhere is refused as relaying: it never springs.
        for trap in sorted(traps.addresses):
            if _domain_key(trap.rpartition("@")[2]) not in domains:
                refuse(trap, "is not in allowed_domains, so it never "
                       "springs", "write traps of our own domains")
        for name in traps.names:
            if not any(domain == name or domain.endswith("." + name)
                       for domain in domains):
                refuse(name, "(a domain of traps) is not in "
                       "allowed_domains, so it never springs",
                       "write traps of our own domains")
    if not (upstream and traps.addresses):
        return []
    try:
        taken, catch_all = _traps_the_upstream_takes(handler_class,
                                                     traps.addresses)
    except UpstreamError as error:
        return ["greytrap_recipients %s: the real server %s:%s could not "
                "be asked whether a trap is a mailbox: %s" % (
                    path, handler_class.smtp_ip, handler_class.smtp_port,
                    error)]
    for trap in taken:
        refuse(trap, "is a mailbox: the real server %s:%s accepts it"
               % (handler_class.smtp_ip, handler_class.smtp_port),
               "remove it from the traps (a trap must be an address the "
               "real server refuses as unknown)")
    return ["greytrap_recipients %s: the real server %s:%s accepts any "
            "recipient of %s (a catch-all), so it cannot say whether a "
            "trap there is a mailbox: make sure none is" % (
                path, handler_class.smtp_ip, handler_class.smtp_port,
                domain) for domain in catch_all]


def _traps_the_upstream_takes(handler_class, addresses, limit=100):
    """``(taken, catch_all)``: the trap ``addresses`` (the first ``limit``)
    that the upstream accepts as recipients (RCPT 250 or 251: mailboxes),
    and the domains where it also accepts an address nobody has (made of
    random letters: a catch-all, whose acceptance says nothing; its traps
    are not in ``taken``).  One session, MAIL FROM:<> and a RCPT each, no
    DATA: nothing is sent; each reply within upstream_timeout (10 s at
    most).  UpstreamError if it cannot be asked."""
    session = handler_class.upstream_class(
        (handler_class.smtp_ip, handler_class.smtp_port),
        min(handler_class.upstream_timeout, 10))
    try:
        session.greet(handler_class.servername, esmtp=True)
        code, lines = session.command("MAIL FROM:<>")
        if code != 250:
            raise UpstreamError("MAIL FROM:<> was answered %d %s"
                                % (code, " ".join(lines)))
        taken = [address for address in sorted(addresses)[:limit]
                 if session.command("RCPT TO:<%s>" % address)[0]
                 in (250, 251)]
        catch_all = []
        for domain in sorted(set(address.rpartition("@")[2]
                                 for address in taken)):
            nobody = "smtpproxy-probe-%s@%s" % (
                os.urandom(8).hex(), domain)
            if session.command("RCPT TO:<%s>" % nobody)[0] in (250, 251):
                catch_all.append(domain)
        session.command("RSET")
        session.quit()
    finally:
        session.abort()
    return ([address for address in taken
             if address.rpartition("@")[2] not in catch_all], catch_all)


def listening_addresses(values):
    """What the service would listen on over TCP: (what, where, host,
    port) of the SMTP port (with smtp_proxy), the policy service (not on
    a UNIX socket) and the metrics."""
    found = []
    if values.get("smtp_proxy", True):
        host, port = values.get("listen_ip", ""), values.get("port", 25)
        found.append(("", "[%s]:%s" % (host, port), host, port))
    for key, what in (("policy_listen", " for policy requests"),
                      ("metrics_listen", " for metrics")):
        where = values.get(key)
        if where and not where.startswith("unix:"):
            host, port = _split_host_port(where)
            found.append((what, where, host or "127.0.0.1", port))
    return found


def check_listening(values):
    """--check-config's checks of the addresses the start would bind
    (never at a reload, which binds nothing: the service, serving as its
    user, holds them): a port below 1024 that this process may not bind
    is refused as the start would refuse it, with what to do, and so is
    an address that is none of this host's."""
    for what, where, host, port in listening_addresses(values):
        advice = privileged_port_advice(port)
        if advice:
            raise StartError("cannot listen%s on %s: %s"
                             % (what, where, advice))
        if host:
            problem = _not_an_address_here(host)
            if problem:
                raise StartError("cannot listen%s on %s: %s is not an "
                                 "address of this host (%s)"
                                 % (what, where, host, problem))


def _not_an_address_here(host):
    """Why ``host`` cannot be listened on here, or None: bound to port 0,
    so that the check never takes, nor needs, the service's own port
    (a --check-config before a reload runs beside the service)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, 0, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0]
        probe = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as error:
        return str(error)
    try:
        probe.bind(address)
    except OSError as error:
        return error.strerror or str(error)
    finally:
        probe.close()
    return None


def check_upstream(handler_class, values):
    """--check-config's probe of the real server, when the service
    forwards to one (smtp_proxy): a session of EHLO and QUIT within
    upstream_timeout.  Return the warnings: one that does not answer is
    no error, for it may be started after the proxy."""
    upstream_class = getattr(handler_class, "upstream_class", None)
    if not values.get("smtp_proxy", True) or upstream_class is None:
        return []
    address = (handler_class.smtp_ip, handler_class.smtp_port)
    try:
        session = upstream_class(address, handler_class.upstream_timeout)
        session.greet(handler_class.servername, esmtp=True)
        session.quit()
    except (UpstreamError, OSError) as error:
        return ["the real server at %s:%s does not answer: %s"
                % (address[0], address[1], error)]
    return []


def check_policy(handler_class, values):
    """What the policy service needs: a greylisting class to apply, a
    group that exists, something to serve, and, started as root, a UNIX
    socket's directory that root may bind in (see
    _open_socket_directory)."""
    if values.get("policy_listen"):
        if not (isinstance(handler_class, type) and issubclass(
                handler_class, GreyListingPolicy)):
            raise StartError("policy_listen: the policy service applies "
                             "greylisting: --class must be GreyListingPolicy "
                             "or a subclass, not %s" % handler_class.__name__,
                             2)
        if values["policy_listen"].startswith("unix:"):
            root = os.geteuid() == 0
            gid = _policy_socket_gid(values, find_user(values) if root
                                     else None)
            if root:
                # Not on a reload (as the serving user): root binds.
                os.close(_open_socket_directory(values["policy_listen"][5:],
                                                gid)[0])
    elif values.get("smtp_proxy") is False:
        raise StartError("smtp_proxy = no, and no policy_listen: nothing "
                         "to serve", 2)


def check_configuration(handler_class, values, files=True, notes=None):
    """Every check of the start that needs no port, as --check-config
    and a reload run them: the user and group (and root without one),
    the PROXY protocol's balancers, the TLS certificate and key, the
    greylisting store as the user serving (a PostgreSQL store: asked,
    saying so in ``notes``), hash_keys' secret (check_hash_keys: kept on
    ``handler_class``), and with ``files`` the pidfile, the logs and
    syslog.  Raise StartError; return the warnings."""
    identity = find_user(values)
    check_proxy_protocol(handler_class)
    check_tls(handler_class, identity)
    warnings = check_hash_keys(handler_class)
    check_policy(handler_class, values)
    check_dns_lists(handler_class)
    warnings += check_lists_as(identity, handler_class,
                               upstream=values.get("smtp_proxy", True))
    if files:
        warnings += check_files(values, identity)
    store = getattr(handler_class, "greylist_db", None)
    if store and is_database_uri(store):
        _load_postgresql_driver(store)       # as root: see its docstring
        # As the user, as the service connects: libpq reads its files
        # (~/.pgpass, a passfile or key the URI names), never root's.
        def check():
            found = []
            return [check_database(handler_class, notes=found), found]
        found, usable = check_as(identity, check,
                                 _store_check_deadline(handler_class),
                                 "the check of greylisting store %s"
                                 % redact_uri(store))
        warnings += found
        if notes is not None:
            notes += usable
    elif store:
        # As the user, who may have planted links there; its warnings
        # (store files readable by every user) come back.
        warnings += check_as(
            identity, lambda: check_store(handler_class, create=False),
            _store_check_deadline(handler_class),
            "the check of greylisting store %s" % store) or []
    return warnings + configuration_warnings(handler_class, values)


# A store's check waits for the store a few times (connecting and making
# the tables, a read, a write and its removal), each wait bounded by the
# store; as root, its child process is given as many waits, and a margin.
_CHECK_WAITS = 4
_CHECK_MARGIN = 5.0


def _store_check_deadline(handler_class):
    """The seconds a check of the store of ``handler_class`` may take:
    PostgreSQL waits greylist_db_timeout at most (connecting: 2 s at
    least, libpq's floor), sqlite GreylistStore.busy_timeout."""
    if is_database_uri(handler_class.greylist_db):
        wait = max(2.0, float(getattr(
            handler_class, "greylist_db_timeout",
            GreyListingPolicy.greylist_db_timeout)))
    else:
        wait = GreylistStore.busy_timeout
    return _CHECK_WAITS * wait + _CHECK_MARGIN


def _policy_socket_gid(values, identity):
    """The group the policy socket is to have: ``policy_socket_group``'s,
    else the serving user's (``identity``), else -1 (this process's)."""
    group = values.get("policy_socket_group")
    if group:
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            raise StartError("policy_socket_group %s: no such group"
                             % group, 2)
    return identity[1] if identity else -1


def _open_socket_directory(path, gid):
    """Open the directory of the policy socket ``path`` (read-only, not
    through a link as its last component); return (descriptor, the
    socket's name in it): every step on the socket is taken relative to
    the descriptor, so that nothing a user swaps in on the way is followed
    afterwards.  Raise StartError.

    Started as root, every directory on the way to it must be one only
    root can change (see _shared_directory); the directory itself may be
    another user's (Postfix's private/ is postfix's): a name swapped in
    there stays in there.  A set-group-ID directory would give the socket
    its own group instead of ``gid``: refused, rather than a chown on a
    name that user could have swapped for a hard link to root's file."""
    directory, name = os.path.split(path)
    where = "policy_listen unix:%s" % path
    if not name or name in (".", ".."):
        raise StartError("%s: name the socket, not a directory" % where, 2)
    root = os.geteuid() == 0
    if root:
        parent = os.path.dirname(directory)
        try:
            shared = _shared_directory(parent)
        except OSError as error:
            raise StartError("%s: %s: %s" % (
                where, error.filename or parent, error.strerror), 2)
        if shared is not None:
            raise StartError(
                "%s: %s can be changed by a user other than root, who "
                "could turn the way to %s into a link to a directory of "
                "root's, where root would bind and remove the socket: put "
                "the socket in a directory whose parent directories only "
                "root can write (the directory itself may be another "
                "user's, as Postfix's /var/spool/postfix/private is)"
                % (where, shared, directory), 2)
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
                     | os.O_NOFOLLOW)
    except OSError as error:
        if os.path.islink(directory):
            raise StartError("%s: %s is a symbolic link: name the directory "
                             "itself" % (where, directory), 2)
        raise StartError("%s: cannot open the directory %s: %s"
                         % (where, directory, error.strerror), 2)
    try:
        info = os.fstat(fd)
        if (root and gid != -1 and info.st_mode & stat.S_ISGID
                and info.st_gid != gid):
            raise StartError(
                "%s: %s is set-group-ID: the socket would get its group %s, "
                "not %s (policy_socket_group, else the serving user's), "
                "and smtpproxy changes no group of a name another user may "
                "have swapped: clear the bit (chmod g-s %s) or set "
                "policy_socket_group = %s" % (
                    where, directory, _group_name(info.st_gid),
                    _group_name(gid), directory, _group_name(info.st_gid)),
                2)
    except BaseException:
        os.close(fd)
        raise
    return fd, name


def _group_name(gid):
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _remove_stale_socket(directory, name, path):
    """Remove the UNIX socket ``name`` in the directory open as
    ``directory`` (``path`` names it for the messages), left by an
    instance that is gone; StartError if it is in use, or not a socket."""
    try:
        mode = os.stat(name, dir_fd=directory, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartError("%s is there and is no socket" % path)
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(_in_directory(directory, name))
    except OSError:
        os.unlink(name, dir_fd=directory)       # nobody listens: stale
        return
    finally:
        probe.close()
    raise StartError("%s is in use: is another instance running?" % path)


def _in_directory(directory, name):
    """A name for ``name`` in the directory open as ``directory``, for
    what takes no descriptor (bind, connect): the kernel goes to the
    directory through the descriptor, not through its path again."""
    return "/proc/self/fd/%d/%s" % (directory, name)


def _bind_policy_socket(path, settings, mode, gid, backlog=None):
    """A UnixPolicyServer on ``path``, its socket made with ``mode`` and
    the group ``gid`` (-1: this process's) as bind() makes it: the umask
    and the effective group of the moment, not a chmod or chown by name
    afterwards, which would follow what a user swapped in meanwhile.
    Every step is taken in the directory opened once
    (_open_socket_directory), which the server keeps open to remove its
    socket, and only its socket, at the stop."""
    directory, name = _open_socket_directory(path, gid)
    server = None
    try:
        _remove_stale_socket(directory, name, path)
        umask, egid, switched = os.umask(0o777 & ~mode), os.getegid(), False
        try:
            if gid not in (-1, egid):
                try:
                    os.setegid(gid)
                    switched = True
                except PermissionError:
                    pass        # not root: only a chown can (below)
            server = UnixPolicyServer(_in_directory(directory, name),
                                      settings, backlog=backlog)
        finally:
            if switched:
                os.setegid(egid)
            os.umask(umask)
        server.server_address = path
        fd, directory = directory, None
        server._socket = (fd, name, None)   # closed by server_close()
        info = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if not stat.S_ISSOCK(info.st_mode):
            raise StartError("%s: something else took the socket's name "
                             "as it was made" % path)
        server._socket = (fd, name, (info.st_dev, info.st_ino))
        if gid != -1 and info.st_gid != gid:
            # Not root (root's bind gave it the group: a set-group-ID
            # directory was refused): a process that is not root can
            # change only its own files.
            os.chown(name, -1, gid, dir_fd=fd, follow_symlinks=False)
    except BaseException:
        if server is not None:
            server._remove_socket()
            server.server_close()
        if directory is not None:
            os.close(directory)
        raise
    return server


def open_policy_server(values, settings, identity=None):
    """Bind the policy service of ``values["policy_listen"]`` (as root if
    need be) for ``settings`` (the GreyListingPolicy class): a
    PolicyServer, or a UnixPolicyServer whose socket is made with
    ``policy_socket_mode`` and the group ``policy_socket_group`` (else
    the serving user's, of ``identity``).  StartError if it cannot."""
    where = values["policy_listen"]
    backlog = values.get("policy_backlog")
    try:
        if where.startswith("unix:"):
            server = _bind_policy_socket(
                where[5:], settings,
                int(values.get("policy_socket_mode", "0660"), 8),
                _policy_socket_gid(values, identity), backlog)
        else:
            host, port = _split_host_port(where)
            server = PolicyServer((host or "127.0.0.1", port), settings,
                                  backlog=backlog)
    except OSError as error:
        if where.startswith("unix:"):
            raise StartError("cannot listen for policy requests on %s: %s"
                             % (where, error))
        raise _listen_error(" for policy requests", where,
                            _split_host_port(where)[1], error)
    configure_server(server, values, POLICY_SETTINGS)
    return server


# ===========================================================================
# == 18. The admin commands: the store's --db-* ==
# ===========================================================================
#
# Owns:  the --db-* commands, as OpenBSD's spamdb (administer_store), and
#        --db-report's text (format_report) and its JSON's fields
#        (REPORT_FIELDS).
# Enter: administer_store(handler_class, args, identity).
# Uses:  sections 8 to 11 (the keys, the stores), 16 (the user) and 17
#        (check_hash_keys).


# The seconds --db-hash-keys may hold the store, at least: a store of a
# million triplets is converted in well under a minute.
REKEY_TIMEOUT = 300


# The fields of --db-report --json (StoreBase.report()), a stable
# interface: fields may be added, none renamed or removed.
REPORT_FIELDS = collections.OrderedDict([
    ("store", "the store, as the other --db- commands name it (a URI "
              "without its password)"),
    ("now", "the end of the period: seconds since the epoch (UTC), by "
            "the store's clock"),
    ("since", "the start of the period (now - period)"),
    ("period", "its length, in seconds (--since)"),
    ("max_defer_time", "the retry window of the configuration, seconds"),
    ("auto_whitelist_clients", "the passes that trust a client (0: never)"),
    ("triplets.seen", "triplets first seen in the period"),
    ("triplets.passed", "of those, passed (greylisting, or --db-pass)"),
    ("triplets.never_retried", "of those, grey with their retry window "
                               "closed without a pass"),
    ("triplets.waiting", "of those, grey, their window still open"),
    ("wait.passes", "of those passed, the greylisting passes whose wait "
                    "is known"),
    ("wait.median", "their median wait, seconds (null: no pass)"),
    ("wait.p90", "their 90th percentile wait (nearest rank), seconds"),
    ("wait.max", "their longest wait, seconds"),
    ("auto_whitelisted_clients", "clients with auto_whitelist_clients "
                                 "passes or more, seen in the period"),
    ("top_by", "what the top lists are ordered by: seen (then passed)"),
    ("top_clients.KIND", "for ipv4, ipv6, name and unknown: up to 10 "
                         "objects, the client key (client), its triplets "
                         "first seen in the period still in the store "
                         "(seen) and of those passed (passed)"),
    ("traps.sprung", "client keys that sprang a greytrap in the period "
                     "(once each, at their last write to a trap; those "
                     "still in the store)"),
    ("traps.trapped_now", "client keys trapped at now"),
    ("traps.top", "up to 10 objects, the client keys trapped now or "
                  "sprung in the period, latest first: the key (client), "
                  "its last write to a trap (sprung) and when its trap "
                  "expires (until), seconds since the epoch; no trap "
                  "address"),
])


def _human_duration(seconds):
    """``seconds`` as a postmaster reads it: its largest unit and the
    next one, whole (45 s, 10 min 12 s, 4 h, 1 d 2 h; 1 h 0 min 5 s is
    1 h)."""
    seconds = int(round(seconds))
    units = (("d", 86400), ("h", 3600), ("min", 60), ("s", 1))
    first = next((index for index, (_, size) in enumerate(units)
                  if seconds >= size), len(units) - 1)
    parts = []
    for name, size in units[first:first + 2]:
        count, seconds = divmod(seconds, size)
        if count or not parts:
            parts.append("%d %s" % (count, name))
    return " ".join(parts)


def format_report(report):
    """The text of --db-report: StoreBase.report()'s ``report``, aligned,
    for a postmaster (keys escaped as the logs escape them): the
    triplets, the waits, the auto-whitelist, the greytraps (their
    counts, then the client keys of ``traps.top`` with when they sprang
    a trap and until when, never a trap's address), then the top client
    keys of each kind."""
    def stamp(moment):
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(moment))

    triplets, wait, top, traps = (report["triplets"], report["wait"],
                                  report["top_clients"], report["traps"])
    # One column of figures for all: after the longest client key.
    width = max([30] + [len(log_escape(entry["client"]))
                        for kind in top for entry in top[kind]]
                + [len(log_escape(entry["client"]))
                   for entry in traps["top"]])

    def line(indent, label, figure, rest=""):
        return "%s%-*s %9s  %s" % (" " * indent, width + 2 - indent, label,
                                   figure, rest)

    def share(count):
        seen = triplets["seen"]
        return "%5.1f %%" % (100.0 * count / seen) if seen else ""
    lines = [
        "Greylisting in the %s before %s (since %s)" % (
            _human_duration(report["period"]), stamp(report["now"]),
            stamp(report["since"])),
        "Store: %s" % log_escape(report["store"]),
        "",
        line(0, "Triplets first seen", triplets["seen"]),
        line(2, "passed", triplets["passed"], share(triplets["passed"])),
        line(2, "never retried", triplets["never_retried"],
             share(triplets["never_retried"])
             + "  (no pass within max_defer_time, %d s)"
             % report["max_defer_time"]),
        line(2, "still waiting", triplets["waiting"],
             share(triplets["waiting"])),
        "",
        "Waits of the %d greylisting passes" % wait["passes"],
    ]
    if triplets["passed"] > wait["passes"]:
        lines.append("  (%d passed with no wait known: by --db-pass, or "
                     "before the store kept waits)"
                     % (triplets["passed"] - wait["passes"]))
    for name, field in (("median", "median"), ("90th percentile", "p90"),
                        ("maximum", "max")):
        value = wait[field]
        lines.append(line(2, name, "-" if value is None else "%d s" % value,
                          "" if value is None else _human_duration(value)))
    lines += [
        "",
        line(0, "Clients auto-whitelisted",
             report["auto_whitelisted_clients"],
             "(%d passes or more, seen in the period)"
             % report["auto_whitelist_clients"]
             if report["auto_whitelist_clients"] else "(auto-whitelist off)"),
        "",
        line(0, "Clients that sprang a greytrap", traps["sprung"],
             "(in the period: each once, at its last write to a trap)"),
        line(2, "trapped now", traps["trapped_now"]),
        "",
        "%-*s %-19s  %s" % (width + 2, "Trapped now or in the period",
                            "last sprung (UTC)", "until (UTC)"),
    ]
    for entry in traps["top"]:
        lines.append("  %-*s %s  %s" % (
            width, log_escape(entry["client"]),
            stamp(entry["sprung"])[:-4], stamp(entry["until"])[:-4]))
    if not traps["top"]:
        lines.append("  (none)")
    lines += [
        "",
        "Top client keys, by triplets first seen in the period (those "
        "still in the store)",
    ]
    titles = (("ipv4", "IPv4 networks"), ("ipv6", "IPv6 networks"),
              ("name", "Names (client_key = name)"),
              ("unknown", "The unknown client"))
    for kind, title in titles:
        lines += ["", "%-*s %9s %9s" % (width + 2, title, "seen", "passed")]
        for entry in top[kind]:
            lines.append("  %-*s %9d %9d" % (
                width, log_escape(entry["client"]), entry["seen"],
                entry["passed"]))
        if not top[kind]:
            lines.append("  (none)")
    return "\n".join(text.rstrip() for text in lines) + "\n"


def administer_store(handler_class, args, identity=None):
    """The --db-* commands, on the greylisting store of the configuration,
    like OpenBSD's spamdb; return the exit status.

    Run as root, the store is worked on as the serving user ``identity``
    (uid, gid, name): this process switches to it for good first
    (_become_user, its HOME too), so that a link in an sqlite store's
    directory leads only where that user may go, what is made is the
    user's, and libpq reads the user's files (~/.pgpass, a passfile the
    URI names), not root's.  With no user, root works only on an sqlite
    store in a directory no other user can change.  --db-report opens
    the store read-only (open_store(..., read_only=True)): it writes
    nothing, also while the service runs.

    With ``hash_keys``, its secret is read first, as the service reads it
    (check_hash_keys(), as root): --db-pass and --db-delete hash the
    addresses they are given into the key the proxy makes
    (hash_store_key()), and --db-hash-keys converts the store's clear
    keys (StoreBase.rekey())."""
    period = None
    if getattr(args, "db_report", False):
        try:
            period = parse_duration(
                "7d" if args.since is None else args.since)
        except ValueError as error:
            sys.stderr.write("smtpproxy: error: --since: %s\n" % error)
            return 2
    elif getattr(args, "since", None) is not None or getattr(
            args, "json", False):
        sys.stderr.write("smtpproxy: error: --since and --json go with "
                         "--db-report\n")
        return 2
    path = getattr(handler_class, "greylist_db", None)
    if not path:
        sys.stderr.write("smtpproxy: error: %s has no greylist_db\n"
                         % handler_class.__name__)
        return 2
    database = is_database_uri(path)
    if not database:
        # The service's name for it (Service._absolute_paths): not
        # abspath(), for ".." after a link is the link's target's parent.
        path = os.path.join(os.getcwd(), path)
    hashing = bool(getattr(handler_class, "hash_keys", "")) and bool(
        args.db_pass or args.db_delete or args.db_hash_keys)
    try:
        if hashing:
            check_hash_keys(handler_class)      # as root: the service's
        if identity is not None and os.geteuid() == 0:
            _become_user(identity)
        if not database:
            check_root_store(path)
    except StartError as error:
        sys.stderr.write("smtpproxy: error: %s\n" % error)
        return error.status
    if args.db_hash_keys and not hashing:
        sys.stderr.write("smtpproxy: error: --db-hash-keys: hash_keys is not "
                         "set: name the file of the site's secret (-o "
                         "hash_keys=FILE, or in the configuration)\n")
        return 2
    key = args.db_pass or args.db_delete
    if key:
        key = " ".join(key)     # quoted or not
        prefixes = (getattr(handler_class, "ipv4_prefix", 24),
                    getattr(handler_class, "ipv6_prefix", 64))
        try:
            key = parse_store_key(key, *prefixes,
                                  network=bool(args.db_delete))
            if hashing:
                # The key the proxy makes of these addresses.
                key = hash_store_key(key, handler_class._key_secret)
        except ValueError as error:
            if args.db_pass:
                sys.stderr.write("smtpproxy: error: --db-pass: %s\n"
                                 % error)
                return 2
            # --db-delete takes whatever a store holds, as it is.
    if not database and not os.path.exists(path) and not args.db_pass:
        sys.stderr.write("smtpproxy: error: no greylisting store at %s: "
                         "give the proxy's --config (or -o greylist_db="
                         "PATH), or run from the directory it runs in\n"
                         % path)
        return 1
    sys.stderr.write("smtpproxy: store %s\n" % redact_uri(path))
    settings = handler_class
    if args.db_hash_keys:
        # One transaction for the whole store: more than a decision's
        # greylist_db_timeout (running proxies' decisions wait meanwhile,
        # up to theirs, then greylist_fail_mode decides).
        settings = type(handler_class.__name__, (handler_class,), {
            "greylist_db_timeout": max(REKEY_TIMEOUT, getattr(
                handler_class, "greylist_db_timeout",
                GreyListingPolicy.greylist_db_timeout))})
    try:
        store = open_store(path, settings, read_only=period is not None)
        now = time.time()
        if period is not None:
            report = store.report(period)
            store.close()
            if args.json:
                print(json.dumps(report, indent=2))
            else:
                sys.stdout.write(format_report(report))
        elif args.db_list:
            def stamp(moment):
                if moment is None:
                    return "-"
                return time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                     time.gmtime(moment))
            print("STATE   KEY | FIRST SEEN | LAST SEEN | PASSES")
            for state, key, first, last, count in store.entries():
                print("%-7s %s | %s | %s | %d" % (state, log_escape(key),
                                                 stamp(first), stamp(last),
                                                 count))
            # Greytraps last, in the same columns: the client key, when
            # it sprang the trap, until when, and the trap.
            for client, sprung, until, recipient in store.traps():
                print("%-7s %s | %s | %s | <%s>" % (
                    "TRAPPED", log_escape(client), stamp(sprung),
                    stamp(until), log_escape(recipient)))
        elif args.db_stats:
            for state, count in sorted(store.stats().items()):
                print("%-7s %d" % (state, count))
        elif args.db_purge:
            print("purged %d" % store.purge(now))
        elif args.db_hash_keys:
            secret = handler_class._key_secret
            print("hashed %d" % store.rekey(
                lambda key: hash_store_key(key, secret),
                lambda text: text if is_key_hash(text)
                else key_hash(secret, text)))
        elif args.db_pass:
            store.pass_key(key, now)
            print("passed %s" % log_escape(key))
        elif store.delete(key):
            print("deleted %s" % log_escape(key))
        else:
            sys.stderr.write("smtpproxy: no entry %s\n" % log_escape(key))
            return 1
    except (sqlite3.Error, ResourceShortage) as error:
        sys.stderr.write("smtpproxy: error: %s: %s\n"
                         % (redact_uri(path), error))
        return 1
    return 0


# ===========================================================================
# == 19. The service: start, signals, reloads, workers ==
# ===========================================================================
#
# Owns:  the start in the order a daemon on port 25 needs, the signals and
#        reloads, the graceful stop (Service), the pre-fork master (Master)
#        and its workers (Worker; how many: worker_count()), the signals of
#        both roles (_SIGNALS).
# Enter: Service(args, base, values, path, warnings).run().
# Uses:  sections 12 to 18.


def _reopen_log_files(values):
    """Reopen the logs of ``values``; one that cannot be opened stays as it
    was, and the log says why."""
    for error in configure_logging(values, keep_failed=True):
        log.error("cannot reopen a log, keeping the one open: %s", error)


# The signals, written once for the two roles a process of the service can
# have.  The handler only notes a signal (on_signal()); the main loop acts
# on it, outside whatever the signal interrupted, by the method its role's
# column of _SIGNALS names; the master then passes it on to the workers.
#
#   signal   a serving process (the single   the master (workers > 1)  passed
#            one, or a worker)                                         on as
#   SIGTERM  stop: the port closes, open     close the port, start no  SIGTERM
#   SIGINT   transactions get grace_period   worker again; end when    SIGTERM
#            (a second one: at once)         the last worker has
#   SIGHUP   reload the configuration and    the same                  SIGHUP
#            reopen the logs
#   SIGUSR1  log the counters                log the workers' pids     SIGUSR1
#   SIGUSR2  reopen the logs                 the same                  SIGUSR2
#
# A worker also stops, as on SIGTERM, when its master is gone.
_SignalRoles = collections.namedtuple("_SignalRoles",
                                      "serving master passed_on")


_SIGNALS = {
    signal.SIGTERM: _SignalRoles("_stop_serving", "_stop_workers",
                                 signal.SIGTERM),
    signal.SIGINT: _SignalRoles("_stop_serving", "_stop_workers",
                                signal.SIGTERM),
    signal.SIGHUP: _SignalRoles("_reload", "_reload", signal.SIGHUP),
    signal.SIGUSR1: _SignalRoles("_log_counters", "_log_workers",
                                 signal.SIGUSR1),
    signal.SIGUSR2: _SignalRoles("_reopen_logs", "_reopen_logs",
                                 signal.SIGUSR2),
}


class _SignalsNoted(object):
    """What each role does with the signals of _SIGNALS: on_signal() only
    notes one; the main loop's _act_on_signals() acts on it, in order, by
    _act_on(signum, roles), which runs the role's column."""

    def __init__(self):
        self.pending = []           # signals noted, not yet acted on
        self.stop_asked = False     # SIGTERM or SIGINT came

    def _catch_signals(self):
        for signum in _SIGNALS:
            signal.signal(signum, self.on_signal)

    def on_signal(self, signum, frame):
        """Only note the signal: the main loop acts on it, in the main
        thread, outside whatever the signal interrupted."""
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stop_asked = True
        self.pending.append(signum)

    def _act_on_signals(self):
        while self.pending:
            signum = self.pending.pop(0)
            self._act_on(signum, _SIGNALS[signum])

    def _act_on(self, signum, roles):
        """Run the method this role's column of ``roles`` (the signal's
        row of _SIGNALS) names."""
        raise NotImplementedError


class Service(_SignalsNoted):
    """The proxy run as a service by main(): start-up in the order a
    daemon on port 25 needs, signals, reloads and the graceful stop.

    The start: pidfile locked, logs opened, port bound (as root), detached
    (--daemon), pid written, store checked as the serving user, privileges
    dropped, then serving.  SIGTERM and SIGINT stop
    (SMTPProxyServer.stop(), once more: at once), SIGHUP reloads the
    configuration and reopens the logs, SIGUSR1 logs the counters, SIGUSR2
    reopens the logs (_SIGNALS, the "serving" column).

    This object is the single process.  With ``workers`` > 1 the process
    that started becomes a Master instead of serving, and each process it
    forks serves as a Worker: a single process that also watches its
    master.  That is so for the policy service alone (``smtp_proxy =
    no``) too: the workers share its listening socket as they share the
    SMTP port.
    """

    def __init__(self, args, base, values, path, warnings, start_dir=None):
        _SignalsNoted.__init__(self)
        self.args = args
        self.base = base
        self.path = path and os.path.abspath(path)
        if path:
            args.config = self.path     # a reload reads the same file
        self.start_dir = start_dir or os.getcwd()
        self.values = self._absolute_paths(values)
        self.warnings = warnings
        self.report = None          # the pipe to the waiting parent
        self.server = None
        self.pidfile = None
        self.policy = None          # the policy service's server
        self.metrics = None         # the metrics endpoint (MetricsServer)
        self.stopped = threading.Event()    # the policy service alone
        self.worker = None          # in a worker process: its number
        self.master = None          # in a worker process: the master's pid

    def _absolute_paths(self, values):
        """``values`` with the file names, given or default, made absolute
        from the directory the service started in (a daemon is in /)."""
        values = dict(values)
        self.relative = []
        for key in PATH_KEYS:
            if key in values:
                value = values[key]
            else:
                value = SERVICE_DEFAULTS.get(key,
                                             getattr(self.base, key, None))
            if CONFIG_KEYS[key][1] == "files":
                value = list_paths(value)
                if not all(os.path.isabs(path) for path in value):
                    self.relative.append(key)
                values[key] = [os.path.join(self.start_dir, path)
                               for path in value]
            elif value and not (key == "greylist_db"
                                and is_database_uri(value)):
                if not os.path.isabs(value):
                    self.relative.append(key)
                values[key] = os.path.join(self.start_dir, value)
        return values

    def run(self):
        """Start, serve until stopped, stop; return the exit status.  Each
        step of the start is a method of its own, in this order."""
        try:
            identity = find_user(self.values)
            self._lock_pidfile()
            self._open_logs(identity)
            handler_class = self._handler_class(identity)
            self._listen(handler_class, identity)
            self._warn_of_relative_names()
            self._detach()
            self._become(identity, handler_class)
        except StartError as error:
            sys.stderr.write("smtpproxy: error: %s\n" % error)
            if self.report is not None:
                report_start(self.report, error.status)
            self.close()
            return error.status
        if worker_count(self.values) > 1:
            # The master's signals first: from the parent's return on, a
            # SIGTERM is a stop.  Then started (the parent told, the
            # standard streams sent to /dev/null) before the forks: no
            # worker may hold the terminal, or the pipe of a script that
            # waits for its end.
            master = Master(self, handler_class)
            master._catch_signals()
            self._started(handler_class, worker_count(self.values))
            master.fork_workers()
            return master.watch()
        self._catch_signals()
        return self._serve(handler_class)

    def _lock_pidfile(self):
        """Lock the pidfile first: a running instance makes this start
        fail before anything else is touched."""
        if self.values.get("pidfile"):
            self.pidfile = lock_pidfile(self.values["pidfile"])

    def _open_logs(self, identity):
        """Open the logs, as open_service_file() says when started as
        root: those made now are the serving user's at once, also when
        the start fails later."""
        try:
            configure_logging(self.values, identity)
        except OSError as error:
            raise StartError("cannot open log: %s" % error, 2)
        self.warnings += _readable_by_others(_log_files(self.values))

    def _handler_class(self, identity):
        """The handler class of the configuration, its TLS pair and
        hash_keys' secret read while they may still be readable (as
        check_tls() and check_hash_keys() say, ``identity`` being the
        serving user), its PROXY balancers checked."""
        handler_class = handler_class_for(self.base, self.values)
        check_proxy_protocol(handler_class)
        check_tls(handler_class, identity)
        self.warnings += check_hash_keys(handler_class)
        check_policy(handler_class, self.values)
        self.warnings += check_lists_as(
            identity, handler_class,
            upstream=self.values.get("smtp_proxy", True))
        return handler_class

    def _listen(self, handler_class, identity):
        """Bind the port (as root if port 25 needs it), and the policy
        service's, if asked."""
        if self.values.get("smtp_proxy", True):
            address = (self.values.get("listen_ip", ""),
                       self.values.get("port", 25))
            try:
                self.server = SMTPProxyServer(address, handler_class)
            except OSError as error:
                raise _listen_error("", "[%s]:%s" % address, address[1],
                                    error)
            configure_server(self.server, self.values)
        if self.values.get("policy_listen"):
            self.policy = open_policy_server(self.values, handler_class,
                                             identity)
        if self.values.get("metrics_listen"):
            self.metrics = open_metrics_server(self.values)

    def _warn_of_relative_names(self):
        """A daemon started in / reads relative names from there."""
        if self.start_dir != "/":
            return
        for key in self.relative:
            if key == "greylist_debuglog" and not self.values.get("debug"):
                continue
            sys.stderr.write("smtpproxy: warning: %s is a relative name, "
                             "read from /: %s\n"
                             % (key, _format_value(self.values[key])))

    def _detach(self):
        """With --daemon: fork away; the parent waits for report_start()."""
        if not self.args.daemon:
            return
        if not (self.values.get("syslog") or self.values.get("log_file")):
            sys.stderr.write("smtpproxy: warning: as a daemon, set syslog "
                             "or log_file to keep the service's log\n")
        self.report = daemonize()

    def _become(self, identity, handler_class):
        """Write the pid, check (and make, the first time) the store as
        the serving user, in a child process that is that user for good
        (root never opens it), then switch to the user for good."""
        if self.pidfile is not None:
            write_pidfile(self.pidfile, self.values["pidfile"])
        store = getattr(handler_class, "greylist_db", None)
        if store:
            _load_postgresql_driver(store)   # while root: its docstring
        if identity is None:
            self.warnings += check_store(handler_class) or []
        elif store:
            # Checked in a child process that is the user for good: this
            # one stays root until it passed (to remove the pidfile if
            # not), and a lock the user holds stalls it only so long.
            self.warnings += drop_privileges(
                identity, lambda: check_store(handler_class) or [],
                _store_check_deadline(handler_class),
                "the check of greylisting store %s" % redact_uri(store))
        else:
            drop_privileges(identity)
        self._check_logs()

    def _serve(self, handler_class):
        """Serve until stopped, stop; return the exit status: the path of
        the single process and of a worker, its signals caught already.
        The server runs on_service() (a service hook); the policy service
        alone has a thread that serves, this one handling the signals."""
        self._start_serving()
        _warm_store(handler_class)
        self._started(handler_class)
        if self.server is not None:
            # Only the first worker says what the upstream offers.
            self.learn_upstream(handler_class, quiet=self.worker not in
                                (None, 0))
        try:
            if self.server is not None:
                self.server.serve_forever(poll_interval=0.25)
            else:
                while not self.stopped.wait(0.25):
                    self.on_service()
            self._stop()
        finally:
            self.close()
        return 0

    def _start_serving(self):
        """The SMTP server's hook, and the threads of the policy service
        and of the metrics endpoint."""
        if self.server is not None:
            self.server.service_hooks.append(self.on_service)
        if self.policy is not None:
            threading.Thread(target=self.policy.serve_forever,
                             kwargs={"poll_interval": 0.25},
                             name="policy service", daemon=True).start()
        if self.metrics is not None:
            threading.Thread(target=self.metrics.serve_forever,
                             kwargs={"poll_interval": 0.25},
                             name="metrics", daemon=True).start()

    def _started(self, handler_class, workers=0):
        """Tell the waiting parent, log the warnings and the start."""
        if self.report is not None:
            report_start(self.report, 0)
        for warning in self.warnings + configuration_warnings(
                handler_class, self.values):
            log.warning("%s", warning)
        details = ("class %s, config %s, pid %d, user %s"
                   % (self.args.handler_class, self.path or "none",
                      os.getpid(), _user_name(os.geteuid())))
        if workers:
            details += ", %d workers" % workers
        if self.server is not None:
            log.info("smtpproxy %s listening on [%s]:%s, forwarding to "
                     "%s:%s (%s)", __version__,
                     self.server.server_address[0],
                     self.server.server_address[1],
                     handler_class.smtp_ip, handler_class.smtp_port,
                     details)
        if self.policy is not None:
            log.info("smtpproxy %s answering policy requests on %s (%s)",
                     __version__, self.values["policy_listen"], details)
        if self.metrics is not None:
            log.info("smtpproxy %s serving metrics on %s", __version__,
                     self.values["metrics_listen"])

    def _configure_server(self, values):
        """Set the server's keys, on a reload (and at a Worker's start)."""
        configure_server(self.server, values)

    def _stop(self):
        """serve_forever() returned (SIGTERM): the policy service's
        connections end at once (Postfix asks the next instance), open
        SMTP transactions get their grace period."""
        if self.policy is not None:
            self.policy.shutdown()
            self.policy.close_connections()
        if self.server is not None:
            log.info("stopping: waiting up to %s seconds for %d open "
                     "session(s)", self.server.grace_period,
                     len(self.server.sessions))
            left = self.server.stop()
        # Scraped until the sessions ended.
        if self.metrics is not None:
            self.metrics.shutdown()
        if self.server is None:
            log.info("stopped")
            return
        log.info("stopped%s", " (%d session(s) did not end)" % left
                 if left else "")

    def _check_logs(self):
        """Warn about log files the serving user could not open again (on
        SIGHUP, after logrotate): files made at the start are its own,
        those that were there already are left as they are; and about a
        configuration file it could not read again."""
        if self.path and not os.access(self.path, os.R_OK):
            sys.stderr.write("smtpproxy: warning: %s is not readable by %s: "
                             "SIGHUP will not reload it\n"
                             % (self.path, _user_name(os.geteuid())))
        keys = ["greylist_log"]
        if not self.values.get("syslog"):
            keys.append("log_file")
        if self.values.get("debug"):
            keys.append("greylist_debuglog")
        for key in keys:
            path = self.values.get(key)
            if path and not os.access(path, os.W_OK):
                sys.stderr.write("smtpproxy: warning: %s %s is not writable "
                                 "by %s: reopening it will fail\n"
                                 % (key, path, _user_name(os.geteuid())))

    @staticmethod
    def learn_upstream(handler_class, quiet=False):
        """Ask the upstream what it offers, for the first clients' EHLO."""
        learn = getattr(handler_class, "learn_upstream", None)
        if learn is not None:
            extensions = learn()
            if extensions is not None and not quiet:
                log.info("upstream %s:%s offers: %s", handler_class.smtp_ip,
                         handler_class.smtp_port, log_escape(" ".join(
                             ("%s %s" % item).rstrip()
                             for item in sorted(extensions.items()))))

    def close(self):
        if self.server is not None:
            self.server.server_close()
        if self.metrics is not None:
            self.metrics.server_close()
            self.metrics = None
        if self.policy is not None:
            if (isinstance(self.policy, UnixPolicyServer)
                    and self.worker is None):
                self.policy._remove_socket()
            self.policy.server_close()
            self.policy = None
        if self.pidfile is not None:
            try:
                os.unlink(self.values["pidfile"])
            except OSError:
                pass    # not ours to remove any more: the init script's
            os.close(self.pidfile)
            self.pidfile = None

    def on_signal(self, signum, frame):
        if (signum in (signal.SIGTERM, signal.SIGINT) and self.stop_asked
                and self.server is not None):
            # Twice, even before on_service() saw the first: end the
            # grace period.
            self.server.stop_now = True
        _SignalsNoted.on_signal(self, signum, frame)

    def on_service(self):
        """Called by the SMTP server's service_actions() at least every
        quarter second (one of its service_hooks), or by the policy
        service's main loop: act on the signals noted."""
        if self.server is None:
            stores.maintain()           # the policy service alone
        metrics.sample_process()
        self._act_on_signals()

    def _act_on(self, signum, roles):
        getattr(self, roles.serving)(signum)

    def _stop_serving(self, signum):
        """SIGTERM, SIGINT: serve_forever() returns (or the policy
        service's loop ends), and _serve() stops."""
        if self.server is None:
            if not self.stopped.is_set():
                log.info("signal %d: stopping", signum)
            self.stopped.set()
        elif not self.server.stopping:
            log.info("signal %d: stopping", signum)
            self.server.stopping = True
            # shutdown() waits for serve_forever() to return: it cannot be
            # called from this thread.
            threading.Thread(target=self.server.shutdown).start()

    def _reload(self, signum):
        self.reload()

    def _log_counters(self, signum):
        if self.server is not None:
            self.server.log_counters()
        if self.policy is not None:
            log.info("policy counters: connections_open=%d %s",
                     len(self.policy.connections),
                     self.policy.counter_text())

    def _reopen_logs(self, signum):
        _reopen_log_files(self.values)
        log.info("logs reopened")

    def reload(self):
        """Read the configuration again; new sessions get it, sessions in
        progress keep theirs.  A configuration that cannot be used leaves
        the one in force, and the log says why."""
        try:
            values, path, warnings = read_settings(self.args)
            values = self._absolute_paths(values)
            handler_class = handler_class_for(self.base, values)
            warnings += check_configuration(handler_class, values,
                                            files=False)
        except (ConfigError, ValueError, OSError, StartError) as error:
            # The logs are reopened all the same: logrotate sent the
            # signal for them, not for the file somebody broke meanwhile.
            _reopen_log_files(self.values)
            log.error("reload failed, keeping the configuration in force: "
                      "%s", error)
            return
        _reopen_log_files(values)
        in_force = (self.server.RequestHandlerClass if self.server is not None
                    else self.policy.settings if self.policy is not None
                    else None)
        change = key_secret_change(in_force, handler_class)
        if change is not None:
            warnings.append(change)
        for warning in warnings:
            log.warning("%s", warning)
        for key in RESTART_KEYS:
            if values.get(key) != self.values.get(key):
                log.warning("reload: %s changed, which takes a restart",
                            key)
                values[key] = self.values.get(key)
        self.values = values
        if self.server is not None:
            self.server.RequestHandlerClass = handler_class
            self._configure_server(values)
        if self.policy is not None:
            self.policy.settings = handler_class
            configure_server(self.policy, values, POLICY_SETTINGS)
        if self.metrics is not None:
            self.metrics.clients = values.get(
                "metrics_clients", SERVICE_DEFAULTS["metrics_clients"])
        log.info("reloaded the configuration from %s", path or "nowhere")


# -- several processes (workers) ---------------------------------------------

# workers = auto: one more than the CPUs, because one process's threads
# take turns at the interpreter's lock (a thread that waited for the
# network must win it back), and meanwhile another process can use the
# CPU: on 2 cores, 3 workers did best (README, "Speed"); at least 2, so
# that a worker that dies leaves another serving; at most this many,
# because each worker holds its own memory (about 45 MB), store
# connections (two) and upstream sessions (upstream_pool_size): a host
# with 64 cores would otherwise start 65 processes and as many database
# connections, for a load that one MX never sees.
WORKERS_AUTO_MAX = 8


def worker_count(values):
    """The number of serving processes ``values["workers"]`` means: 1 is
    the single process (no master)."""
    workers = values.get("workers", SERVICE_DEFAULTS["workers"])
    if workers != "auto":
        return workers
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(2, min(cpus + 1, WORKERS_AUTO_MAX))


class Master(_SignalsNoted):
    """``workers`` > 1: the process that started (its ``service``) forks
    that many Worker processes, which all serve the port it bound and
    the policy service's socket (each worker accepts on the shared
    listening sockets; the metrics endpoint is the first worker's), and
    watches them until stopped.

    It serves no client and starts no thread, so that a fork never copies
    a lock held by another thread.  A worker that ends when it should not
    is started again, at once, or after 1, 2, 4 ... 60 seconds when it
    ends again within ``worker_quick_end`` seconds of its start.  Its
    signals are the "master" column of _SIGNALS, each passed on to the
    workers, which act on it as a single process does; it ends when the
    last worker has.  A worker whose master is gone stops by itself.

    ``workers``: pid -> (number, when it started), the workers running.
    """

    worker_quick_end = 10

    def __init__(self, service, handler_class):
        _SignalsNoted.__init__(self)
        self.service = service
        self.handler_class = handler_class
        self.workers = {}
        self._restarts = {}         # worker number -> when to start it
        self._quick_ends = {}       # worker number -> quick ends in a row
        self._stopping = False      # the stop was passed on

    def fork_workers(self):
        """Start the workers (the signals are caught already)."""
        stores.reset()          # no store connection crosses a fork
        # A worker that loses the race for a new connection must go back
        # to its loop, not wait in accept() for the next one.
        for server in (self.service.server, self.service.policy):
            if server is not None:
                server.socket.setblocking(False)
        if self.service.server is not None:
            self.service.server.service_sessions = SessionCounts(
                worker_count(self.service.values))
        metrics.share(worker_count(self.service.values))
        for number in range(worker_count(self.service.values)):
            self._fork_worker(number)

    def watch(self):
        """Watch the workers until they all ended after a stop; close the
        service, return the exit status."""
        try:
            while self.workers or not self.stop_asked:
                metrics.sample_process()
                self._reap_workers()
                self._act_on_signals()
                self._restart_workers()
                if self.workers or not self.stop_asked:
                    time.sleep(0.1)
        finally:
            self.service.close()
        log.info("stopped")
        return 0

    def _fork_worker(self, number):
        """Start worker ``number``; in the child, serve and exit."""
        # The signals wait, blocked, until the worker has its own handlers
        # (Worker.run()): else a SIGTERM passed on to a starting worker is
        # noted in its copy of the master's list, and lost.
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            pid = os.fork()
        except OSError as error:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            log.error("cannot start worker %d: %s; trying again in a "
                      "second", number, error)
            self._restarts[number] = time.monotonic() + 1
            return
        if pid:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            self.workers[pid] = (number, time.monotonic())
            return
        status = 70                 # EX_SOFTWARE, if serving raised
        try:
            status = Worker(self.service, number, self.handler_class).run()
        except BaseException:
            log.exception("worker %d failed", number)
        finally:
            os._exit(status)

    def _restart_workers(self):
        now = time.monotonic()
        for number, when in sorted(self._restarts.items()):
            if when <= now and not self.stop_asked:
                del self._restarts[number]
                self._fork_worker(number)

    def _reap_workers(self):
        """Note the workers that ended; plan their restart unless the
        service is stopping."""
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.workers.clear()
                return
            if not pid:
                return
            number, started = self.workers.pop(pid, (None, 0))
            if number is None:
                continue
            # Its sessions died with it: their places are free.
            if self.service.server is not None:
                self.service.server.service_sessions.set(0, slot=number)
            metrics.clear_gauges(number)
            if self.stop_asked:
                continue
            if os.WIFSIGNALED(status):
                how = "was killed by signal %d" % os.WTERMSIG(status)
            else:
                how = "exited with status %d" % os.WEXITSTATUS(status)
            if time.monotonic() - started < self.worker_quick_end:
                quick = self._quick_ends.get(number, 0) + 1
            else:
                quick = 0
            self._quick_ends[number] = quick
            delay = self._restart_delay(quick)
            log.error("worker %d (pid %d) %s; starting another%s", number,
                      pid, how, " in %d s" % delay if delay else "")
            self._restarts[number] = time.monotonic() + delay

    @staticmethod
    def _restart_delay(quick_ends):
        """Seconds to wait before starting again a worker that ended
        ``quick_ends`` times in a row within worker_quick_end of its
        start.  The first quick end may be chance; a second one in a row
        is a worker that cannot serve: wait 1, 2, 4 ... 60 s."""
        return min(60, 2 ** (quick_ends - 2)) if quick_ends > 1 else 0

    def _act_on(self, signum, roles):
        getattr(self, roles.master)(signum)
        for pid in list(self.workers):
            try:
                os.kill(pid, roles.passed_on)
            except OSError:
                pass        # ended meanwhile: reaped next time

    def _stop_workers(self, signum):
        if self._stopping:
            return
        self._stopping = True
        log.info("signal %d: stopping %d workers", signum,
                 len(self.workers))
        # The port closes at once, as a single process's does (the
        # workers close their copies as they stop); the policy socket's
        # name is removed by close(), when the last worker has ended.
        for server in (self.service.server, self.service.policy):
            if server is not None:
                server.socket.close()
        self._restarts.clear()

    def _reload(self, signum):
        self.service.reload()

    def _log_workers(self, signum):
        log.info("workers: %d running (pids %s)", len(self.workers),
                 " ".join(str(pid) for pid in sorted(self.workers)))

    def _reopen_logs(self, signum):
        _reopen_log_files(self.service.values)


class Worker(Service):
    """A process forked by the Master: a single process (Service) that
    serves the port its master bound, with its share of
    max_connections_per_ip (max_connections is counted for the service:
    SessionCounts), and also watches its master: when the master is gone, it
    stops as on SIGTERM.  Built in the child, from the master's
    ``service``, which hands over its servers; the pidfile's lock stays the
    master's, the policy service is every worker's (its connection limits
    each worker's), the metrics endpoint the first worker's (number 0).
    Each worker counts into its own slot of the service's ``metrics``
    (Metrics.enter())."""

    def __init__(self, service, number, handler_class):
        Service.__init__(self, service.args, service.base, service.values,
                         service.path, [], service.start_dir)
        self.handler_class = handler_class
        self.worker = number
        self.master = os.getppid()
        self.server, service.server = service.server, None
        if self.server is not None:
            self.server.service_sessions.slot = number
        metrics.enter(number)
        if service.pidfile is not None:
            os.close(service.pidfile)       # the lock stays the master's
            service.pidfile = None
        self.policy = service.policy
        if number == 0:
            self.metrics = service.metrics
        elif service.metrics is not None:
            service.metrics.server_close()
        service.policy = service.metrics = None

    def run(self):
        """Serve as a single process does, until stopped; return the exit
        status."""
        self._catch_signals()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)  # Master's
        lookup_threads.after_fork()
        # Out of the terminal's process group: a ^C reaches the master,
        # which passes it on once.
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
        self._configure_server(self.values)
        # The store now, not at the first RCPT (the master closed its own
        # before the fork): what a worker holds is there from its start.
        if getattr(self.handler_class, "greylister_class", None) is not None \
                and getattr(self.handler_class, "greylist_db", None):
            try:
                stores.get(self.handler_class)
            except (sqlite3.Error, OSError):
                pass                    # the first decision says why
        return self._serve(self.handler_class)

    def _started(self, handler_class, workers=0):
        """Nothing: the master told the parent and logged the start."""

    def _configure_server(self, values):
        """Set the server's keys; a worker's connection limits are its
        share of the service's."""
        if self.server is None:
            return                      # the policy service alone
        Service._configure_server(self, values)
        workers = worker_count(values)
        if workers > 1:
            self.server.worker = self.worker
            # max_connections is the service's (SessionCounts); a client's
            # connections are counted by the worker that took each.
            value = self.server.max_connections_per_ip
            if value:
                self.server.max_connections_per_ip = -(-value // workers)

    def on_service(self):
        """Also watch the master: a worker whose master is gone stops."""
        if os.getppid() != self.master and not self.stop_asked:
            log.warning("worker %d: the master process (pid %d) is gone: "
                        "stopping", self.worker, self.master)
            self.stop_asked = True
            self.pending.append(signal.SIGTERM)
        Service.on_service(self)


# ===========================================================================
# == 20. The command line ==
# ===========================================================================
#
# Owns:  --help (the module's docstring), the options, and main(), which
#        starts itself again without glibc's thread caches before serving.
# Enter: main(argv).
# Uses:  sections 14 to 19.


DEFAULT_CLASS = "smtpproxy.GreyListingPolicy"

# glibc's allocator keeps in each thread a cache of the small blocks that
# thread freed (tcache, glibc 2.26 and later: up to 7 of each of 64 sizes),
# given back only when the thread ends.  A session thread kept for the
# next client (spare_threads) does not end while clients come, and the
# blocks in its cache pin the memory around them: with 50 spare threads a
# worker grew by 26 MB in 90 seconds of contrib/soak.py and kept it, with
# Python's own objects flat (tracemalloc).  Without the caches it stayed
# flat, at no cost in speed (contrib/bench.py).  Their size can be set
# only before the process starts (GLIBC_TUNABLES), so the command line
# starts itself again, once, with them off, before it opens anything; an
# admin's own glibc.malloc.tcache_count in GLIBC_TUNABLES is kept.
THREAD_CACHES_OFF = "glibc.malloc.tcache_count=0"


def _restart_without_thread_caches():
    """Run this command line again (same process, same pid) with glibc's
    per-thread caches off; return if it is done already, not glibc, or
    the command line cannot be told."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.tcache_count" in tunables or not sys.executable:
        return
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):
        return
    try:
        version = tuple(int(part) for part in libc.split()[1].split("."))
    except (IndexError, ValueError):
        return
    if not libc.startswith("glibc ") or version < (2, 26):
        return
    argv = getattr(sys, "orig_argv", None)      # 3.10: with its options
    if not argv:
        if not (sys.argv and os.path.isfile(sys.argv[0])):
            return                  # python -c or -m of old: not told
        argv = [sys.executable] + sys.argv
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(
        part for part in (tunables, THREAD_CACHES_OFF) if part)
    sys.stdout.flush()              # what is buffered would be lost
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:
        return                      # serve as we are


def _usage():
    # Each key's name and default, by section: its help is in
    # --sample-config, which an admin keeps as the configuration file.
    sections = collections.OrderedDict()
    for key in KEYS:
        sections.setdefault(key.section, []).append(
            "%s (%s)" % (key.name, shown_default(key)))
    # An item is not broken across lines (NUL stands for its blanks).
    keys = "\n".join(
        "    %s:\n%s" % (section, textwrap.fill(
            "; ".join(item.replace(" ", "\0") for item in items), 79,
            initial_indent=" " * 8, subsequent_indent=" " * 8,
            break_on_hyphens=False).replace("\0", " "))
        for section, items in sections.items())
    names = [name for name in CONFIG_SEARCH_PATH
             if not name.endswith(".dist")]
    if CONFIG_SEARCH_PATH == names + [name + ".dist" for name in names]:
        names.append("then each of them with .dist")
    else:
        names = CONFIG_SEARCH_PATH
    search_path = textwrap.fill(", ".join(names), 79,
                                initial_indent=" " * 12,
                                subsequent_indent=" " * 12,
                                break_on_hyphens=False)
    key_options = textwrap.fill(
        ", ".join("--" + name.replace("_", "-") for name in KEY_OPTIONS),
        79, initial_indent=" " * 12, subsequent_indent=" " * 12,
        break_on_hyphens=False)
    return __doc__ % {"program": "smtpproxy", "default_class": DEFAULT_CLASS,
                      "config_keys": keys, "search_path": search_path,
                      "key_options": key_options}


def find_class(dotted_name):
    """Import ``module.Class`` (or a class of this module by bare name)."""
    module_name, _, class_name = dotted_name.rpartition(".")
    if not module_name:
        module = sys.modules[__name__]
    else:
        module = importlib.import_module(module_name)
    handler = getattr(module, class_name)
    if not (isinstance(handler, type) and issubclass(handler, MailHandler)):
        raise TypeError("%s is not a MailHandler class" % dotted_name)
    return handler


def _until_the_reader_stops(command, *args):
    """Run ``command`` (an admin command printing to stdout) and return
    its status; when the reader stops reading (--db-list | head), end
    quietly, as other Unix tools do when SIGPIPE kills them: status 141
    (128 + SIGPIPE, as a shell reports it), no traceback, and stdout
    pointed at /dev/null, where Python's flush at exit cannot fail.
    What the command wrote to the store before is done."""
    try:
        status = command(*args)
        sys.stdout.flush()          # the last lines: their pipe too
        return status
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE


def main(argv=None):
    """Run the proxy from the command line; return the exit status."""
    # A --class module that imports smtpproxy must get this very module,
    # also when it runs as a script (__main__).
    sys.modules.setdefault("smtpproxy", sys.modules[__name__])
    parser = argparse.ArgumentParser(
        prog="smtpproxy", usage="%(prog)s [options]", add_help=False,
        description=_usage(), formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("-V", "--version", action="version",
                        version="smtpproxy " + __version__)
    parser.add_argument("-c", "--config", metavar="FILE")
    parser.add_argument("-l", "--listen", metavar="[HOST:]PORT")
    parser.add_argument("-u", "--upstream", metavar="HOST[:PORT]")
    parser.add_argument("--class", dest="handler_class",
                        metavar="DOTTED.NAME", default=DEFAULT_CLASS)
    parser.add_argument("-d", "--debug", action="store_true", default=None)
    parser.add_argument("-o", dest="set", action="append",
                        metavar="KEY=VALUE")
    for key in KEY_OPTIONS:
        parser.add_argument("--" + key.replace("_", "-"), dest=key)
    detach = parser.add_mutually_exclusive_group()
    detach.add_argument("--daemon", action="store_true")
    detach.add_argument("--foreground", action="store_false", dest="daemon")
    parser.add_argument("--check-config", action="store_true")
    parser.add_argument("-q", "--quiet", action="store_true")
    parser.add_argument("--sample-config", action="store_true")
    store_commands = parser.add_mutually_exclusive_group()
    store_commands.add_argument("--db-list", action="store_true")
    store_commands.add_argument("--db-stats", action="store_true")
    store_commands.add_argument("--db-purge", action="store_true")
    store_commands.add_argument("--db-pass", metavar="KEY", nargs="+")
    store_commands.add_argument("--db-delete", metavar="KEY", nargs="+")
    store_commands.add_argument("--db-hash-keys", action="store_true")
    store_commands.add_argument("--db-report", action="store_true")
    parser.add_argument("--since", metavar="DURATION")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.help:
        print(_usage())
        return 0
    if args.sample_config:
        sys.stdout.write(sample_config())
        return 0
    try:
        values, path, warnings = read_settings(args)
    except (ConfigError, ValueError) as error:
        sys.stderr.write("smtpproxy: error: %s\n" % error)
        return 2
    try:
        base = find_class(args.handler_class)
    except (ImportError, AttributeError, TypeError) as error:
        sys.stderr.write("smtpproxy: error: --class %s: %s\n"
                         % (args.handler_class, error))
        return 2
    handler_class = handler_class_for(base, values)
    if args.check_config:
        notes = []
        try:
            warnings += check_configuration(handler_class, values,
                                            notes=notes)
            check_listening(values)
            warnings += check_upstream(handler_class, values)
        except StartError as error:
            sys.stderr.write("smtpproxy: error: %s\n" % error)
            return error.status
        for warning in warnings:
            sys.stderr.write("smtpproxy: warning: %s\n" % warning)
        if not args.quiet:
            print("# config file: %s; class: %s"
                  % (path or "none", args.handler_class))
            for note in notes:
                print("# " + note)
            print(format_config(handler_class, values))
        return 0
    if (args.db_list or args.db_stats or args.db_purge or args.db_pass
            or args.db_delete or args.db_hash_keys or args.db_report
            or args.json or args.since is not None):
        identity = None
        if values.get("user") and os.geteuid() == 0:
            try:
                identity = find_user(values)
            except StartError as error:
                sys.stderr.write("smtpproxy: error: %s\n" % error)
                return error.status
        return _until_the_reader_stops(administer_store, handler_class,
                                       args, identity)
    if argv is None:
        _restart_without_thread_caches()
    return Service(args, base, values, path, warnings).run()


if __name__ == "__main__":
    sys.exit(main())
