"""The CPU tasks of `generate` must not import torch: Ray starts many short-lived task
workers, and a torch import costs each of them seconds of CPU and hundreds of MB."""
import subprocess
import sys


def test_cpu_task_module_imports_no_torch():
    code = "import sys, pipeline.tasks; print('torch' in sys.modules, 'open_clip' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["False", "False"]
