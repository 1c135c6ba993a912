"""Greylisting that real mail survives: clients keyed by their confirmed
names, suspicious-only greylisting, DNS block and allow lists, recipients
never greylisted.  The engine is asked directly where no socket is
needed; a resolver stands in for DNS (as the FCrDNS tests do), and the
pool test runs through the proxy from two loopback networks."""

import logging
import os
import threading
import time

import pytest

import smtpproxy
from conftest import RawClient, wait_until

T0 = 1000000000.0
BL, WL = "bl.example", "wl.example"


class Resolver(object):
    """DNS as a test says it is: PTR names of addresses, addresses of
    names (DNS list queries included); ``slow`` names answer late."""

    def __init__(self, reverse=None, forward=None, slow=(), delay=5.0):
        self.reverse = reverse or {}
        self.forward = forward or {}
        self.slow, self.delay = set(slow), delay
        self.asked = []

    def ptr(self, address):
        return list(self.reverse.get(address, ()))

    def addresses(self, name):
        self.asked.append(name)
        if name in self.slow:
            time.sleep(self.delay)
        return set(self.forward.get(name, ()))


@pytest.fixture
def engine(engine):
    """conftest's engine, with no trusted senders and half a second for
    a DNS answer."""
    def make(**keys):
        keys.setdefault("allowed_senders", [])
        keys.setdefault("dns_timeout", 0.5)
        return engine(**keys)
    return make


def decide(grey, client, name=None, resolver=None, now=T0,
           recipient="b@example.org", sender="a@example.net"):
    return grey.decide(client, sender, recipient, now, hostname=name,
                       resolve=(resolver or Resolver()).addresses)


# -- client_key = name | network ----------------------------------------------

def test_a_pool_retrying_from_another_network_passes_keyed_by_name(
        proxy, upstream, tmp_path):
    """The first try from 127.0.0.2, the retry an hour later from
    127.0.1.2 (another /24), both forward-confirmed in out.example.com:
    accepted with client_key = name, deferred again with network."""
    resolver = Resolver(
        reverse={"127.0.0.2": ["mx-a1.out.example.com"],
                 "127.0.1.2": ["mx-b7.out.example.com"]},
        forward={"mx-a1.out.example.com": {"127.0.0.2"},
                 "mx-b7.out.example.com": {"127.0.1.2"}})
    clock = [T0]
    replies = {}
    for mode in ("name", "network"):
        port = proxy(handler=smtpproxy.GreyListingPolicy,
                     greylist_db=str(tmp_path / ("%s.db" % mode)),
                     allowed_senders=[], allowed_domains=["example.org"],
                     client_key=mode, x_greylist_header=True,
                     now=lambda self: clock[0],
                     reverse_lookup=lambda self, ip: resolver.ptr(ip),
                     forward_lookup=lambda self, name:
                     resolver.addresses(name))
        clock[0] = T0
        first = send(port, "127.0.0.2")
        clock[0] = T0 + 3600
        replies[mode] = (first, send(port, "127.0.1.2"))
    assert replies["name"] == (451, 250)
    assert replies["network"] == (451, 451)
    [delivered] = upstream.messages
    assert delivered.content.startswith(
        b"X-Greylist: delayed 3600 seconds by smtpproxy-")
    assert b"(name:out.example.com)" in delivered.content.split(b"\r\n")[0]


@pytest.mark.parametrize("cache_time, lookups", [(600, 1), (0, 3)])
def test_a_clients_names_are_kept_for_its_next_sessions(proxy, tmp_path,
                                                       cache_time, lookups):
    """client_name_cache_time: the names answered for a client serve its
    next sessions, by the same policy; 0 looks them up in each session."""
    resolver = Resolver(reverse={"127.0.0.2": ["mx-a1.out.example.com"]},
                        forward={"mx-a1.out.example.com": {"127.0.0.2"}})
    reversed_ = []

    def reverse_lookup(self, ip):
        reversed_.append(ip)
        return resolver.ptr(ip)
    port = proxy(handler=smtpproxy.GreyListingPolicy,
                 greylist_db=str(tmp_path / "names.db"),
                 allowed_senders=[], allowed_domains=["example.org"],
                 client_key="name", client_name_cache_time=cache_time,
                 reverse_lookup=reverse_lookup,
                 forward_lookup=lambda self, name: resolver.addresses(name))
    for _ in range(3):
        assert send(port, "127.0.0.2") == 451
    assert reversed_ == ["127.0.0.2"] * lookups
    assert resolver.asked == ["mx-a1.out.example.com"] * lookups
    # Keyed by name in every session, cached or not.
    store = smtpproxy.GreylistStore(str(tmp_path / "names.db"))
    assert [entry[1].split()[0] for entry in store.entries()] == [
        "out.example.com"]
    store.close()


def send(port, source):
    """A message to b@example.org from ``source``: the RCPT's code."""
    client = RawClient(port, source=source)
    client.cmd("EHLO mx.out.example.com")
    client.cmd("MAIL FROM:<a@example.net>")
    code = client.cmd("RCPT TO:<b@example.org>")[0]
    if code == 250:
        assert client.cmd("DATA")[0] == 354
        client.send(b"Subject: pool\r\n\r\nhello\r\n.\r\n")
        assert client.reply()[0] == 250
    client.cmd("QUIT")
    client.close()
    return code


