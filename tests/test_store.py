"""The greylisting stores: Kamaelia Grey's timing table, row by row at its
boundaries, with time given (no sleeping), the store shared by threads and
by another process, the auto-whitelist and the purge.  Every test runs on
each store: sqlite, and PostgreSQL (a private cluster, tests/pg.py) with
each driver, with the same assertions.  What only one store has is at the
end: sqlite's survival of kill -9, PostgreSQL's clock and schema."""

import sqlite3
import subprocess
import sys
import threading

import pytest

import smtpproxy
from conftest import PG_DRIVERS, ROOT

T0 = 1000000000.0
TOO_SOON, MIN_DEFER, MAX_DEFER, MAX_GREY = 180, 300, 25000, 3000000

KINDS = ["sqlite"] + ["postgresql-" + name for name in PG_DRIVERS]


class Maker(object):
    """Makes stores of one kind on one location: ``make(**attributes)``
    gives a store of a subclass with those attributes (timings) set.  A
    PostgreSQL store reads the time given, as the sqlite store does
    (database_clock off), so that tests drive the clock."""

    def __init__(self, kind, location):
        self.kind = kind
        self.location = location
        self.made = []

    def cls(self, **attributes):
        # Every decision asks the store, unless a test is about the cache.
        attributes.setdefault("greylist_cache_time", 0)
        if self.kind == "sqlite":
            base = smtpproxy.GreylistStore
        else:
            base = smtpproxy.PostgreSQLStore
            attributes.setdefault("driver", self.kind.split("-")[1])
            attributes.setdefault("database_clock", False)
        return type("TestStore", (base,), attributes)

    def __call__(self, **attributes):
        store = self.cls(**attributes)(self.location)
        self.made.append(store)
        return store

    def close(self):
        for store in self.made:
            store.close()


@pytest.fixture(params=KINDS)
def make(request, tmp_path):
    if request.param == "sqlite":
        location = str(tmp_path / "greylist.db")
    else:
        location = request.getfixturevalue("postgresql").empty("store")
    maker = Maker(request.param, location)
    yield maker
    maker.close()


@pytest.fixture
def store(make):
    return make()


def rows(store):
    """The triplets as (key, first seen, passed, passes)."""
    return [(key, first, last if state == "WHITE" else None, passes)
            for state, key, first, last, passes in store.entries()
            if state != "CLIENT"]


def test_defaults_are_the_lineage_timings_but_a_five_minute_wait():
    # Kamaelia Grey waited 3600 s; every common MTA retries after 300 s
    # or more (README: "How long a new sender waits").
    for cls in (smtpproxy.GreylistStore, smtpproxy.PostgreSQLStore):
        assert (cls.too_soon, cls.min_defer_time, cls.max_defer_time,
                cls.max_grey) == (TOO_SOON, MIN_DEFER, MAX_DEFER, MAX_GREY)


def test_never_seen_is_deferred_and_seen_now(store):
    assert store.decide("k", T0) is False
    assert rows(store) == [("k", T0, None, 0)]


@pytest.mark.parametrize("retry", [1, TOO_SOON - 0.001])
def test_retry_too_soon_is_deferred_and_restarts_the_clock(store, retry):
    store.decide("k", T0)
    assert store.decide("k", T0 + retry) is False
    assert rows(store) == [("k", T0 + retry, None, 0)]


@pytest.mark.parametrize("retry", [TOO_SOON, MIN_DEFER - 0.001])
def test_retry_before_min_defer_is_deferred_without_change(store, retry):
    store.decide("k", T0)
    assert store.decide("k", T0 + retry) is False
    assert rows(store) == [("k", T0, None, 0)]


@pytest.mark.parametrize("retry", [MIN_DEFER, MAX_DEFER])
def test_retry_inside_the_window_is_accepted_and_passed(store, retry):
    store.decide("k", T0)
    assert store.check("k", T0 + retry) == (True, retry)
    assert rows(store) == [("k", T0, T0 + retry, 1)]


def test_retry_after_max_defer_is_deferred_and_restarts_the_clock(store):
    store.decide("k", T0)
    late = T0 + MAX_DEFER + 0.001
    assert store.decide("k", late) is False
    assert rows(store) == [("k", late, None, 0)]
    # ... and the new window counts from the late try.
    assert store.decide("k", late + MIN_DEFER) is True


