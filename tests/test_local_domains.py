"""Which recipient domains are ours (allowed_domains, issue 21): one rule
that the upstream, which gets the address as it was written, agrees with.
ASCII letters compare without case and a final dot does not count; a name
with non-ASCII letters (SMTPUTF8) is ours only if listed exactly as
written: no IDNA 2003 nameprep (fullwidth letters, the soft hyphen, sharp
s), no Unicode case folding, no NFC; an A-label (xn--...) matches only an
A-label.  The same rule in whitelists and greylisting keys."""

import pytest

import smtpproxy
from conftest import ProxyFactory, RawClient, Upstream

FULLWIDTH_CLASS = "\uff43\uff4c\uff41\uff53\uff53"      # class, fullwidth
SOFT_HYPHEN = "\u00ad"
SHARP_S = "\u00df"
KELVIN = "\u212a"                                       # lower(): "k"


def engine(*domains):
    class Policy(smtpproxy.GreyListingPolicy):
        allowed_domains = list(domains)
    return smtpproxy.Greylister(Policy)


def test_fullwidth_letters_are_not_the_ascii_domain():
    assert not engine("class.org").is_local_recipient(
        "bob@%s.org" % FULLWIDTH_CLASS)


def test_a_soft_hyphen_is_not_dropped():
    assert not engine("class.org").is_local_recipient(
        "bob@cl%sass.org" % SOFT_HYPHEN)


def test_sharp_s_is_not_ss():
    assert not engine("strasse.de").is_local_recipient(
        "bob@stra%se.de" % SHARP_S)
    listed = engine("stra%se.de" % SHARP_S)
    assert listed.is_local_recipient("bob@stra%se.de" % SHARP_S)
    assert not listed.is_local_recipient("bob@strasse.de")


def test_ascii_letters_compare_without_case_and_final_dot():
    policy = engine("class.org", "mail.example.org.")
    assert policy.is_local_recipient("Bob@Class.ORG")
    assert policy.is_local_recipient("bob@MAIL.example.org")
    assert policy.is_local_recipient("bob@mail.example.org.")
    assert not policy.is_local_recipient("bob@sub.class.org")
    # Only ASCII letters: the Kelvin sign, which str.lower() makes "k",
    # is not a k.
    assert engine("kample.org").is_local_recipient("x@Kample.org")
    assert not engine("kample.org").is_local_recipient(
        "x@%sample.org" % KELVIN)


def test_non_ascii_letters_only_as_listed():
    policy = engine("b\u00fccher.example")
    assert policy.is_local_recipient("j\u00fcrgen@b\u00fccher.example")
    assert policy.is_local_recipient("j\u00fcrgen@B\u00fcCHER.example")
    assert not policy.is_local_recipient("x@B\u00dccher.example")
    # Decomposed (u and a combining diaeresis): another name, not NFC'd.
    assert not policy.is_local_recipient("x@bu\u0308cher.example")
    assert not policy.is_local_recipient("x@xn--bcher-kva.example")


def test_an_a_label_entry_matches_only_the_a_label():
    policy = engine("xn--bcher-kva.example")
    assert policy.is_local_recipient("x@xn--bcher-kva.example")
    assert policy.is_local_recipient("x@XN--Bcher-KVA.example")
    assert not policy.is_local_recipient("x@b\u00fccher.example")


@pytest.mark.parametrize("entry", [
    "%s.org" % FULLWIDTH_CLASS,         # nameprep would make it class.org
    "cl%sass.org" % SOFT_HYPHEN,        # ... classorg, invisibly
    "B\u00fccher.example",              # capitals: mail never matches
    "bu\u0308cher.example",             # not NFC
])
def test_entries_that_nameprep_would_map_are_refused(entry):
    with pytest.raises(ValueError) as caught:
        smtpproxy._domain(entry)
    assert "expected a domain name" in str(caught.value)


@pytest.mark.parametrize("entry", [
    "xn--bcher-kva.example", "b\u00fccher.example", "stra%se.de" % SHARP_S,
    "\u7528\u6237.example", "Example.ORG.",
])
def test_entries_as_mail_is_written_are_kept_as_written(entry):
    assert smtpproxy._domain(entry) == entry


def test_whitelists_and_keys_tell_the_same_domains_apart():
    policy = engine("kample.org")
    kelvin = "x@%sample.org" % KELVIN
    assert policy.triplet_key("192.0.2", "a@example.net", kelvin) != (
        policy.triplet_key("192.0.2", "a@example.net", "x@kample.org"))
    assert policy.triplet_key("192.0.2", "a@example.net", "X@Kample.ORG") \
        == policy.triplet_key("192.0.2", "a@example.net", "x@kample.org")
    listed = smtpproxy.ListFile(["kample.org", "y@kample.org"])
    assert listed.has_recipient("x@KAMPLE.org")
    assert not listed.has_recipient(kelvin)
    assert not listed.has_recipient("y@%sample.org" % KELVIN)


def test_a_fullwidth_domain_is_refused_end_to_end(tmp_path):
    upstream = Upstream(enable_SMTPUTF8=True)
    proxies = ProxyFactory(upstream)
    try:
        port = proxies(handler=smtpproxy.GreyListingPolicy,
                       greylist_db=str(tmp_path / "grey.db"),
                       allowed_senders=[], allowed_domains=["class.org"])
        client = RawClient(port)
        assert client.cmd("EHLO mx.example.net")[0] == 250
        assert client.cmd("MAIL FROM:<a@example.net> SMTPUTF8")[0] == 250
        code, text = client.cmd("RCPT TO:<bob@%s.org>" % FULLWIDTH_CLASS)
        assert (code, text[:6]) == (550, "5.7.1 ")
        # The ASCII name is ours: greylisted, not refused.
        assert client.cmd("RCPT TO:<bob@Class.org>")[0] == 451
        client.cmd("QUIT")
        client.close()
        assert upstream.connections == 0
    finally:
        proxies.stop()
        upstream.stop()


def test_a_key_written_by_the_administrator_is_the_proxys():
    # As the proxy writes it: capital U with diaeresis stays one.
    policy = engine("b\u00fccher.example")
    recipient = "J\u00fcrgen@B\u00dccher.example"
    assert smtpproxy.parse_store_key(
        "192.0.2.7 a@example.net " + recipient) == policy.triplet_key(
            "192.0.2.0/24", "a@example.net", recipient)
