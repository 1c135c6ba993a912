"""One greylist through a database failover: the PostgreSQL store on a
real primary and a real hot standby (tests/pg.py: initdb, pg_basebackup
-R, pg_ctl promote), as a site keeps its greylist when a database host
dies.  What is specified:

- the store finds the primary among the hosts of its URI, passes over a
  standby wherever it stands, and leaves a server that turns read-only;
- a decision waits at most greylist_db_timeout whatever the hosts: one
  that never answers holds the connector, not the decisions;
- after a failover, decisions go to the promoted standby, what was
  decided before it is known there, and the change of server is logged
  (an old primary that comes back as well, as an error);
- two proxies through a failover, with each greylist_fail_mode: what
  the clients hear while there is no primary, and after;
- the driver is imported before the switch to the serving user (in
  tests/test_root_files.py: it needs root).
"""

import itertools
import logging
import socket
import string
import threading

import pytest

import smtpproxy
from conftest import read, wait_until
from pg import PostgreSQL
from test_postgresql import SENDERS, proxies, rcpt  # noqa: F401 (fixture)

KEY = "192.0.2.0/24 a@example.net b@example.org"


@pytest.fixture
def pair():
    """A primary and its hot standby, and the URI of one database on
    both, the primary first: ``(primary, standby, uri)``."""
    primary = PostgreSQL()
    try:
        name = primary.database().rsplit("/", 1)[1]
        standby = primary.standby()
    except BaseException:
        primary.close()
        raise
    yield primary, standby, both(primary, standby, name)
    standby.close()
    primary.close()


def both(first, second, name):
    """The URI of database ``name`` on the hosts ``first``, ``second``."""
    return first.uri(name).replace(
        "127.0.0.1:%d/" % first.port,
        "127.0.0.1:%d,127.0.0.1:%d/" % (first.port, second.port))


def name_of(uri):
    return uri.rsplit("/", 1)[1].split("?")[0]


def caught_up(primary, standby):
    """Wait until the standby replayed all the primary wrote (decisions
    commit without waiting for the disk: the WAL writer sends them)."""
    position = primary.sql("SELECT pg_current_wal_insert_lsn()")
    wait_until(lambda: standby.sql(
        "SELECT pg_last_wal_replay_lsn() >= '%s'::pg_lsn" % position) == "t",
        timeout=30, what="the standby to replay %s" % position)


def read_only(cluster, value):
    """Make every session of ``cluster`` read-only ("on") or not: a
    reload, waited for until a new session sees it (the postmaster has
    then told the sessions already running, which take it before their
    next statement)."""
    cluster.sql("ALTER SYSTEM SET default_transaction_read_only = %s" % value)
    cluster.sql("SELECT pg_reload_conf()")
    wait_until(lambda: cluster.sql("SHOW default_transaction_read_only")
               == value, what="the reload")


class Store(smtpproxy.PostgreSQLStore):
    greylist_db_timeout = 2


def works(store, key):
    """The Step of ``key``, or None while the store fails."""
    try:
        return store.step(key, 0)
    except smtpproxy.StoreError:
        return None


@pytest.fixture
def store_log(caplog):
    caplog.set_level(logging.INFO, logger="smtpproxy")

    def lines(level=logging.INFO):
        return [record.getMessage() for record in caplog.records
                if record.levelno >= level
                and record.getMessage().startswith("greylisting store")]
    return lines


# -- finding the primary ------------------------------------------------------

def test_the_pause_after_failures_is_short():
    # Decisions fail at once while the connector pauses between attempts:
    # after the database is usable again, the next attempt is at most
    # retry_max away.
    assert smtpproxy.PostgreSQLStore.retry_min <= 0.25
    assert smtpproxy.PostgreSQLStore.retry_max <= 1.0


def test_a_standby_first_in_the_uri_is_passed_over(pair, store_log):
    primary, standby, uri = pair
    backwards = both(standby, primary, name_of(uri))
    store = Store(backwards)
    assert store.step(KEY, 0).new is True
    assert store.step(KEY, 0).new is False      # written on the primary
    assert any("on the server at 127.0.0.1:%d " % primary.port in line
               for line in store_log()), store_log()
    store.close()


