"""scripts/install-test-deps: fetches Prometheus without installing anything on the system (no service enabled
at boot). The package manager is replaced at its boundary: a fake `apt-get` on PATH that records its arguments
and "downloads" a real .deb built here with dpkg-deb; everything else (dpkg-deb, the script) is real."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb (Debian) is what the script uses")
def test_install_test_deps_unpacks_prometheus_and_installs_nothing(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "install-test-deps", repo / "scripts")
    # a minimal Debian package with a usr/bin/prometheus, as Debian's has
    tree = tmp_path / "pkg"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text("Package: prometheus\nVersion: 2.42.0\nArchitecture: all\n"
                                             "Maintainer: test <t@example.com>\nDescription: test\n")
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "usr" / "bin" / "prometheus").write_text("#!/bin/sh\necho 'prometheus, version 2.42.0'\n")
    (tree / "usr" / "bin" / "prometheus").chmod(0o755)
    deb = tmp_path / "prometheus_2.42.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(tree), str(deb)], check=True,
                   capture_output=True)
    # PATH: every tool of /usr/bin and /bin except prometheus, apt-get and systemctl; apt-get is the fake
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for directory in ("/usr/bin", "/bin", "/usr/sbin", "/sbin"):
        for tool in os.listdir(directory) if os.path.isdir(directory) else []:
            if tool not in ("prometheus", "apt-get", "systemctl") and not (bin_dir / tool).exists():
                (bin_dir / tool).symlink_to(os.path.join(directory, tool))
    calls = tmp_path / "apt-get.calls"
    (bin_dir / "apt-get").write_text(f'#!/bin/sh\necho "$@" >> {calls}\ncp {deb} .\n')
    (bin_dir / "apt-get").chmod(0o755)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}

    first = subprocess.run(["bash", "scripts/install-test-deps"], cwd=repo, env=env, capture_output=True,
                           text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    unpacked = repo / ".cache" / "test-deps" / "prometheus" / "usr" / "bin" / "prometheus"
    assert os.access(unpacked, os.X_OK)
    assert "not installed on the system" in first.stdout and "prometheus, version 2.42.0" in first.stdout
    recorded = calls.read_text().split()
    assert "download" in recorded and "install" not in recorded  # never apt-get install: no service, no user

    again = subprocess.run(["bash", "scripts/install-test-deps"], cwd=repo, env=env, capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 0 and "prometheus present: .cache/test-deps" in again.stdout
    assert calls.read_text().count("download") == 1  # fetched once

