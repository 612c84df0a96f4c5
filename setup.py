"""
The one part of the build setup.cfg cannot say: the frame engine's optional C accelerator.  When
it cannot be compiled (no C compiler), the install goes on and wsgate uses its pure-Python twin.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("wsgate.core._utf8", ["wsgate/core/_utf8.c"], optional=True)])
