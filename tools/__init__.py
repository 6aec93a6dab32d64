"""Harness for running the pack in a real ComfyUI outside a browser: tests, the main job, benchmarks."""
