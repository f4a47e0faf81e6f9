"""Builds the optional compiled extensions: the pgoutput decoder
(cdc/postgres/protocol/_columns.pyx), the COPY drain of the snapshot
(cdc/postgres/_copy_drain.pyx) and the ``hash`` mask (transforms/_hmac.pyx).

Everything else is configured in pyproject.toml. Without a C compiler (or without Cython)
the build prints a warning and installs the pure-Python package, which works the same, only
slower: ``cdc.postgres.protocol.compiled.AVAILABLE`` tells which one is in use.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, PlatformError

PYX = "cdc/postgres/protocol/_columns.pyx"
COPY_DRAIN_PYX = "cdc/postgres/_copy_drain.pyx"
HMAC_PYX = "transforms/_hmac.pyx"
# What a missing or failing compiler raises.
_BUILD_ERRORS = (CCompilerError, CompileError, ExecError, LinkError, PlatformError, OSError)


class OptionalBuildExt(build_ext):
    """build_ext that falls back to pure Python when the extension cannot be built, unless
    CDC_REQUIRE_EXTENSION=1 (CI) asks for a failure instead."""

    def run(self) -> None:
        try:
            super().run()
        except _BUILD_ERRORS as e:
            self._give_up(e)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except _BUILD_ERRORS as e:
            self._give_up(e)

    @staticmethod
    def _give_up(error: Exception) -> None:
        if os.environ.get("CDC_REQUIRE_EXTENSION") == "1":
            raise error
        print(
            f"warning: the compiled pgoutput decoder was not built ({error}); "
            "installing the pure-Python package",
            file=sys.stderr,
        )


def extensions() -> list[Extension]:
    try:
        from Cython.Build import cythonize
    except ImportError:
        if os.environ.get("CDC_REQUIRE_EXTENSION") == "1":
            raise
        print("warning: Cython is not installed; pure-Python package only", file=sys.stderr)
        return []
    return cythonize(
        [
            Extension("cdc.postgres.protocol._columns", [PYX], extra_compile_args=["-O2"]),
            Extension("cdc.postgres._copy_drain", [COPY_DRAIN_PYX], extra_compile_args=["-O2"]),
            Extension("transforms._hmac", [HMAC_PYX], extra_compile_args=["-O2"]),
        ],
        compiler_directives={"language_level": "3"},
        quiet=True,
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
