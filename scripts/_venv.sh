# Sourced by the scripts in this folder: create .venv (once) and install aiolimits with its
# development extras into it, so every script works on a fresh machine with nothing typed first.
# A script that needs more sets AIOLIMITS_EXTRAS (e.g. "bench") before sourcing this file.
#
# The install compiles the core with mypyc when it can (hatch_build.py; `aiolimits.COMPILED`
# says which build runs). The compiled files sit beside the sources, so after an edit of a
# compiled module they are rebuilt here, before anything runs. .venv is always the compiled build
# where it can be (AIOLIMITS_PURE is ignored here): `AIOLIMITS_PURE=1 scripts/test` tests the
# pure-Python modules, on a copy of the sources.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${AIOLIMITS_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
extras="dev${AIOLIMITS_EXTRAS:+,$AIOLIMITS_EXTRAS}"
stamp="$venv/.aiolimits-installed${AIOLIMITS_EXTRAS:+-${AIOLIMITS_EXTRAS//,/-}}"
built="$venv/.aiolimits-built"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
# Reinstall when pyproject.toml changed since the last install.
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    env -u AIOLIMITS_PURE "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        -e ".[$extras]"
    touch "$stamp" "$built"
fi
# Rebuild (without the dependencies, with the venv's own mypy) when a compiled module, or the
# build hook, changed since the last build: stale compiled files would run the old code.
stale=""
for source in hatch_build.py $(grep -o '"aiolimits/[a-z_/]*\.py"' hatch_build.py | tr -d '"'); do
    if [ ! -f "$built" ] || [ "$source" -nt "$built" ]; then stale="$source"; fi
done
if [ -n "$stale" ]; then
    echo "== $stale changed: rebuilding aiolimits (pip install -e .)" >&2
    env -u AIOLIMITS_PURE "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        --no-deps --no-build-isolation -e .
    touch "$built"
fi
export PATH="$venv/bin:$PATH"
