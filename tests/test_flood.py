"""A client that floods RCPTs to new recipients cannot grow the store
without bound.

Each RCPT the policy defers or refuses is an error towards ``max_errors``
(20), as Postfix counts smtpd_hard_error_limit: past it the session hears
421 4.7.0 and is closed, and what it pipelined after is never read; a
delivered message starts the count again.  A triplet seen for the first
time adds a row to the store, at most ``max_new_triplets_per_session`` in
a session and ``max_new_triplets_per_network`` an hour from one client
network (/24, an IPv6 /48); past either bound the RCPT is deferred and nothing
is written, logged once per session or per network and hour.  The
per-network counts are kept for at most ``NewTriplets.max_networks``
networks.

Sessions are real: a GreyListingPolicy proxy in front of aiosmtpd, raw
sockets as clients (the loopback /8 gives several /24s).  The engine's
bounds are also asked with the time given, without sockets.
"""

import logging
import sqlite3

import pytest

import smtpproxy
from conftest import RawClient

T0 = 1000000000.0
FLOOD = 5000


@pytest.fixture
def grey(proxy, tmp_path):
    """Start a greylisting proxy for example.org with a store of its own:
    ``port = grey(**attributes)``."""
    def start(**attributes):
        attributes.setdefault("greylist_db", str(tmp_path / "flood.db"))
        attributes.setdefault("allowed_senders", [])
        attributes.setdefault("allowed_domains", ["example.org"])
        return proxy(handler=smtpproxy.GreyListingPolicy, **attributes)
    return start


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.INFO, logger="smtpproxy")
    return caplog


def store_rows(tmp_path):
    """The triplets in the proxy's store."""
    connection = sqlite3.connect(str(tmp_path / "flood.db"))
    try:
        return connection.execute(
            "SELECT count(*) FROM triplets").fetchone()[0]
    finally:
        connection.close()


def pipeline(client, count, first=0):
    """Send ``count`` RCPTs to new recipients and a QUIT in one write;
    the codes of the replies heard until the connection closed."""
    client.send("".join("RCPT TO:<n%d@example.org>\r\n" % number
                        for number in range(first, first + count))
                + "QUIT\r\n")
    codes = []
    for _ in range(count + 1):          # bounded
        code = client.reply()[0]
        if code is None:
            break
        codes.append(code)
    return codes


def flood(port, count, source="127.0.0.1", first=0):
    """A session from ``source`` that pipelines ``count`` RCPTs."""
    client = RawClient(port, source=source)
    try:
        assert client.cmd("EHLO flood.example")[0] == 250
        assert client.cmd("MAIL FROM:<flood@example.net>")[0] == 250
        return pipeline(client, count, first)
    finally:
        client.close()


def warnings(logs, text):
    return [record.getMessage() for record in logs.records
            if text in record.getMessage()]


# ---------------------------------------------------------------------------
# Deferrals are errors
# ---------------------------------------------------------------------------

def test_a_session_ends_with_421_after_max_errors_deferrals(grey, tmp_path,
                                                           upstream):
    port = grey()
    codes = flood(port, FLOOD)
    # 20 deferrals, then 421 and the end: the other 4,980 RCPTs and the
    # QUIT were never read, and added nothing.
    assert codes == [451] * 20 + [421]
    assert store_rows(tmp_path) == 20
    assert upstream.connections == 0


def test_the_limit_is_max_errors_and_the_421_says_why(grey, tmp_path):
    port = grey(max_errors=5)
    client = RawClient(port)
    client.cmd("EHLO flood.example")
    client.cmd("MAIL FROM:<flood@example.net>")
    for number in range(4):
        assert client.cmd("RCPT TO:<n%d@example.org>" % number)[0] == 451
    client.send("RCPT TO:<n4@example.org>\r\n")
    assert client.reply()[0] == 451
    assert client.reply() == (421, "4.7.0 mail.example.com Error: too many "
                                   "errors")
    assert client.is_closed()
    client.close()
    assert store_rows(tmp_path) == 5


