"""Builds the small-batch kernel of the window engine (streamd/_kernel.c) ahead of time.

The extension is optional: without a C compiler the install still succeeds and every batch runs
through the NumPy engine (tests/test_windows.py fails loudly in that case, so CI notices).
Contraction into fused multiply-adds is turned off so that the kernel rounds like NumPy does.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("streamd._kernel", ["streamd/_kernel.c"], optional=True, extra_compile_args=["-ffp-contract=off"])
    ]
)
