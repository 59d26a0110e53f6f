"""Builds the compiled kernels in place:

    python setup_cython.py build_ext --inplace

im2col_cython (C): im2col/col2im for layers.py, max pooling for fast_layers.py.
fast_kernels (C++): the direct convolution and the ReLU of fast_layers.py; the header
fast_kernels.hpp holds them.

Both are compiled for the CPU family as a whole, never with -march=native: the AVX2 + FMA code of
the convolution is a second build of its functions, chosen at run time where the CPU has those
instructions, so a module built on one machine runs on every machine of its architecture.
setuptools only (distutils is gone from Python 3.12).
"""
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

optimize = ["/O2"] if sys.platform == "win32" else ["-O3"]
cpp_standard = ["/std:c++14"] if sys.platform == "win32" else ["-std=c++14"]
numpy_api = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]

extensions = [
    Extension("im2col_cython", ["im2col_cython.pyx"], include_dirs=[np.get_include()],
              extra_compile_args=optimize, define_macros=numpy_api),
    Extension("fast_kernels", ["fast_kernels.pyx"], include_dirs=[np.get_include(), "."], language="c++",
              depends=["fast_kernels.hpp"], extra_compile_args=optimize + cpp_standard, define_macros=numpy_api),
]

# build_dir: the generated .c/.cpp files go to build/ with the other intermediates
setup(name="im2col_cython", ext_modules=cythonize(extensions, language_level=3, build_dir="build"), zip_safe=False)