@pytest.mark.parametrize("later", [1, MAX_GREY - 0.001])
def test_passed_is_accepted_and_pass_renewed(store, later):
    store.decide("k", T0)
    store.decide("k", T0 + MIN_DEFER)
    passed = T0 + MIN_DEFER + later
    assert store.check("k", passed) == (True, None)
    assert rows(store) == [("k", T0, passed, 2)]


@pytest.mark.parametrize("later", [MAX_GREY, MAX_GREY + 1])
def test_passed_long_ago_is_forgotten_and_deferred(store, later):
    store.decide("k", T0)
    store.decide("k", T0 + MIN_DEFER)
    again = T0 + MIN_DEFER + later
    assert store.decide("k", again) is False
    assert rows(store) == [("k", again, None, 0)]


def test_timings_are_attributes(make):
    store = make(too_soon=1, min_defer_time=2, max_defer_time=3)
    store.decide("k", T0)
    assert store.decide("k", T0 + 2) is True


def test_fifty_threads_decide_as_a_serial_run_would(store):
    results = {}
    errors = []

    def session(number):
        key = "k%d" % (number % 5)          # 10 sessions per triplet
        try:
            results[number] = store.check(key, T0 + MIN_DEFER * (
                number >= 25), client="net")
        except Exception as error:          # "database is locked", ...
            errors.append(error)

    for first_half in (True, False):
        threads = [threading.Thread(target=session, args=(n,))
                   for n in range(50) if (n < 25) == first_half]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert errors == []
    assert sorted(results) == list(range(50))
    # First tries all deferred; the 25 retries all passed, 5 of them
    # after waiting, 20 as passed triplets; no pass lost or doubled.  The
    # client's five greylisting passes, at one time, count once.
    assert [results[n][0] for n in range(25)] == [False] * 25
    assert [results[n][0] for n in range(25, 50)] == [True] * 25
    assert sorted(delay for accepted, delay in results.values()
                  if delay is not None) == [MIN_DEFER] * 5
    assert [row[3] for row in rows(store)] == [5] * 5
    assert store.stats() == {"GREY": 0, "WHITE": 5, "CLIENT": 1}
    assert [entry[4] for entry in store.entries()
            if entry[0] == "CLIENT"] == [1]


def test_another_process_sees_the_passes(make):
    store = make()
    store.decide("k", T0)
    assert store.decide("k", T0 + MIN_DEFER) is True
    attributes = {}
    if make.kind != "sqlite":
        attributes = {"driver": make.kind.split("-")[1],
                      "database_clock": False}
    base = ("GreylistStore" if make.kind == "sqlite" else "PostgreSQLStore")
    code = ("import sys; sys.path.insert(0, %r); import smtpproxy; "
            "S = type('S', (smtpproxy.%s,), %r); s = S(%r); "
            "print(s.decide('k', %r), s.decide('other', %r))"
            % (ROOT, base, attributes, make.location, T0 + MIN_DEFER + 10,
               T0))
    output = subprocess.check_output([sys.executable, "-c", code])
    assert output.split() == [b"True", b"False"]
    assert [row[0] for row in rows(store)] == ["k", "other"]


HOUR = 3600      # client_pass_interval


def passes(store, client, times, start=T0):
    """``times`` greylisting passes of new triplets of ``client``, an hour
    apart (a client's count grows at most once an hour), the first
    seen at ``start``; the time of the last pass."""
    for number in range(times):
        first = start + number * HOUR
        key = "%s s%d r" % (client, first)
        store.decide(key, first, client=client)
        assert store.decide(key, first + MIN_DEFER, client=client) is True
    return first + MIN_DEFER


def test_client_trusted_after_auto_whitelist_clients_passes(store):
    last = passes(store, "192.0.2.0/24", 4)
    assert store.client_is_trusted("192.0.2.0/24", last) is False
    last = passes(store, "192.0.2.0/24", 1, start=T0 + 4 * HOUR)
    assert store.client_is_trusted("192.0.2.0/24", last + 10)
    assert not store.client_is_trusted("198.51.100.0/24", last)
    # Unseen for max_grey: no longer trusted.
    assert not store.client_is_trusted("192.0.2.0/24",
                                       last + 20 + MAX_GREY)


def test_being_trusted_counts_as_being_seen(store):
    later = passes(store, "192.0.2.0/24", 5) + MAX_GREY - 10
    assert store.client_is_trusted("192.0.2.0/24", later)
    assert store.client_is_trusted("192.0.2.0/24", later + MAX_GREY - 10)