@pytest.mark.parametrize("name", [
    "1-2-3-4.pool.isp.example", "4-3-2-1.isp.example",
    "1.2.3.4.isp.example", "4.3.2.1.isp.example", "1_2_3_4.isp.example",
    "host1234.isp.example", "h001002003004.isp.example",
    "01020304.isp.example", "dyn-77.isp.example", "dynamic99.isp.example",
    "dhcp-1.isp.example", "dsl12.isp.example", "adsl-9.isp.example",
    "pool-3.isp.example", "ppp5.isp.example", "cable-7.isp.example",
    "cpe-2.isp.example", "dialup-8.isp.example", "broadband1.isp.example",
    "client-4.isp.example", "host-6.isp.example", "ip-42.isp.example",
    "static-11.isp.example",
])
def test_generic_names_are_never_grouped(engine, name):
    grey = engine()
    assert smtpproxy.generic_name(name, "1.2.3.4")
    assert grey.client_identity("1.2.3.4", name) == (
        "1.2.3.0/24", "network:1.2.3.0/24")


@pytest.mark.parametrize("name, key", [
    ("mx-a1.out.example.com", "out.example.com"),
    ("mail.example.com", "example.com"),
    ("example.com", "example.com"),
    ("mx.example.co.uk", "example.co.uk"),
    ("a.b.example.co.uk", "b.example.co.uk"),
    ("mail-wr1-f51.google.com", "google.com"),
])
def test_a_name_key_is_never_shorter_than_the_registered_domain(
        engine, name, key):
    assert engine().client_identity("192.0.2.7", name) == (key,
                                                           "name:" + key)


@pytest.mark.parametrize("name", ["localhost", "co.uk", "com", None])
def test_no_registered_domain_no_name_key(engine, name):
    assert engine().client_identity("192.0.2.7", name)[1] == \
        "network:192.0.2.0/24"


def test_a_lying_ptr_falls_back_to_the_network(proxy, tmp_path):
    """The PTR says out.example.com, its forward lookup does not give the
    client back: the name is not confirmed, the key is the network."""
    port = proxy(handler=smtpproxy.GreyListingPolicy,
                 greylist_db=str(tmp_path / "liar.db"), allowed_senders=[],
                 allowed_domains=["example.org"],
                 reverse_lookup=lambda self, ip: ["mx1.out.example.com"],
                 forward_lookup=lambda self, name: {"192.0.2.99"})
    assert send(port, "127.0.0.2") == 451
    store = smtpproxy.GreylistStore(str(tmp_path / "liar.db"))
    assert [entry[1] for entry in store.entries()] == [
        "127.0.0.0/24 a@example.net b@example.org"]
    store.close()


def test_client_key_network_keys_every_client_by_network(engine):
    grey = engine(client_key="network")
    assert grey.client_identity("192.0.2.7", "mx1.out.example.com") == (
        "192.0.2.0/24", "network:192.0.2.0/24")


def test_network_keys_look_up_no_name(engine):
    # A network key, all clients greylisted: no rule reads the client's
    # name, so no DNS is asked (a lookup can take dns_timeout).
    looked_up = []

    def hostname():
        looked_up.append(True)
        return "mx1.out.example.com"
    decision = decide(engine(client_key="network"), "192.0.2.7", hostname)
    assert (decision.verdict, decision.rule) == ("defer",
                                                 "network:192.0.2.0/24")
    assert looked_up == []
    decision = decide(engine(), "192.0.2.7", hostname)
    assert looked_up == [True]


# -- greylist_clients = suspicious ---------------------------------------------

@pytest.mark.parametrize("name, listed, expected", [
    ("mx1.out.example.com", False,
     ("accept", "not-suspicious name:out.example.com")),
    (None, False, ("defer", "suspicious:no-name network:192.0.2.0/24")),
    ("4-3-2-1.dyn.isp.example", False,
     ("defer", "suspicious:generic-name network:192.0.2.0/24")),
    ("mx1.out.example.com", True,
     ("defer", "dnsbl:bl.example name:out.example.com")),
])
def test_only_suspicious_clients_are_greylisted(engine, name, listed,
                                                expected):
    grey = engine(greylist_clients="suspicious", dnsbl=[BL])
    client = "192.0.2.7" if name != "4-3-2-1.dyn.isp.example" else \
        "1.2.3.4"
    if client == "1.2.3.4":
        expected = (expected[0], expected[1].replace("192.0.2.0/24",
                                                     "1.2.3.0/24"))
    resolver = Resolver(forward={
        smtpproxy.dns_list_query(client, BL): {"127.0.0.2"}}
        if listed else {})
    decision = decide(grey, client, name, resolver)
    assert (decision.verdict, decision.rule) == expected


def test_all_clients_are_greylisted_by_default(engine):
    decision = decide(engine(), "192.0.2.7", "mx1.out.example.com")
    assert (decision.verdict, decision.rule) == ("defer",
                                                 "name:out.example.com")


# -- DNS lists -----------------------------------------------------------------

def listing(client, zone, *answers):
    return Resolver(forward={smtpproxy.dns_list_query(client, zone):
                             set(answers)})


def test_dns_list_queries_are_reversed_under_the_zone():
    assert smtpproxy.dns_list_query("192.0.2.7", "Zen.Spamhaus.org.") == \
        "7.2.0.192.zen.spamhaus.org"
    assert smtpproxy.dns_list_query("2001:db8::1", "bl.example") == (
        "1.0.0.0." + "0.0.0.0." * 5 + "8.b.d.0.1.0.0.2.bl.example")
    assert smtpproxy.dns_list_query("::ffff:192.0.2.7", "x.example") == \
        "7.2.0.192.x.example"


def test_a_client_listed_on_a_dnswl_is_never_greylisted(engine):
    grey = engine(dnswl=[WL])
    decision = decide(grey, "192.0.2.7", None,
                      listing("192.0.2.7", WL, "127.0.10.2"))
    assert (decision.verdict, decision.rule) == ("accept", "dnswl:" + WL)
    assert decide(grey, "192.0.2.8").verdict == "defer"


