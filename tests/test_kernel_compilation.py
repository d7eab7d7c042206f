"""Every Triton kernel compiles for a GPU (sm_90), on this CPU-only machine, in every variant its flags select.

Triton's interpreter, which runs the kernel tests in CI, executes the Python of a kernel and so accepts code that
Triton's compiler rejects (a `None` out of a called `@triton.jit` function broke the scan on the H200 once). The
compiler itself needs no GPU: this test compiles each kernel to a cubin for `GPUTarget("cuda", 90, 32)` with the
variants a launcher can ask for: every boolean constexpr on, then each one off in turn (its tensor absent where it
has one). It runs in a subprocess because the interpreter, which conftest switches on, replaces the compiler.
The PTX of the conv kernels is also read for the one property their design exists for: tiles loaded as vectors.
"""

import ast
import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

KERNEL_MODULES = ("hybrid_lm.mamba_scan_triton", "hybrid_lm.mamba_conv_triton", "hybrid_lm.triton_rms_norm",
                  "hybrid_lm.triton_cross_entropy", "hybrid_lm.triton_decode_attention")
# a flag's optional tensor: off means None is passed for it
OPTIONAL_TENSOR = {"HAS_D": "D_ptr", "HAS_Z": "z_ptr", "HAS_BIAS": "bias_ptr", "HAS_SEQ": "seq_ptr",
                   "HAS_INIT": "init_ptr", "HAS_DFINAL": "dfinal_ptr", "HAS_RESIDUAL": "res_ptr",
                   "HAS_DSUM": "dsum_ptr", "HAS_MASK": "mask_ptr"}
# tile constexprs, in the ranges the launchers use
TILES = {"BLOCK_D": 16, "BLOCK_T": 64, "BLOCK_L": 128, "BLOCK_K": 4, "BLOCK_N": 16, "BLOCK_M": 4, "BLOCK_H": 1024,
         "BLOCK_V": 4096, "WIDTH": 4, "BLOCK_G": 16, "BLOCK_P": 64, "HEADS": 16, "NUM_KV_HEADS": 4, "GROUP": 4,
         "HEAD_DIM": 16, "PRECISION": "tf32"}
FLOAT32_POINTERS = {"A_ptr", "D_ptr", "bias_ptr", "states_ptr", "adjoint_ptr", "dB_ptr", "dC_ptr", "dA_ptr",
                    "dD_ptr", "dbias_ptr", "rstd_ptr", "state_ptr", "loss_ptr", "dweight_ptr", "acc_ptr", "max_ptr",
                    "sum_ptr"}
INT64_POINTERS = {"seq_ptr", "labels_ptr"}
FLOAT32_SCALARS = {"scaling"}


def _variants(fn):
    """(constexpr values) of every flag on, then each flag off."""
    flags = [name for name in fn.arg_names if re.fullmatch(r"[A-Z_]+", name) and name not in TILES]
    yield {**dict.fromkeys(flags, True)}
    for flag in flags:
        yield {**dict.fromkeys(flags, True), flag: False}


def _signature(fn, constants: dict) -> dict:
    """Triton types of a kernel's arguments: constexpr for `constants`, pointers by name (bf16 unless listed above),
    float32 for the scalars listed above, 32-bit integers for the rest."""
    def type_of(arg):
        if arg in constants:
            return "constexpr"
        if arg.endswith("_ptr"):
            return "*i64" if arg in INT64_POINTERS else "*fp32" if arg in FLOAT32_POINTERS else "*bf16"
        return "fp32" if arg in FLOAT32_SCALARS else "i32"
    return {arg: type_of(arg) for arg in fn.arg_names}


def compile_all(module_name: str) -> list[str]:
    """Compiles every `*_kernel` of the module in every variant; returns one line per failure."""
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module(module_name)
    failures = []
    for name in sorted(n for n in dir(module) if n.endswith("_kernel")):
        fn = getattr(module, name)
        while not isinstance(fn, triton.runtime.jit.JITFunction):  # under @triton.heuristics / autotune
            fn = fn.fn
        for flags in _variants(fn):
            constants = {**flags, **{k: v for k, v in TILES.items() if k in fn.arg_names}}
            for flag, value in flags.items():
                if not value and OPTIONAL_TENSOR.get(flag) in fn.arg_names:
                    constants[OPTIONAL_TENSOR[flag]] = None
            try:
                triton.compile(ASTSource(fn, _signature(fn, constants), constants), target=GPUTarget("cuda", 90, 32))
            except Exception as error:  # report every failing variant, not the first
                cause = error
                while (cause.__cause__ or cause.__context__) is not None:
                    cause = cause.__cause__ or cause.__context__
                off = [flag for flag, value in flags.items() if not value]
                failures.append(f"{module_name}.{name} (off: {off or 'none'}): {type(error).__name__} "
                                f"{str(error).splitlines()[0]} ... {type(cause).__name__}: {cause}")
    return failures


