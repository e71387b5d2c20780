# shellcheck shell=bash
# Sourced, never run:  source tools/_venv.sh
#
# Makes sure <repo>/.venv exists and holds this project installed editable with
# its extras, then puts .venv/bin first on PATH. Works from any cwd.
#
#   SHMBUS_PYTHON       interpreter that creates the venv (default: python3 on PATH;
#                       must be Python >= 3.11)
#   SHMBUS_VENV_EXTRAS  comma-separated extras to install (default: test,dev)
#
# The project is (re)installed only when setup.cfg or pyproject.toml changed
# since the last install, or when an extra not installed yet is asked for; the
# sha256 of both files and the installed extras are kept in
# .venv/.shmbus-install-stamp. pip's full output goes to
# .venv/.shmbus-install.log and is printed when the install fails.
# Sets SHMBUS_ROOT, SHMBUS_VENV and VIRTUAL_ENV, and puts <repo>/tools on
# PYTHONPATH (the checkout's tools package, shmbus_tools).

if ! (return 0 2>/dev/null); then
    echo "tools/_venv.sh must be sourced, not run: source tools/_venv.sh" >&2
    exit 2
fi

SHMBUS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)" || return 1
SHMBUS_VENV="$SHMBUS_ROOT/.venv"

_shmbus_venv_err() { printf 'shmbus venv: %s\n' "$*" >&2; }

# True if interpreter $1 runs and is Python >= 3.11.
_shmbus_py_ok() {
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
}

# Prints a comma list of the union of the comma lists given, sorted, no blanks.
_shmbus_extras_union() {
    printf '%s\n' "$@" | tr ',' '\n' | tr -d ' \t' | grep -v '^$' | sort -u | paste -sd, -
}

# Runs in a subshell so that the lock on fd 9 (the repo directory, opened by
# the caller) is released when it returns and never leaks into exec'd programs.
_shmbus_ensure_venv() (
    py="${SHMBUS_PYTHON:-python3}"
    vpy="$SHMBUS_VENV/bin/python"
    stamp="$SHMBUS_VENV/.shmbus-install-stamp"
    log="$SHMBUS_VENV/.shmbus-install.log"

    # Serialise concurrent tools/* runs around creating and installing.
    if command -v flock >/dev/null 2>&1; then
        flock 9 || _shmbus_venv_err "could not lock $SHMBUS_ROOT; going on without the lock"
    fi

    if [[ -e "$SHMBUS_VENV" ]] && ! _shmbus_py_ok "$vpy"; then
        _shmbus_venv_err "$SHMBUS_VENV is broken or older than Python 3.11; recreating it"
        rm -rf -- "$SHMBUS_VENV" || { _shmbus_venv_err "cannot remove $SHMBUS_VENV"; return 1; }
    fi

    if [[ ! -e "$vpy" ]]; then
        if ! command -v "$py" >/dev/null 2>&1; then
            _shmbus_venv_err "'$py' not found on PATH; shmbus needs Python >= 3.11" \
                "(put one on PATH as python3, or set SHMBUS_PYTHON)"
            return 1
        fi
        if ! _shmbus_py_ok "$py"; then
            _shmbus_venv_err "shmbus needs Python >= 3.11, but '$py' ($(command -v "$py")) is" \
                "$("$py" -c 'import sys; print(sys.version.split()[0])' 2>&1)." \
                "Put Python >= 3.11 on PATH as python3, or set SHMBUS_PYTHON."
            return 1
        fi
        if ! out="$("$py" -m venv "$SHMBUS_VENV" 2>&1)"; then
            printf '%s\n' "$out" >&2
            _shmbus_venv_err "'$py -m venv $SHMBUS_VENV' failed"
            rm -rf -- "$SHMBUS_VENV"
            return 1
        fi
    fi

    if ! hashes="$(cd "$SHMBUS_ROOT" && sha256sum setup.cfg pyproject.toml)"; then
        _shmbus_venv_err "cannot hash setup.cfg and pyproject.toml in $SHMBUS_ROOT"
        return 1
    fi
    want="$(_shmbus_extras_union "${SHMBUS_VENV_EXTRAS:-test,dev}")"
    have_hashes="" have=""
    if [[ -f "$stamp" ]]; then
        have_hashes="$(grep -v '^extras ' "$stamp")"
        have="$(sed -n 's/^extras //p' "$stamp")"
    fi
    if [[ "$have_hashes" == "$hashes" ]] \
        && [[ "$(_shmbus_extras_union "$have" "$want")" == "$have" ]]; then
        return 0   # up to date
    fi

    # Keep extras installed earlier (e.g. by tools/bench) along with the new ones.
    extras="$(_shmbus_extras_union "$have" "$want")"
    rm -f -- "$stamp"
    _shmbus_venv_err "installing shmbus[$extras] (editable) into $SHMBUS_VENV ..."
    if ! "$vpy" -m pip install --editable "$SHMBUS_ROOT[$extras]" >"$log" 2>&1; then
        cat -- "$log" >&2
        _shmbus_venv_err "pip install failed (full output above and in $log)"
        return 1
    fi
    printf '%s\nextras %s\n' "$hashes" "$extras" >"$stamp"
)

_shmbus_ensure_venv 9<"$SHMBUS_ROOT" || return 1

export VIRTUAL_ENV="$SHMBUS_VENV"
# The source checkout's tools (tools/shmbus_tools) are importable, not installed.
case ":${PYTHONPATH:-}:" in
    *":$SHMBUS_ROOT/tools:"*) ;;
    *) export PYTHONPATH="$SHMBUS_ROOT/tools${PYTHONPATH:+:$PYTHONPATH}" ;;
esac
case ":$PATH:" in
    *":$SHMBUS_VENV/bin:"*) ;;
    *) export PATH="$SHMBUS_VENV/bin:$PATH" ;;
esac
hash -r
