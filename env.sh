# Source this for interactive work: the same environment as `make` (env.mk).
_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
while IFS=' :=' read -r key value; do
  [[ -z "$key" || "$key" == \#* ]] && continue
  value="${value#= }"; value="${value//\$(CURDIR)/$_here}"
  export "$key=$value"
done < <(grep -E '^[A-Z_]+ :=' "$_here/env.mk" | sed 's/ := /=/' | tr '=' ' ')
export PYTHONPATH="$_here/src${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$_here/.venv/bin:$PATH"  # as make: the project's python, dvc, prefect first
unset _here key value
