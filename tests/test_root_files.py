"""What root does with files at the start, in --check-config and in the
admin commands (issue 21, "root follows links planted in the service
user's directories").

Every test here starts the real service as root, with ``--user nobody``,
against links a compromised serving user could have planted in its own
directories, and looks at the victim afterwards: its owner, mode and
content.  Root-only files stand for /etc/shadow and /etc/profile.d.
"""

import argparse
import grp
import os
import pwd
import shutil
import json
import signal
import smtplib
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile

import pytest

from conftest import HERE, ROOT, free_port, rcpt_code, read, wait_until
import smtpproxy

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="what root does: needs root")

SECRET = "root:secret-hash:19000:0:99999:7:::\n"


def run(args, cwd, timeout=30):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, ROOT]))
    return subprocess.run([sys.executable, os.path.join(ROOT, "smtpproxy.py")]
                          + list(args), env=env, cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout)


@pytest.fixture
def nobody():
    return pwd.getpwnam("nobody")


@pytest.fixture
def user_dir(nobody):
    """A directory of the serving user's, as the README makes them
    (install -d -o smtpproxy): it can plant anything in it."""
    path = tempfile.mkdtemp(prefix="smtpproxy-user-")
    os.chmod(path, 0o755)
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def root_dir():
    """A directory only root can write (such as /etc or /run)."""
    path = tempfile.mkdtemp(prefix="smtpproxy-root-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def home_dir(root_dir, nobody):
    """The serving user's directory where the README puts it
    (/var/lib/smtpproxy): the directories on the way are root's, the
    last one the user's."""
    path = os.path.join(root_dir, "home")
    os.mkdir(path, 0o755)
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    return path


@pytest.fixture
def victim(root_dir):
    """A root-only file, like /etc/shadow."""
    path = os.path.join(root_dir, "shadow")
    with open(path, "w") as victim:
        victim.write(SECRET)
    os.chmod(path, 0o600)
    return path


def assert_untouched(path):
    info = os.lstat(path)
    assert stat.S_ISREG(info.st_mode)
    assert (info.st_uid, info.st_gid) == (0, 0)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert read(path) == SECRET


def plant(link, target, nobody):
    """A symbolic link made by the serving user."""
    os.symlink(target, link)
    os.lchown(link, nobody.pw_uid, nobody.pw_gid)


class Started(object):
    """Services started as daemons, killed at the end even if a test
    fails (a start that should have failed may have succeeded)."""

    def __init__(self):
        self.pidfiles = []

    def start(self, user_dir, root_dir, *extra, **options):
        """Start as root, serving as nobody, with the store and the logs in
        ``user_dir`` and the pidfile in ``root_dir`` unless ``extra``
        says otherwise; return the CompletedProcess."""
        return run(self.arguments(user_dir, root_dir, *extra, **options),
                   cwd=user_dir)

    def arguments(self, user_dir, root_dir, *extra, **options):
        """The command line of start()."""
        pidfile = options.get("pidfile", os.path.join(root_dir, "p.pid"))
        self.pidfiles.append(pidfile)
        self.port = options.get("port") or free_port()
        return ["--daemon", "--user", "nobody",
                "--listen", "127.0.0.1:%d" % self.port,
                "--class", "smtpproxy.GreyListingPolicy",
                "--pidfile", pidfile,
                "-o", "allowed_domains=example.org", "-o", "allowed_senders=",
                "-o", "greylist_db=%s/grey.db" % user_dir,
                "-o", "greylist_log=%s/greylist.log" % user_dir,
                "-o", "log_file=%s/service.log" % user_dir] + list(extra)

    def pid(self, pidfile=None):
        return int(read(pidfile or self.pidfiles[-1]).split()[0])

    def stop(self, pidfile=None):
        pid = self.pid(pidfile)
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not os.path.exists("/proc/%d" % pid)
                   or read("/proc/%d/stat" % pid).split(")")[-1].split()[0]
                   == "Z", what="the daemon to stop")

    def kill(self):
        for pidfile in self.pidfiles:
            try:
                os.kill(self.pid(pidfile), signal.SIGKILL)
            except (OSError, ValueError, IndexError):
                pass


@pytest.fixture
def started():
    started = Started()
    yield started
    started.kill()


# -- who may change a directory -----------------------------------------------

def test_shared_directory_names_the_first_one_another_user_can_change(
        user_dir, root_dir, nobody, tmp_path):
    shared = smtpproxy._shared_directory
    assert shared(root_dir) is None
    # pytest's base is in /tmp (sticky, everyone's), and root's.
    assert shared(str(tmp_path)) is None
    assert shared("/tmp") == "/tmp"         # anyone may make a name there
    assert shared(user_dir) == user_dir     # the user's, in sticky /tmp
    inner = os.path.join(root_dir, "inner")
    os.mkdir(inner)
    os.chmod(inner, 0o775)                  # its group may write
    assert shared(os.path.join(inner, ".")) == inner
    os.chmod(inner, 0o755)
    assert shared(inner) is None
    # A link is followed, and judged as its directory: root's link, in
    # root's directory, to the user's directory; and a link of the user's.
    os.symlink(user_dir, os.path.join(root_dir, "to-user"))
    assert shared(os.path.join(root_dir, "to-user")) == user_dir
    os.symlink(inner, os.path.join(root_dir, "to-inner"))
    assert shared(os.path.join(root_dir, "to-inner")) is None
    os.mkdir(os.path.join(user_dir, "sub"))
    plant(os.path.join(user_dir, "sub", "back"), inner, nobody)
    assert shared(os.path.join(user_dir, "sub", "back")) == user_dir
    # ".." goes back from where a link led, as the kernel does.
    assert shared(os.path.join(root_dir, "to-user", "..")) == user_dir
    os.symlink(os.path.join(user_dir, "sub"), os.path.join(inner, "to-sub"))
    assert shared(os.path.join(inner, "to-sub", "..", "..")) == user_dir
    assert shared(os.path.join(root_dir, "to-inner", "..")) is None


# -- the store ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["grey.db", "grey.db-wal", "grey.db-shm"])
def test_a_store_file_linked_to_a_root_file_leaves_it_as_it_was(
        started, user_dir, root_dir, victim, nobody, name):
    plant(os.path.join(user_dir, name), victim, nobody)
    result = started.start(user_dir, root_dir)
    assert_untouched(victim)
    assert result.returncode == 1, result.stderr
    assert ("greylisting store %s/grey.db: %s/%s is a symbolic link to a "
            "file user nobody cannot write: remove the link"
            % (user_dir, user_dir, name)) in result.stderr


