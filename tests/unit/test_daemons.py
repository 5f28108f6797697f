"""The spawner's command runs this very ovlfuse, whatever the current directory and PYTHONPATH hold."""

from __future__ import annotations

import os
import subprocess

import ovlfuse
from ovlfuse.sys import daemons


def test_the_command_runs_this_ovlfuse_from_anywhere(tmp_path):
    decoy = tmp_path / "ovlfuse"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise ImportError('the decoy was imported')\n")
    (decoy / "cli.py").write_text("raise ImportError('the decoy was imported')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run([*daemons.command(), "--version"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ovlfuse {ovlfuse.__version__}"


def test_the_import_path_is_absolute_and_starts_with_this_package():
    paths = daemons.import_path()
    assert paths[0] == os.path.dirname(os.path.dirname(os.path.abspath(ovlfuse.__file__)))
    assert all(os.path.isabs(p) for p in paths) and "" not in paths
