#!/usr/bin/env bash
# Sets up a fresh machine for recsys: Debian packages, a virtualenv in .venv, the project.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/../.."

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v java >/dev/null || need_apt+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need_apt+=(maven)
# Monitoring (`recsys stack up --monitoring`, and promtool for the rules' tests).
command -v prometheus >/dev/null || need_apt+=(prometheus)
command -v prometheus-redis-exporter >/dev/null || need_apt+=(prometheus-redis-exporter)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  else
    echo "setup: missing ${need_apt[*]}: install them (Debian: sudo apt-get install ${need_apt[*]})" >&2
    exit 1
  fi
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.recsys-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements.lock -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  # Exactly the locked versions, each checked against its sha256 (pip refuses anything else);
  # then the project itself, which brings nothing new. Re-lock after changing pyproject.toml:
  #   pip-compile --generate-hashes --strip-extras --allow-unsafe --no-emit-find-links -o requirements.lock pyproject.toml
  .venv/bin/pip install -q --require-hashes -r requirements.lock
  .venv/bin/pip install -q --no-deps -e .
  touch "$stamp"
fi
# kustomize for tests/test_k8s_manifests.py: kubectl's built-in one, else kustomize from the Go proxy.
if ! command -v kubectl >/dev/null && ! command -v kustomize >/dev/null && [ ! -x .venv/bin/kustomize ]; then
  if command -v go >/dev/null; then
    GOBIN="$PWD/.venv/bin" go install sigs.k8s.io/kustomize/kustomize/v5@v5.5.0
  else
    echo "setup: missing kubectl or kustomize (or Go to install kustomize): see deploy/k8s/README.md" >&2
    exit 1
  fi
fi
echo "setup: ready (.venv/bin/recsys --help)"
