#!/usr/bin/env bash
# Installs the system packages selfscope's tests need on Debian 12 (bookworm), as root:
#   - mesa-vulkan-drivers >= 25 from bookworm-backports: lavapipe, a CPU Vulkan driver, so the
#     WebGPU backend (Dawn through the `webgpu` npm package) has an adapter without a GPU.
#     Mesa 25 is the version our WebGPU tests are validated on; bookworm's own is 22.3.
#   - libvulkan1: the Vulkan loader Dawn opens.
#   - chromium (bookworm's normal suite): for browser tests.
# Idempotent: a second run with everything in place does nothing (not even `apt-get update`).
# Only reuses the Debian mirror already configured in /etc/apt; it never names a host of its own.
set -euo pipefail

readonly SUITE=bookworm
readonly BACKPORTS="${SUITE}-backports"
readonly MESA_MIN=25
readonly BACKPORTS_FILE="/etc/apt/sources.list.d/selfscope-${BACKPORTS}.sources"

log() { printf '[install-system-deps] %s\n' "$*"; }
die() { printf '[install-system-deps] error: %s\n' "$*" >&2; exit 1; }

[[ "$(id -u)" -eq 0 ]] || die "must run as root (try: sudo $0)"
command -v apt-get >/dev/null || die "apt-get not found; this script supports Debian 12 (bookworm) only"
if [[ -r /etc/os-release ]]; then
  codename="$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")"
  [[ "$codename" == "$SUITE" ]] || log "warning: expected Debian $SUITE, found '${codename:-unknown}'; continuing"
fi

export DEBIAN_FRONTEND=noninteractive

# The source files apt actually reads (files with other extensions are ignored by apt).
apt_source_files() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -f "$f" ]] && printf '%s\n' "$f"
  done
}

# Installed version of a package, or nothing if it is not installed.
installed_version() {
  dpkg-query -W -f='${db:Status-Status} ${Version}\n' "$1" 2>/dev/null | awk '$1 == "installed" { print $2 }'
}

mesa_ok() {
  local v
  v="$(installed_version mesa-vulkan-drivers)"
  [[ -n "$v" ]] && dpkg --compare-versions "$v" ge "$MESA_MIN"
}

backports_configured() {
  local f
  while read -r f; do
    # One-line format: "deb [opts] URI bookworm-backports ..."; deb822: "Suites: ... bookworm-backports".
    if grep -Eq "^[[:space:]]*deb[[:space:]].*[[:space:]]${BACKPORTS}([[:space:]]|$)" "$f" \
      || grep -Eiq "^[[:space:]]*Suites:.*(^|[[:space:]])${BACKPORTS}([[:space:]]|$)" "$f"; then
      return 0
    fi
  done < <(apt_source_files)
  return 1
}

# Prints "URI<TAB>SIGNED_BY<TAB>FORMAT" for the first enabled source that serves the plain
# bookworm suite (the main Debian mirror, not -security), from either file format.
find_debian_mirror() {
  local f
  while read -r f; do
    case "$f" in
      *.sources)
        # deb822: stanzas separated by blank lines; '#' lines are comments.
        awk -v suite="$SUITE" '
          function flush() {
            if (types ~ /(^|[ \t])deb([ \t]|$)/ && enabled !~ /^(no|false)$/ && uris != "") {
              n = split(suites, s, /[ \t]+/)
              for (i = 1; i <= n; i++) if (s[i] == suite) {
                split(uris, u, /[ \t]+/)
                printf "%s\t%s\tdeb822\n", u[1], signed; found = 1; exit
              }
            }
            types = ""; uris = ""; suites = ""; signed = ""; enabled = ""
          }
          /^[ \t]*#/ { next }
          /^[ \t]*$/ { flush(); next }
          {
            key = tolower($0); sub(/:.*/, "", key); gsub(/[ \t]/, "", key)
            val = $0; sub(/^[^:]*:[ \t]*/, "", val); sub(/[ \t]+$/, "", val)
            if (key == "types") types = val
            else if (key == "uris") uris = val
            else if (key == "suites") suites = val
            else if (key == "signed-by") signed = val
            else if (key == "enabled") enabled = tolower(val)
          }
          END { if (!found) flush() }
        ' "$f"
        ;;
      *)
        # One-line: deb [options] URI suite component...
        awk -v suite="$SUITE" '
          $1 == "deb" {
            i = 2; opts = ""
            if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) { opts = opts " " $i; i++ } opts = opts " " $i; i++ }
            if ($(i + 1) == suite) {
              signed = ""
              if (match(opts, /signed-by=[^] ]+/)) signed = substr(opts, RSTART + 10, RLENGTH - 10)
              printf "%s\t%s\tone-line\n", $i, signed; exit
            }
          }
        ' "$f"
        ;;
    esac
  done < <(apt_source_files) | head -n 1
}

add_backports() {
  local line uri signed
  line="$(find_debian_mirror)"
  [[ -n "$line" ]] || die "no enabled apt source for suite '$SUITE' found in /etc/apt; cannot derive the mirror for $BACKPORTS"
  IFS=$'\t' read -r uri signed _ <<<"$line"
  [[ -n "$signed" ]] || signed=/usr/share/keyrings/debian-archive-keyring.gpg
  log "adding $BACKPORTS from $uri to $BACKPORTS_FILE"
  cat >"$BACKPORTS_FILE" <<EOF
# Added by selfscope scripts/install-system-deps.sh (mesa-vulkan-drivers >= $MESA_MIN for lavapipe).
Types: deb
URIs: $uri
Suites: $BACKPORTS
Components: main
Signed-By: $signed
EOF
}

missing=()
mesa_ok || missing+=("mesa-vulkan-drivers")
[[ -n "$(installed_version libvulkan1)" ]] || missing+=("libvulkan1")
[[ -n "$(installed_version chromium)" ]] || missing+=("chromium")

if ((${#missing[@]} == 0)); then
  log "nothing to do"
else
  if ! mesa_ok && ! backports_configured; then add_backports; fi
  log "apt-get update"
  apt-get update -q
  # libvulkan1 and chromium from the normal suite (chromium is not in backports anyway).
  rest=()
  [[ -n "$(installed_version libvulkan1)" ]] || rest+=("libvulkan1")
  [[ -n "$(installed_version chromium)" ]] || rest+=("chromium")
  if ((${#rest[@]} > 0)); then
    log "installing ${rest[*]}"
    apt-get install -y -q --no-install-recommends "${rest[@]}"
  fi
  # Mesa last: backports packages are never chosen unless asked for, and -t makes apt move the
  # whole mesa family (libgbm1, libgl1-mesa-dri, mesa-libgallium, ...) to the same backports
  # version together, including the ones chromium pulled in above.
  if ! mesa_ok; then
    log "installing mesa-vulkan-drivers from $BACKPORTS"
    apt-get install -y -q --no-install-recommends -t "$BACKPORTS" mesa-vulkan-drivers
  fi
fi

mesa_ok || die "mesa-vulkan-drivers >= $MESA_MIN is not installed (found '$(installed_version mesa-vulkan-drivers)')"
for p in mesa-vulkan-drivers libvulkan1 chromium; do
  v="$(installed_version "$p")"
  [[ -n "$v" ]] || die "$p is not installed"
  log "$p $v"
done
# lavapipe's ICD manifest is what the Vulkan loader looks for.
ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 \
  || die "lavapipe ICD (/usr/share/vulkan/icd.d/lvp_icd*.json) missing after install"
