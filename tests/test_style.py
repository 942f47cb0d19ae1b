"""Style: flake8 over the repository with the project's settings (setup.cfg)."""
import subprocess
import sys

from tests.helpers import ROOT


def test_flake8_is_clean():
    proc = subprocess.run([sys.executable, "-m", "flake8", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
