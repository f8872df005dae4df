#!/usr/bin/env bash
# Run the whole test suite from a clean clone: sets up .venv, installs a headless browser for the
# web UI test and bubblewrap for the code sandbox when the system package manager allows it, then runs pytest. Extra args go to pytest.
set -e
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
source dev/setup_env.sh
# wait (up to 10 min) for another apt/dpkg process, e.g. unattended upgrades, instead of failing on its lock; an
# update that finds the package lists locked (another update is refreshing them) does not stop the install
APT_GET="apt-get -o DPkg::Lock::Timeout=600"
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing chromium + chromedriver for the browser test"
    ($APT_GET update -qq; DEBIAN_FRONTEND=noninteractive $APT_GET install -y -qq chromium chromium-driver >/dev/null) \
        || echo "[setup] could not install chromium; the browser test will be skipped"
fi
if ! command -v bwrap >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing bubblewrap for the code sandbox"
    ($APT_GET update -qq; DEBIAN_FRONTEND=noninteractive $APT_GET install -y -qq bubblewrap >/dev/null) \
        || echo "[setup] could not install bubblewrap; the sandbox tests of bwrap isolation will be skipped"
fi
# one pytest-xdist worker per CPU (logical: a 2-vCPU machine may count one physical core), each running whole files
# (module-scoped fixtures are built once); -n 0 runs the tests in this process
python -m pytest -n logical --dist loadfile "$@"
