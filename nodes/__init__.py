"""ComfyUI adapters. Each module ends in ``NODES = [...]``; this file registers them through the V1
mappings, the route both ComfyUI 0.3.75 and the newest upstream load. Node ids (``NODE_ID``) are permanent
once workflows are shared."""
import importlib

MODULES = ("repellency", "peers", "references", "memory", "report", "demo", "fairness", "finetune", "calibration")

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _name in MODULES:
    _module = importlib.import_module(f".{_name}", __name__)
    for _cls in _module.NODES:
        NODE_CLASS_MAPPINGS[_cls.NODE_ID] = _cls
        NODE_DISPLAY_NAME_MAPPINGS[_cls.NODE_ID] = _cls.DISPLAY_NAME
