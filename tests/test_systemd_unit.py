"""The systemd unit (contrib/systemd/smtpproxy.service) and the README's
override for a venv, checked by systemd itself (issue 26):
`systemd-analyze verify` in a root of their own, which holds the
system's units, the unit, the override, and only the program the
install made, so that a command naming another is found out."""

import os
import re
import shutil
import subprocess

import pytest

from conftest import ROOT

UNIT = os.path.join(ROOT, "contrib", "systemd", "smtpproxy.service")
SYSTEM_UNITS = "/lib/systemd/system"

# No skip: .ci/run installs systemd (its systemd-analyze) where it lacks.


def readme_override():
    """The block the README gives for `systemctl edit smtpproxy`."""
    with open(os.path.join(ROOT, "README.md")) as readme:
        text = readme.read()
    after = text.split("`systemctl edit\nsmtpproxy`", 1)[1]
    block = re.search(r"\n\n((?:    .*\n)+)", after).group(1)
    lines = [line[4:] for line in block.splitlines()]
    assert lines[0] == "[Service]"
    return "\n".join(lines) + "\n"


def verify(tmp_path, program, override=None):
    """systemd-analyze verify of the unit in a root where ``program`` is
    the only smtpproxy; return (status, what it said)."""
    root = tmp_path / "root"
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    (root / "usr" / "lib" / "systemd").mkdir(parents=True)
    shutil.copytree(SYSTEM_UNITS, str(root / "usr" / "lib" / "systemd"
                                      / "system"), symlinks=True)
    shutil.copy(UNIT, str(units))
    if override is not None:
        (units / "smtpproxy.service.d").mkdir()
        (units / "smtpproxy.service.d" / "override.conf").write_text(override)
    installed = root / program.lstrip("/")
    installed.parent.mkdir(parents=True)
    installed.write_text("#!/bin/sh\n")
    installed.chmod(0o755)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "--root", str(root),
         "smtpproxy.service"], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
    return result.returncode, result.stdout


def test_the_unit_verifies_where_pip_as_root_installs_the_command(tmp_path):
    code, said = verify(tmp_path, "/usr/local/bin/smtpproxy")
    assert code == 0, said
    assert said == ""


def test_the_unit_names_a_command_found_out_when_it_is_not_there(tmp_path):
    # What makes the next test mean something: verify looks for them.
    code, said = verify(tmp_path, "/opt/smtpproxy/bin/smtpproxy")
    assert code != 0
    assert "/usr/local/bin/smtpproxy is not executable" in said


def test_the_readmes_override_for_a_venv_covers_start_and_reload(tmp_path):
    override = readme_override()
    assert "ExecStart=/opt/smtpproxy/bin/smtpproxy " in override
    code, said = verify(tmp_path, "/opt/smtpproxy/bin/smtpproxy", override)
    assert code == 0, said
    assert said == ""
