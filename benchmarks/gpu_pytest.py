"""pytest on the GPU machine's bare checkout (routelens is not installed there: the checkout's root goes on the
path). Usage: python benchmarks/gpu_pytest.py tests/test_launch.py -q"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.exit(pytest.main(["-p", "no:cacheprovider", *sys.argv[1:]]))
