"""GreyListingPolicy: relay refusal, allow-lists, whitelisted triples and
greylisting through the store, with the policy's clock set by the test."""

import smtplib
import sqlite3

import pytest

import smtpproxy
from conftest import RawClient

T0 = 1000000000.0


class Clock(object):
    def __init__(self):
        self.now = T0


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def grey(proxy, tmp_path, clock):
    """Start a GreyListingPolicy proxy: ``port = grey(**attributes)``."""
    def start(**attributes):
        attributes.setdefault("greylist_db", str(tmp_path / "grey.db"))
        attributes.setdefault("allowed_senders", [])
        attributes.setdefault("allowed_domains", ["example.org"])
        attributes["now"] = lambda self: clock.now
        return proxy(handler=smtpproxy.GreyListingPolicy, **attributes)
    return start


def rcpt(port, recipient, sender="a@example.net", helo="mx.example.net"):
    client = RawClient(port)
    assert client.cmd("EHLO " + helo)[0] == 250
    assert client.cmd("MAIL FROM:<%s>" % sender)[0] == 250
    reply = client.cmd("RCPT TO:<%s>" % recipient)
    client.cmd("QUIT")
    client.close()
    return reply


def test_unknown_triplet_is_deferred_then_accepted_in_the_window(
        grey, clock, upstream):
    port = grey()
    # The reply says why (defer_reply).
    assert rcpt(port, "b@example.org") == (
        451, "4.7.1 Greylisted, please try again later")
    assert upstream.connections == 0        # deferred: upstream never asked
    clock.now += 3600
    assert rcpt(port, "b@example.org")[0] == 250
    clock.now += 10
    assert rcpt(port, "b@example.org")[0] == 250


def test_retry_too_soon_restarts_the_clock(grey, clock):
    port = grey()
    assert rcpt(port, "b@example.org")[0] == 451
    clock.now += 100
    assert rcpt(port, "b@example.org")[0] == 451
    clock.now += 250                        # 350 after the first try
    assert rcpt(port, "b@example.org")[0] == 451
    clock.now += 50                         # 300 after the hasty retry
    assert rcpt(port, "b@example.org")[0] == 250


def test_timings_are_configurable(grey, clock):
    port = grey(too_soon=1, min_defer_time=5, max_defer_time=10)
    assert rcpt(port, "b@example.org")[0] == 451
    clock.now += 5
    assert rcpt(port, "b@example.org")[0] == 250


@pytest.mark.parametrize("prefix,key", [
    (24, "127.0.0.0/24 a@example.net b@example.org"),
    (32, "127.0.0.1/32 a@example.net b@example.org"),
])
def test_greylisting_key_is_client_network_sender_recipient(
        grey, tmp_path, prefix, key):
    port = grey(ipv4_prefix=prefix)
    assert rcpt(port, "B@Example.org", sender="A+x@Example.NET")[0] == 451
    connection = sqlite3.connect(str(tmp_path / "grey.db"))
    assert connection.execute("SELECT key FROM triplets").fetchall() == [
        (key,)]
    connection.close()


@pytest.mark.parametrize("peer,key", [
    ("192.0.2.77", "192.0.2.0/24"),
    ("2001:db8:1:2:3::4", "2001:db8:1:2::/64"),
])
def test_client_network(peer, key):
    engine = smtpproxy.Greylister(smtpproxy.GreyListingPolicy)
    assert engine.client_network(peer) == key


def test_sender_tags_do_not_make_a_new_sender(grey, clock):
    port = grey()
    assert rcpt(port, "b@example.org", sender="a+1@example.net")[0] == 451
    clock.now += 3600
    assert rcpt(port, "b@example.org",
                sender="prvs=0123abcd=A+2@Example.NET")[0] == 250


@pytest.mark.parametrize("recipient", [
    "b@example.com",                    # not our domain
    "b@sub.example.org",                # subdomain not listed
    "@relay.example.org:b@example.com", # source route
    "b%example.com@example.org",        # % hack
    "example.com!b@example.org",        # ! path
    '"b@example.com"@example.org',      # quoted local-part with @
    "b@[127.0.0.1]",                    # address literal
])
def test_relaying_is_refused(grey, recipient, upstream):
    port = grey()
    assert rcpt(port, recipient) == (550, "5.7.1 Relaying denied")
    assert upstream.connections == 0


def test_domains_compare_without_case_and_postmaster_is_ours(grey, clock):
    port = grey(allowed_domains=["Example.ORG"])
    assert rcpt(port, "b@EXAMPLE.org")[0] == 451
    assert rcpt(port, "Postmaster")[0] == 451


def test_allowed_senders_may_relay_anywhere(grey):
    port = grey(allowed_senders=["127.0.0.1"])
    assert rcpt(port, "anyone@example.com")[0] == 250


