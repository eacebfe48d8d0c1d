"""The int8 dot-product tensor intrinsics the scheduled matmul kernels tensorize with.

``C[i] += Σ_k A[k] · B[i, k]`` over a 4-element slice of ``A``: 4 × 4 with aarch64 ``sdot``
(Armv8.2 dotprod) or ``smull + saddlp + addp`` (Armv8.0 NEON) — TVM's
``ARM_DOT_4x4_i8_{SDOT,NEON}_INTRIN`` — and 16 × 4 with x86 AVX-512 VNNI ``vpdpbusd``
(u8 × s8; TVM's own VNNI intrinsic does not build with the LLVM inside the wheel, whose
``vpdpbusd.512`` takes byte vectors). Written out here as TVMScript text: importing
``tvm.s_tir.tensor_intrin`` would register every intrinsic of every target.
"""

from __future__ import annotations

from .. import adapter

_DESC_4x4 = '''
@T.prim_func(s_tir=True)
def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "int8", offset_factor=1)
    B = T.match_buffer(b, (4, 4), "int8", offset_factor=1)
    C = T.match_buffer(c, (4,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        for i in T.serial(0, 4):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")
'''

_SDOT = '''
@T.prim_func(s_tir=True)
def sdot(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "int8", offset_factor=1)
    B = T.match_buffer(b, (4, 4), "int8", offset_factor=1)
    C = T.match_buffer(c, (4,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        a4 = T.reinterpret(A.vload([0], "int8x4"), dtype="int32")
        va = T.reinterpret(T.broadcast(a4, 4), dtype="int8x16")
        C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
            C.vload([0], dtype="int32x4"), va, B.vload([0, 0], dtype="int8x16"), dtype="int32x4",
        )
'''

_NEON = '''
@T.prim_func(s_tir=True)
def neon(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "int8", offset_factor=1)
    B = T.match_buffer(b, (4, 4), "int8", offset_factor=1)
    C = T.match_buffer(c, (4,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        a4 = T.reinterpret(A.vload([0], "int8x4"), dtype="int32")
        va = T.reinterpret(T.broadcast(a4, 2), dtype="int8x8")
        vb = B.vload([0, 0], dtype="int8x16")
        low = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.saddlp.v4i32.v8i16"),
            T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smull.v8i16"), va, T.vectorlow(vb, dtype="int8x8"),
                dtype="int16x8",
            ),
            dtype="int32x4",
        )
        high = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.saddlp.v4i32.v8i16"),
            T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smull.v8i16"), va, T.vectorhigh(vb, dtype="int8x8"),
                dtype="int16x8",
            ),
            dtype="int32x4",
        )
        C[T.ramp(T.int32(0), 1, 4)] += T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.addp.v4i32"), low, high, dtype="int32x4"
        )
'''

# the accumulators live in a "local" tile (a tensor intrinsic matches one buffer scope)
_VNNI_DESC = '''
@T.prim_func(s_tir=True)
def vnni_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
    B = T.match_buffer(b, (16, 4), "int8", offset_factor=1)
    C = T.match_buffer(c, (16,), "int32", offset_factor=1, scope="local")
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")
'''

# LLVM 22: <16 x i32> vpdpbusd.512(<16 x i32> acc, <64 x i8> u8, <64 x i8> s8)
_VNNI = '''
@T.prim_func(s_tir=True)
def vnni(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
    B = T.match_buffer(b, (16, 4), "int8", offset_factor=1)
    C = T.match_buffer(c, (16,), "int32", offset_factor=1, scope="local")
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        a4 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        va = T.reinterpret(T.broadcast(a4, 16), dtype="int8x64")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"), va, B.vload([0, 0], dtype="int8x64"), dtype="int32x16",
        )
'''

_SOURCES = {
    "sdot": ("qcompiler_dot_4x4_i8i8s32_sdot", _DESC_4x4, _SDOT),
    "neon": ("qcompiler_dot_4x4_i8i8s32_neon", _DESC_4x4, _NEON),
    "vnni": ("qcompiler_dot_16x4_u8i8s32_vnni", _VNNI_DESC, _VNNI),
}
_REGISTERED: set[str] = set()


def dot_intrinsic(kind: str) -> str:
    """The registered name of the ``kind`` (``sdot``, ``neon``, ``vnni``) intrinsic, registering it once."""
    name, description, implementation = _SOURCES[kind]
    if kind not in _REGISTERED:
        adapter.register_tensor_intrinsic(name, description, implementation)
        _REGISTERED.add(kind)
    return name
