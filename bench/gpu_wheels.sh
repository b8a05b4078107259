#!/usr/bin/env bash
# Wheels for bench/gpu.sh: the project's dependencies that a bare GPU machine (torch, transformers,
# numpy, Python 3.12, no registry access) lacks, downloaded here into bench/wheels (git-ignored;
# carry it to the GPU machine with the checkout, e.g. the device tool's carry=["bench/wheels"]).
#
#   bash bench/gpu_wheels.sh            # needs .venv (make install) and registry access
#
# fairscale ships only an sdist: it is built here into a wheel (pure Python, torch needed at build
# time, hence --no-build-isolation with .venv's torch). tiktoken, sentencepiece, markupsafe and
# matplotlib's compiled dependencies are the CPython 3.12 manylinux x86_64 wheels. Versions: those
# of requirements.txt, and for the rest those installed in .venv when this was written.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
DEST=bench/wheels
PYVER=${PYVER:-3.12}
rm -rf "$DEST"
mkdir -p "$DEST"

PLATFORMS=(--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64
           --platform manylinux_2_27_x86_64 --platform manylinux_2_12_x86_64 --platform manylinux1_x86_64)
PACKAGES=(
  fire==0.7.1 termcolor==3.3.0                       # the CLIs (solver_train.py, ppo_train.py, ...)
  gguf==0.19.0                                       # GGUF import (checkpoint.formats imports it)
  sentencepiece==0.2.3                               # tokenizers (bench/placement.py trains one)
  tiktoken==0.14.0                                   # tiktoken tokenizers
  jinja2==3.1.6 markupsafe==3.0.4                    # chat templates
  matplotlib==3.11.2 contourpy==1.3.3 cycler==0.12.1 fonttools==4.68.0 kiwisolver==1.5.1
  pillow==13.0.0 pyparsing==3.3.3 python-dateutil==4.0.0 six==1.17.0   # the trainers' PNG curves
)
quiet() { grep -v "is ignored: it is neither a file nor a directory" >&2 || true; }  # this machine's pip.conf mirrors
"$PIP" download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "${PACKAGES[@]}" 2> >(quiet)
"$PIP" wheel --quiet --no-deps --no-build-isolation fairscale==0.4.13 -w "$DEST" 2> >(quiet)

ls -l "$DEST"
du -sh "$DEST"