def conv_global_loads() -> dict:
    """{kernel: (global load instructions, of them 16-byte vectors)} per thread of the conv kernels as training
    launches them: bf16, the default tiles, unit stride along L, 16-byte aligned pointers and sizes, no initial
    state, documents or final-state gradient."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hybrid_lm import mamba_conv_triton

    tiles = mamba_conv_triton.ConvTiles()
    counts = {}
    for name, num_warps in (("_conv_fwd_kernel", tiles.num_warps), ("_conv_bwd_kernel", tiles.backward_warps)):
        fn = getattr(mamba_conv_triton, name).fn
        constants = {"WIDTH": 4, "SILU": True, "BLOCK_D": tiles.block_d, "BLOCK_L": tiles.block_l,
                     "TILES": tiles.backward_tiles, "HAS_BIAS": True, "HAS_INIT": False, "HAS_SEQ": False,
                     "HAS_DFINAL": False, "stride_x_l": 1, "stride_dout_l": 1, "init_ptr": None, "seq_ptr": None,
                     "dfinal_ptr": None, "dinit_ptr": None}
        constants = {k: v for k, v in constants.items() if k in fn.arg_names}
        aligned = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names) if arg not in constants}
        source = ASTSource(fn, _signature(fn, constants), constants, aligned)
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        ptx = kernel.asm["ptx"]
        counts[name] = (len(re.findall(r"ld\.global", ptx)), len(re.findall(r"ld\.global[^;]*\.v4", ptx)))
    return counts


@pytest.mark.parametrize("module_name", KERNEL_MODULES)
def test_kernels_compile_for_sm90(module_name, tmp_path):
    result = run_here(module_name, tmp_path)
    assert result.returncode == 0, f"compilation failed:\n{result.stdout}\n{result.stderr[-3000:]}"


def test_conv_kernels_load_their_tiles_as_vectors(tmp_path):
    """The conv kernels' design: each tile is loaded whole as 16-byte vectors and the shifted views are built in
    registers, so the per-thread loads are the tiles' vectors plus the weights and bias. A shifted view loaded
    from memory would be loaded element by element (the kernels before: 60 loads forward, 164 backward)."""
    result = run_here("--conv-loads", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    from hybrid_lm.mamba_conv_triton import ConvTiles

    counts = ast.literal_eval(result.stdout.strip().splitlines()[-1])  # the dict the subprocess printed
    tiles = ConvTiles()
    # x at t - 8 and t forward; at t - 8, t, t + 8 and dout at t, t + 8 backward
    for name, num_warps, tiles_loaded in (("_conv_fwd_kernel", tiles.num_warps, 2),
                                          ("_conv_bwd_kernel", tiles.backward_warps, 5)):
        vectors_per_tile = tiles.block_d * tiles.block_l // (num_warps * 32) // 8  # 8 bf16 a vector
        weights_and_bias = vectors_per_tile * (4 + 1)  # a thread's rows of channels (a vector each): 4 weights, bias
        loads, vectors = counts[name]
        assert vectors == tiles_loaded * vectors_per_tile, (name, counts)
        assert loads <= vectors + weights_and_bias, (name, counts)


def run_here(argument: str, tmp_path) -> subprocess.CompletedProcess:
    """This file as a script, outside the interpreter that conftest switches on, with a fresh Triton cache."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    return subprocess.run([sys.executable, __file__, argument], env=env, capture_output=True, text=True, timeout=900)


if __name__ == "__main__":
    if sys.argv[1] == "--conv-loads":
        print(conv_global_loads())
        sys.exit(0)
    problems = compile_all(sys.argv[1])
    print("\n".join(problems))
    sys.exit(1 if problems else 0)
