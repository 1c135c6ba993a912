"""The greylisting engine on its own: Greylister decides for a client
address, a sender and a recipient at a given time, with no socket and no
session around it; its configuration is a policy class's attributes."""

import time

import pytest

import smtpproxy

T0 = 1000000000.0


def verdict(decision):
    return decision.verdict, decision.rule


def test_a_new_triplet_waits_then_passes_in_the_window(engine):
    grey = engine()
    first = grey.decide("192.0.2.7", "a+1@example.net", "B@example.org", T0)
    assert verdict(first) == ("defer", "network:192.0.2.0/24")
    assert first.key == "192.0.2.0/24 a@example.net b@example.org"
    assert not first.accepted
    # From another address of the network, with another tag: the same.
    again = grey.decide("192.0.2.99", "a+2@example.net", "b@example.org",
                        T0 + 3600)
    assert verdict(again) == ("accept", "network:192.0.2.0/24")
    assert again.delay == 3600 and again.accepted
    later = grey.decide("192.0.2.7", "a@example.net", "b@example.org",
                        T0 + 3700)
    assert later.accepted and later.delay is None


def test_the_policy_timings_are_the_engines(engine):
    grey = engine(min_defer_time=300, too_soon=60)
    grey.decide("192.0.2.7", "a@example.net", "b@example.org", T0)
    assert grey.decide("192.0.2.7", "a@example.net", "b@example.org",
                       T0 + 300).accepted


@pytest.mark.parametrize("client, recipient, expected", [
    ("127.0.0.1", "x@elsewhere.example", ("relay", "allowed_senders")),
    ("10.1.2.3", "x@elsewhere.example", ("relay", "allowed_senders")),
    ("192.0.2.7", "x@elsewhere.example", ("refuse", "not-local")),
    ("192.0.2.7", "a%b@example.org", ("refuse", "not-local")),
    ("192.0.2.7", "Postmaster", ("defer", "network:192.0.2.0/24")),
])
def test_relay_and_refusal_come_before_greylisting(engine, client,
                                                   recipient, expected):
    grey = engine(allowed_sender_nets=["10"])
    assert verdict(grey.decide(client, "a@example.net", recipient,
                               T0)) == expected


def test_a_recipient_rule_decides_which_recipients_are_greylisted(
        engine):
    # The policy service's: Postfix did the relay control, so its rule
    # greylists what allowed_domains' would refuse, and may refuse ours.
    settings = engine().settings
    ruled = smtpproxy.Greylister(
        settings, recipient_rule=lambda recipient: "%" in recipient)
    assert verdict(ruled.decide("192.0.2.7", "a@example.net",
                                "a%b@example.org", T0)) == (
        "defer", "network:192.0.2.0/24")
    assert verdict(ruled.decide("192.0.2.7", "a@example.net",
                                "b@example.org", T0)) == (
        "refuse", "not-local")
    # Allowed clients still relay before any rule is asked.
    assert verdict(ruled.decide("127.0.0.1", "a@example.net",
                                "b@example.org", T0)) == (
        "relay", "allowed_senders")
    assert ruled.recipient_rule is not None
    assert smtpproxy.Greylister(settings).recipient_rule is None


def test_whitelisted_triples_pass_at_once(engine):
    grey = engine(
        whitelisted_triples=[("192.0.2.7", "<a@example.net>",
                              "<b@example.org>")],
        whitelisted_nonstandard_triples=[("mx.example.net", "198.51.100",
                                          "<c@example.org>")])
    assert verdict(grey.decide("192.0.2.7", "A@example.net",
                               "b@example.org", T0)) == (
        "accept", "whitelisted_triples")
    assert verdict(grey.decide("198.51.100.9", "z@example.net",
                               "c@example.org", T0,
                               helo="MX.example.net")) == (
        "accept", "whitelisted_triples")
    assert grey.decide("198.51.100.9", "z@example.net", "c@example.org",
                       T0, helo="other.example").verdict == "defer"


def test_a_whitelist_file_name_is_looked_up_only_when_needed(engine,
                                                             tmp_path):
    listed = tmp_path / "clients"
    listed.write_text("192.0.2.0/24\nout.example.com\n")
    grey = engine(whitelist_clients=str(listed))
    asked = []

    def hostname():
        asked.append(True)
        return "mx1.out.example.com"
    assert verdict(grey.decide("192.0.2.7", "a@example.net",
                               "b@example.org", T0, hostname=hostname)) == (
        "accept", "whitelist_clients")
    assert asked == []                       # the network matched first
    assert grey.decide("198.51.100.1", "a@example.net", "b@example.org",
                       T0, hostname=hostname).verdict == "accept"
    assert asked == [True]
    assert grey.decide("198.51.100.1", "a@example.net", "b@example.org",
                       T0, hostname=None).verdict == "defer"


