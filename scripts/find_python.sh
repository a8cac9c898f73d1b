#!/usr/bin/env bash
# Print the path of a Python interpreter of the given minor version (e.g. 3.10), looking on
# PATH first and then in pyenv. A missing interpreter is an error, never a silent skip.
set -euo pipefail
want="${1:?usage: find_python.sh 3.X}"
if command -v "python$want" >/dev/null 2>&1 && "python$want" -c 'import sys' >/dev/null 2>&1; then
  command -v "python$want"; exit 0
fi
if command -v pyenv >/dev/null 2>&1; then
  root="$(pyenv root)"
  for v in $(pyenv versions --bare 2>/dev/null | grep -E "^${want//./\\.}\.[0-9]+$" | sort -t. -k3 -n -r); do
    if [ -x "$root/versions/$v/bin/python$want" ]; then echo "$root/versions/$v/bin/python$want"; exit 0; fi
  done
fi
echo "error: no Python $want interpreter found (not on PATH, not in pyenv). Install it, e.g. 'pyenv install $want', then retry." >&2
exit 1