def test_a_store_root_made_is_refused_with_what_to_run(
        started, home_dir, root_dir):
    # Left by an earlier version or a root admin command: root's.  The
    # chown names the files there, and changes no link it is given.
    for name in ("grey.db", "grey.db-wal"):
        open(os.path.join(home_dir, name), "w").close()
    result = started.start(home_dir, root_dir)
    assert result.returncode == 1
    store = os.path.join(home_dir, "grey.db")
    assert ("greylisting store {0}: user nobody cannot write {0}: give it "
            "to nobody: chown -h nobody {0} {0}-wal\n"
            .format(store)) in result.stderr
    assert os.stat(store).st_uid == 0       # not given away by the start
    assert not os.path.exists(os.path.join(root_dir, "p.pid"))


def test_no_chown_is_suggested_for_a_store_file_the_user_linked(
        home_dir, root_dir, victim, nobody, started):
    # The store root's, -wal a link the user planted to root's file: GNU
    # chown follows a link it is given, and would give the victim away.
    store = os.path.join(home_dir, "grey.db")
    open(store, "w").close()
    os.chmod(store, 0o640)
    plant(store + "-wal", victim, nobody)
    result = started.start(home_dir, root_dir)
    assert_untouched(victim)
    assert result.returncode == 1
    assert ("greylisting store {0}: user nobody cannot write {0}: {0}-wal "
            "is a symbolic link, and a chown could give away what it leads "
            "to: remove it\n".format(store)) in result.stderr
    assert "chown nobody" not in result.stderr
    assert "chown -h" not in result.stderr


def test_no_chown_is_suggested_where_another_user_can_change_the_way(
        user_dir, root_dir, started):
    # user_dir is in /tmp, where anyone makes names: the way to the store
    # may lead elsewhere by the time the admin runs the chown.
    store = os.path.join(user_dir, "grey.db")
    open(store, "w").close()
    result = started.start(user_dir, root_dir)
    assert result.returncode == 1
    assert ("greylisting store {0}: user nobody cannot write {0}: no chown "
            "is safe there: /tmp can be changed by a user other than root, "
            "who could swap a directory for a link to root's files: name a "
            "path whose directories are root's, the last one nobody's\n"
            .format(store)) in result.stderr


# -- what a store's error says to do (issue 26) -------------------------------

BOTH_CHECKS = pytest.mark.parametrize("check", [(), ("--check-config",)],
                                      ids=["start", "check-config"])


def store_at(started, user_dir, root_dir, store, check):
    """Start (or --check-config) as root serving as nobody, with the
    store at ``store``."""
    return started.start(user_dir, root_dir, "-o", "greylist_db=%s" % store,
                         *check)


def a_users_home():
    """The home directory of a user other than root and nobody, if one
    is there (a system's users, such as /home/alice)."""
    for entry in pwd.getpwall():
        if (entry.pw_uid >= 1000 and entry.pw_name != "nobody"
                and os.path.isdir(entry.pw_dir)
                and entry.pw_dir.startswith("/home/")):
            return entry.pw_dir
    return None


@BOTH_CHECKS
def test_a_directory_as_greylist_db_says_to_name_a_file_in_it(
        started, user_dir, root_dir, check):
    # postgrey's --dbdir habit: the directory the store should go in.
    result = store_at(started, user_dir, root_dir, user_dir, check)
    assert result.returncode == 2, result.stderr
    assert ("greylisting store %s: greylist_db is a directory: name a file "
            "in it, such as %s/greylist.db\n" % (user_dir, user_dir)
            ) in result.stderr
    # A system directory is not where the file goes: one of its own there.
    result = store_at(started, user_dir, root_dir, "/var/lib", check)
    assert result.returncode == 2, result.stderr
    assert ("greylisting store /var/lib: greylist_db is a directory, and a "
            "system one: give the store a directory of its own: install -d "
            "-o nobody -m 750 /var/lib/smtpproxy, and set greylist_db = "
            "/var/lib/smtpproxy/greylist.db\n") in result.stderr


@BOTH_CHECKS
def test_a_missing_store_directory_is_to_be_made_the_users_own(
        started, user_dir, root_dir, check):
    directory = os.path.join(root_dir, "state", "smtpproxy")
    store = os.path.join(directory, "grey.db")
    result = store_at(started, user_dir, root_dir, store, check)
    assert result.returncode == 1, result.stderr
    advice = ("its directory %s does not exist: make it, the user's: "
              "install -d -o nobody -m 750 %s\n" % (directory, directory))
    assert advice in result.stderr
    assert "chown" not in result.stderr
    # What it says works: install makes the way root's, the last one
    # the user's, and the store is made there.
    subprocess.check_call(advice.split(": ")[-1].split())
    assert os.stat(os.path.dirname(directory)).st_uid == 0
    result = store_at(started, user_dir, root_dir, store, ("--check-config",))
    assert result.returncode == 0, result.stderr


SYSTEM_STORES = ["/grey.db", "/var/lib/grey.db", "/root/grey.db",
                 "/etc/grey.db", "/home/grey.db"]


@pytest.mark.parametrize("store", SYSTEM_STORES + ["a user's home"])
@BOTH_CHECKS
def test_no_chown_of_a_system_directory_or_a_home_is_ever_suggested(
        started, user_dir, root_dir, store, check):
    if store == "a user's home":
        home = a_users_home()
        if home is None:
            pytest.skip("no user with a home directory here")
        store = os.path.join(home, "grey.db")
    result = store_at(started, user_dir, root_dir, store, check)
    assert result.returncode == 1, result.stderr
    assert "chown" not in result.stderr
    directory = os.path.dirname(store)
    assert ("its directory %s is a " % directory) in result.stderr
    assert (", not one to give to nobody: give the store a directory of its "
            "own: install -d -o nobody -m 750 ") in result.stderr
    if store in SYSTEM_STORES:
        assert ("install -d -o nobody -m 750 /var/lib/smtpproxy, and set "
                "greylist_db = /var/lib/smtpproxy/grey.db\n") in result.stderr
    assert not os.path.exists(store)


@BOTH_CHECKS
def test_a_directory_holding_other_files_is_not_given_away(
        started, user_dir, root_dir, check):
    # root_dir holds other files of root's: the store gets a directory
    # of its own there.
    open(os.path.join(root_dir, "other.conf"), "w").close()
    store = os.path.join(root_dir, "grey.db")
    result = store_at(started, user_dir, root_dir, store, check)
    assert result.returncode == 1, result.stderr
    own = os.path.join(root_dir, "smtpproxy")
    files = "other.conf, p.pid" if not check else "other.conf"  # (its pid)
    assert ("its directory %s is a directory holding other files (%s)"
            % (root_dir, files)) in result.stderr
    advice = ("not one to give to nobody: give the store a directory of its "
              "own: install -d -o nobody -m 750 %s, and set greylist_db = "
              "%s/grey.db\n" % (own, own))
    assert advice in result.stderr
    assert "chown nobody" not in result.stderr
    subprocess.check_call(advice.split(": ")[-1].split(",")[0].split())
    result = store_at(started, user_dir, root_dir, os.path.join(
        own, "grey.db"), ("--check-config",))
    assert result.returncode == 0, result.stderr


