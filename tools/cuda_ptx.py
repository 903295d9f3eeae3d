"""Compile one nbnet CUDA kernel to PTX (and SASS) on a machine without a GPU.

For reading what the CUDA kernels compile to, where no device is lent: numba-cuda
compiles with NVVM alone, but asks the driver for the current device's compute
capability when a kernel calls a device function; this script answers that question
itself (``--cc``, default 9.0: H100/H200) and never opens a CUDA context.

Needs NVVM, which nbnet's own install does not bring. In a separate virtual environment:

    python -m venv /tmp/ptx
    /tmp/ptx/bin/pip install "numba-cuda[cu12]" numpy        # or [cu13]
    PYTHONPATH=. /tmp/ptx/bin/python tools/cuda_ptx.py column_stats._fused_backward_reduce \\
        "f4[:, ::1], f4[:, ::1], f8[::1], f8[::1], f4[::1], f4[::1], int64, float64, int64, \\
         f8[:, ::1], f8[:, ::1]" --out /tmp/fbr

writes ``/tmp/fbr.ptx`` and, when ``ptxas`` and ``nvdisasm`` are found (the
``nvidia-cuda-nvcc-cu12`` wheel has ``ptxas``; ``nvdisasm`` comes with the ``cu13``
wheels), ``/tmp/fbr.sass``. The signature uses numba's type strings; device arrays are
C-contiguous (``[:, ::1]``).

Round 8 used it on the open H200 fault (docs/cuda.md): the ReLU branch of
``_fused_backward_reduce`` compiles (NVVM 12.9 and 13.5, sm_90) to selects with no memory
operation of its own, in the PTX and in ptxas's SASS.
"""
import argparse
import glob
import importlib
import os
import shutil
import subprocess
import sys
import types


def _tool(name):
    """``name`` on PATH, or from an installed NVIDIA wheel of this interpreter."""
    found = shutil.which(name)
    if found:
        return found
    roots = [p for p in sys.path if p.endswith("site-packages")]
    for root in roots:
        hits = sorted(glob.glob(os.path.join(root, "nvidia", "**", "bin", name), recursive=True))
        if hits:
            return hits[-1]
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kernel", help="module.function under nbnet.kernels.cuda, e.g. "
                                   "column_stats._fused_backward_reduce")
    ap.add_argument("signature", help="numba argument types, comma-separated")
    ap.add_argument("--cc", default="9.0", help="compute capability (default 9.0)")
    ap.add_argument("--out", default="kernel", help="output path without extension")
    args = ap.parse_args(argv)
    cc = tuple(int(v) for v in args.cc.split("."))

    import numba.cuda.dispatcher as dispatcher
    # device functions ask for the current device's capability: answer without a driver
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=cc)
    from numba import cuda
    from numba.core import sigutils

    module_name, func_name = args.kernel.rsplit(".", 1)
    module = importlib.import_module(f"nbnet.kernels.cuda.{module_name}")
    kernel = getattr(module, func_name)
    argtypes, _ = sigutils.normalize_signature(f"void({args.signature})")
    ptx, _ = cuda.compile_ptx(kernel.py_func, argtypes, cc=cc)
    with open(args.out + ".ptx", "w") as f:
        f.write(ptx)
    print(f"{args.out}.ptx: {len(ptx.splitlines())} lines (sm_{cc[0]}{cc[1]})")
    ptxas, nvdisasm = _tool("ptxas"), _tool("nvdisasm")
    if not (ptxas and nvdisasm):
        print("no ptxas/nvdisasm found: PTX only")
        return 0
    cubin = args.out + ".cubin"
    subprocess.run([ptxas, f"-arch=sm_{cc[0]}{cc[1]}", "-O3", args.out + ".ptx", "-o", cubin],
                   check=True)
    sass = subprocess.run([nvdisasm, "-c", cubin], check=True, capture_output=True, text=True).stdout
    with open(args.out + ".sass", "w") as f:
        f.write(sass)
    print(f"{args.out}.sass: {len(sass.splitlines())} lines ({ptxas})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