def test_an_auto_whitelisted_network_passes_at_once(engine):
    grey = engine(auto_whitelist_clients=1)
    grey.decide("192.0.2.7", "a@example.net", "b@example.org", T0)
    grey.decide("192.0.2.7", "a@example.net", "b@example.org", T0 + 3600)
    assert verdict(grey.decide("192.0.2.8", "new@example.net",
                               "c@example.org", T0 + 3700)) == (
        "accept", "auto-whitelist network:192.0.2.0/24")


def test_resends_of_one_passed_triplet_never_trust_the_network(engine):
    # The case: one triplet passed, then resent four times a
    # minute apart (and once more an hour later); with the default five
    # passes, the network is not trusted: only greylisting passes count,
    # each triplet once.
    grey = engine()
    grey.decide("192.0.2.7", "a@example.net", "b@example.org", T0)
    passed = T0 + 3600
    for resend in (0, 60, 120, 180, 240, 3600):
        assert grey.decide("192.0.2.7", "a@example.net", "b@example.org",
                           passed + resend).accepted
    assert verdict(grey.decide("192.0.2.8", "new@example.net",
                               "c@example.org", passed + 3700)) == (
        "defer", "network:192.0.2.0/24")


def test_five_passes_within_a_second_count_as_one(engine):
    grey = engine(auto_whitelist_clients=2)
    senders = ["%s@example.net" % name for name in "abcde"]
    for sender in senders:
        grey.decide("192.0.2.7", sender, "b@example.org", T0)
    for number, sender in enumerate(senders):
        assert grey.decide("192.0.2.7", sender, "b@example.org",
                           T0 + 3600 + number * 0.2).delay == \
            pytest.approx(3600 + number * 0.2)
    assert verdict(grey.decide("192.0.2.8", "new@example.net",
                               "c@example.org", T0 + 3601)) == (
        "defer", "network:192.0.2.0/24")


@pytest.mark.parametrize("mode", ["accept", "defer"])
def test_a_broken_store_decides_by_the_fail_mode(engine, tmp_path, mode):
    unusable = tmp_path / "a-directory"
    unusable.mkdir()
    grey = engine(greylist_db=str(unusable), greylist_fail_mode=mode)
    decision = grey.decide("192.0.2.7", "a@example.net", "b@example.org",
                           T0)
    assert verdict(decision) == (mode, "store-failed")
    assert decision.error is not None


# -- the client's names: FCrDNS in one lookup job (confirmed_names) ----------

def slow(answer, seconds):
    def lookup(_):
        time.sleep(seconds)             # a resolver taking its time
        return answer
    return lookup


def test_confirmed_names_take_the_first_name_that_resolves_back():
    forward = {"a.example.net": {"192.0.2.9"},
               "b.example.net": {"192.0.2.7"}}
    assert smtpproxy.confirmed_names(
        "192.0.2.7", lambda _: ["192.0.2.7", "A.example.net.", "b.example.net"],
        forward.get, 3, 5) == (
        True, ["A.example.net.", "b.example.net"], "b.example.net")
    # Only ``tries`` names are looked up.
    assert smtpproxy.confirmed_names(
        "192.0.2.7", lambda _: ["a.example.net", "b.example.net"],
        forward.get, 1, 5)[2] is None


def test_confirmed_names_give_each_lookup_its_own_deadline():
    # 0.3 s each, 0.5 s allowed each: confirmed, after 0.6 s in all.
    start = time.monotonic()
    assert smtpproxy.confirmed_names(
        "192.0.2.7", slow(["a.example.net"], 0.3),
        slow({"192.0.2.7"}, 0.3), 3, 0.5) == (
        True, ["a.example.net"], "a.example.net")
    assert time.monotonic() - start >= 0.6


@pytest.mark.parametrize("seconds", [0, None])
def test_confirmed_names_without_a_deadline_wait_for_the_answers(seconds):
    assert smtpproxy.confirmed_names(
        "192.0.2.7", slow(["a.example.net"], 0.2),
        slow({"192.0.2.7"}, 0.2), 3, seconds) == (
        True, ["a.example.net"], "a.example.net")


def test_confirmed_names_stop_at_a_lookup_that_does_not_answer():
    # The answers that come after the deadline are not used: waited for,
    # the PTR name would be in the result, and then confirmed.
    assert smtpproxy.confirmed_names(
        "192.0.2.7", slow(["a.example.net"], 5), slow(set(), 0), 3,
        0.3) == (False, [], None)
    # That timeout leaves 192.0.2.0/24 unasked for a minute: forgotten.
    smtpproxy.lookup_threads.forget_timeouts()
    assert smtpproxy.confirmed_names(
        "192.0.2.7", slow(["a.example.net", "b.example.net"], 0),
        slow({"192.0.2.7"}, 5), 3, 0.3) == (
        True, ["a.example.net", "b.example.net"], None)


def test_confirmed_names_take_a_failing_resolver_for_no_answer():
    def broken(_):
        raise OSError("resolver gone")
    assert smtpproxy.confirmed_names("192.0.2.7", broken, broken, 3,
                                     1) == (True, [], None)
    assert smtpproxy.confirmed_names(
        "192.0.2.7", lambda _: ["a.example.net"], broken, 3, 1) == (
        True, ["a.example.net"], None)
