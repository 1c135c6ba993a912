"""The README's quick start, run as written: as root, and as an ordinary
user with the system's Python.

The trial directory and the two ports are the only things changed, so
that a run cannot meet another; Python 3.12 and later, which have no
smtpd module, get the throwaway server the README names for them.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import ROOT, free_port

README = os.path.join(ROOT, "README.md")


def quick_start_blocks():
    """The shell blocks of the README's quick start, in order."""
    with open(README) as readme:
        text = readme.read()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks, current = [], []
    for line in section.splitlines():
        if line.startswith("    ") or (current and not line.strip()):
            current.append(line[4:])
        elif current:
            blocks.append("\n".join(current).strip() + "\n")
            current = []
    if current:
        blocks.append("\n".join(current).strip() + "\n")
    return blocks


def trial_script(base, python_dir, modern):
    """The quick start's commands, run from a copy of the checkout (what
    they use of it: smtpproxy.py) that any user can read, making the
    trial's directory in ``base`` (TMPDIR)."""
    checkout = os.path.join(base, "checkout")
    if not os.path.isdir(checkout):
        os.mkdir(checkout)
        shutil.copy(os.path.join(ROOT, "smtpproxy.py"), checkout)
        os.chmod(checkout, 0o755)
    try_it, let_through = quick_start_blocks()[:2]
    script = try_it + let_through
    if modern:
        # What the README says to do on Python 3.12 and later.
        script = script.replace(
            "python3 -W ignore -m smtpd -n -c DebuggingServer",
            "python3 -m aiosmtpd -n -l")
        assert "aiosmtpd -n -l" in script
    # A directory of the run's own, wherever mktemp makes it.
    assert 'cd "$(mktemp -d)"' in script
    # Both at once: the first port chosen may hold "8025" (38025, say).
    ports = {"2525": str(free_port()), "8025": str(free_port())}
    script = re.sub("2525|8025", lambda match: ports[match.group()], script)
    # Unbuffered: the throwaway server prints to a pipe here, not to a
    # terminal, and is killed at the end.
    return ("export PATH=%s:$PATH PYTHONUNBUFFERED=1 TMPDIR=%s\ncd %s\n%s"
            % (python_dir, base, checkout, script))


def trial_directories(base):
    return set(name for name in os.listdir(base) if name != "checkout")


def check_trial(result, base, before=()):
    """The trial's output, and the log in the one directory it made in
    ``base`` (beside those ``before``)."""
    output = result.stdout
    assert result.returncode == 0, output
    made = trial_directories(base) - set(before)
    assert len(made) == 1, (made, output)
    directory = os.path.join(base, made.pop())
    tries = output.split("RCPT:")[1:]
    assert len(tries) == 2, output
    first, second = tries
    assert first.startswith(" 451 4.7.1 Greylisted"), output
    assert second.startswith(" 250 "), output
    assert "DATA: 250 " in output, output
    assert "Subject: trial" in output, output        # the server printed it
    with open(os.path.join(directory, "greylist.log")) as log:
        lines = log.read().splitlines()
    assert [line.split(" | ")[5] for line in lines] == ["DEFERRED",
                                                       "ACCEPTED"]


@pytest.fixture
def trial_directory():
    """The TMPDIR of the trial, standing for /tmp: a sticky directory
    every user may make theirs in (pytest's own is root's alone)."""
    base = tempfile.mkdtemp(prefix="smtpproxy-readme-", dir="/tmp")
    os.chmod(base, 0o1777)
    yield base                  # the quick start makes its directory there
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.timeout(60)
def test_the_quick_start_works_as_written(trial_directory):
    script = trial_script(trial_directory, os.path.dirname(sys.executable),
                          sys.version_info >= (3, 12))
    result = subprocess.run(["bash", "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=50)
    check_trial(result, trial_directory)


def system_python():
    """The system's python3 (an ordinary user cannot reach root's pyenv),
    if it has the smtpd module the quick start uses."""
    python = "/usr/bin/python3"
    if not os.path.exists(python):
        return None
    found = subprocess.run([python, "-W", "ignore", "-c", "import smtpd"],
                           stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    return python if found.returncode == 0 else None


def run_as_nobody(script):
    return subprocess.run(
        [shutil.which("runuser") or "/sbin/runuser", "-u", "nobody", "--",
         "bash", "-c", script],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True, timeout=50)


@pytest.mark.timeout(60)
def test_the_quick_start_works_for_an_ordinary_user(trial_directory):
    assert os.geteuid() == 0, "the tests run as root, as CI does"
    python = system_python()
    assert python, "Debian's python3 (3.11) with its smtpd module"
    check_trial(run_as_nobody(trial_script(trial_directory, "/usr/bin",
                                           False)), trial_directory)


@pytest.mark.timeout(100)
def test_the_quick_start_works_as_root_then_as_an_ordinary_user(
        trial_directory):
    # On one machine, one after the other: each run in a directory of
    # its own, none meeting what the other left.
    assert os.geteuid() == 0, "the tests run as root, as CI does"
    assert system_python(), "Debian's python3 (3.11) with its smtpd module"
    script = trial_script(trial_directory, "/usr/bin", False)
    result = subprocess.run(["bash", "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=45)
    check_trial(result, trial_directory)
    before = trial_directories(trial_directory)
    check_trial(run_as_nobody(script), trial_directory, before)
