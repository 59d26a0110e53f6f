"""Builds the im2col_cython extension in place:

    python setup_cython.py build_ext --inplace

setuptools only (distutils is gone from Python 3.12).
"""
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

extension = Extension(
    "im2col_cython",
    ["im2col_cython.pyx"],
    include_dirs=[np.get_include()],
    extra_compile_args=["/O2"] if sys.platform == "win32" else ["-O3"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

setup(name="im2col_cython", ext_modules=cythonize([extension], language_level=3), zip_safe=False)