def client_passes(store, client):
    return [entry[4] for entry in store.entries()
            if entry[0] == "CLIENT" and entry[1] == client]


def test_resends_of_a_passed_triplet_do_not_count_towards_the_client(store):
    # The case: one triplet passes, then is resent four times a
    # minute apart, then four times an hour apart: one pass, not five.
    key = "192.0.2.0/24 a@example.net b@example.org"
    store.decide(key, T0, client="192.0.2.0/24")
    now = T0 + MIN_DEFER
    assert store.decide(key, now, client="192.0.2.0/24") is True
    for resend in [60, 120, 180, 240, 2 * HOUR, 3 * HOUR, 4 * HOUR,
                   5 * HOUR]:
        assert store.decide(key, now + resend, client="192.0.2.0/24")
    assert client_passes(store, "192.0.2.0/24") == [1]
    assert not store.client_is_trusted("192.0.2.0/24", now + 5 * HOUR)


def test_a_clients_passes_count_at_most_once_an_hour(store):
    # Five triplets that waited and came back within a second: one pass;
    # the next greylisting pass an hour after the first counts again.
    for number in range(5):
        store.decide("net s%d r" % number, T0 + number * 0.2, client="net")
    for number in range(5):
        assert store.decide("net s%d r" % number, T0 + MIN_DEFER
                            + number * 0.2, client="net") is True
    assert client_passes(store, "net") == [1]
    store.decide("net late r", T0 + 10, client="net")
    assert store.decide("net late r", T0 + MIN_DEFER + HOUR - 1,
                        client="net") is True
    assert client_passes(store, "net") == [1]
    store.decide("net later r", T0 + 20, client="net")
    assert store.decide("net later r", T0 + MIN_DEFER + HOUR,
                        client="net") is True
    assert client_passes(store, "net") == [2]


def test_a_step_says_accepted_delay_and_new_by_name(store):
    first = store.step("k", T0)
    assert (first.accepted, first.delay, first.new) == (False, None, True)
    waited = store.step("k", T0 + MIN_DEFER)
    assert (waited.accepted, waited.delay, waited.new) == (
        True, MIN_DEFER, False)
    resent = store.step("k", T0 + MIN_DEFER + 1)
    assert (resent.accepted, resent.delay, resent.new) == (True, None, False)


def test_a_new_triplet_is_not_added_when_the_decision_may_not_add(store):
    assert store.step("new", T0, add=False) == (False, None, True)
    assert rows(store) == []
    assert store.step("known", T0) == (False, None, True)
    # A known triplet is decided as ever, whether or not one may add.
    assert store.step("known", T0 + MIN_DEFER, add=False) == (
        True, MIN_DEFER, False)
    assert store.step("known", T0 + MIN_DEFER + 1, add=False) == (
        True, None, False)
    assert [row[0] for row in rows(store)] == ["known"]


def test_an_early_retry_says_the_seconds_left(store):
    assert store.step("k", T0).wait is None         # the clock starts
    assert store.step("k", T0 + 200).wait == MIN_DEFER - 200
    assert store.step("k", T0 + MIN_DEFER).accepted


def test_auto_whitelist_off(make):
    store = make(auto_whitelist_clients=0)
    passes(store, "192.0.2.0/24", 6)
    assert store.client_is_trusted("192.0.2.0/24", T0 + MIN_DEFER) is False


def test_purge_removes_only_what_expired(store):
    store.decide("grey-old", T0)
    store.decide("grey-new", T0 + MAX_DEFER)
    store.decide("passed", T0)
    store.decide("passed", T0 + MIN_DEFER, client="net")
    assert store.purge(T0 + MAX_DEFER + 1) == 1
    assert [row[0] for row in rows(store)] == ["grey-new", "passed"]
    assert store.purge(T0 + MIN_DEFER + MAX_GREY + 1) == 3   # + client
    assert rows(store) == []


def test_a_decision_purges_once_per_purge_interval(make):
    store = make(purge_interval=100)
    store.decide("old", T0)                         # purges: the first
    store.decide("new", T0 + MAX_DEFER + 1)         # purges: "old" went
    assert [row[0] for row in rows(store)] == ["new"]
    store.decide("older", T0)
    store.decide("x", T0 + MAX_DEFER + 50)          # within the interval
    assert "older" in [row[0] for row in rows(store)]
    store.decide("x", T0 + MAX_DEFER + 200)         # after it
    assert "older" not in [row[0] for row in rows(store)]


