#!/usr/bin/env bash
# Here, before a GPU run: packs .gpu/ for benchmarks/gpu.sh (the device tool carries it: carry [".gpu"]).
#   bash benchmarks/gpu_pack.sh
# ../shared/gpu/prepare.sh packs Hydra, OmegaConf, MLflow's closure and the data set for the bare GPU machine
# (Python 3.12, PyTorch, tensorboard, matplotlib, pandas, tqdm, pytest; no network). This adds wheels for the rest
# of pyproject.toml's dependencies that machine lacks (tensorboardX, tabulate, the launcher plugins: without them
# the tracking process, the sweep table and Hydra's plugin scan fail there), then checks what will travel.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ../shared/gpu/prepare.sh
# What the GPU machine has, and what prepare.sh packed, need no wheel.
python3 - > .gpu/extra.txt <<'PY'
import pathlib, re, tomllib
project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
wanted = project["dependencies"] + project["optional-dependencies"]["launchers"]
have = {"torch", "torchvision", "tensorboard", "numpy", "pandas", "matplotlib", "tqdm", "pytest",
        "filelock"}  # torch requires filelock
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
packed = {norm(w.name.split("-")[0]) for w in pathlib.Path(".gpu/whl").glob("*.whl")}
for spec in wanted:
    name = norm(re.split(r"[<>=!~ \[;]", spec, maxsplit=1)[0])
    if name not in have and name not in packed:
        print(spec)
PY
# submitit: hydra-submitit-launcher's own dependency (the fused launcher's SLURM part imports it)
echo "submitit==1.5.4" >> .gpu/extra.txt
python3 -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .gpu/whl -r .gpu/extra.txt
echo "added: $(tr '\n' ' ' < .gpu/extra.txt)"
size=$(( $(du -sb .gpu | cut -f1) + $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) ))
echo "will travel: $((size / 1048576)) MiB of 64 (.gpu/ and the tracked files)"
[ "$size" -lt $((64 * 1048576)) ] || { echo "over 64 MiB: the device tool will not carry it"; exit 1; }
