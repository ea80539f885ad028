#!/usr/bin/env bash
# Installs the peer proxies that `spotable-bench compare` measures Spotable
# against: nginx's stream (UDP) module from Debian, and Quilkin from crates.io.
#
# Installs are cached: nginx by dpkg, Quilkin under $SPOTABLE_PEERS
# (default: target/peers), so a second run costs seconds. A peer that cannot
# be installed is reported and skipped; the benchmark then marks its rows as
# "not measured" instead of failing.
#
# Usage: benches/peers/install.sh [nginx] [quilkin]   (default: both)
set -uo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
peers="${SPOTABLE_PEERS:-$root/target/peers}"
quilkin_version="${QUILKIN_VERSION:-}"
mkdir -p "$peers"

want=("$@")
[ ${#want[@]} -eq 0 ] && want=(nginx quilkin)

sudo_() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

install_nginx() {
    if [ -x /usr/sbin/nginx ] && ls /usr/lib/nginx/modules/ngx_stream_module.so >/dev/null 2>&1; then
        echo "peers: nginx already installed ($(/usr/sbin/nginx -v 2>&1))"
        return 0
    fi
    echo "peers: installing nginx + libnginx-mod-stream from Debian"
    if ! command -v apt-get >/dev/null; then
        echo "peers: SKIP nginx: apt-get not available on this machine" >&2
        return 1
    fi
    sudo_ apt-get update -qq >/dev/null \
        && sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            nginx-light libnginx-mod-stream >/dev/null 2>&1 \
        || sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            nginx libnginx-mod-stream >/dev/null \
        || { echo "peers: SKIP nginx: apt-get install failed" >&2; return 1; }
    # The package starts a system nginx on port 80; the benchmark runs its own.
    sudo_ service nginx stop >/dev/null 2>&1 || true
    echo "peers: nginx installed ($(/usr/sbin/nginx -v 2>&1))"
}

install_quilkin() {
    local bin="$peers/quilkin/bin/quilkin"
    if [ -x "$bin" ]; then
        echo "peers: quilkin already installed ($("$bin" --version 2>/dev/null | head -1))"
        return 0
    fi
    if ! command -v cargo >/dev/null; then
        echo "peers: SKIP quilkin: cargo not available" >&2
        return 1
    fi
    # Quilkin needs protoc for its build script on some versions.
    if ! command -v protoc >/dev/null && command -v apt-get >/dev/null; then
        sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler >/dev/null 2>&1 || true
    fi
    echo "peers: building quilkin from crates.io (long: 20-40 min on 2 cores; cached afterwards)"
    local args=(install quilkin --locked --root "$peers/quilkin")
    [ -n "$quilkin_version" ] && args+=(--version "$quilkin_version")
    if ! RUSTFLAGS="-C target-feature=+aes,+avx2" CARGO_TARGET_DIR="$peers/quilkin-build" \
        cargo "${args[@]}" > "$peers/quilkin-build.log" 2>&1; then
        echo "peers: SKIP quilkin: cargo install failed; last lines of $peers/quilkin-build.log:" >&2
        tail -5 "$peers/quilkin-build.log" >&2
        return 1
    fi
    rm -rf "$peers/quilkin-build"
    echo "peers: quilkin installed ($("$bin" --version 2>/dev/null | head -1))"
}

status=0
for peer in "${want[@]}"; do
    case "$peer" in
        nginx) install_nginx || status=1 ;;
        quilkin) install_quilkin || status=1 ;;
        *) echo "peers: unknown peer '$peer' (known: nginx quilkin)" >&2; exit 2 ;;
    esac
done
exit $status