def test_a_failed_purge_does_not_fail_the_decision_it_came_with(
        make, caplog):
    def fails(self, transaction, now, when_due=False):
        raise sqlite3.OperationalError("database is locked")
    store = make(purge_interval=100, _purge=fails)
    assert store.decide("k", T0) is False           # deferred, answered
    assert "purge: database is locked" in caplog.text
    with pytest.raises(sqlite3.Error):              # --db-purge says so
        store.purge(T0)


def test_admin_methods(store):
    store.pass_key("k", T0)
    store.decide("g", T0)
    assert store.stats() == {"GREY": 1, "WHITE": 1, "CLIENT": 0}
    assert rows(store) == [("g", T0, None, 0), ("k", T0, T0, 1)]
    assert store.delete("k") is True
    assert store.delete("k") is False
    assert store.stats() == {"GREY": 1, "WHITE": 0, "CLIENT": 0}


# -- what a process keeps in memory (greylist_cache_time) --------------------

def test_a_pass_seen_recently_is_accepted_without_a_write(make):
    store = make(greylist_cache_time=60)
    store.decide("k", T0)
    passed = T0 + MIN_DEFER
    assert store.check("k", passed) == (True, MIN_DEFER)
    assert rows(store) == [("k", T0, passed, 1)]
    # Within the cache time: accepted, the store not even asked.
    assert store.check("k", passed + 59.9) == (True, None)
    assert rows(store) == [("k", T0, passed, 1)]
    # After it: asked, and the pass renewed.
    assert store.check("k", passed + 60) == (True, None)
    assert rows(store) == [("k", T0, passed + 60, 2)]
    # A clock that went back asks the store.
    assert store.check("k", passed) == (True, None)
    assert rows(store)[0][3] == 3


def test_a_triplet_deleted_elsewhere_is_greylisted_after_the_cache_time(
        make):
    store = make(greylist_cache_time=60)
    admin = make()                      # another process: --db-delete
    store.decide("k", T0)
    passed = T0 + MIN_DEFER
    assert store.decide("k", passed) is True
    assert admin.delete("k") is True
    assert store.decide("k", passed + 30) is True       # still in memory
    assert store.decide("k", passed + 60) is False      # as never seen
    assert rows(store) == [("k", passed + 60, None, 0)]
    # Deleted through the store itself: at once.
    store.decide("j", T0)
    assert store.decide("j", passed) is True
    assert store.delete("j") is True
    assert store.decide("j", passed + 1) is False


def test_a_trusted_client_is_kept_in_memory_for_the_cache_time(make):
    store = make(greylist_cache_time=60)
    admin = make()
    now = passes(store, "192.0.2.0/24", 5) + 10
    assert store.client_is_trusted("192.0.2.0/24", now)
    assert admin.delete("192.0.2.0/24") is True
    assert store.client_is_trusted("192.0.2.0/24", now + 59)
    assert not store.client_is_trusted("192.0.2.0/24", now + 60)
    passes(store, "198.51.100.0/24", 5, start=now - MIN_DEFER - 4 * HOUR)
    assert store.client_is_trusted("198.51.100.0/24", now)
    assert store.delete("198.51.100.0/24") is True
    assert not store.client_is_trusted("198.51.100.0/24", now + 1)


def test_what_is_kept_in_memory_is_bounded(make):
    store = make(greylist_cache_time=60, cache_size=3)
    for number in range(10):
        key = "k%d" % number
        store.decide(key, T0)
        assert store.decide(key, T0 + MIN_DEFER) is True
        assert len(store._known) <= 3
    # Forgotten is asked again, and still passed.
    assert store.check("k0", T0 + MIN_DEFER + 1) == (True, None)
    assert rows(store)[0] == ("k0", T0, T0 + MIN_DEFER + 1, 2)


def test_what_is_kept_longer_than_the_cache_time_goes_at_the_checkpoint(
        make):
    store = make(greylist_cache_time=60)
    for key, start in (("old", T0), ("new", T0 + 100)):
        store.decide(key, start)
        assert store.decide(key, start + MIN_DEFER) is True
    assert sorted(store._known) == [("triplet", "new"), ("triplet", "old")]
    store.checkpoint()
    assert sorted(store._known) == [("triplet", "new")]


# -- checkpoints, off the decisions ------------------------------------------

