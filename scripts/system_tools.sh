#!/usr/bin/env bash
# The Debian tools the tests use, and which are missing.
#   bash scripts/system_tools.sh check     # say what is missing and how to get it (what `make test` does first)
#   bash scripts/system_tools.sh install   # apt-get install what is missing (as root; `.ci/run`, `make test INSTALL_TOOLS=1`)
#
#   dicom3tools: dciodvfy validates every DICOM object medvision writes
#   postgresql:  the service's database tests run against a real PostgreSQL (started by the tests, socket only)
#   orthanc, orthanc-dicomweb, dcmtk: the PACS round trips (storescu -> Orthanc -> medvision -> SR back)
#   chromium:    the review UI's and the API docs' browser tests (headless, driven by Playwright)
#   openssl:     certificates for the DICOM-over-TLS test
#   libopenjp2-tools: opj_compress writes the JPEG 2000 codestream options Pillow cannot (SOP/EPH, tile-parts)
#   openjph-tools: ojph_compress writes HTJ2K (no Python package here encodes it)
set -euo pipefail
need=()
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v Orthanc >/dev/null 2>&1 || need+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v opj_compress >/dev/null 2>&1 || need+=(libopenjp2-tools)
command -v ojph_compress >/dev/null 2>&1 || need+=(openjph-tools)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "${1:-check}" = install ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
else
  echo "missing system tools: ${need[*]}: the tests that need them will be SKIPPED (in CI they fail)." >&2
  echo "  install them: sudo apt-get install ${need[*]}   (or, as root: make test INSTALL_TOOLS=1)" >&2
fi
