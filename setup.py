"""Builds the native extension ``peft_kernels._C`` from csrc/.

CPU sources are always compiled. CUDA sources are added when nvcc is found and PEFT_KERNELS_CUDA is not
"0". The default architecture is sm_90a (H100/H200); PEFT_KERNELS_CUDA_ARCHS="9.0a;8.0" changes it.
"""

import glob
import os
import shutil
import site
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _nvcc_available() -> bool:
    if os.environ.get("PEFT_KERNELS_CUDA", "1") == "0":
        return False
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return True
    return shutil.which("nvcc") is not None


def _locate_cuda_home() -> None:
    """torch guesses CUDA_HOME from nvcc's directory; where nvcc is a wrapper in /usr/local/bin that guess
    (/usr/local) has no lib64/libcudart. Prefer a directory that has both nvcc and the runtime library."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and glob.glob(os.path.join(home, "lib*", "libcudart.so*")):
            os.environ["CUDA_HOME"] = home
            return


def _nvidia_wheel_includes() -> list[str]:
    """torch's CUDA headers include cublas_v2.h / cusparse.h; with pip-installed torch these live in the
    nvidia-* wheels (site-packages/nvidia/**/include), not in a compiler-only system CUDA toolkit."""
    roots = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
    found = []
    for root in roots:
        for inc in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            if os.path.isdir(inc) and inc not in found:
                found.append(inc)
    return found


def _extensions():
    import torch.utils.cpp_extension as ext

    with_cuda = _nvcc_available() and ext.CUDA_HOME is not None and torch_has_cuda()
    sources = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))]
    sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx_flags = ["-O3", "-fopenmp"]  # torch adds the C++ standard it needs (C++20 for 2.14)
    extra_link = ["-fopenmp"]
    define_macros = []
    if with_cuda:
        archs = os.environ.get("PEFT_KERNELS_CUDA_ARCHS", "9.0a")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # torch turns this into -gencode flags
        sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]
        include_dirs += _nvidia_wheel_includes()
        define_macros.append(("PEFT_KERNELS_WITH_CUDA", "1"))
        nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        return [
            ext.CUDAExtension(
                "peft_kernels._C",
                sources,
                include_dirs=include_dirs,
                define_macros=define_macros,
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                extra_link_args=extra_link,
            )
        ], with_cuda
    return [
        ext.CppExtension(
            "peft_kernels._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link,
        )
    ], with_cuda


def torch_has_cuda() -> bool:
    import torch

    return torch.version.cuda is not None


def main():
    _locate_cuda_home()  # before torch.utils.cpp_extension reads CUDA_HOME at import
    from torch.utils.cpp_extension import BuildExtension

    if os.environ.get("PEFT_KERNELS_SKIP_EXT") == "1":
        # `make` installs the package first and then builds _C in place (build/ stays for incremental rebuilds).
        ext_modules, with_cuda = [], False
        print("peft_kernels: PEFT_KERNELS_SKIP_EXT=1, not building _C", flush=True)
    else:
        ext_modules, with_cuda = _extensions()
        print(f"peft_kernels: building _C with CUDA={'yes' if with_cuda else 'no'}", flush=True)
    setup(
        ext_modules=ext_modules,
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
    )


if __name__ == "__main__":
    main()