@pytest.mark.parametrize("answers, listed", [
    (("127.0.0.2",), True),
    (("127.0.0.4", "127.0.0.10"), True),
    ((), False),                          # NXDOMAIN
    (("192.0.2.1",), False),              # outside 127.0.0.0/8
    (("127.255.255.254",), False),        # Spamhaus: query refused
    (("127.255.255.252",), False),
])
def test_only_answers_in_127_list_and_refusals_do_not(engine, caplog,
                                                      answers, listed):
    grey = engine(dnsbl=[BL], auto_whitelist_clients=1, dns_cache_time=0)
    # Passed and auto-whitelisted: only a listing greylists it again.
    decide(grey, "192.0.2.7", None, now=T0)
    decide(grey, "192.0.2.7", None, now=T0 + 3600)
    with caplog.at_level(logging.ERROR, logger="smtpproxy"):
        decision = decide(grey, "192.0.2.7", None,
                          listing("192.0.2.7", BL, *answers),
                          recipient="new@example.org", now=T0 + 3700)
    assert (decision.verdict == "defer") is listed, decision
    if listed:
        assert decision.rule == "dnsbl:%s network:192.0.2.0/24" % BL
    # A refusal, or an answer no list gives: an error, logged.
    errors = [r for r in caplog.records if "is no listing" in
              r.getMessage()]
    assert len(errors) == (0 if listed or not answers else 1)


ONE = ((127, 127),)
ZERO = ((0, 0),)


@pytest.mark.parametrize("entry, parsed", [
    ("zen.spamhaus.org", ("zen.spamhaus.org", None)),
    ("Zen.Spamhaus.ORG.", ("zen.spamhaus.org", None)),
    ("bl.example=127.0.0.2", ("bl.example", (ONE, ZERO, ZERO, ((2, 2),)))),
    ("list.dnswl.org=127.0.[0..255].[1..3]",
     ("list.dnswl.org", (ONE, ZERO, ((0, 255),), ((1, 3),)))),
    ("bl.example=127.0.0.[2;4;9..11]",
     ("bl.example", (ONE, ZERO, ZERO, ((2, 2), (4, 4), (9, 11))))),
])
def test_dns_list_entries_are_read_in_postfixs_syntax(entry, parsed):
    assert smtpproxy.parse_dns_list(entry) == parsed


@pytest.mark.parametrize("entry, says", [
    ("bl.example=127.0.0", "four octets"),
    ("bl.example=127.0.0.2.1", "four octets"),
    ("bl.example=127.0.0.256", "is no octet"),
    ("bl.example=127.0.0.[9..2]", "is no octet"),
    ("bl.example=127.0.0.2..4", "four octets"),
    ("bl.example=127.0.0.[2;;4]", "is no octet"),
    ("bl.example=127.0.0.x", "is no octet"),
    ("bl.example=127.0.0.2*3", "postscreen"),
    ("bl.example=", "four octets"),
    ("nodot=127.0.0.2", "zone such as"),
    ("bad_zone.example", "zone such as"),
])
def test_a_bad_dns_list_entry_says_what_to_write(entry, says):
    with pytest.raises(ValueError) as caught:
        smtpproxy.parse_dns_list(entry)
    assert says in str(caught.value)
    assert "such as" in str(caught.value)


@pytest.mark.parametrize("entry, answers, expected", [
    # dnswl.org: trust levels low, medium, high list; "none" does not;
    # .255, "query blocked", is an error.
    ("list.dnswl.org", ["127.0.15.1"], (True, None)),
    ("list.dnswl.org", ["127.0.15.3"], (True, None)),
    ("list.dnswl.org", ["127.0.15.0"], (False, None)),
    ("list.dnswl.org", ["127.0.0.255"], (False, "127.0.0.255")),
    ("list.dnswl.org=127.0.[0..255].[2..3]", ["127.0.15.1"], (False, None)),
    ("list.dnswl.org=127.0.[0..255].[0..255]", ["127.0.0.255"],
     (False, "127.0.0.255")),
    # Spamhaus: 127.0.0.2 to 11 list, 127.255.255.252 to 255 refuse.
    ("zen.spamhaus.org", ["127.0.0.4", "127.0.0.10"], (True, None)),
    ("zen.spamhaus.org", ["127.255.255.254"], (False, "127.255.255.254")),
    ("key.zen.dq.spamhaus.net", ["127.255.255.252"],
     (False, "127.255.255.252")),
    ("zen.spamhaus.org=127.0.0.[10..11]", ["127.0.0.4"], (False, None)),
    # Other zones: 127.0.0.0/8, but the refusals; nothing else.
    ("bl.example", ["127.0.0.2"], (True, None)),
    ("bl.example", ["127.1.2.3"], (True, None)),
    ("bl.example", ["127.255.255.255"], (False, "127.255.255.255")),
    ("bl.example", ["198.51.100.7"], (False, "198.51.100.7")),
    ("bl.example", ["2001:db8::1"], (False, "2001:db8::1")),
    ("bl.example", [], (False, None)),
    # An error beside a listing: the answer is not to be trusted.
    ("bl.example", ["127.0.0.2", "198.51.100.7"], (False, "198.51.100.7")),
])
def test_what_a_dns_list_answer_says(entry, answers, expected):
    assert smtpproxy.dns_list_answer(entry, answers) == expected


def test_a_blocked_dnswl_greylists_every_client_and_is_logged_once(
        engine, caplog):
    """list.dnswl.org answers 127.0.0.255 to a resolver it blocks: that
    whitelists nobody; the admin hears it once."""
    zone = "list.dnswl.org"
    grey = engine(dnswl=[zone])
    blocked = Resolver(forward=dict(
        (smtpproxy.dns_list_query("192.0.2.%d" % host, zone),
         {"127.0.0.255"}) for host in range(1, 6)))
    with caplog.at_level(logging.WARNING, logger="smtpproxy"):
        decisions = [decide(grey, "192.0.2.%d" % host, None, blocked)
                     for host in range(1, 6)]
    assert [(d.verdict, d.rule) for d in decisions] == [
        ("defer", "network:192.0.2.0/24")] * 5
    [line] = [r.getMessage() for r in caplog.records
              if zone in r.getMessage()]
    assert "answered 127.0.0.255, which is no listing" in line
    assert "use a resolver of your own" in line


