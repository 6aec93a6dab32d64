"""The example workflows' input files (kept in ``demo/example_inputs.py``, which the pack's demo nodes also use
to fill a fresh ComfyUI's input folder), for the tests, the main job and serve.sh."""
from demo.example_inputs import PROTECTED_CLASS, PROTECTED_COUNT, PROTECTED_FOLDER, write_protected_digits  # noqa: F401
