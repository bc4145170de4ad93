"""Developer tools, each run from the repository root as `python -m tools.NAME` (they import the root's
modules and satkit/): benchmark (speed as ratios), gpu_bundle and gpu_check (the GPU check, docs/gpu.md)."""