@BOTH_CHECKS
def test_a_file_that_is_no_database_is_said_to_be_so_not_a_permission(
        started, home_dir, root_dir, nobody, check):
    store = os.path.join(home_dir, "grey.db")
    with open(store, "w") as text:
        text.write("not a database, but the user's own\n" * 200)
    os.chown(store, nobody.pw_uid, nobody.pw_gid)
    result = store_at(started, home_dir, root_dir, store, check)
    assert result.returncode == 2, result.stderr
    assert ("greylisting store %s: file is not a database: it is no sqlite "
            "database smtpproxy can use (not a permission problem): name a "
            "file that is not there yet (smtpproxy makes it), or move this "
            "one away\n" % store) in result.stderr
    assert "chown" not in result.stderr
    assert "must be able to write" not in result.stderr


def test_serving_as_root_refuses_a_store_another_user_can_reach(
        started, user_dir, root_dir, nobody):
    # run_as_root: root itself opens the store, and sqlite follows links:
    # only in a directory no other user can change.
    goal = os.path.join(root_dir, "made.db")
    plant(os.path.join(user_dir, "grey.db"), goal, nobody)
    started.pidfiles.append(os.path.join(root_dir, "p.pid"))
    result = run(["--daemon", "--listen", "127.0.0.1:%d" % free_port(),
                  "--pidfile", started.pidfiles[-1],
                  "-o", "run_as_root=yes", "-o", "greylist_log=",
                  "-o", "greylist_db=%s/grey.db" % user_dir], cwd=root_dir)
    assert not os.path.lexists(goal)
    assert result.returncode == 2
    assert ("greylisting store %s/grey.db: %s can be changed by a user "
            "other than root" % (user_dir, user_dir)) in result.stderr


def test_files_are_created_0640_and_the_serving_users(
        started, user_dir, root_dir, nobody, upstream):
    # The service's log in root's directory (root makes it and gives it to
    # the user through its descriptor), the others in the user's (made as
    # the user).
    result = started.start(user_dir, root_dir, "-o", "log_file=%s/service.log"
                           % root_dir, "-o", "greylist_debuglog=%s/debug.log"
                           % user_dir, "--debug",
                           "--upstream", "127.0.0.1:%d" % upstream.port)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert rcpt_code(started.port) == 451      # greylisted: a row written
    wait_until(lambda: "DEFERRED" in read(os.path.join(user_dir,
                                                       "greylist.log")),
               what="the transaction in greylist.log")
    for path in [os.path.join(user_dir, name) for name in
                 ("grey.db", "grey.db-wal", "grey.db-shm", "greylist.log",
                  "debug.log")] + [os.path.join(root_dir, "service.log")]:
        info = os.stat(path)
        assert (info.st_uid, info.st_gid) == (nobody.pw_uid,
                                              nobody.pw_gid), path
        assert stat.S_IMODE(info.st_mode) == 0o640, path
    info = os.stat(os.path.join(root_dir, "p.pid"))
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o644)
    started.stop()


def ids(pid):
    """The (real, effective, saved, filesystem) uids of process ``pid``."""
    for line in read("/proc/%d/status" % pid).splitlines():
        if line.startswith("Uid:"):
            return [int(uid) for uid in line.split()[1:]]
    return None