def test_dnswls_none_trust_level_whitelists_nobody(engine):
    zone = "list.dnswl.org"
    grey = engine(dnswl=[zone])
    assert decide(grey, "192.0.2.7", None,
                  listing("192.0.2.7", zone, "127.0.15.0")).verdict == \
        "defer"
    assert decide(grey, "192.0.2.8", None,
                  listing("192.0.2.8", zone, "127.0.15.1")).rule == \
        "dnswl:" + zone


def test_one_zone_as_allow_and_block_list_by_its_answers(engine):
    """One zone that answers both ways (127.0.0.1 good, 127.0.0.2 bad),
    written twice with its filters."""
    zone = "karma.example"
    grey = engine(dnswl=[zone + "=127.0.0.1"], dnsbl=[zone + "=127.0.0.2"],
                  greylist_clients="suspicious")
    good = decide(grey, "192.0.2.7", "mx.out.example.com",
                  listing("192.0.2.7", zone, "127.0.0.1"))
    bad = decide(grey, "192.0.2.8", "mx.out.example.com",
                 listing("192.0.2.8", zone, "127.0.0.2"))
    assert (good.verdict, good.rule) == ("accept", "dnswl:" + zone)
    assert (bad.verdict, bad.rule) == ("defer",
                                       "dnsbl:%s name:out.example.com"
                                       % zone)


def test_a_dnsbl_listing_beats_the_auto_whitelist(engine):
    grey = engine(dnsbl=[BL], auto_whitelist_clients=1, dns_cache_time=0)
    decide(grey, "192.0.2.7", now=T0)
    decide(grey, "192.0.2.7", now=T0 + 3600)
    assert decide(grey, "192.0.2.7", recipient="c@example.org",
                  now=T0 + 3700).rule.startswith("auto-whitelist")
    listed = listing("192.0.2.7", BL, "127.0.0.2")
    assert decide(grey, "192.0.2.7", None, listed, recipient="d@example.org",
                  now=T0 + 3800).verdict == "defer"


def test_a_lookup_that_times_out_is_not_listed_and_logged(engine, caplog):
    grey = engine(dnsbl=[BL], dnswl=[WL], dns_timeout=0.3)
    slow = Resolver(slow={smtpproxy.dns_list_query("192.0.2.7", BL),
                          smtpproxy.dns_list_query("192.0.2.7", WL)},
                    delay=3)
    with caplog.at_level(logging.WARNING, logger="smtpproxy"):
        decision = decide(grey, "192.0.2.7", None, slow)
    assert decision.verdict == "defer"
    assert decision.rule == "network:192.0.2.0/24"       # not dnsbl:
    timeouts = [r for r in caplog.records if "timed out" in r.getMessage()]
    assert len(timeouts) == 2
    # The answer that never came is not asked again for a while.
    asked = len(slow.asked)
    decide(grey, "192.0.2.7", None, slow, recipient="c@example.org")
    assert len(slow.asked) == asked


def test_the_lists_are_asked_at_once(engine):
    """Each list is asked in a lookup thread of its own, all before the
    engine waits: one timeout for all, not one after the other.  Here
    each answer comes only once both lists have been asked (a barrier of
    two; one asked alone would break it after 5 s: no answer)."""
    grey = engine(dnsbl=[BL], dnswl=[WL], dns_timeout=10)
    both = threading.Barrier(2, timeout=5)

    class Together(Resolver):
        def addresses(self, name):
            both.wait()
            return Resolver.addresses(self, name)
    resolver = Together(forward={
        smtpproxy.dns_list_query("192.0.2.7", BL): {"127.0.0.2"},
        smtpproxy.dns_list_query("192.0.2.7", WL): {"127.0.10.2"}})
    decision = decide(grey, "192.0.2.7", None, resolver)
    assert not both.broken
    assert sorted(resolver.asked) == sorted(resolver.forward)
    assert decision.rule == "dnswl:" + WL


def test_dns_list_answers_are_cached(engine):
    grey = engine(dnsbl=[BL], dns_cache_time=600)
    resolver = listing("192.0.2.7", BL, "127.0.0.2")
    decide(grey, "192.0.2.7", None, resolver)
    decide(grey, "192.0.2.7", None, resolver, recipient="c@example.org")
    assert len(resolver.asked) == 1


def test_a_slow_resolver_holds_a_session_for_bounded_time(proxy, tmp_path):
    """PTR and list lookups that never answer: the RCPT is answered at
    the lookups' deadlines (dns_timeout), not after the resolver's own
    timeouts.  Here the resolver answers nothing before the test ends, and
    the client waits 15 s: a reply at all is one given at a deadline."""
    never = threading.Event()
    asked = []

    def hang(what):
        asked.append(what)
        never.wait()
    port = proxy(handler=smtpproxy.GreyListingPolicy,
                 greylist_db=str(tmp_path / "slow.db"), allowed_senders=[],
                 allowed_domains=["example.org"], dns_timeout=0.5,
                 dnsbl=[BL], dnswl=[WL],
                 reverse_lookup=lambda self, ip: hang(ip) or
                 ["a.out.example.com"],
                 forward_lookup=lambda self, name: hang(name) or set())
    client = RawClient(port, source="127.0.0.2")
    try:
        client.cmd("EHLO mx.example.net")
        client.cmd("MAIL FROM:<a@example.net>")
        code, _ = client.cmd("RCPT TO:<b@example.org>")
        # The PTR, then both lists: each asked, none answered.
        assert sorted(asked) == sorted([
            "127.0.0.2", smtpproxy.dns_list_query("127.0.0.2", BL),
            smtpproxy.dns_list_query("127.0.0.2", WL)])
    finally:
        never.set()
        client.close()
    assert code == 451


