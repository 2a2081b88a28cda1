"""The C kernel (recycler/merge/_fused.c); everything else is in pyproject.toml.

`optional=True`: where it cannot be compiled (no C compiler), recycler installs
without it and merges with its PyTorch kernel, several times slower on the CPU.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "recycler.merge._fused",
            ["recycler/merge/_fused.c"],
            # No FMA contraction: every build and every CPU gives the same bits.
            extra_compile_args=["-O3", "-ffp-contract=off"],
            optional=True,
        )
    ]
)
