#!/usr/bin/env bash
# Virtual environments of the tools the export tests read dapseg's exports back with, and of the Label
# Studio server tests/test_labelstudio.py runs dapseg serve against (tests/tools.py finds them under
# .venv-tools/). They live apart from the project's: their pins clash with it (label-studio-sdk 2.1 pins
# opencv-python-headless < 4.13, hence numpy < 2.3; datumaro pins pandas ~= 2.3 and opencv 4.x). Two
# venvs: Label Studio (its SDK comes with the server) and the readers (Datumaro and FiftyOne resolve
# together; Datumaro and Label Studio do not). Run it once; a venv already made is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
make_venv() {
    local name=$1; shift
    if [ ! -x ".venv-tools/$name/bin/python" ]; then
        python3 -m venv ".venv-tools/$name"
        ".venv-tools/$name/bin/python" -m pip install -q "$@"
    fi
}
# fiftyone-db builds by downloading mongod from mongodb.org; offline it installs without one, and the
# test reads the export with FiftyOne's own importer class (no database needed).
make_venv readers "datumaro==1.13.12" "fiftyone==1.22.1" &
readers=$!
# The Label Studio server for tests/test_labelstudio.py (dapseg serve as its ML backend) and the
# label-studio-sdk 2.1.2 it pins (the export test decodes tasks with it); the server pins Django and the
# SDK's numpy/opencv. sentry-sdk 3 makes it die at start ("Unknown option 'send_default_pii'").
make_venv label-studio "label-studio==1.23.2" "label-studio-sdk==2.1.2" "sentry-sdk<3" &
label_studio=$!
# both install at once (the time goes to downloads and unpacking, not to the CPU); either failing fails
wait "$readers"
wait "$label_studio"