# -- whitelist_recipients ------------------------------------------------------

def test_whitelisted_recipients_are_never_greylisted(engine, tmp_path):
    path = tmp_path / "recipients"
    path.write_text("# postgrey's format\npostmaster@\n"
                    "abuse@example.org\notp.example.org\n"
                    "/^login-[0-9]+@example\\.org$/\n")
    grey = engine(whitelist_recipients=str(path),
                  allowed_domains=["example.org", "otp.example.org",
                                   "mx.otp.example.org", "otp2.example.org"])
    for recipient in ("postmaster@example.org", "Abuse@Example.org",
                      "x@otp.example.org", "y@mx.otp.example.org",
                      "login-42@example.org"):
        decision = decide(grey, "192.0.2.7", recipient=recipient)
        assert (decision.verdict, decision.rule) == (
            "accept", "whitelist_recipients"), recipient
    for recipient in ("abuse@otp2.example.org", "b@example.org",
                      "login-x@example.org"):
        assert decide(grey, "192.0.2.7",
                      recipient=recipient).verdict == "defer", recipient
    # Read again when it changes.
    path.write_text("b@example.org\n")
    stamp = os.stat(str(path)).st_mtime + 2
    os.utime(str(path), (stamp, stamp))
    assert decide(grey, "192.0.2.7").rule == "whitelist_recipients"
    assert decide(grey, "192.0.2.7",
                  recipient="abuse@example.org").verdict == "defer"


def test_whitelisted_users_match_with_their_plus_extension_as_postgrey(
        engine, tmp_path):
    # postgrey 1.37: user@domain is ^user(\+[^@]+)?@domain$, user@ is
    # ^user(\+[^@]+)?@ (any domain); the delimiter is always "+".
    path = tmp_path / "recipients"
    path.write_text("postmaster@\nabuse@example.org\nlists+x@example.org\n")
    grey = engine(whitelist_recipients=str(path),
                  allowed_domains=["example.org", "example.com"])
    for recipient in ("postmaster+x@example.org", "Postmaster+a+b@example.com",
                      "abuse+spam@Example.org", "lists+x+y@example.org"):
        decision = decide(grey, "192.0.2.7", recipient=recipient)
        assert (decision.verdict, decision.rule) == (
            "accept", "whitelist_recipients"), recipient
    for recipient in ("postmasterx@example.org", "abuse+x@example.com",
                      "abuse-x@example.org", "lists@example.org",
                      "lists+xy@example.org", "x+abuse@example.org"):
        assert decide(grey, "192.0.2.7",
                      recipient=recipient).verdict == "defer", recipient


def test_a_list_key_reads_several_files_and_the_local_beside_each(
        engine, tmp_path):
    # postgrey: --whitelist-recipients given more than once, and
    # /etc/postgrey/whitelist_recipients.local read when it exists.
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_text("abuse@example.org\n")
    (tmp_path / "first.local").write_text("sales@example.org\n")
    second.write_text("otp.example.org\n")
    clients = tmp_path / "clients"
    clients.write_text("198.51.100\n")
    (tmp_path / "clients.local").write_text("mail.pool.example\n")
    grey = engine(whitelist_recipients=[str(first), str(second)],
                  whitelist_clients=[str(clients)],
                  allowed_domains=["example.org", "otp.example.org"])
    for recipient in ("abuse@example.org", "sales@example.org",
                      "x@otp.example.org"):
        assert decide(grey, "192.0.2.7", recipient=recipient).rule == \
            "whitelist_recipients", recipient
    assert decide(grey, "198.51.100.9").rule == "whitelist_clients"
    assert decide(grey, "192.0.2.8",
                  "out.mail.pool.example").rule == "whitelist_clients"
    assert decide(grey, "192.0.2.9",
                  "mail.pool.example.net").verdict == "defer"
    # A .local made later is read at once, as a changed file is.
    (tmp_path / "second.local").write_text("b@example.org\n")
    assert decide(grey, "192.0.2.7").rule == "whitelist_recipients"


def test_the_shipped_whitelist_of_sender_pools_loads(engine):
    path = os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "contrib", "whitelist_clients")
    listed = smtpproxy.ListFile(open(path).read().splitlines(), path)
    assert listed.has_name("mail-am5eur02lp2051.outbound.protection."
                           "outlook.com")
    assert listed.has_name("a27-50.smtp-out.us-west-2.amazonses.com")
    assert not listed.has_name("outlook.com.evil.example")
    # A name counts only when forward-confirmed: the engine asks hostname.
    grey = engine(whitelist_clients=path)
    assert decide(grey, "192.0.2.7", None).verdict == "defer"
    assert decide(grey, "192.0.2.7",
                  "mail-wr1-f51.google.com").rule == "whitelist_clients"


# -- defer_reply's placeholders (postgrey's --greylist-text) -----------------

PLACEHOLDERS = "451 4.7.1 Greylisted for %s seconds (see http://x/%r)"


def rcpt_reply(port, recipient):
    """One session from 127.0.0.2: the reply to RCPT, (code, text)."""
    client = RawClient(port, source="127.0.0.2")
    try:
        client.cmd("EHLO client.example.net")
        client.cmd("MAIL FROM:<a@example.net>")
        return client.cmd("RCPT TO:<%s>" % recipient)
    finally:
        client.cmd("QUIT")
        client.close()