def test_checkpoints_are_the_servers_not_the_decisions(make):
    store = make()
    for number in range(20):
        store.decide("k%d" % number, T0)
    store.checkpoint()
    store.checkpoint()                  # nothing written since: nothing
    store.decide("k0", T0 + MIN_DEFER)
    if make.kind == "sqlite":
        assert store._db.execute("PRAGMA wal_autocheckpoint").fetchone() \
            == (10000,)
        assert store.checkpoints == 1
        store.checkpoint()
        assert store.checkpoints == 2
    else:
        assert store.checkpoints == 0   # PostgreSQL checkpoints itself
    assert store.stats() == {"GREY": 19, "WHITE": 1, "CLIENT": 0}


def test_without_a_server_a_decision_still_bounds_the_wal(tmp_path):
    path = tmp_path / "greylist.db"
    store = type("S", (smtpproxy.GreylistStore,), {
        "checkpoint_pages": 10, "greylist_cache_time": 0})(str(path))
    for number in range(300):
        store.decide("k%d" % number, T0)
    # 300 transactions of a page or more each: a WAL that was never
    # checkpointed would hold them all (over a megabyte).
    assert (tmp_path / "greylist.db-wal").stat().st_size < 200 * 1024
    assert store.checkpoints == 0
    store.close()


def test_the_server_checkpoints_its_stores(tmp_path):
    settings = type("Settings", (smtpproxy.GreyListingPolicy,), {
        "greylist_db": str(tmp_path / "server.db")})
    store = smtpproxy.stores.get(settings)
    server = smtpproxy.SMTPProxyServer(("127.0.0.1", 0),
                                       smtpproxy.ConcreteMailHandler)
    try:
        store.decide("k", T0)
        smtpproxy.stores._maintained = 0.0
        server.service_actions()
        assert store.checkpoints == 1
        # At most once a second.
        store.decide("j", T0)
        server.service_actions()
        assert store.checkpoints == 1
    finally:
        server.server_close()


def test_the_decision_table_is_one_pure_function():
    class Timings(object):
        too_soon, min_defer_time, max_defer_time, max_grey = 10, 100, 1000, \
            5000
    step = smtpproxy.triplet_step
    R, P = smtpproxy.RESTART, smtpproxy.PASS
    Step = smtpproxy.Step
    new = Step(accepted=False, delay=None, new=True)
    deferred = Step(accepted=False, delay=None, new=False)
    accepted = Step(accepted=True, delay=None, new=False)

    def waited(seconds):
        return Step(accepted=True, delay=seconds, new=False)
    assert step(None, None, 0, Timings) == (new, R)
    assert step(0, None, 9, Timings) == (deferred, R)
    assert step(0, None, 10, Timings) == (deferred, None)
    # Deferred as too early, with the seconds left (not of the tuple).
    assert step(0, None, 10, Timings)[0].wait == 90
    assert step(0, None, 99.5, Timings)[0].wait == 0.5
    assert step(None, None, 0, Timings)[0].wait is None
    assert step(0, None, 1001, Timings)[0].wait is None
    assert step(0, None, 100, Timings) == (waited(100), P)
    assert step(0, None, 1000, Timings) == (waited(1000), P)
    assert step(0, None, 1001, Timings) == (deferred, R)
    assert step(0, 100, 5099, Timings) == (accepted, P)
    assert step(0, 100, 5100, Timings) == (deferred, R)


# -- sqlite only ------------------------------------------------------------

def test_kill_9_in_the_middle_of_writing_leaves_a_sound_store(tmp_path):
    import signal
    import sqlite3
    import time as _time
    path = str(tmp_path / "killed.db")
    code = ("import sys; sys.path.insert(0, %r); import smtpproxy; "
            "s = smtpproxy.GreylistStore(%r); print('ready', flush=True)\n"
            "i = 0\n"
            "while True:\n"
            "    s.decide('k%%d' %% (i %% 1000), 1e9 + i); i += 1\n"
            % (ROOT, path))
    child = subprocess.Popen([sys.executable, "-c", code],
                             stdout=subprocess.PIPE)
    assert child.stdout.readline() == b"ready\n"
    deadline = _time.monotonic() + 10
    while _time.monotonic() < deadline:     # until it has written a lot
        connection = sqlite3.connect(path)
        count = connection.execute("SELECT count(*) FROM triplets")\
            .fetchone()[0]
        connection.close()
        if count >= 500:
            break
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA integrity_check").fetchone() == (
        "ok",)
    connection.close()
    store = smtpproxy.GreylistStore(path)
    assert store.decide("after", T0) is False
    store.close()
