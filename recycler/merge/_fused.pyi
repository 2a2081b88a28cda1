# Types of the C kernel in _fused.c (see its header comment).
from collections.abc import Sequence

F32: int
BF16: int
F16: int
HAVE_F16: int
FILE_STEP: int

def combine(
    out_addr: int,
    out_dtype: int,
    in_addrs: Sequence[int],
    in_dtypes: Sequence[int],
    coeffs: Sequence[float],
    start: int,
    stop: int,
    /,
) -> bool: ...
def combine_files(
    out_fd: int,
    out_offset: int,
    out_dtype: int,
    in_fds: Sequence[int],
    in_offsets: Sequence[int],
    in_dtypes: Sequence[int],
    coeffs: Sequence[float],
    start: int,
    stop: int,
    scratch: bytearray,
    /,
) -> bool: ...
def gram(
    in_addrs: Sequence[int],
    in_dtypes: Sequence[int],
    start: int,
    stop: int,
    /,
) -> tuple[float, ...]: ...
def gram_files(
    in_fds: Sequence[int],
    in_offsets: Sequence[int],
    in_dtypes: Sequence[int],
    start: int,
    stop: int,
    scratch: bytearray,
    /,
) -> tuple[float, ...]: ...
