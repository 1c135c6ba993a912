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


def trial_script(directory, python_dir, modern):
    """The quick start's commands, run from a copy of the checkout (what
    they use of it: smtpproxy.py) that any user can read."""
    checkout = os.path.join(os.path.dirname(directory), "checkout")
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
    script = script.replace("/tmp/smtpproxy-trial", directory)
    # Both at once: the first port chosen may hold "8025" (38025, say).
    ports = {"2525": str(free_port()), "8025": str(free_port())}
    script = re.sub("2525|8025", lambda match: ports[match.group()], script)
    # Unbuffered: the throwaway server prints to a pipe here, not to a
    # terminal, and is killed at the end.
    return ("export PATH=%s:$PATH PYTHONUNBUFFERED=1\ncd %s\n%s"
            % (python_dir, checkout, script))


def check_trial(result, directory):
    output = result.stdout
    assert result.returncode == 0, output
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
    """Where the trial runs, as /tmp/smtpproxy-trial: in a directory that
    every user may pass through (pytest's own is root's alone)."""
    base = tempfile.mkdtemp(prefix="smtpproxy-readme-", dir="/tmp")
    os.chmod(base, 0o1777)
    yield os.path.join(base, "trial")       # made by the quick start
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.timeout(60)
def test_the_quick_start_works_as_written(trial_directory):
    directory = trial_directory
    script = trial_script(directory, os.path.dirname(sys.executable),
                          sys.version_info >= (3, 12))
    result = subprocess.run(["bash", "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=50)
    check_trial(result, directory)


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


@pytest.mark.timeout(60)
def test_the_quick_start_works_for_an_ordinary_user(trial_directory):
    assert os.geteuid() == 0, "the tests run as root, as CI does"
    python = system_python()
    assert python, "Debian's python3 (3.11) with its smtpd module"
    directory = trial_directory
    script = trial_script(directory, "/usr/bin", False)
    result = subprocess.run(
        [shutil.which("runuser") or "/sbin/runuser", "-u", "nobody", "--",
         "bash", "-c", script],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True, timeout=50)
    check_trial(result, directory)