def test_a_delivered_message_starts_the_error_count_again(grey, tmp_path,
                                                          upstream):
    # As Postfix: the limit is of errors "without delivering mail".
    port = grey(whitelisted_triples=[
        ("127.0.0.1", "<flood@example.net>", "<ok@example.org>")])
    client = RawClient(port)
    client.cmd("EHLO flood.example")
    client.cmd("MAIL FROM:<flood@example.net>")
    for number in range(15):
        assert client.cmd("RCPT TO:<n%d@example.org>" % number)[0] == 451
    assert client.cmd("RCPT TO:<ok@example.org>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    assert client.cmd("Subject: list\r\n\r\nhello\r\n.")[0] == 250
    assert client.cmd("MAIL FROM:<flood@example.net>")[0] == 250
    # 20 more errors, not 5, before the 421.
    assert pipeline(client, 100, first=15) == [451] * 20 + [421]
    client.close()
    assert len(upstream.messages) == 1
    assert store_rows(tmp_path) == 35


# ---------------------------------------------------------------------------
# New triplets: per session, per network and hour
# ---------------------------------------------------------------------------

def test_a_pipelined_flood_adds_at_most_max_new_triplets_per_session(
        grey, tmp_path, logs):
    # Errors that never end the session (an admin's choice, or deliveries
    # in between) still add no more than the session's bound.
    port = grey(max_errors=100000, max_new_triplets_per_session=30)
    codes = flood(port, FLOOD)
    assert codes == [451] * FLOOD + [221]
    assert store_rows(tmp_path) == 30
    said = warnings(logs, "max_new_triplets_per_session")
    assert said == ["client 127.0.0.1: 30 new triplets in one session "
                    "(max_new_triplets_per_session); further new ones are "
                    "deferred without a row"]


def test_a_network_adds_at_most_max_new_triplets_per_network_an_hour(
        grey, tmp_path, logs):
    port = grey(max_new_triplets_per_network=25)
    # Three clients of 127.0.0.0/24, one after the other, each cut at 20
    # errors: 25 rows in all.
    for number, source in enumerate(["127.0.0.2", "127.0.0.3",
                                     "127.0.0.4"]):
        assert flood(port, FLOOD, source=source, first=1000 * number) == \
            [451] * 20 + [421]
    assert store_rows(tmp_path) == 25
    said = warnings(logs, "max_new_triplets_per_network")
    assert len(said) == 1 and said[0].startswith(
        "client network 127.0.0.0/24: 25 new triplets within an hour")
    # Another network has its own count.
    flood(port, 3, source="127.0.1.2", first=9000)
    assert store_rows(tmp_path) == 28


def triplets(grey):
    store = smtpproxy.stores.get(grey.settings)
    return sorted(entry[1] for entry in store.entries()
                  if entry[0] != "CLIENT")


def test_past_the_network_bound_a_new_triplet_is_deferred_without_a_row(
        engine):
    grey = engine(max_new_triplets_per_network=3)
    for number in range(3):
        decision = grey.decide("192.0.2.%d" % number, "a@example.net",
                               "r%d@example.org" % number, T0 + number)
        assert decision.verdict == "defer" and decision.added
    over = grey.decide("192.0.2.200", "a@example.net", "r9@example.org",
                       T0 + 10)
    assert (over.verdict, over.rule, over.added) == (
        "defer", "max_new_triplets_per_network 192.0.2.0/24", False)
    assert len(triplets(grey)) == 3
    # What is known goes on as ever: a retry passes.
    assert grey.decide("192.0.2.0", "a@example.net", "r0@example.org",
                       T0 + 3600).verdict == "accept"
    # Another network is not held back; this one again after its hour.
    assert grey.decide("198.51.100.1", "a@example.net", "r9@example.org",
                       T0 + 20).added
    assert grey.decide("192.0.2.200", "a@example.net", "r9@example.org",
                       T0 + 3600).added
    assert len(triplets(grey)) == 5


def test_an_ipv6_network_is_bounded_as_its_48_not_each_64(engine):
    # A site holds 65,536 /64s of its /48: one bound for all of them.
    grey = engine(max_new_triplets_per_network=3)
    for number in range(3):
        assert grey.decide("2001:db8:0:%x::1" % number, "a@example.net",
                           "r%d@example.org" % number, T0).added
    over = grey.decide("2001:db8:0:ffff::1", "a@example.net",
                       "r9@example.org", T0)
    assert (over.verdict, over.rule, over.added) == (
        "defer", "max_new_triplets_per_network 2001:db8::/48", False)
    # The key itself keeps its /64.
    assert sorted(key.split()[0] for key in triplets(grey)) == [
        "2001:db8:0:1::/64", "2001:db8:0:2::/64", "2001:db8::/64"]


def test_the_network_a_new_triplet_counts_against_is_a_hook(engine):
    """A Greylister whose flood_network() is the client's /16: three
    /24s of one /16 share one bound."""
    class Wider(smtpproxy.Greylister):
        def flood_network(self, client):
            return smtpproxy.network_key(client, 16, 32)
    grey = Wider(engine(max_new_triplets_per_network=2).settings)
    for number in range(2):
        assert grey.decide("192.0.%d.1" % number, "a@example.net",
                           "r%d@example.org" % number, T0).added
    over = grey.decide("192.0.200.1", "a@example.net", "r9@example.org",
                       T0)
    assert (over.verdict, over.rule, over.added) == (
        "defer", "max_new_triplets_per_network 192.0.0.0/16", False)


def test_past_the_session_bound_a_new_triplet_is_deferred_without_a_row(
        engine):
    grey = engine(max_new_triplets_per_session=2)
    decide = grey.decide
    assert decide("192.0.2.1", "a@example.net", "r1@example.org", T0,
                  session_added=1).added
    over = decide("192.0.2.1", "a@example.net", "r2@example.org", T0,
                  session_added=2)
    assert (over.verdict, over.rule, over.added) == (
        "defer", "max_new_triplets_per_session", False)
    # No session (the policy service): no session bound.
    assert decide("192.0.2.1", "a@example.net", "r2@example.org", T0).added
    assert len(triplets(grey)) == 2


def test_zero_means_no_bound(engine):
    grey = engine(max_new_triplets_per_session=0,
                  max_new_triplets_per_network=0)
    for number in range(50):
        assert grey.decide("192.0.2.1", "a@example.net",
                           "r%d@example.org" % number, T0,
                           session_added=number).added
    assert len(smtpproxy.new_triplets) == 0     # nothing counted


def test_the_networks_counted_are_bounded_in_memory():
    counts = smtpproxy.NewTriplets()
    counts.max_networks = 100
    for number in range(1000):
        counts.added("net%d" % number, T0 + number)
        assert len(counts) <= 100
    # The newest are kept, the oldest went first.
    assert not counts.allows("net999", T0 + 1000, 1)
    assert counts.allows("net0", T0 + 1000, 1)
    # Networks whose hour is over go before any other.
    counts.added("late", T0 + 999 + 3600)
    assert len(counts) == 1