def children(pid):
    """The pids of the processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat_line = read("/proc/%s/stat" % entry)
            if stat_line and int(stat_line.rsplit(")", 1)[1].split()[1]) \
                    == pid:
                found.append(int(entry))
    return found


def test_the_starts_store_check_runs_as_the_user_for_good(
        started, user_dir, root_dir, nobody):
    # The user's store, which the user holds locked (it may): the start's
    # check waits for it.  Meanwhile the check runs in a process that is
    # nobody in every uid (no way back to root), while the service's
    # process is still root, all of it, to remove its pidfile should the
    # check fail; then it is nobody for good.
    store = os.path.join(user_dir, "grey.db")
    open(store, "w").close()        # an empty database, not in WAL mode yet
    os.chmod(store, 0o640)
    os.chown(store, nobody.pw_uid, nobody.pw_gid)
    holder = sqlite3.connect(store, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, ROOT]))
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "smtpproxy.py")]
        + started.arguments(user_dir, root_dir), env=env, cwd=user_dir,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True)
    try:
        def checking():
            try:
                pid = started.pid()
            except (ValueError, IndexError):
                return None             # the pid is not written yet
            checks = children(pid)
            # Root for the instant between its fork and its switch.
            return (checks and ids(checks[0]) == [nobody.pw_uid] * 4
                    and (pid, checks[0]))
        service = wait_until(checking, what="the store's check, nobody "
                             "in every uid")[0]
        assert ids(service) == [0] * 4
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert ids(started.pid()) == [nobody.pw_uid] * 4
    started.stop()


# -- logs ---------------------------------------------------------------------

@pytest.mark.parametrize("key", ["greylist_log", "log_file",
                                 "greylist_debuglog"])
@pytest.mark.parametrize("target", ["dangling", "existing"])
def test_a_log_linked_into_roots_directory_is_refused(
        started, user_dir, root_dir, victim, nobody, key, target):
    # Dangling: root would make /etc/profile.d/x.sh, the user's to write.
    # Existing: root would append client-chosen HELO text to it.
    goal = victim if target == "existing" else os.path.join(root_dir,
                                                            "x.sh")
    link = os.path.join(user_dir, "link.log")
    plant(link, goal, nobody)
    for command in ([], ["--check-config"]):
        result = started.start(user_dir, root_dir, "--debug",
                               "-o", "%s=%s" % (key, link), *command)
        if target == "existing":
            assert_untouched(victim)
        else:
            assert not os.path.lexists(goal)
        assert result.returncode == 2, result.stderr
        assert ("%s %s is a symbolic link: started as root, smtpproxy opens "
                "no link (another user may have planted it): name the file "
                "itself" % (key, link)) in result.stderr
    assert not os.path.exists(os.path.join(root_dir, "p.pid"))


def test_a_log_link_in_roots_own_directory_is_refused_too(
        started, user_dir, root_dir, victim):
    link = os.path.join(root_dir, "service.log")
    os.symlink(victim, link)
    result = started.start(user_dir, root_dir, "-o", "log_file=%s" % link)
    assert result.returncode == 2
    assert "log_file %s is a symbolic link" % link in result.stderr
    assert_untouched(victim)


def test_a_log_the_user_could_not_open_is_refused(
        started, user_dir, home_dir, root_dir, victim):
    # In the user's directory, a log is opened as the user: the kernel
    # says what it may open.  A hard link to root's file (which
    # protected_hardlinks would not even let the user make): the message
    # says to remove it, not to chown it (which would give root's away).
    log = os.path.join(user_dir, "service.log")
    os.link(victim, log)
    for command in ([], ["--check-config"]):
        result = started.start(user_dir, root_dir, *command)
        assert_untouched(victim)
        assert result.returncode == 2, result.stderr
        assert ("cannot open log_file %s as nobody (other users than root "
                "can change %s, so it is opened as the serving user): "
                "Permission denied: %s has other names (hard links), and a "
                "chown would give them away too: remove it"
                % (log, user_dir, log)) in result.stderr
    # Root's own file, left by an earlier version: chown it, where the
    # way to it is root's.
    log = os.path.join(home_dir, "service.log")
    open(log, "w").close()
    result = started.start(home_dir, root_dir, "--check-config")
    assert result.returncode == 2
    assert ("Permission denied: give it to nobody: chown -h nobody %s, or "
            "name a file in a directory only root can write" % log) \
        in result.stderr


def test_no_chown_is_suggested_for_a_log_through_a_planted_directory_link(
        home_dir, root_dir, nobody, started):
    # The user's "sub" leads to a directory of root's, with root's log:
    # "chown nobody home/sub/service.log" would give root's file away.
    logs = os.path.join(root_dir, "logs")
    os.mkdir(logs)
    os.chmod(logs, 0o755)
    target = os.path.join(logs, "service.log")
    open(target, "w").close()
    os.chmod(target, 0o644)
    plant(os.path.join(home_dir, "sub"), logs, nobody)
    log = os.path.join(home_dir, "sub", "service.log")
    for command in ([], ["--check-config"]):
        result = started.start(home_dir, root_dir, "-o", "log_file=%s" % log,
                               *command)
        assert result.returncode == 2, result.stderr
        assert ("Permission denied: no chown is safe there: %s can be "
                "changed by a user other than root" % home_dir) \
            in result.stderr
        assert "chown -h" not in result.stderr
        assert "chown nobody" not in result.stderr
    assert os.stat(target).st_uid == 0


@pytest.mark.parametrize("way", ["directory", "link"])
def test_serving_as_root_refuses_a_log_another_user_can_reach(
        user_dir, root_dir, nobody, way, started):
    # run_as_root: root itself would open the log, following a directory
    # link of the user's on the way (only the file is opened O_NOFOLLOW).
    log = os.path.join(user_dir, "service.log")
    made = log
    if way == "link":
        plant(os.path.join(user_dir, "sub"), root_dir, nobody)
        log = os.path.join(user_dir, "sub", "x.log")
        made = os.path.join(root_dir, "x.log")
    pidfile = os.path.join(root_dir, "p.pid")
    started.pidfiles.append(pidfile)
    for command in ([], ["--check-config"]):
        result = run(["--daemon", "--listen", "127.0.0.1:%d" % free_port(),
                      "--pidfile", pidfile, "-o", "run_as_root=yes",
                      "-o", "greylist_log=", "-o", "log_file=%s" % log,
                      "-o", "greylist_db=%s/grey.db" % root_dir] + command,
                     cwd=root_dir)
        assert result.returncode == 2, result.stderr
        assert ("log_file %s: %s can be changed by a user other than root, "
                "whose links root would follow: put the log in a directory "
                "only root can write, or set user" % (log, user_dir)) \
            in result.stderr
        assert not os.path.lexists(made)


def test_a_failed_first_start_leaves_no_root_log_behind(
        started, user_dir, root_dir, nobody):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        result = started.start(user_dir, root_dir, "-o",
                               "log_file=%s/service.log" % root_dir,
                               port=taken.getsockname()[1])
    finally:
        taken.close()
    assert result.returncode == 1
    assert "cannot listen on" in result.stderr
    for path in (os.path.join(user_dir, "greylist.log"),
                 os.path.join(root_dir, "service.log")):
        assert os.stat(path).st_uid == nobody.pw_uid, path
    result = started.start(user_dir, root_dir, "-o",
                           "log_file=%s/service.log" % root_dir)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
    started.stop()


# -- the pidfile --------------------------------------------------------------

def test_a_pidfile_link_is_refused(started, user_dir, root_dir, victim):
    pidfile = os.path.join(root_dir, "p.pid")
    os.symlink(victim, pidfile)
    for command in ([], ["--check-config"]):
        result = started.start(user_dir, root_dir, *command)
        assert_untouched(victim)
        assert os.path.islink(pidfile)
        assert result.returncode == 2, result.stderr
        assert "pidfile %s is a symbolic link" % pidfile in result.stderr


def test_a_pidfile_in_a_directory_the_user_can_write_is_refused(
        started, user_dir, root_dir):
    pidfile = os.path.join(user_dir, "p.pid")
    for command in ([], ["--check-config"]):
        result = started.start(user_dir, root_dir, *command,
                               pidfile=pidfile)
        assert result.returncode == 2, result.stderr
        assert ("pidfile %s: %s can be changed by a user other than root, "
                "who could make the pid one the init script signals: put "
                "the pidfile in a directory only root can write, such as "
                "/run" % (pidfile, user_dir)) in result.stderr
    assert not os.path.exists(pidfile)


def test_the_service_holds_its_pidfile_read_only(started, user_dir,
                                                 root_dir):
    result = started.start(user_dir, root_dir)
    assert result.returncode == 0, result.stderr
    pid = started.pid()
    pidfile = os.path.join(root_dir, "p.pid")
    held = []
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            if os.readlink("/proc/%d/fd/%s" % (pid, fd)) == pidfile:
                held.append(fd)
        except OSError:
            pass
    assert len(held) == 1          # the lock's, and no other
    flags = [line.split()[1] for line in
             read("/proc/%d/fdinfo/%s" % (pid, held[0])).splitlines()
             if line.startswith("flags:")][0]
    assert int(flags, 8) & os.O_ACCMODE == os.O_RDONLY
    # The lock on it still keeps a second instance out.
    second = started.start(user_dir, root_dir)
    assert second.returncode == 1
    assert "already running (pid %d, %s)" % (pid, pidfile) in second.stderr
    started.stop()


# -- the admin commands -------------------------------------------------------

@pytest.mark.parametrize("user", ["nobody", None])
def test_db_pass_as_root_on_a_dangling_store_link_creates_nothing(
        user_dir, root_dir, nobody, user):
    goal = os.path.join(root_dir, "made.db")
    plant(os.path.join(user_dir, "grey.db"), goal, nobody)
    args = ["-o", "greylist_db=%s/grey.db" % user_dir,
            "--db-pass", "192.0.2.1", "a@example.net", "b@example.org"]
    if user:
        args = ["--user", user] + args
    result = run(args, cwd=root_dir)
    for name in ("made.db", "made.db-wal", "made.db-shm"):
        assert not os.path.lexists(os.path.join(root_dir, name))
    assert result.returncode != 0
    if not user:
        assert ("greylisting store %s/grey.db: %s can be changed by a user "
                "other than root, whose links root would follow: set user"
                % (user_dir, user_dir)) in result.stderr


def test_db_commands_as_root_work_as_the_serving_user(user_dir, root_dir,
                                                      nobody):
    store = os.path.join(user_dir, "grey.db")
    result = run(["--user", "nobody", "-o", "greylist_db=%s" % store,
                  "--db-pass", "192.0.2.1", "a@example.net",
                  "b@example.org"], cwd=root_dir)
    assert result.returncode == 0, result.stderr
    for name in ("grey.db", "grey.db-wal", "grey.db-shm"):
        path = os.path.join(user_dir, name)
        if os.path.exists(path):
            info = os.stat(path)
            assert info.st_uid == nobody.pw_uid, name
            assert stat.S_IMODE(info.st_mode) == 0o640, name
    result = run(["--user", "nobody", "-o", "greylist_db=%s" % store,
                  "--db-list"], cwd=root_dir)
    assert result.returncode == 0, result.stderr
    assert "192.0.2.0/24 a@example.net b@example.org" in result.stdout


# -- a PostgreSQL store: libpq runs as the user ------------------------------

PG_PASSWORD = "Pg-pass-of-nobody"


def pg_login(postgresql):
    """A role of its own and its database: the role's name, and the line
    of a passfile that logs it in."""
    role = postgresql.login(PG_PASSWORD).split("//")[1].split(":")[0]
    return role, "127.0.0.1:%d:%s:%s:%s\n" % (postgresql.port, role, role,
                                              PG_PASSWORD)


def pg_args(postgresql, role, passfile, root_dir, command, *extra):
    """The arguments of a run as root, serving as nobody, of ``command``
    on the database of ``role``, with the passfile the URI names."""
    uri = "postgresql://%s@127.0.0.1:%d/%s?passfile=%s" % (
        role, postgresql.port, role, passfile)
    return ["--user", "nobody", "--pidfile", os.path.join(root_dir, "p.pid"),
            "-o", "greylist_db=%s" % uri, "-o", "greylist_log=",
            "-o", "allowed_domains=example.org"] + list(extra) + [command]


@pytest.mark.parametrize("command", ["--check-config", "--db-stats"])
def test_libpq_reads_a_passfile_as_the_user_never_as_root(
        user_dir, root_dir, nobody, postgresql, command):
    # The password is in a root-only file (as root's ~/.pgpass, or any
    # secret of root's that a login line could be read from); the user
    # links its passfile to it.  Read as the user, it cannot be: libpq
    # has no password, and the login fails.
    role, line = pg_login(postgresql)
    secret = os.path.join(root_dir, "pgpass")
    with open(secret, "w") as stream:
        stream.write(line)
    os.chmod(secret, 0o600)
    passfile = os.path.join(user_dir, "pgpass")
    plant(passfile, secret, nobody)
    args = pg_args(postgresql, role, passfile, root_dir, command)
    result = run(args, cwd=root_dir)
    assert result.returncode == (2 if command == "--check-config" else 1), \
        result.stdout + result.stderr
    assert "no password supplied" in result.stderr
    # The user's own passfile, the same line: the login works, as the
    # user (who can read it), and the store is usable.
    os.unlink(passfile)
    shutil.copy(secret, passfile)
    os.chown(passfile, nobody.pw_uid, nobody.pw_gid)
    result = run(args, cwd=root_dir)
    assert result.returncode == 0, result.stderr
    if command == "--check-config":
        assert ": usable (psycopg" in result.stdout
    else:
        assert result.stdout.split() == ["CLIENT", "0", "GREY", "0",
                                         "WHITE", "0"]


def test_a_fifo_for_a_passfile_ends_check_config_with_an_error(
        user_dir, root_dir, nobody, postgresql):
    # The libpq of newer drivers opens the passfile before it looks at
    # what it is: a FIFO blocks it until somebody writes, which nobody
    # does, and the check is stopped at its deadline, 4 waits of 2 s
    # (greylist_db_timeout, but libpq's floor of 2 s to connect) and 5 s.
    # An older libpq (psycopg2 2.9 on Python 3.6) says it is no plain
    # file, and the login fails for want of a password.  Either way the
    # check ends, with an error.
    role, _ = pg_login(postgresql)
    passfile = os.path.join(user_dir, "pgpass")
    os.mkfifo(passfile, 0o600)
    os.chown(passfile, nobody.pw_uid, nobody.pw_gid)
    result = run(pg_args(postgresql, role, passfile, root_dir,
                         "--check-config", "-o", "greylist_db_timeout=1"),
                 cwd=root_dir, timeout=120)
    stopped = ("smtpproxy: error: the check of greylisting store "
               "postgresql://%s@127.0.0.1:%d/%s?passfile=%s as nobody did "
               "not finish within 13 s, and was stopped: something it reads "
               "blocks (a FIFO where a file should be"
               % (role, postgresql.port, role, passfile))
    refused = ('password file "%s" is not a plain file' % passfile)
    if refused in result.stderr:
        assert result.returncode == 2, result.stderr
        assert "fe_sendauth: no password supplied" in result.stderr
    else:
        assert result.returncode == 1, result.stderr
        assert stopped in result.stderr


def test_a_driver_only_root_can_read_is_imported_before_the_switch(
        user_dir, root_dir, nobody, postgresql, upstream, started):
    # The driver where only root can read it, as with an interpreter (and
    # its site-packages) under /root: imported after the switch to the
    # user, it is not found; imported before, the service works.
    import psycopg2
    private = tempfile.mkdtemp(prefix="smtpproxy-driver-")   # mode 0700
    try:
        origin = os.path.dirname(os.path.dirname(psycopg2.__file__))
        for name in os.listdir(origin):
            if name == "psycopg2" or name.startswith("psycopg2_binary"):
                if os.path.isdir(os.path.join(origin, name)):
                    shutil.copytree(os.path.join(origin, name),
                                    os.path.join(private, name))
        role, line = pg_login(postgresql)
        passfile = os.path.join(user_dir, "pgpass")
        with open(passfile, "w") as stream:
            stream.write(line)
        os.chmod(passfile, 0o600)
        os.chown(passfile, nobody.pw_uid, nobody.pw_gid)
        uri = "postgresql://%s@127.0.0.1:%d/%s?passfile=%s" % (
            role, postgresql.port, role, passfile)
        # The URI in a subclass, as a site's own handler may have it: no
        # configuration key is read (whose check imports the driver too).
        with open(os.path.join(private, "sitehandler.py"), "w") as stream:
            stream.write("import smtpproxy\n\n\n"
                         "class Policy(smtpproxy.GreyListingPolicy):\n"
                         "    greylist_db = %r\n" % uri)
        # No other copy of a driver on the path; no restart of the
        # interpreter (it would lose this path): the tunable is set.
        code = ("import os, sys; sys.path[:] = [p for p in sys.path if not "
                "os.path.isdir(os.path.join(p, 'psycopg2'))]; "
                "sys.path.insert(0, %r); sys.modules['psycopg'] = None; "
                "sys.path.insert(0, %r); import smtpproxy; "
                "sys.exit(smtpproxy.main(sys.argv[1:]))" % (private, ROOT))
        env = dict(os.environ, PYTHONPATH=HERE,
                   GLIBC_TUNABLES="glibc.malloc.tcache_count=0")
        args = started.arguments(
            user_dir, root_dir, "-o", "greylist_fail_mode=accept",
            "-o", "workers=2", "--upstream", "127.0.0.1:%d" % upstream.port)
        where = [arg.startswith("greylist_db=") for arg in args].index(True)
        del args[where - 1:where + 1]           # -o greylist_db=...
        args[args.index("smtpproxy.GreyListingPolicy")] = "sitehandler.Policy"
        check = subprocess.run(
            [sys.executable, "-c", code] + args[1:] + ["--check-config"],
            env=env, cwd=user_dir, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        assert check.returncode == 0, check.stderr
        assert ": usable (psycopg2" in check.stdout, check.stdout
        result = subprocess.run(
            [sys.executable, "-c", code] + args, env=env, cwd=user_dir,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, timeout=60)
        assert result.returncode == 0, result.stderr
        # Greylisted by the store (the fail mode would accept).
        assert rcpt_code(started.port) == 451
        assert rcpt_code(started.port, sender="c@example.net") == 451
        started.stop()
        assert "PostgreSQL" not in read(os.path.join(user_dir,
                                                     "service.log"))
    finally:
        shutil.rmtree(private, ignore_errors=True)


@pytest.mark.parametrize("unreadable", ["directory", "file"])
def test_a_driver_the_user_cannot_read_is_not_said_to_be_missing(
        user_dir, root_dir, nobody, unreadable):
    # Started by an ordinary user (no switch, nothing imported as root),
    # with a driver only root can read: its directory (which Python
    # then takes for an empty namespace package) or its __init__.py.
    # --check-config and the start say alike that it cannot be imported,
    # and why, never that it is not installed (nor that libpq cannot read
    # the URI).  Debian's python3: nobody cannot reach root's pyenv.
    python = "/usr/bin/python3"
    assert os.path.exists(python), "Debian's python3, as CI has"
    package = os.path.join(root_dir, "site", "psycopg2")
    os.makedirs(package)
    with open(os.path.join(package, "__init__.py"), "w") as stream:
        stream.write("connect = None\n")
    os.chmod(os.path.join(root_dir, "site"), 0o755)
    os.chmod(root_dir, 0o755)
    if unreadable == "directory":
        os.chmod(package, 0o700)
        why = "(%s: this user cannot read it)" % package
    else:
        os.chmod(os.path.join(package, "__init__.py"), 0o600)
        why = "(PermissionError: [Errno 13] Permission denied: '%s" % package
    code = ("import sys; sys.path[:0] = [%r, %r]; "
            "sys.modules['psycopg'] = None; import smtpproxy; "
            "sys.exit(smtpproxy.main(sys.argv[1:]))"
            % (os.path.join(root_dir, "site"), ROOT))
    said = []
    for args in (["--check-config"],
                 ["--listen", "127.0.0.1:%d" % free_port(),
                  "--upstream", "127.0.0.1:9", "--pidfile", ""]):
        result = subprocess.run(
            [shutil.which("runuser") or "/sbin/runuser", "-u", "nobody",
             "--", python, "-c", code,
             "-o", "greylist_db=postgresql://greylist@127.0.0.1:9/greylist",
             "-o", "greylist_log=%s/greylist.log" % user_dir,
             "-o", "allowed_domains=example.org",
             "-o", "allowed_senders="] + args,
            cwd=user_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, timeout=60)
        assert result.returncode == 1, (args, result.stderr)
        said.append([line for line in result.stderr.splitlines()
                     if line.startswith("smtpproxy: error: ")])
    assert said[0] == said[1] and len(said[0]) == 1, said
    assert ("greylist_db is a PostgreSQL database, but its driver psycopg2 "
            "cannot be imported %s" % why) in said[0][0], said
    assert said[0][0].endswith(", for %s: install it again, or make its "
                               "files readable by the serving user"
                               % python), said
    assert "not installed" not in said[0][0]


# -- the switch to the user ---------------------------------------------------

def test_a_check_as_the_user_is_that_user_for_good_and_returns_its_value(
        nobody, user_dir):
    def check():
        return [os.getresuid(), os.getresgid(), sorted(os.getgroups()),
                [os.environ.get(name) for name in ("HOME", "USER",
                                                   "LOGNAME")]]
    home = os.environ.get("HOME")
    identity = (nobody.pw_uid, nobody.pw_gid, "nobody")
    assert smtpproxy.check_as(identity, check) == [
        [nobody.pw_uid] * 3, [nobody.pw_gid] * 3,
        sorted(set(os.getgrouplist("nobody", nobody.pw_gid))),
        [nobody.pw_dir, "nobody", "nobody"]]
    assert (os.getresuid(), os.environ.get("HOME")) == ((0, 0, 0), home)

    def refuse():
        raise smtpproxy.StartError("refused, as a check does", 2)
    with pytest.raises(smtpproxy.StartError) as raised:
        smtpproxy.check_as(identity, refuse)
    assert (str(raised.value), raised.value.status) == (
        "refused, as a check does", 2)

    # One that never ends is stopped at its deadline.
    fifo = os.path.join(user_dir, "fifo")
    os.mkfifo(fifo, 0o600)
    os.chown(fifo, nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(smtpproxy.StartError) as raised:
        smtpproxy.check_as(identity, lambda: open(fifo).read(), 0.5,
                           "the reading of %s" % fifo)
    assert str(raised.value).startswith(
        "the reading of %s as nobody did not finish within 0.5 s, and was "
        "stopped" % fifo)


def test_the_service_is_the_user_with_its_home(nobody):
    # libpq finds ~/.pgpass and ~/.postgresql/ by HOME: the user's, not
    # root's.
    code = ("import json, os, smtpproxy; smtpproxy.drop_privileges((%d, %d, "
            "'nobody')); print(json.dumps([os.getresuid(), [os.environ.get("
            "name) for name in ('HOME', 'USER', 'LOGNAME')]]))"
            % (nobody.pw_uid, nobody.pw_gid))
    env = dict(os.environ, PYTHONPATH=ROOT, HOME="/root", USER="root",
               LOGNAME="root")
    output = subprocess.check_output([sys.executable, "-c", code], env=env,
                                     universal_newlines=True)
    assert json.loads(output) == [[nobody.pw_uid] * 3,
                                  [nobody.pw_dir, "nobody", "nobody"]]


# -- --check-config -----------------------------------------------------------

def test_check_config_refuses_a_store_link_and_changes_nothing(
        started, user_dir, root_dir, victim, nobody):
    plant(os.path.join(user_dir, "grey.db"), victim, nobody)
    result = started.start(user_dir, root_dir, "--check-config")
    assert result.returncode == 1
    assert "is a symbolic link to a file user nobody cannot write" \
        in result.stderr
    assert_untouched(victim)
    # Nothing was made: no log, no pidfile.
    assert sorted(os.listdir(user_dir)) == ["grey.db"]
    assert os.listdir(root_dir) == ["shadow"]


# -- the policy service's socket ----------------------------------------------

def start_policy(started, user_dir, root_dir, path, *extra):
    """Start the policy service alone on the UNIX socket ``path``."""
    return started.start(user_dir, root_dir, "-o", "smtp_proxy=no",
                         "-o", "policy_listen=unix:%s" % path, *extra)


def policy_answer(path):
    client = socket.socket(socket.AF_UNIX)
    client.settimeout(10)
    client.connect(path)
    client.sendall(b"request=smtpd_access_policy\nprotocol_state=DATA\n\n")
    answer = client.recv(4096)
    client.close()
    return answer


@pytest.mark.parametrize("setgid", [False, True])
def test_the_policy_socket_is_made_with_its_mode_and_group(
        started, user_dir, root_dir, setgid):
    # A set-group-ID directory of the socket's own group is fine: it gives
    # the group bind() gives anyway.
    sockets = os.path.join(root_dir, "sockets")
    os.mkdir(sockets)
    if setgid:
        os.chown(sockets, 0, grp.getgrnam("nogroup").gr_gid)
        os.chmod(sockets, 0o2755)
    path = os.path.join(sockets, "policy")
    result = start_policy(started, user_dir, root_dir, path,
                          "-o", "policy_socket_mode=0620",
                          "-o", "policy_socket_group=nogroup")
    assert result.returncode == 0, result.stderr
    info = os.lstat(path)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o620
    assert info.st_gid == grp.getgrnam("nogroup").gr_gid
    assert info.st_uid == 0                 # made by root's bind()
    started.stop()


def test_a_set_group_id_directory_of_another_group_is_refused(
        started, user_dir, root_dir):
    # It would give the socket its group, and root changes no group on a
    # name (whoever may write the directory could swap it meanwhile).
    sockets = os.path.join(root_dir, "sockets")
    os.mkdir(sockets)
    os.chown(sockets, 0, grp.getgrnam("daemon").gr_gid)
    os.chmod(sockets, 0o2755)
    path = os.path.join(sockets, "policy")
    for command in (["--check-config"], []):
        result = start_policy(started, user_dir, root_dir, path,
                              "-o", "policy_socket_group=nogroup", *command)
        assert result.returncode == 2, result.stderr
        assert ("policy_listen unix:%s: %s is set-group-ID: the socket "
                "would get its group daemon, not nogroup" % (path, sockets)) \
            in result.stderr
        assert ("clear the bit (chmod g-s %s) or set policy_socket_group = "
                "daemon" % sockets) in result.stderr
        assert os.listdir(sockets) == []


def test_a_policy_socket_through_a_users_directory_link_is_refused(
        started, user_dir, root_dir, nobody):
    # The user's "sub" leads to a directory of root's: root would bind
    # (and, at the stop, remove) the socket there.
    private = os.path.join(root_dir, "private")
    os.mkdir(private)
    plant(os.path.join(user_dir, "sub"), root_dir, nobody)
    path = os.path.join(user_dir, "sub", "private", "policy")
    for command in (["--check-config"], []):
        result = start_policy(started, user_dir, root_dir, path, *command)
        assert result.returncode == 2, result.stderr
        assert ("policy_listen unix:%s: %s can be changed by a user other "
                "than root" % (path, user_dir)) in result.stderr
        assert "put the socket in a directory whose parent directories " \
            "only root can write" in result.stderr
        assert os.listdir(private) == []


def test_the_policy_sockets_directory_is_not_opened_through_a_link(
        started, user_dir, root_dir):
    private = os.path.join(root_dir, "private")
    os.mkdir(private)
    os.symlink(private, os.path.join(root_dir, "link"))
    path = os.path.join(root_dir, "link", "policy")
    for command in (["--check-config"], []):
        result = start_policy(started, user_dir, root_dir, path, *command)
        assert result.returncode == 2, result.stderr
        assert ("policy_listen unix:%s: %s/link is a symbolic link: name "
                "the directory itself" % (path, root_dir)) in result.stderr
        assert os.listdir(private) == []


def test_postfixs_layout_works_and_a_stale_socket_is_replaced(
        started, user_dir, root_dir, nobody):
    # The README's: the socket in a directory of another user's (Postfix's
    # private/, 0700 postfix), under directories only root can write.
    private = os.path.join(root_dir, "private")
    os.mkdir(private)
    os.chmod(private, 0o700)
    os.chown(private, nobody.pw_uid, nobody.pw_gid)
    path = os.path.join(private, "smtpproxy")
    stale = socket.socket(socket.AF_UNIX)   # the previous run's, killed
    stale.bind(path)
    stale.close()
    assert os.lstat(path).st_gid == 0
    result = start_policy(started, user_dir, root_dir, path,
                          "-o", "policy_socket_group=nogroup")
    assert result.returncode == 0, result.stderr
    info = os.lstat(path)                   # a new one, and in use
    assert stat.S_ISSOCK(info.st_mode)
    assert (info.st_uid, info.st_gid) == (0, grp.getgrnam("nogroup").gr_gid)
    assert policy_answer(path) == b"action=DUNNO\n\n"
    started.stop()
    assert os.listdir(private) == []


def test_a_failed_start_leaves_a_file_swapped_in_for_the_socket(
        root_dir, victim):
    # The start failed after the bind (the store check, say), and the
    # socket's name now is another file of root's: close() removes the
    # socket it made, or nothing.
    private = os.path.join(root_dir, "private")
    os.mkdir(private)
    path = os.path.join(private, "policy")
    descriptors = len(os.listdir("/proc/self/fd"))
    service = smtpproxy.Service(
        argparse.Namespace(config=None), smtpproxy.GreyListingPolicy,
        {"smtp_proxy": False, "policy_listen": "unix:%s" % path}, None, [])
    service._listen(smtpproxy.GreyListingPolicy, None)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    os.unlink(path)
    os.link(victim, path)                   # root's file, under the name
    service.close()
    assert_untouched(path)
    assert len(os.listdir("/proc/self/fd")) == descriptors


def test_a_switch_that_fails_leaves_root_as_it_was():
    # A uid the kernel refuses: the groups and gid switched before it
    # are root's again.
    groups = os.getgroups()
    with pytest.raises((OverflowError, OSError)):
        with smtpproxy._effective_user((2 ** 40, 65534, "nobody")):
            pass
    assert (os.geteuid(), os.getegid(), os.getgroups()) == (0, 0, groups)


# -- the TLS certificate and key ----------------------------------------------

def copy_pair(certificates, directory):
    """The test pair, as root keeps it (/etc/ssl/private): root's, 0600."""
    paths = []
    for name in ("server.pem", "server.key"):
        path = os.path.join(directory, name)
        shutil.copy(certificates.path(name), path)
        os.chmod(path, 0o600)
        paths.append(path)
    return paths


