# Source this for interactive work: the same environment as `make` (env.mk).
_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
while IFS=' :=' read -r key value; do
  [[ -z "$key" || "$key" == \#* ]] && continue
  value="${value#= }"; value="${value//\$(CURDIR)/$_here}"
  export "$key=$value"
done < <(grep -E '^[A-Z_]+ :=' "$_here/env.mk" | sed 's/ := /=/' | tr '=' ' ')
export PYTHONPATH="$_here/src${PYTHONPATH:+:$PYTHONPATH}"
# The project's tools first, as under make: `dvc`, `prefect`, and DVC's `python -m flows.*`.
[[ -d "$_here/.venv/bin" ]] && export PATH="$_here/.venv/bin:$PATH"
unset _here key value
