"""Builds the im2col_cython extension in place:

    python setup_cython.py build_ext --inplace

setuptools only (distutils is gone from Python 3.12). OpenMP parallelises
im2col/col2im over the batch; compilers without OpenMP still build a serial
version because Cython's prange degrades to a plain loop.
"""
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

openmp = [] if sys.platform == "darwin" else (["/openmp"] if sys.platform == "win32" else ["-fopenmp"])

extension = Extension(
    "im2col_cython",
    ["im2col_cython.pyx"],
    include_dirs=[np.get_include()],
    extra_compile_args=["-O3"] + openmp if sys.platform != "win32" else ["/O2"] + openmp,
    extra_link_args=openmp if sys.platform != "win32" else [],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

setup(name="im2col_cython", ext_modules=cythonize([extension], language_level=3), zip_safe=False)