def test_a_tls_key_linked_to_roots_key_is_read_as_the_user(
        user_dir, root_dir, nobody, certificates, started):
    # The user's link to root's key: read as root, root's private key
    # would be served by (and so be in the memory of) the user's process.
    private = os.path.join(root_dir, "private")
    os.mkdir(private, 0o700)
    cert, key = copy_pair(certificates, private)
    link = os.path.join(user_dir, "key.pem")
    plant(link, key, nobody)
    for command in ([], ["--check-config"]):
        result = started.start(user_dir, root_dir, "-o", "tls_cert=%s" % cert,
                               "-o", "tls_key=%s" % link, *command)
        assert result.returncode == 2, result.stderr
        assert ("tls_key %s: Permission denied as nobody (other users than "
                "root can change %s, so it is read as the serving user): put "
                "it in a directory only root can write" % (link, user_dir)) \
            in result.stderr
    assert not os.path.exists(os.path.join(root_dir, "p.pid"))


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_tls_key_that_is_no_file_is_refused_unopened(
        user_dir, root_dir, certificates, kind, started):
    # A FIFO would block the start (and the init script's reload) in
    # open(); run()'s timeout fails the test if it does.
    cert = copy_pair(certificates, root_dir)[0]
    key = os.path.join(root_dir, "fifo.key")
    if kind == "fifo":
        os.mkfifo(key, 0o600)
    else:
        os.mkdir(key, 0o700)
    for command in ([], ["--check-config"]):
        result = started.start(user_dir, root_dir, "-o", "tls_cert=%s" % cert,
                               "-o", "tls_key=%s" % key, *command)
        assert result.returncode == 2, result.stderr
        assert ("tls_key %s is not a regular file: name the file itself"
                % key) in result.stderr