def test_a_standby_alone_is_refused_saying_why(pair):
    primary, standby, uri = pair
    # target_session_attrs=any: the admin's choice is kept, and the store
    # refuses the standby itself.
    store = Store(standby.uri(name_of(uri)) + "?target_session_attrs=any")
    with pytest.raises(smtpproxy.StoreError) as caught:
        store.step(KEY, 0)
    assert "127.0.0.1:%d is a standby" % standby.port in str(caught.value)
    assert "secret" not in str(caught.value)
    store.close()


def test_a_server_that_turns_read_only_is_left_for_the_next_host(
        pair, store_log):
    primary, standby, uri = pair
    store = Store(uri)
    assert store.step(KEY, 0).new is True
    caught_up(primary, standby)
    # Two primaries (the standby promoted while the primary runs on, as a
    # failover manager may do), then the first one turns read-only.
    standby.promote()
    read_only(primary, "on")
    # The next decision meets SQLSTATE 25006, and goes on to the next
    # host at once: no failure, no fail mode.
    assert store.step(KEY, 0).new is False      # known there too
    assert store.failing is None
    assert any("now on the server at 127.0.0.1:%d " % standby.port in line
               and "timeline 2" in line and "it was 127.0.0.1:%d "
               % primary.port in line
               for line in store_log(logging.WARNING)), store_log()
    # Back to the old primary (the new one read-only, the old writable):
    # a timeline older than one seen before, logged as an error.
    read_only(primary, "off")
    read_only(standby, "on")
    assert store.step("other " + KEY, 0).new is True
    errors = store_log(logging.ERROR)
    assert any("127.0.0.1:%d is on timeline 1" % primary.port in line
               and "timeline 2 was seen at 127.0.0.1:%d" % standby.port
               in line and "pg_rewind" in line for line in errors), errors
    store.close()


# -- hosts that never answer --------------------------------------------------

class Silent(object):
    """A host that takes TCP connections and never says a word."""

    def __init__(self):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(16)
        self.port = self.socket.getsockname()[1]

    def still_waited_for(self):
        """True if the first client that connected still waits for an
        answer: it sent its startup packet and did not close."""
        self.socket.settimeout(30)
        client, _ = self.socket.accept()
        client.settimeout(30)
        data = client.recv(4096)            # libpq's startup packet
        client.setblocking(False)
        try:
            closed = client.recv(1) == b""
        except BlockingIOError:
            closed = False
        client.close()
        return bool(data) and not closed

    def close(self):
        self.socket.close()


