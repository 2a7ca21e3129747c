"""Importing passl changes nothing in the process; entry points set it up with one call, first."""
import ast
import glob
import os
import subprocess
import sys

import pytest

IMPORT_PROBE = """
import os, sys, warnings
sys.path.insert(0, {root!r})

def state():
    return dict(os.environ), sys.stderr, sys.stdout, list(warnings.filters)

def same(before):
    after = state()
    changed = {{k: (before[0].get(k), after[0].get(k)) for k in set(before[0]) | set(after[0])
               if before[0].get(k) != after[0].get(k)}}
    assert not changed, changed
    assert after[1:] == before[1:], "stderr, stdout or warning filters changed"

before = state()
import passl
assert "paddle" not in sys.modules, "import passl alone must not import paddle"
same(before)
import paddle                                   # paddle's own import may set its variables
stride_kernels = paddle.get_flags(["FLAGS_use_stride_kernel"])["FLAGS_use_stride_kernel"]
before = state()
import importlib, pkgutil
names = sorted(m.name for m in pkgutil.walk_packages(passl.__path__, "passl."))
for name in names:
    importlib.import_module(name)
passl.MODELS.names()                            # filling the registries too
same(before)
from passl.utils import cpu_fast
assert cpu_fast.enabled_fast_paths() == [] and paddle.nn.Linear.forward is cpu_fast._PLAIN_LINEAR_FORWARD
assert paddle.get_flags(["FLAGS_use_stride_kernel"])["FLAGS_use_stride_kernel"] == stride_kernels
print(len(names))
"""


def test_importing_passl_and_every_submodule_changes_nothing(repo_root):
    """In a fresh process: ``import passl`` imports no paddle and changes nothing; importing every
    submodule and filling the registries then leaves the environment, stderr/stdout, warning filters,
    Paddle's kernel flag and the plain code paths as they were after paddle's own import."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "GLOG_minloglevel")}
    proc = subprocess.run([sys.executable, "-c", IMPORT_PROBE.format(root=repo_root)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.strip().splitlines()[-1]) > 30      # every module of the package was imported


def test_configure_process_sets_the_environment_first_then_imports_paddle(repo_root):
    code = (f"import sys; sys.path.insert(0, {repo_root!r}); import passl; "
            "from passl.utils.runtime import configure_process; applied = configure_process(); "
            "import os; assert 'paddle' in sys.modules; "
            "print(applied['OMP_NUM_THREADS'] == os.environ['OMP_NUM_THREADS'] == str(len(os.sched_getaffinity(0))), "
            "os.environ['GLOG_minloglevel'])")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "GLOG_minloglevel")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "2"]
    assert "OMP_NUM_THREADS set to" not in proc.stderr and "ccache" not in proc.stderr


def _module_statements(path):
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), path).body


ENTRY_POINTS = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), d, "*.py")) for d in ("tools", "benchmarks"))
ENTRY_POINTS = [p for group in ENTRY_POINTS for p in group if not os.path.basename(p).startswith("_")]


@pytest.mark.parametrize("path", ENTRY_POINTS + [os.path.join(os.path.dirname(os.path.dirname(__file__)),
                                                              "conftest.py")],
                         ids=lambda p: os.path.relpath(p, os.path.dirname(os.path.dirname(os.path.dirname(p)))))
def test_entry_points_call_configure_process_once_before_anything_else_of_passl(path):
    """The first passl import at module level is configure_process, called right after it, once; no
    other module-level statement before it imports paddle or numpy-backed passl code."""
    body = _module_statements(path)
    imports = [(i, node) for i, node in enumerate(body) if isinstance(node, (ast.Import, ast.ImportFrom))]
    passl_imports = [(i, node) for i, node in imports
                     if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("passl")
                     or isinstance(node, ast.Import) and any(a.name.split(".")[0] in ("passl", "paddle")
                                                               for a in node.names)]
    assert passl_imports, "no passl import"
    index, first = passl_imports[0]
    assert isinstance(first, ast.ImportFrom) and first.module == "passl.utils.runtime" \
        and [a.name for a in first.names] == ["configure_process"], ast.unparse(first)
    call = body[index + 1]
    assert isinstance(call, (ast.Expr, ast.Assign)) and ast.unparse(call.value) == "configure_process()"
    calls = [node for node in ast.walk(ast.Module(body=body, type_ignores=[]))
             if isinstance(node, ast.Call) and ast.unparse(node.func) == "configure_process"]
    assert len(calls) == 1
    earlier = [ast.unparse(node) for node in body[:index] if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert not any("paddle" in line or "numpy" in line for line in earlier), earlier