def test_serving_as_root_refuses_a_tls_key_another_user_can_reach(
        user_dir, root_dir, certificates):
    cert, key = copy_pair(certificates, user_dir)
    result = run(["--check-config", "-o", "run_as_root=yes",
                  "-o", "greylist_log=", "-o", "tls_cert=%s" % cert,
                  "-o", "tls_key=%s" % key,
                  "-o", "greylist_db=%s/grey.db" % root_dir], cwd=root_dir)
    assert result.returncode == 2, result.stderr
    assert ("tls_cert %s: %s can be changed by a user other than root, "
            "whose links root would follow: put it in a directory only root "
            "can write, or set user" % (cert, user_dir)) in result.stderr


def test_a_tls_pair_through_links_in_roots_directories_is_served(
        user_dir, root_dir, certificates, started):
    # As Let's Encrypt keeps them: live/NAME/privkey.pem ->
    # ../../archive/NAME/privkey1.pem, all root's, archive/ 0700.
    archive = os.path.join(root_dir, "archive", "mail")
    os.makedirs(archive, 0o700)
    live = os.path.join(root_dir, "live", "mail")
    os.makedirs(live, 0o755)
    copy_pair(certificates, archive)
    for name in ("server.pem", "server.key"):
        os.symlink(os.path.join("..", "..", "archive", "mail", name),
                   os.path.join(live, name))
    result = started.start(user_dir, root_dir,
                           "-o", "tls_cert=%s/server.pem" % live,
                           "-o", "tls_key=%s/server.key" % live)
    assert result.returncode == 0, result.stderr
    client = smtplib.SMTP("127.0.0.1", started.port, timeout=10)
    client.ehlo("client.example.net")
    client.starttls(context=certificates.client_context())
    assert client.ehlo("client.example.net")[0] == 250
    client.quit()
    started.stop()