@pytest.mark.parametrize("nets,relays", [
    (["127.0.0"], True),
    (["127.0.0.0/8"], True),
    (["127.0.0.1"], True),
    (["127.0.0.10"], False),
    (["127.0.0.10/32"], False),
    (["12"], False),                     # whole octets: not 127
    (["::1/128"], False),
])
def test_allowed_sender_nets(grey, nets, relays):
    port = grey(allowed_sender_nets=nets)
    code = rcpt(port, "anyone@example.com")[0]
    assert (code == 250) is relays


def test_whitelisted_triples_skip_greylisting(grey):
    port = grey(whitelisted_triples=[
        ("127.0.0.1", "<a@example.net>", "<b@example.org>")])
    assert rcpt(port, "b@example.org")[0] == 250
    assert rcpt(port, "c@example.org")[0] == 451


def test_whitelisted_nonstandard_triples(grey):
    port = grey(whitelisted_nonstandard_triples=[
        ("mx-out.example.net", "127.0.0", "<b@example.org>")])
    assert rcpt(port, "b@example.org", helo="mx-out.example.net")[0] == 250
    assert rcpt(port, "b@example.org", helo="other.example.net")[0] == 451


def test_accepted_mail_is_delivered_deferred_is_logged(grey, clock,
                                                      upstream):
    port = grey()
    with smtplib.SMTP("127.0.0.1", port) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("a@example.net", ["b@example.org"], b"x\r\n")
    clock.now += 3600
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.sendmail("a@example.net", ["b@example.org"], b"x\r\n")
    assert [m.rcpt_tos for m in upstream.messages] == [["b@example.org"]]


def test_normalise_sender():
    normalise = smtpproxy.normalise_sender
    assert normalise("User+tag@Example.COM") == "user@example.com"
    assert normalise("prvs=1234abcd=user@example.com") == "user@example.com"
    assert normalise("SRS0=HHH=TT=orig.example=alice@fwd.example") == \
        "alice@orig.example"
    assert normalise("bounce-123@lists.example") == \
        normalise("bounce-456@lists.example")
    assert normalise("") == ""


def test_reversed_batv_sender_keeps_one_key_across_tags_as_postgrey():
    # postgrey 1.37's do_sender_substitutions: prvs=A=B, the user is the
    # one of A and B that does not begin with ten letters or digits (a
    # tag-val), B when both or neither do.
    normalise = smtpproxy.normalise_sender
    for tag in ("0123456789", "1abcdef234", "0999fedcba"):
        assert normalise("prvs=alice=%s@example.net" % tag) == \
            "alice@example.net"
        assert normalise("prvs=%s=alice@example.net" % tag) == \
            "alice@example.net"
    # Both look like tags (or neither): the standard's order.
    assert normalise("prvs=alicesmith=0123456789@example.net") == \
        "#@example.net"
    assert normalise("prvs=bob=carol@example.net") == "carol@example.net"


@pytest.mark.parametrize("mode,code", [("accept", 250), ("defer", 451)])
def test_store_failure_falls_back_and_is_logged_once(grey, tmp_path, mode,
                                                     code, caplog):
    unusable = tmp_path / "a-directory"
    unusable.mkdir()
    port = grey(greylist_db=str(unusable), greylist_fail_mode=mode)
    with caplog.at_level("ERROR", logger="smtpproxy"):
        assert rcpt(port, "b@example.org")[0] == code
        assert rcpt(port, "c@example.org")[0] == code
    errors = [r for r in caplog.records if "greylisting store" in
              r.getMessage()]
    assert len(errors) == 1


def test_command_line_runs_greylisting_by_default(proxy_process, tmp_path,
                                                  upstream):
    process = proxy_process(handler=None, config=(
        "greylist_db = %s\n"
        "allowed_senders:\n"
        "allowed_domains:\n"
        "    example.org\n" % (tmp_path / "default.db")))
    assert rcpt(process.port, "b@example.com")[0] == 550
    assert rcpt(process.port, "b@example.org")[0] == 451
    assert upstream.connections == 0


@pytest.mark.parametrize("threshold,trusted", [(2, True), (0, False)])
def test_auto_whitelisted_client_network_is_accepted_at_once(
        grey, clock, threshold, trusted):
    port = grey(auto_whitelist_clients=threshold)
    # Two greylisting passes an hour apart (a client's count grows at
    # most once an hour).
    for sender in ("one@example.net", "two@example.net"):
        assert rcpt(port, "b@example.org", sender=sender)[0] == 451
        clock.now += 3600
        assert rcpt(port, "b@example.org", sender=sender)[0] == 250
    code = rcpt(port, "b@example.org", sender="new@example.net")[0]
    assert (code == 250) is trusted


