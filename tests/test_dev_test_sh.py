"""
dev/test.sh on a machine where other apt processes hold the locks (unattended upgrades): run with stub commands
(apt-get, id, python) on an otherwise empty PATH, so nothing is installed and no test suite runs.
"""

import os
import shutil
import pathlib
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]

# another apt-get is refreshing the package lists, and an upgrade holds the dpkg lock: an install that does not
# ask to wait for the lock fails at once, as apt-get does
FAKE_APT_GET = """#!/bin/bash
echo "$@" >> "$APT_LOG"
case "$*" in
    *update*) echo "E: Could not get lock /var/lib/apt/lists/lock" >&2; exit 100;;
    *DPkg::Lock::Timeout=*) exit 0;;
esac
echo "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 4242 (unattended-upgr)" >&2
exit 100
"""


def test_apt_installs_wait_for_the_dpkg_lock(tmp_path):
    repo = tmp_path / "repo"
    (repo / "dev").mkdir(parents=True)
    shutil.copy(REPO / "dev" / "test.sh", repo / "dev" / "test.sh")
    (repo / "dev" / "setup_env.sh").write_text("")  # the virtual environment is not this test's business
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in [("apt-get", FAKE_APT_GET), ("id", "#!/bin/bash\necho 0\n"), ("python", "#!/bin/bash\nexit 0\n")]:
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    os.symlink(shutil.which("dirname"), bin_dir / "dirname")
    log = tmp_path / "apt.log"
    proc = subprocess.run(["/bin/bash", str(repo / "dev" / "test.sh")], capture_output=True, text=True, timeout=60,
                          env={"PATH": str(bin_dir), "APT_LOG": str(log)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "could not install" not in proc.stdout, proc.stdout
    installs = [line for line in log.read_text().splitlines() if " install " in f" {line} "]
    assert len(installs) == 2 and all("DPkg::Lock::Timeout=" in line for line in installs), installs
    assert "chromium" in installs[0] and "bubblewrap" in installs[1]