# -- files readable by every user ---------------------------------------------

def test_a_store_and_a_log_readable_by_everyone_are_warned_about(
        home_dir, root_dir, nobody, started):
    # Left 0644 by an earlier version: they hold mail addresses.
    store = os.path.join(home_dir, "grey.db")
    log = os.path.join(home_dir, "service.log")
    for path in (store, log):
        open(path, "w").close()
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
        os.chmod(path, 0o644)
    result = started.start(home_dir, root_dir, "--check-config")
    assert result.returncode == 0, result.stderr
    for path in (store, log):
        assert ("smtpproxy: warning: %s is readable by every user (mode "
                "0644) and holds mail addresses: chmod o-r %s (smtpproxy "
                "makes its files 0640)\n" % (path, path)) in result.stderr
    result = started.start(home_dir, root_dir)
    assert result.returncode == 0, result.stderr
    started.stop()
    for path in (store, log):
        assert ("WARNING %s is readable by every user (mode 0644)" % path) \
            in read(log)


# -- the list files are read as the serving user ------------------------------

@pytest.mark.parametrize("check", [["--check-config"], ["--listen", "-"]])
def test_list_files_are_read_as_the_serving_user_never_as_root(
        tmp_path, user_dir, check):
    # A whitelist in a directory the serving user can write: it plants
    # FILE.local there, a link to a file only root may read.  Root never
    # reads it: the check runs as the user, who cannot, and says so.
    secret = tmp_path / "only-root"
    secret.write_text(SECRET)
    os.chmod(str(secret), 0o600)
    listed = os.path.join(user_dir, "whitelist_clients")
    with open(listed, "w") as whitelist:
        whitelist.write("192.0.2.7\n")
    os.chmod(listed, 0o644)
    os.symlink(str(secret), listed + ".local")
    config = tmp_path / "smtpproxy.conf"
    config.write_text("user = nobody\nwhitelist_clients = %s\n"
                      "greylist_db = %s/greylist.db\ngreylist_log =\n"
                      "pidfile =\n" % (listed, user_dir))
    if check[0] == "--listen":
        check = ["--listen", "127.0.0.1:%d" % free_port()]
    result = run(["--config", str(config)] + check, str(tmp_path))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert ("whitelist_clients %s.local: cannot read it: Permission denied"
            % listed) in result.stderr, result.stderr
    assert "secret-hash" not in result.stdout + result.stderr
    # The same file, the user's to read: the start's check passes it.
    os.unlink(listed + ".local")
    result = run(["--config", str(config), "--check-config"], str(tmp_path))
    assert result.returncode == 0, result.stderr