def test_fifty_concurrent_sessions_decide_as_a_serial_run(grey, clock):
    import threading
    port = grey(auto_whitelist_clients=0)
    results = []

    def session(number):
        sender = "s%s@example.net" % "abcde"[number % 5]
        results.append(rcpt(port, "b@example.org", sender=sender)[0])

    def wave():
        del results[:]
        threads = [threading.Thread(target=session, args=(n,))
                   for n in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        return sorted(results)

    assert wave() == [451] * 50             # 5 triplets, all first tries
    clock.now += 3600
    assert wave() == [250] * 50             # all inside the window


def deliver(port, sender="a@example.net", recipients=("b@example.org",)):
    with smtplib.SMTP("127.0.0.1", port) as client:
        return client.sendmail(sender, list(recipients),
                               b"Subject: t\r\n\r\nbody\r\n")


@pytest.mark.parametrize("header", [True, False])
def test_x_greylist_header_on_delayed_mail_only(grey, clock, upstream,
                                                header):
    port = grey(x_greylist_header=header)
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        deliver(port)
    clock.now += 3725
    deliver(port)                           # the delayed one
    clock.now += 10
    deliver(port)                           # already passed: no delay
    first, second = [m.content for m in upstream.messages]
    assert second == b"Subject: t\r\n\r\nbody\r\n"
    if header:
        assert first.startswith(
            b"X-Greylist: delayed 3725 seconds by smtpproxy-")
        assert first.endswith(b"\r\nSubject: t\r\n\r\nbody\r\n")
    else:
        assert first == second


class Resolver(object):
    """Stands in for DNS: PTR names and forward addresses."""

    def __init__(self, reverse, forward):
        self.reverse, self.forward = reverse, forward


@pytest.fixture
def whitelisted(grey, tmp_path):
    def start(lines, reverse=(), forward=()):
        path = tmp_path / "clients"
        path.write_text("# whitelisted clients\n" + "\n".join(lines) + "\n")
        resolver = Resolver(list(reverse), dict(forward))
        return grey(whitelist_clients=str(path),
                    reverse_lookup=lambda self, ip: resolver.reverse,
                    forward_lookup=lambda self, name:
                    resolver.forward.get(name, set()))
    return start


@pytest.mark.parametrize("lines,reverse,forward,accepted", [
    (["127.0.0.1"], [], {}, True),
    (["127.0.0.0/8"], [], {}, True),
    (["127.0"], [], {}, True),
    (["192.0.2.0/24"], [], {}, False),
    # A name counts only when its forward lookup confirms the PTR.
    (["mail.example.net"], ["mail.example.net"],
     {"mail.example.net": {"127.0.0.1"}}, True),
    (["example.net"], ["out1.mail.example.net"],
     {"out1.mail.example.net": {"127.0.0.1"}}, True),
    (["example.net"], ["out1.mail.example.net"],
     {"out1.mail.example.net": {"192.0.2.1"}}, False),     # PTR lies
    (["example.net"], ["badexample.net"],
     {"badexample.net": {"127.0.0.1"}}, False),            # not a suffix
    (["example.net"], [], {}, False),                      # no PTR
])
def test_whitelist_clients_with_forward_confirmed_names(
        whitelisted, lines, reverse, forward, accepted):
    port = whitelisted(lines, reverse, forward)
    code = rcpt(port, "b@example.org")[0]
    assert (code == 250) is accepted


def test_whitelisted_client_may_still_not_relay(whitelisted):
    port = whitelisted(["127.0.0.1"])
    assert rcpt(port, "b@example.com")[0] == 550


def test_forward_lookups_ask_the_system_resolver():
    """What the handlers' forward_lookup() answers by default: the
    system's resolver (/etc/hosts names localhost), nothing for a name
    that cannot exist (RFC 6761)."""
    assert "127.0.0.1" in smtpproxy.resolve_addresses("localhost")
    assert smtpproxy.resolve_addresses("name.invalid") == set()


def test_trailing_dot_domain_is_refused_before_the_upstream(grey, upstream):
    port = grey()
    code, _ = rcpt(port, "b@example.org.")
    assert code in (501, 550)
    assert upstream.connections == 0


def test_transaction_log_records_the_decision(grey, clock, upstream):
    import logging
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect()
    logger = logging.getLogger("smtpproxy.transactions")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        port = grey()
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            deliver(port)
        clock.now += 3600
        deliver(port)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    fields = [line.split(" | ") for line in records]
    assert [f[3:6] for f in fields] == [
        ["<a@example.net>", "<b@example.org>", "DEFERRED"],
        ["<a@example.net>", "<b@example.org>", "ACCEPTED"]]


def test_missing_whitelist_clients_file_is_logged_once(grey, tmp_path,
                                                       caplog):
    port = grey(whitelist_clients=str(tmp_path / "missing"))
    with caplog.at_level("ERROR", logger="smtpproxy"):
        assert rcpt(port, "b@example.org")[0] == 451
        assert rcpt(port, "c@example.org")[0] == 451
    errors = [r.getMessage() for r in caplog.records
              if "whitelist_clients" in r.getMessage()]
    assert len(errors) == 1 and "missing" in errors[0]
