"""Installing: `pip install .` and copying the single file (issue 4)."""

import os
import shutil
import subprocess
import sys

from conftest import ROOT
import smtpproxy

DATA_FILES = ["greylist.conf.dist", "whitelist_clients", "init.d/smtpproxy",
              "default/smtpproxy", "systemd/smtpproxy.service"]


def source_copy(tmp_path):
    """The files setup.py needs, copied: pip builds in the source tree."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "smtpproxy.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), str(source))
    shutil.copytree(os.path.join(ROOT, "contrib"), str(source / "contrib"))
    return source


def pip_version():
    output = subprocess.check_output([sys.executable, "-m", "pip",
                                      "--version"], universal_newlines=True)
    return tuple(int(part) for part in output.split()[1].split(".")[:2])


def test_pip_install_gives_the_command_and_the_service_files(tmp_path):
    prefix = tmp_path / "prefix"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-index",
         "--no-deps", "--no-build-isolation", "--prefix", str(prefix),
         str(source_copy(tmp_path))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True)
    assert pip.returncode == 0, pip.stdout
    # Built the standard way (pyproject.toml, PEP 517), not by the legacy
    # setup.py that pip warns of (or will); pip before 19 knows only that.
    assert "DEPRECATION" not in pip.stdout
    if pip_version() >= (19,):
        assert "(setup.py)" not in pip.stdout
        assert "setup.py install" not in pip.stdout
    script = prefix / "bin" / "smtpproxy"
    assert os.access(str(script), os.X_OK)
    site = [os.path.join(path, name) for path, dirs, _ in os.walk(str(prefix))
            for name in dirs if name == "site-packages"]
    assert len(site) == 1
    assert os.path.exists(os.path.join(site[0], "smtpproxy.py"))
    env = dict(os.environ, PYTHONPATH=site[0])
    output = subprocess.check_output([str(script), "--version"], env=env,
                                     universal_newlines=True)
    assert output == "smtpproxy %s\n" % smtpproxy.__version__
    share = prefix / "share" / "smtpproxy"
    for name in DATA_FILES:
        with open(str(share / name)) as installed, \
                open(os.path.join(ROOT, "contrib", name)) as original:
            assert installed.read() == original.read(), name
    assert os.access(str(share / "init.d" / "smtpproxy"), os.X_OK)


def test_the_single_file_runs_on_its_own(tmp_path):
    shutil.copy(os.path.join(ROOT, "smtpproxy.py"), str(tmp_path))
    # -I: no PYTHONPATH, no user site, not even the script's own checkout.
    result = subprocess.run(
        [sys.executable, "-I", str(tmp_path / "smtpproxy.py"),
         "--check-config", "-o", "allowed_domains=example.org",
         "-o", "run_as_root=yes"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "allowed_domains:\n    example.org\n" in result.stdout