def test_defer_reply_says_the_seconds_left_and_the_recipients_domain(
        proxy, tmp_path):
    clock = [T0]
    port = proxy(handler=smtpproxy.GreyListingPolicy,
                 greylist_db=str(tmp_path / "grey.db"), allowed_senders=[],
                 allowed_domains=["example.org", "Example.COM"],
                 client_key="network", too_soon=0, min_defer_time=300,
                 defer_reply=PLACEHOLDERS, now=lambda self: clock[0])
    assert rcpt_reply(port, "b@example.org") == (
        451, "4.7.1 Greylisted for 300 seconds (see http://x/example.org)")
    clock[0] = T0 + 100.5                   # whole seconds, rounded up
    assert rcpt_reply(port, "b@example.org") == (
        451, "4.7.1 Greylisted for 200 seconds (see http://x/example.org)")
    assert rcpt_reply(port, "c@Example.COM") == (
        451, "4.7.1 Greylisted for 300 seconds (see http://x/Example.COM)")
    clock[0] = T0 + 300
    assert rcpt_reply(port, "b@example.org")[0] == 250


@pytest.mark.parametrize("reply, text", [
    # As postgrey: the first %s, then the first %r; nothing else.
    ("451 4.7.1 %s %s %r %r", "4.7.1 300 %s example.org %r"),
    ("451 4.7.1 100%% sure, %d%, %(x)s, %", "4.7.1 100%% sure, %d%, %(x)s, %"),
    ("451 4.7.1 %%s", "4.7.1 %300"),
    ("451 4.7.1 Greylisted, please try again later",
     "4.7.1 Greylisted, please try again later"),
])
def test_other_percent_signs_of_defer_reply_stay_as_written(
        proxy, tmp_path, reply, text):
    port = proxy(handler=smtpproxy.GreyListingPolicy,
                 greylist_db=str(tmp_path / "grey.db"), allowed_senders=[],
                 allowed_domains=["example.org"], min_defer_time=300,
                 defer_reply=reply, now=lambda self: T0)
    assert rcpt_reply(port, "b@example.org") == (451, text)


def test_the_default_defer_reply_is_still_the_hooks_false(engine, tmp_path):
    class Session(smtpproxy.GreyListingPolicy):
        peer, mail_from, helo_name, triplets_added = (
            "192.0.2.7", "a@example.net", "client.example.net", 0)
        allowed_senders, allowed_domains = [], ["example.org"]
        greylist_db = str(tmp_path / "grey.db")

        def __init__(self):
            pass

        def client_hostname(self):
            return None
    assert Session().shouldWeAcceptRecipient("b@example.org") is False
    Session.defer_reply = PLACEHOLDERS
    assert Session().shouldWeAcceptRecipient("b@example.org").startswith(
        "451 4.7.1 Greylisted for ")


# -- lookup threads ------------------------------------------------------------

def test_lookups_reuse_their_threads():
    before = smtpproxy.lookup_threads.count
    for number in range(50):
        address = "192.0.2.%d" % number
        assert smtpproxy.confirmed_names(
            address, lambda _: ["mx.example.net"], lambda _: {address}, 3,
            5) == (True, ["mx.example.net"], "mx.example.net")
    assert smtpproxy.lookup_threads.count - before <= 1


def test_lookup_threads_are_bounded_and_deadlines_kept(pool, caplog):
    threads = pool(limit=2)
    stuck = threading.Event()
    made = []

    def names(address, reverse=lambda _: ["mx.example.net"]):
        return smtpproxy.confirmed_names(address, reverse,
                                         lambda _: {address}, 3, 0.2)
    try:
        # Two lookups stuck in the resolver (of two networks: a timeout
        # leaves its network unasked for a while).
        for address in ("192.0.2.7", "198.51.100.7"):
            began = time.monotonic()
            assert names(address, lambda _: stuck.wait()) == (
                False, [], None)
            assert time.monotonic() - began > 0.15
        # None free: not made (nor queued for later), and said so.
        assert names("203.0.113.7", made.append) == (False, [], None)
        assert "lookup threads: all 2 busy" in caplog.text
        stuck.set()                     # the resolver answers at last
        wait_until(lambda: threads.idle == 2, what="the threads to be free")
        assert made == []
        assert names("203.0.113.7")[2] == "mx.example.net"
        assert threads.count == 2
    finally:
        stuck.set()


def test_lookup_threads_all_busy_is_logged_once_a_minute(pool, caplog):
    threads = pool(limit=1)
    stuck = threading.Event()
    try:
        assert threads.submit(stuck.wait)   # a resolver that hangs
        for _ in range(3):
            assert not threads.submit(lambda: None)
        # A minute later, the same outage (or the next one, days later)
        # is logged again.
        for logged in smtpproxy._log_times.items():
            logged[0] -= 60
        assert not threads.submit(lambda: None)
    finally:
        stuck.set()
    lines = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith("lookup threads: all")]
    assert lines == ["lookup threads: all 1 busy (a resolver that does not "
                     "answer?); lookups fail until one is free (logged at "
                     "most once a minute)"] * 2


@pytest.mark.parametrize("dns_timeout", [0, None])
def test_no_dns_timeout_is_no_limit(engine, dns_timeout):
    """dns_timeout 0 or None (a class attribute; the file takes numbers
    above 0): the lists are asked and their answers waited for, however
    long the resolver takes (here 0.2 s)."""
    grey = engine(dnsbl=[BL], dnswl=[WL], dns_timeout=dns_timeout)
    resolver = Resolver(forward={
        smtpproxy.dns_list_query("192.0.2.7", BL): {"127.0.0.2"}},
        slow={smtpproxy.dns_list_query("192.0.2.7", BL),
              smtpproxy.dns_list_query("192.0.2.7", WL)}, delay=0.2)
    decision = decide(grey, "192.0.2.7", None, resolver)
    assert sorted(resolver.asked) == sorted(
        smtpproxy.dns_list_query("192.0.2.7", zone) for zone in (BL, WL))
    assert (decision.verdict, decision.rule) == (
        "defer", "dnsbl:%s network:192.0.2.0/24" % BL)


