#!/usr/bin/env bash
# Installs (if missing) and locates the external tools the test suite drives.
#
#   scripts/tools.sh install [TOOL...]   install the given tools (default: all); best effort:
#                                        a tool that cannot be installed is reported, and the
#                                        tests that need it skip, saying so
#   scripts/tools.sh path TOOL           print the tool's path; exit 1 if it is not installed
#   scripts/tools.sh list                the known tools
#
# Built tools live in ${XDG_CACHE_HOME:-$HOME/.cache}/consensusfit/ (shared layout):
#   bin/<tool>            what the tests run (a link to the pinned build)
#   build/<tool>-<ver>/   one pinned build, so changing a pin rebuilds and an unchanged one is reused
# To add a tool: write ensure_<tool> (install if missing) and path_<tool> (print or fail), and add
# it to TOOLS.
set -euo pipefail

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/consensusfit"
BIN="$CACHE/bin"
TOOLS=(helm prometheus promtool lua)

HELM_VERSION=v3.22.0
# The Kubernetes version helm assumes without a cluster (helm template, lint): that of its client-go
# (v0.37 -> 1.37), set as helm's own Makefile does; a bare `go install` would assume 1.20.
HELM_KUBE_MINOR=37

log() { echo "tools.sh: $*" >&2; }

# --- Go-built tools ----------------------------------------------------------------------------
# go_build NAME VERSION PACKAGE@VERSION [LDFLAGS]: build once into build/NAME-VERSION, link bin/NAME.
go_build() {
  local name=$1 version=$2 package=$3 ldflags=${4:-} dir="$CACHE/build/$1-$2"
  if [[ ! -x "$dir/$name" ]]; then
    if ! command -v go >/dev/null; then
      log "$name: no Go toolchain on PATH, cannot build $package"; return 1
    fi
    log "$name: building $package (first time only, a few minutes)"
    local started=$SECONDS
    mkdir -p "$dir.tmp"
    CGO_ENABLED=0 GOBIN="$dir.tmp" go install -trimpath -ldflags "-s -w $ldflags" "$package" || { rm -rf "$dir.tmp"; return 1; }
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
    log "$name: built in $((SECONDS - started)) s"
  fi
  mkdir -p "$BIN"
  ln -sfn "$dir/$name" "$BIN/$name"
}

helm_build() { echo "$HELM_VERSION-k1.$HELM_KUBE_MINOR"; }
ensure_helm() {
  local x=-X\ helm.sh/helm/v3
  go_build helm "$(helm_build)" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" \
    "$x/internal/version.version=$HELM_VERSION $x/internal/version.gitTreeState=clean \
     $x/pkg/chartutil.k8sVersionMajor=1 $x/pkg/chartutil.k8sVersionMinor=$HELM_KUBE_MINOR \
     $x/pkg/lint/rules.k8sVersionMajor=1 $x/pkg/lint/rules.k8sVersionMinor=$HELM_KUBE_MINOR"
}
path_helm() { local helm="$CACHE/build/helm-$(helm_build)/helm"; [[ -x $helm ]] && echo "$helm"; }

# --- Debian packages ---------------------------------------------------------------------------
# apt_install COMMAND PACKAGE: install PACKAGE unless COMMAND is already on PATH.
apt_install() {
  local command=$1 package=$2
  command -v "$command" >/dev/null && return 0
  if ! command -v apt-get >/dev/null; then log "$command: no apt-get; install $package by hand"; return 1; fi
  local sudo=()
  if [[ $(id -u) != 0 ]]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo=(sudo -n); else
      log "$command: not root and no password-less sudo; install $package by hand"; return 1
    fi
  fi
  log "$command: apt-get install $package"
  if ! apt-cache show "$package" >/dev/null 2>&1; then
    "${sudo[@]}" apt-get update -qq || true
  fi
  local install=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$package")
  # A stale package list (files gone from the mirror) needs one update and a second try.
  "${install[@]}" >/dev/null || { "${sudo[@]}" apt-get update -qq && "${install[@]}" >/dev/null; } \
    || { log "$command: apt-get install $package failed"; return 1; }
}

ensure_prometheus() { apt_install prometheus prometheus; }
ensure_promtool() { apt_install promtool prometheus; }
ensure_lua() { apt_install lua5.4 lua5.4; }
path_prometheus() { command -v prometheus; }
path_promtool() { command -v promtool; }
path_lua() { command -v lua5.4; }

# --- commands ----------------------------------------------------------------------------------
main() {
  local command=${1:-install}; shift || true
  case $command in
    install)
      local failed=()
      for tool in "${@:-${TOOLS[@]}}"; do
        "ensure_$tool" || failed+=("$tool")
      done
      if ((${#failed[@]})); then log "not installed: ${failed[*]} (the tests that need them will skip)"; fi
      ;;
    path) "path_$1" ;;
    list) printf '%s\n' "${TOOLS[@]}" ;;
    *) log "unknown command $command"; exit 2 ;;
  esac
}

main "$@"