def test_hosts_that_never_answer_hold_no_decision_longer_than_its_budget(
        postgresql, pg_uri):
    silent = [Silent(), Silent()]
    hosts = ",".join("127.0.0.1:%d" % host.port for host in silent)
    uri = pg_uri.replace("127.0.0.1:%d/" % postgresql.port,
                         "%s,127.0.0.1:%d/" % (hosts, postgresql.port))

    class Quick(smtpproxy.PostgreSQLStore):
        greylist_db_timeout = 1         # libpq's connect_timeout: 2 s a host
    store = Quick(uri)
    errors = []

    def decide(number):
        try:
            store.step("%d %s" % (number, KEY), 0)
        except smtpproxy.StoreError as error:
            errors.append(str(error))
    # Three decisions at once: none queues behind another's wait, and
    # each gives up at its deadline while libpq still waits for the first
    # silent host (its connection is open, its startup packet unanswered).
    threads = [threading.Thread(target=decide, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(errors) == 3, errors
    assert all("no connection within greylist_db_timeout (1 s)" in error
               for error in errors), errors
    assert silent[0].still_waited_for()
    # The connector goes on through the hosts; once it reached the real
    # one, decisions work.
    wait_until(lambda: works(store, KEY) is not None, timeout=30,
               what="the third host")
    store.close()
    for host in silent:
        host.close()


def test_one_decision_waits_one_budget_for_all_its_uses_of_the_store(
        engine, postgresql, pg_uri):
    # A decision asks the store up to three times (the auto-whitelist,
    # the purge that is due, the triplet): together they wait one
    # greylist_db_timeout, not one each.  Two waits of 1.5 s (the purge's
    # and the triplet's) would have outlasted libpq's 2 s on the silent
    # host.
    silent = Silent()
    uri = pg_uri.replace("127.0.0.1:%d/" % postgresql.port,
                         "127.0.0.1:%d,127.0.0.1:%d/" % (silent.port,
                                                         postgresql.port))
    grey = engine(greylist_db=uri, greylist_db_timeout=1.5,
                  auto_whitelist_clients=0, greylist_fail_mode="defer",
                  client_key="network")
    decision = grey.decide("192.0.2.1", "a@example.net", "b@example.org",
                           1000)
    assert decision.rule == "store-failed", decision
    assert "no connection within greylist_db_timeout (1.5 s)" in str(
        decision.error)
    assert silent.still_waited_for()
    silent.close()
    smtpproxy.stores.reset()


# -- a failover -----------------------------------------------------------------

def test_after_a_failover_decisions_go_to_the_promoted_standby(
        pair, store_log):
    primary, standby, uri = pair
    store = Store(uri)
    assert store.step(KEY, 0).new is True
    caught_up(primary, standby)
    primary.stop("immediate")
    # No primary: the standby is refused, decisions fail (fail mode).
    with pytest.raises(smtpproxy.StoreError):
        store.step("during " + KEY, 0)
    standby.promote()
    step = wait_until(lambda: works(store, KEY), timeout=30,
                      what="the promoted standby")
    assert step.new is False                    # known from before
    assert store.failing is None
    assert any("now on the server at 127.0.0.1:%d " % standby.port in line
               for line in store_log(logging.WARNING)), store_log()
    assert any("usable again" in line for line in store_log()), store_log()
    store.close()


@pytest.mark.parametrize("fail_mode", ["accept", "defer"])
def test_two_mx_hosts_through_a_failover(pair, proxies, fail_mode):
    primary, standby, uri = pair
    first = proxies(uri, "mx1", greylist_fail_mode=fail_mode,
                    min_defer_time=0, greylist_db_timeout=2)
    second = proxies(uri, "mx2", greylist_fail_mode=fail_mode,
                     min_defer_time=0, greylist_db_timeout=2)
    assert rcpt(first, SENDERS[0]) == 451       # first seen, on mx1
    caught_up(primary, standby)
    primary.stop("immediate")
    # No primary: greylist_fail_mode answers, and nothing is recorded.
    assert rcpt(second, SENDERS[1]) == (250 if fail_mode == "accept"
                                        else 451)
    standby.promote()
    # New senders (letters: digits are normalised away, one key for all).
    fresh = ("%s%s%s@example.net" % letters for letters in
             itertools.product(string.ascii_lowercase, repeat=3))
    name = name_of(uri)

    def rows(sender, passed=False):
        return int(standby.sql(
            "SELECT count(*) FROM smtpproxy_triplets WHERE key LIKE '%% %s %%'"
            "%s" % (sender, " AND passed IS NOT NULL" if passed else ""),
            name))
    # Greylisting again on the promoted standby: a new triplet is
    # greylisted, not accepted by the fail mode (each worker of a proxy
    # comes back at its next decision).
    for proxy in (first, second):
        wait_until(lambda: rcpt(proxy, next(fresh)) == 451, timeout=30,
                   what="greylisting on the promoted standby")
    # The triplet greylisted before the failover was known there: its
    # retry passes (min_defer_time 0), and the pass is written.
    wait_until(lambda: rcpt(second, SENDERS[0]) == 250 and rows(
        SENDERS[0], passed=True), timeout=30, what="the pass of " + SENDERS[0])
    # What the fail mode answered during the outage was not recorded: that
    # triplet starts again.
    assert rows(SENDERS[1]) == 0
    for proxy in (first, second):
        # Each says where it went (a worker's first server, or a change).
        assert "on the server at 127.0.0.1:%d " % standby.port in read(
            proxy.stderr_path)
