# Sourced by the scripts in this folder: create .venv (once) and install aiolimits with its
# development extras into it, so every script works on a fresh machine with nothing typed first.
# A script that needs more sets AIOLIMITS_EXTRAS (e.g. "bench") before sourcing this file.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${AIOLIMITS_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
extras="dev${AIOLIMITS_EXTRAS:+,$AIOLIMITS_EXTRAS}"
stamp="$venv/.aiolimits-installed${AIOLIMITS_EXTRAS:+-${AIOLIMITS_EXTRAS//,/-}}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
# Reinstall when pyproject.toml changed since the last install.
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[$extras]"
    touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
