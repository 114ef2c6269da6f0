#!/usr/bin/env bash
# The project's test command: installs what the integration tests need (Debian's registry,
# skopeo, a static busybox), makes sure the Docker daemon answers, then runs rustfmt, clippy and
# every test. Arguments are passed on to `cargo test` (e.g. `./scripts/test.sh --test harness`).
# Safe to run again and again; quiet on success apart from the test output.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export DEBIAN_FRONTEND=noninteractive

say() { printf 'test.sh: %s\n' "$*" >&2; }
die() {
	say "$*"
	exit 1
}

# Runs a command as root: directly when we are root, else through sudo.
as_root() {
	if [ "$(id -u)" -eq 0 ]; then
		"$@"
	elif command -v sudo >/dev/null 2>&1; then
		sudo "$@"
	else
		die "need root (or sudo) to run: $*"
	fi
}

# Runs a command with its output kept in a log that is shown only if it fails.
quietly() {
	local log
	log="$(mktemp)"
	if "$@" >"$log" 2>&1; then
		rm -f "$log"
	else
		local rc=$?
		cat "$log" >&2
		rm -f "$log"
		die "failed (exit $rc): $*"
	fi
}

installed() {
	dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

# --- Debian packages the integration tests use ---------------------------------------------
missing=()
if ! command -v docker-registry >/dev/null 2>&1 && ! command -v registry >/dev/null 2>&1; then
	missing+=(docker-registry)
fi
command -v skopeo >/dev/null 2>&1 || missing+=(skopeo)
if command -v dpkg-query >/dev/null 2>&1; then
	# The registry image built by the tests needs busybox linked statically.
	installed busybox-static || missing+=(busybox-static)
fi
if [ "${#missing[@]}" -gt 0 ]; then
	command -v apt-get >/dev/null 2>&1 ||
		die "missing ${missing[*]} and no apt-get to install them; install them by hand"
	say "installing ${missing[*]}"
	quietly as_root apt-get update -q
	quietly as_root env DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# --- Docker daemon ----------------------------------------------------------------------------
docker_answers() { docker info >/dev/null 2>&1; }
wait_for_docker() {
	local i
	for i in $(seq 1 30); do
		docker_answers && return 0
		sleep 1
	done
	return 1
}

if ! command -v docker >/dev/null 2>&1; then
	say "WARNING: the docker CLI is not installed; tests that use the Docker engine will fail"
elif docker_answers; then
	:
elif [ "$(id -u)" -eq 0 ] && command -v dockerd >/dev/null 2>&1; then
	say "the Docker daemon does not answer; starting it"
	if command -v service >/dev/null 2>&1 && service docker start >/dev/null 2>&1 && wait_for_docker; then
		say "started the Docker daemon with 'service docker start'"
	else
		dockerd_log="${TMPDIR:-/tmp}/docker-delete-dockerd.log"
		nohup dockerd >"$dockerd_log" 2>&1 </dev/null &
		if wait_for_docker; then
			say "started dockerd in the background (pid $!, log $dockerd_log)"
		else
			tail -n 20 "$dockerd_log" >&2 || true
			say "WARNING: dockerd did not answer within 30 s; tests that use Docker will fail"
		fi
	fi
else
	say "WARNING: the Docker daemon does not answer (docker info failed) and cannot be started" \
		"from here; tests that use Docker will fail"
fi

# --- Rust checks and tests -------------------------------------------------------------------
for component in rustfmt clippy; do
	if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
		command -v rustup >/dev/null 2>&1 || die "cargo $component is missing and there is no rustup"
		quietly rustup component add "$component"
	fi
done

cargo fmt --all -- --check
cargo clippy --quiet --all-targets -- -D warnings
cargo test "$@"
