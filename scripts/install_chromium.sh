#!/usr/bin/env bash
# Installs what tests/test_report.py renders the HTML report in: Debian's headless-capable `chromium`.
# Called by `make test` / `make chromium-deps`. Nothing to do when `chromium` is on PATH. Without root or
# apt-get it says so and exits 0: the rest of the suite still runs, and the report test FAILS naming this script.
set -uo pipefail
command -v chromium >/dev/null 2>&1 && exit 0
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "chromium-deps: chromium is missing and there is no root/apt-get to install it: tests/test_report.py" \
       "will FAIL; install it as root with 'bash scripts/install_chromium.sh' (apt-get install chromium)" >&2
  exit 0
fi
echo "chromium-deps: installing chromium with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q chromium >/dev/null 2>&1 \
  || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null; } \
  || echo "chromium-deps: apt-get install chromium failed: tests/test_report.py will FAIL" >&2
command -v chromium >/dev/null 2>&1 && echo "chromium-deps: $(command -v chromium) installed" >&2
exit 0