@pytest.fixture
def pool():
    """``pool(**attributes)``: LookupThreads of their own in place of the
    process's, for one test."""
    original = smtpproxy.lookup_threads
    made = []

    def make(**attributes):
        attributes.setdefault("idle_time", 30)
        threads = type("Pool", (smtpproxy.LookupThreads,), attributes)()
        smtpproxy.lookup_threads = threads
        made.append(threads)
        return threads
    yield make
    smtpproxy.lookup_threads = original
    for threads in made:
        threads.close()


class Callers(object):
    """Threads that each run ``target(*args)``; ``wait_finished(n)`` until
    n of them have returned (False if not within a deadline)."""

    def __init__(self, target, argument_list):
        self.finished = 0
        self.condition = threading.Condition()
        self.results = []

        def run(*args):
            result = target(*args)
            with self.condition:
                self.finished += 1
                self.results.append(result)
                self.condition.notify_all()
        self.threads = [threading.Thread(target=run, args=args, daemon=True)
                        for args in argument_list]
        for thread in self.threads:
            thread.start()

    def wait_finished(self, count):
        with self.condition:
            return self.condition.wait_for(lambda: self.finished >= count,
                                           timeout=10)

    def join(self):
        for thread in self.threads:
            thread.join(10)
            assert not thread.is_alive()


class Hanging(object):
    """A resolver call that hangs until ``release`` is set; ``entered``
    counts the calls under way."""

    def __init__(self):
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def __call__(self, *args):
        self.entered.release()
        self.release.wait(30)
        return []

    def wait_entered(self, count):
        return all(self.entered.acquire(timeout=10) for _ in range(count))


def test_the_dns_list_cache_keeps_its_bound():
    """50,000 addresses of one /64, two zones: the cache keeps its
    ``cache_size`` answers, not 100,000."""
    lists = smtpproxy.DNSLists()
    for number in range(50000):
        lists.listing("2001:db8::%x" % number, [BL, WL], lambda name: (),
                      5, 600)
    assert len(lists) == lists.cache_size == 10000
    # The last answers asked are those kept.
    resolver = Resolver()
    lists.listing("2001:db8::%x" % 49999, [BL, WL], resolver.addresses, 5,
                  600)
    assert resolver.asked == []


def test_list_lookups_run_on_the_bounded_lookup_threads(pool):
    """40 clients against a zone that never answers: 4 lookup threads
    (the limit), no thread of its own per query; the others are not
    asked (not listed) and return at once."""
    threads = pool(limit=4, reserve=0)  # the zone's share (10) is more
    resolver = Hanging()
    lists = smtpproxy.DNSLists()
    before = set(threading.enumerate())
    callers = Callers(lists.listing, [("192.0.%d.7" % n, [BL], resolver, 30,
                                       600) for n in range(40)])
    try:
        assert resolver.wait_entered(4)
        assert callers.wait_finished(36)
        assert callers.results == [set()] * 36
        started = set(threading.enumerate()) - before - set(callers.threads)
        assert len(started) == threads.count == 4
        assert threads.held(BL) == 4    # counted as the list's
        assert set(thread.name for thread in started) == {"lookup"}
    finally:
        resolver.release.set()
    callers.join()


def test_lookup_owners_are_networks():
    assert smtpproxy.lookup_owner("192.0.2.7") == "192.0.2.0/24"
    assert smtpproxy.lookup_owner("::ffff:192.0.2.7") == "192.0.2.0/24"
    assert smtpproxy.lookup_owner("2001:db8:1:2::7") == "2001:db8:1::/48"


def test_a_network_whose_lookups_hang_leaves_threads_to_the_others(
        pool, caplog):
    """30 sessions of 198.51.100.0/24, whose reverse zone never answers,
    against 20 lookup threads: that network holds its share (5), its
    other lookups fail at once, logged once; a client of another network
    gets its names."""
    threads = pool(limit=20, share=5, reserve=0)
    hanging = Hanging()

    def reverse(address):
        if address.startswith("198.51.100."):
            return hanging(address)
        return ["mx.out.example.com"]

    def forward(name):
        return {"192.0.2.7"}
    with caplog.at_level(logging.WARNING, logger="smtpproxy"):
        callers = Callers(smtpproxy.confirmed_names, [
            ("198.51.100.%d" % n, reverse, forward, 3, 30)
            for n in range(1, 31)])
        try:
            assert hanging.wait_entered(5)
            assert callers.wait_finished(25)
            assert callers.results == [(False, [], None)] * 25
            assert threads.held("198.51.100.0/24") == 5
            assert smtpproxy.confirmed_names(
                "192.0.2.7", reverse, forward, 3, 30) == (
                    True, ["mx.out.example.com"], "mx.out.example.com")
        finally:
            hanging.release.set()
        callers.join()
    shares = [r for r in caplog.records if "its share" in r.getMessage()]
    assert len(shares) == 1
    assert "client network 198.51.100.0/24 holds 5" in shares[0].getMessage()


def trusted(grey, client):
    """``client``'s network earns the auto-whitelist (with
    auto_whitelist_clients = 1): a triplet that waited and came back."""
    decide(grey, client, now=T0)
    decide(grey, client, now=T0 + 3600)
    assert decide(grey, client, recipient="c@example.org",
                  now=T0 + 3700).rule.startswith("auto-whitelist")


