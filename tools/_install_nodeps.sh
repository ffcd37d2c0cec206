# Sourced by tools/install_vllm.sh and tools/install_sglang.sh: installs an engine's Python side into the ACTIVE
# environment with --no-deps, then the requirements its modules need to import, with what is installed held.
#
#   install_nodeps TAG DIST VERSION "$CHECK" HOLD REQ...
#     TAG      log prefix ("install_vllm")
#     DIST     the distribution ("vllm"), VERSION its exact version
#     CHECK    Python code that imports what the tests need (the install is complete when it runs)
#     HOLD     "all": every installed distribution but DIST and esamp is held at its version (constraints file);
#              else a space-separated list of distributions to hold ("torch transformers ...")
#     REQ...   the requirements to install (unpinned: the constraints file holds the rest)
# Idempotent: returns at once when CHECK already runs.  PYTHON names the interpreter (default: python).
install_nodeps() {
  local tag=$1 dist=$2 version=$3 check=$4 hold=$5
  shift 5
  local py=${PYTHON:-python}
  log() { printf '[%s] %s\n' "$tag" "$*"; }
  if "$py" -c "$check" >/dev/null 2>&1; then
    log "$dist $version already installed and importable"
    return 0
  fi
  local pipq=("$py" -m pip install -q --disable-pip-version-check)
  if ! "$py" -c "import importlib.metadata as md; assert md.version('$dist') == '$version'" >/dev/null 2>&1; then
    log "installing $dist==$version (--no-deps)"
    "${pipq[@]}" --no-deps "$dist==$version"
  fi
  local cons
  cons=$(mktemp)
  "$py" - "$cons" "$dist" "$hold" <<'PYEOF'
import importlib.metadata as md, re, sys
out, dist, hold = sys.argv[1], sys.argv[2].lower(), sys.argv[3]
canon = lambda n: re.sub(r"[-_.]+", "-", n).lower()
if hold == "all":
    pins = {canon(d.metadata["Name"]): d.version for d in md.distributions()
            if d.metadata["Name"] and canon(d.metadata["Name"]) not in (canon(dist), "esamp")}
else:
    pins = {}
    for name in hold.split():
        try:
            pins[canon(name)] = md.version(name)
        except md.PackageNotFoundError:
            pass
with open(out, "w") as f:
    for name, version in sorted(pins.items()):
        f.write(f"{name}=={version}\n")
PYEOF
  log "installing $dist's import-time requirements ($# packages; $( [ "$hold" = all ] && echo "installed packages" \
      || echo "${hold// //}") held)"
  local rc=0
  "${pipq[@]}" -c "$cons" "$@" || rc=$?
  rm -f "$cons"
  [ $rc -eq 0 ] || { log "error: pip could not install $dist's requirements"; return 1; }
  if ! "$py" -c "$check"; then
    log "error: $dist $version is installed but its modules do not import (see the traceback above)"
    return 1
  fi
  log "$dist $version importable"
}
