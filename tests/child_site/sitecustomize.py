"""Python imports this at start-up in every process the tests start (tests/conftest.py puts
this folder first on their PYTHONPATH): ComfyUI, the CLI and the benchmarks get the test
process's network block. Loaded by path, so nothing of tests/ joins their import path."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_vibevoice_test_netguard", Path(__file__).parent.parent / "netguard.py")
_netguard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_netguard)
_netguard.install_for_the_process()