def test_a_listed_client_holding_its_networks_lookups_is_still_listed(
        engine, pool):
    """A client on a dnsbl whose network is trusted, and whose other
    sessions hold its network's share of the lookup threads (reverse
    lookups that hang in a zone it controls): the list is asked all the
    same (list queries count as the list's, not the client's), so it is
    greylisted as listed, not let through by the auto-whitelist."""
    threads = pool()                    # the defaults: a share of 10
    grey = engine(dnsbl=[BL], auto_whitelist_clients=1, dns_cache_time=0,
                  dns_timeout=30)
    trusted(grey, "192.0.2.7")
    hanging = Hanging()
    callers = Callers(smtpproxy.confirmed_names, [
        ("192.0.2.%d" % n, hanging, lambda name: set(), 3, None)
        for n in range(10, 10 + threads.share)])
    try:
        assert hanging.wait_entered(threads.share)
        assert threads.held("192.0.2.0/24") == threads.share
        listed = listing("192.0.2.7", BL, "127.0.0.2")
        decision = decide(grey, "192.0.2.7", None, listed,
                          recipient="d@example.org", now=T0 + 3800)
    finally:
        hanging.release.set()
    callers.join()
    assert listed.asked == [smtpproxy.dns_list_query("192.0.2.7", BL)]
    assert (decision.verdict, decision.rule) == (
        "defer", "dnsbl:%s network:192.0.2.0/24" % BL)


def test_a_dnsbl_not_asked_keeps_the_client_from_the_auto_whitelist(
        engine, pool, caplog):
    """Every lookup thread busy: the lists are not asked.  A dnsbl not
    asked counts as a listing for the auto-whitelist (the client is
    greylisted, not refused), logged once per zone and 10 minutes; a
    dnswl not asked whitelists nobody."""
    threads = pool(limit=4)
    grey = engine(dnsbl=[BL], dnswl=[WL], auto_whitelist_clients=1,
                  dns_cache_time=0, dns_timeout=30)
    trusted(grey, "192.0.2.7")
    hanging = Hanging()
    try:
        assert all(threads.submit(hanging) for _ in range(4))
        resolver = Resolver(forward={
            smtpproxy.dns_list_query("192.0.2.7", WL): {"127.0.10.2"}})
        with caplog.at_level(logging.WARNING, logger="smtpproxy"):
            decisions = [decide(grey, "192.0.2.7", None, resolver,
                                recipient=recipient, now=T0 + 3800)
                         for recipient in ("d@example.org",
                                           "e@example.org")]
    finally:
        hanging.release.set()
    assert resolver.asked == []
    assert [(d.verdict, d.rule) for d in decisions] == [
        ("defer", "dnsbl-not-asked:%s network:192.0.2.0/24" % BL)] * 2
    unasked = [r.getMessage() for r in caplog.records
               if "not asked" in r.getMessage()]
    assert len(unasked) == 2            # one per zone
    assert any(BL in message and "auto-whitelist" in message
               for message in unasked)


@pytest.mark.parametrize("silent_time, asked", [(60, 1), (0, 2)])
def test_a_network_whose_lookup_timed_out_is_not_asked_for_a_while(
        pool, silent_time, asked):
    """A reverse lookup of 198.51.100.7 that times out: for
    ``silent_time`` seconds, 198.51.100.8 (same /24) gets no names at
    once, its lookup not made; 192.0.2.7 is asked as ever."""
    pool(silent_time=silent_time)
    hanging = Hanging()
    try:
        for address in ("198.51.100.7", "198.51.100.8"):
            assert smtpproxy.confirmed_names(
                address, hanging, lambda name: set(), 3, 0.2) == (
                    False, [], None)
        assert hanging.wait_entered(asked)
        assert not hanging.entered.acquire(blocking=False)
    finally:
        hanging.release.set()
    assert smtpproxy.confirmed_names(
        "192.0.2.7", lambda address: ["mx.out.example.com"],
        lambda name: {"192.0.2.7"}, 3, 0.2)[2] == "mx.out.example.com"


@pytest.mark.parametrize("silent_time, second", [
    (60, "not asked: a lookup of its network timed out in the last 60 s"),
    (0, "not made: no lookup thread free for it (the lookup threads' "
        "warning says why)")])
def test_the_log_says_why_a_client_has_no_name(
        proxy, tmp_path, pool, caplog, silent_time, second):
    """The reverse lookup of 127.0.0.2 hangs: "no answer within 0.2 s".
    The next session, of 127.0.0.3 (same /24), makes none, and the log
    says so rather than that it waited: its network is silent for a
    minute, or (silent_time = 0) holds its share of the lookup threads
    (here 1) with the lookup that still hangs."""
    pool(silent_time=silent_time, share=1)
    never = threading.Event()
    port = proxy(handler=smtpproxy.GreyListingPolicy,
                 greylist_db=str(tmp_path / "names.db"),
                 allowed_senders=[], allowed_domains=["example.org"],
                 dns_timeout=0.2,
                 reverse_lookup=lambda self, ip: never.wait(30) and [],
                 forward_lookup=lambda self, name: set())
    with caplog.at_level(logging.INFO, logger="smtpproxy"):
        try:
            for source in ("127.0.0.2", "127.0.0.3"):
                client = RawClient(port, source=source)
                client.cmd("EHLO mx.example.net")
                client.cmd("MAIL FROM:<a@example.net>")
                assert client.cmd("RCPT TO:<b@example.org>")[0] == 451
                client.close()
        finally:
            never.set()
    assert [r.getMessage() for r in caplog.records
            if r.getMessage().startswith("reverse lookup of")] == [
        "reverse lookup of 127.0.0.2: no answer within 0.2 s",
        "reverse lookup of 127.0.0.3: " + second]


def test_the_last_lookup_threads_are_kept_for_networks_holding_none(pool):
    """10 threads, a share of 5, 4 kept in reserve: network A takes 5;
    B one, not two (only 4 free); C to F one each; then none is left."""
    threads = pool(limit=10, share=5, reserve=4)
    hanging = Hanging()
    taken = []
    try:
        for network, tries in (("A", 6), ("B", 2), ("C", 1), ("D", 1),
                               ("E", 1), ("F", 1), ("G", 1)):
            taken.append(sum(threads.submit(hanging, network)
                             for _ in range(tries)))
        assert taken == [5, 1, 1, 1, 1, 1, 0]
        assert threads.count == 10
    finally:
        hanging.release.set()
