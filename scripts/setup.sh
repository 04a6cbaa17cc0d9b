#!/usr/bin/env bash
# Create .venv (Python 3.11) with torch and ms-splatfacto (editable, test extras), then build the
# CPU kernels. Idempotent: a second run on a set-up machine only checks a stamp and takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
STAMP=.venv/.ms-splatfacto-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
# How pip is run; tests/test_packaging.py points it at a stub to see that a set-up machine runs no pip.
PIP="${MS_SPLATFACTO_SETUP_PIP:-.venv/bin/python -m pip}"

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $PY"
    "$PY" -m venv .venv
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing torch==2.14.1 torchvision==0.29.1 and ms-splatfacto[test] (a few minutes the first time)"
    start=$(date +%s)
    # This machine's pip config lists local index folders that may be absent; drop pip's notes on them.
    $PIP install -q --disable-pip-version-check \
        torch==2.14.1 torchvision==0.29.1 -e ".[test]" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    echo "$want" > "$STAMP"
    echo "setup: installed in $(( $(date +%s) - start )) s"
else
    echo "setup: .venv is up to date"
fi
# Not `ldconfig -p | grep -q`: grep quits at the first match, ldconfig dies of SIGPIPE (141), and
# pipefail turns that into "missing", so every run called apt-get.
libs="$(ldconfig -p 2>/dev/null || true)"
if [[ "$libs" != *libusb-1.0.so.0* ]]; then
    # open3d, imported by ns-export, links against it; Debian's python image lacks it.
    echo "setup: installing libusb-1.0-0 for open3d (ns-export)"
    { apt-get update -qq && apt-get install -y -qq libusb-1.0-0; } > /dev/null \
        || echo "setup: could not install libusb-1.0-0 (not root?); ns-export will fail to import open3d" >&2
fi
if [[ ! -f /usr/include/jpeglib.h || ! -f /usr/include/png.h ]]; then
    # The row decoder (csrc/image, built on first use) lets each member decode only the pixel rows it renders.
    echo "setup: installing libjpeg-turbo and libpng headers for the image row decoder"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjpeg62-turbo-dev libpng-dev; } > /dev/null \
        || echo "setup: could not install libjpeg62-turbo-dev libpng-dev (not root?); streamed training images decode whole" >&2
fi
if ! command -v chromium > /dev/null; then
    # Headless Chromium opens ns-viewer in tests/test_viewer_browser.py, which skips without it.
    echo "setup: installing chromium for the viewer's browser test"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } > /dev/null \
        || echo "setup: could not install chromium (not root?); tests/test_viewer_browser.py will skip" >&2
fi
.venv/bin/python -m ms_splatfacto.backend.build
