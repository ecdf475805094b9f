"""Static cost of the GPU kernels, read from their compiled code without a GPU (issue 20, docs/performance.md).

For every GPU kernel configuration `auto` can launch (Triton: per key dimension D, value channels E, image dtype,
provenance, distance precision and tile config, through the launcher's own `launch_config`; CUDA: per template
instance of csrc/reduce.cu) this compiles ahead of time for sm_90, reads registers, stack and spills from
`ptxas -v`, disassembles the cubin (the `cuobjdump` Triton's wheel carries), finds the main loop (the outermost
backward branch around the softmax's ex2) and counts its warp-instructions per query-entry pair by class. A
roofline over issue rate, exponential unit, tensor cores and L2 gathers turns the counts into predicted pairs/s.

    python benchmarks/static_cost.py                      # every config -> benchmarks/results/static-cost.json
    python benchmarks/static_cost.py --quick --out x.json # the CI subset (tests/test_gpu_kernels_static.py)

Run it without TRITON_INTERPRET (it compiles for a GPU). Counting rules (see docs/performance.md): instructions
are counted statically between a loop's branch target and its backward branch, so both sides of an in-loop
branch count (an upper bound on what one iteration issues); an inner loop counts `trips` times, where `trips`
comes from the config (the Triton kernel's key-feature chunk loop runs ceil(D / BLOCK_D) times) or, when the
tool cannot know it, once (flagged in the JSON as `inner_loops_counted_once`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "static-cost.json"

# --- the machine (NVIDIA H100 SXM5 / H200 SXM: same GH100 die, 132 SMs) --------------------------------------------
# Sources: NVIDIA H100 Tensor Core GPU datasheet and H200 datasheet (132 SMs; dense FP16/BF16 tensor 989.4 TFLOPS,
# dense TF32 494.7 TFLOPS, FP32 66.9 TFLOPS); NVIDIA Hopper tuning guide / CUDA C Programming Guide, compute
# capability 9.0 tables (4 warp schedulers per SM, each issuing 1 warp-instruction per clock; 16 special-function
# results (MUFU: ex2, rcp) per clock per SM; 64K 32-bit registers, 2048 threads, 32 blocks and 228 KB shared memory
# per SM, 227 KB per block, 1 KB reserved per block). The datasheet tensor peaks correspond to 4096 (FP16/BF16) and
# 2048 (TF32) dense FLOP per clock per SM at 1.83 GHz (989.4e12 / 132 / 4096 = 1.83e9).
SMS = 132
CLOCK_HZ = 1.755e9  # sustained clock under load: TOOLCHAIN.md's figure, the H100 PCIe's maximum boost
# (Chips and Cheese, "Nvidia's H100: Funny L2, and Tons of Bandwidth", 2023-07-02); the SXM boosts to 1.98 GHz, so
# predictions here are conservative by up to 13% (they scale linearly with the clock).
ISSUE_PER_CLOCK_SM = 4  # warp-instructions
MUFU_LANES_PER_CLOCK_SM = 16
TENSOR_FLOP_PER_CLOCK_SM = {"f16": 4096, "bf16": 4096, "tf32": 2048, "s8": 8192, "f64": 128}
L2_BYTES_PER_S = 5.5e12  # no vendor figure: the order Chips and Cheese measured on the H100 PCIe (114 SMs); the
# SXM's 132 SMs reach more. Gathered bytes are counted as requested by the lanes (32 per warp-instruction times
# the access width); sectors fetched can be more for scattered bytes, L1 hits make the L2 traffic less.
REGISTERS_PER_SM, THREADS_PER_SM, CTAS_PER_SM = 65536, 2048, 32
SHARED_PER_SM, SHARED_PER_CTA_MAX, SHARED_RESERVED_PER_CTA = 228 * 1024, 227 * 1024, 1024

# The CIFAR-10 problem of SPEC section 5 / issue 20: 64 query images of 32 x 32 pixels against 50,000 training
# images (51.2M entries per query pixel at every position), 3 channels.
PROBLEM_PAIRS = 64 * 1024 * 50_000 * 1024


# --- SASS ----------------------------------------------------------------------------------------------------------

_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", re.MULTILINE)
_TARGET = re.compile(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)")
_FUNCTION = re.compile(r"Function : (\S+)")

CLASSES = ("tensor", "mufu", "fp_alu", "int_alu", "conversion", "load_store", "shuffle", "control")
_OPCLASS = [
    (re.compile(r"^(HMMA|HGMMA|IMMA|IGMMA|QGMMA|BMMA|DMMA)"), "tensor"),
    (re.compile(r"^MUFU"), "mufu"),
    (re.compile(r"^(FFMA|FADD|FMUL|FMNMX|FSEL|FSETP|FSET|FSWZADD|FCHK|HADD2|HFMA2|HMUL2|HMNMX2|HSETP2|DADD|DFMA|DMUL)"),
     "fp_alu"),
    (re.compile(r"^(F2F|F2I|I2F|F2FP|I2FP|F2IP|I2I)"), "conversion"),
    (re.compile(r"^(LDG|STG|LDS|STS|LDSM|STSM|LDGSTS|LDL|STL|LD|ST|ATOM|ATOMS|ATOMG|RED|LDC|ULDC|UBLKCP|UTMA|ULDC|"
                r"LDGDEPBAR|ARRIVES|SYNCS)"), "load_store"),
    (re.compile(r"^(SHFL|VOTE|REDUX|MATCH)"), "shuffle"),
    (re.compile(r"^(BRA|BAR|BSSY|BSYNC|WARPSYNC|EXIT|RET|CALL|NOP|DEPBAR|WARPGROUP|YIELD|BPT|MEMBAR|ERRBAR|CCTL|"
                r"JMP|BREAK|BMOV|ELECT|PLOP3|UPLOP3|R2UR|S2UR|S2R|CS2R|R2P|P2R|ACQBULK|FENCE)"), "control"),
]  # fmt: skip
# Everything else (IMAD, IADD3, LOP3, SHF, LEA, ISETP, SEL, MOV, PRMT, IMNMX, POPC, uniform-datapath U*...) is integer.


def opclass(opcode: str) -> str:
    for pattern, name in _OPCLASS:
        if pattern.match(opcode):
            return name
    return "int_alu"


@dataclass
class Instruction:
    address: int
    text: str  # without the predicate

    @property
    def opcode(self) -> str:
        return self.text.split()[0] if self.text else ""


def parse_sass(sass: str) -> dict[str, list[Instruction]]:
    """SASS text of `cuobjdump -sass` -> {function name: instructions}."""
    functions: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for line in sass.splitlines():
        found = _FUNCTION.search(line)
        if found:
            current = functions.setdefault(found.group(1), [])
            continue
        match = _LINE.match(line)
        if match and current is not None:
            text = re.sub(r"^@!?U?P[T0-9]+\s+", "", match.group(2).strip())
            current.append(Instruction(int(match.group(1), 16), text))
    return functions


def find_loops(code: list[Instruction]) -> list[tuple[int, int]]:
    """Loops as index ranges `(first, last)` (inclusive): a branch at `last` back to the instruction `first`."""
    index = {ins.address: i for i, ins in enumerate(code)}
    loops = []
    for i, ins in enumerate(code):
        target = _TARGET.search(ins.text)
        if target and int(target.group(1), 16) <= ins.address and int(target.group(1), 16) in index:
            first = index[int(target.group(1), 16)]
            if first < i:
                loops.append((first, i))
    return loops


def main_loop(code: list[Instruction]) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """The main loop (the outermost loop that holds an ex2, the softmax's exponential; the largest one if no loop
    does) and the loops nested directly or indirectly inside it."""
    loops = find_loops(code)
    if not loops:
        raise ValueError("no loop in this kernel")

    def has_ex2(loop):
        return any(code[i].opcode.startswith("MUFU.EX2") for i in range(loop[0], loop[1] + 1))

    candidates = [loop for loop in loops if has_ex2(loop)] or loops
    outer = [c for c in candidates if not any(o[0] <= c[0] and c[1] <= o[1] and o != c for o in candidates)]
    best = max(outer, key=lambda loop: loop[1] - loop[0])
    inner = [loop for loop in loops if loop != best and best[0] <= loop[0] and loop[1] <= best[1]]
    return best, inner


def loop_counts(code, loop, inner, trips) -> tuple[dict, dict, list[dict]]:
    """Per class (and per opcode) counts of one iteration of `loop`, inner loops weighted by `trips` (a list in
    address order of the outermost inner loops; missing or None: counted once and flagged)."""
    weight = [1.0] * len(code)
    outermost_inner = [c for c in inner if not any(o[0] <= c[0] and c[1] <= o[1] and o != c for o in inner)]
    described = []
    for k, (first, last) in enumerate(sorted(outermost_inner)):
        known = k < len(trips) and trips[k] is not None
        t = trips[k] if known else 1
        for i in range(first, last + 1):
            weight[i] *= t
        described.append({"instructions": last - first + 1, "trips": t, "counted_once": not known})
    classes = dict.fromkeys(CLASSES, 0.0)
    opcodes: dict[str, float] = {}
    for i in range(loop[0], loop[1] + 1):
        op = code[i].opcode
        classes[opclass(op)] += weight[i]
        opcodes[op] = opcodes.get(op, 0.0) + weight[i]
    return classes, opcodes, described


def tensor_flops(opcode: str) -> tuple[float, str]:
    """Dense FLOPs one warp issues with this tensor-core instruction, and the operand type."""
    kind = "f16"
    for name in ("BF16", "TF32", "F16", "S8", "U8", "F64"):
        if f".{name}" in opcode:
            kind = {"BF16": "bf16", "TF32": "tf32", "F16": "f16", "S8": "s8", "U8": "s8", "F64": "f64"}[name]
            break
    wg = re.search(r"GMMA\.(\d+)x(\d+)x(\d+)", opcode)
    if wg:  # a warpgroup MMA (m64nNkK) is issued by each of the 4 warps of the warpgroup
        m, n, k = (int(x) for x in wg.groups())
        return 2 * m * n * k / 4, kind
    mma = re.search(r"MMA\.(16)(8)(\d+)", opcode)  # HMMA.16816: m16 n8 k16; HMMA.1688: m16 n8 k8
    if mma:
        m, n, k = (int(x) for x in mma.groups())
        return 2 * m * n * k, kind
    return 0.0, kind


def global_bytes(opcode: str) -> float:
    """Bytes a warp requests from the memory system with this global load (32 lanes x width)."""
    if not (opcode.startswith("LDG") or opcode.startswith("LDGSTS")):
        return 0.0
    width = 4
    for token, size in ((".128", 16), (".64", 8), (".U8", 1), (".S8", 1), (".U16", 2), (".S16", 2)):
        if token in opcode:
            width = size
            break
    return 32.0 * width


# --- compile ---------------------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    """ptxas / cuobjdump from Triton's wheel (the CUDA toolkit on the device image lacks cuobjdump)."""
    try:
        import triton

        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found (install triton, or put the CUDA toolkit on PATH)")
    return found


def ptxas_info(text: str) -> dict:
    """Registers, stack frame, spill stores/loads and static shared memory from `ptxas -v` output."""
    get = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else 0  # noqa: E731
    return {
        "registers": get(r"Used (\d+) registers"),
        "stack_bytes": get(r"(\d+) bytes stack frame"),
        "spill_store_bytes": get(r"(\d+) bytes spill stores"),
        "spill_load_bytes": get(r"(\d+) bytes spill loads"),
        "static_shared_bytes": get(r"(\d+) bytes smem"),
    }


def ctas_per_sm(registers: int, threads: int, shared: int) -> int:
    """Resident blocks per SM under the register file (allocated per warp in units of 256), threads, shared memory
    (plus the 1 KB the runtime reserves per block) and the 32-block limit."""
    warps = math.ceil(threads / 32)
    per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = REGISTERS_PER_SM // (per_warp * warps)
    by_threads = THREADS_PER_SM // threads
    by_shared = SHARED_PER_SM // (shared + SHARED_RESERVED_PER_CTA) if shared else CTAS_PER_SM
    return max(0, min(by_regs, by_threads, by_shared, CTAS_PER_SM))


@dataclass
class Config:
    """One kernel configuration to compile and measure."""

    name: str
    kernel: str  # "triton" or "cuda"
    P: int
    C: int
    D: int
    E: int
    provenance: bool
    uint8: bool
    precision: str
    auto: bool  # whether `auto` can launch it (a spill here fails the test)
    detail: dict = field(default_factory=dict)


def problem_sizes(quick: bool) -> list[tuple[int, int, bool, bool, str]]:
    """`(P, C, uint8, provenance, precision)` of the configs to measure, at the distance precision `auto` picks
    (`elsfast.reduce.triton_backend.dot_precision`: "fp16x2" for uint8 images; "tf32x3" for float32 images; "tf32"
    only when asked for). Full: CIFAR-10 (C = 3) at every odd P up to 11 and MNIST (C = 1) at P = 3 and 11, uint8
    images, with and without provenance, and P = 13, 15, 17 (the rest of CIFAR-10's published P(t)) without; at
    P = 3 and 11 also float32 images and the forced "ieee". Quick (CI):
    P = 3 and 11, C = 3, uint8, with and without provenance."""
    from elsfast.reduce.triton_backend import dot_precision

    u8 = dot_precision("auto", uint8=True)
    if quick:
        return [(P, 3, True, prov, u8) for P in (3, 11) for prov in (False, True)]
    sizes = ((3, (3, 5, 7, 9, 11)), (1, (3, 11)))
    out = [(P, C, True, prov, u8) for C, Ps in sizes for P in Ps for prov in (False, True)]
    out += [(P, 3, True, False, u8) for P in (13, 15, 17)]  # the rest of the published CIFAR-10 P(t)
    out += [(P, 3, False, False, precision) for P in (3, 11) for precision in ("tf32x3", "tf32")]
    out += [(P, 3, True, False, "ieee") for P in (3, 11)]
    return out


def triton_configs(quick: bool) -> list[Config]:
    """What the Triton backend launches for these patch problems with its default tiles; "ieee" (only when asked
    for by name) is marked as a config `auto` does not launch."""
    from elsfast.reduce.triton_backend import Triton, value_block

    default = Triton()
    out = []
    for P, C, uint8, provenance, precision in problem_sizes(quick):
        D, E = C * P * P, C
        name = f"triton-P{P}-C{C}-{'u8' if uint8 else 'f32'}-{precision}{'-prov' if provenance else ''}"
        detail = {"block_m": default.block_m, "block_n": default.block_n, "block_e": value_block(E)}
        out.append(Config(name, "triton", P, C, D, E, provenance, uint8, precision, precision != "ieee", detail))
    return out


# The launches the compiles are specialised for (issue 24): the problem of PROBLEM_PAIRS as elsfast launches it,
# one group of every position (circular padding), 64 query images; C = 3: CIFAR-10 (50,000 images of 3 x 32 x 32
# bytes), C = 1: MNIST (60,000 of 28 x 28).
PROBLEMS = {3: dict(images=50_000, side=32), 1: dict(images=60_000, side=28)}
QUERY_IMAGES = 64


def triton_launch(
    launch: dict, G: int, M: int, N: int, S: int, pixels_per_image: int, splits: int | None = None
) -> dict:
    """What `elsfast.reduce.triton_backend.Triton.reduce` launches for G groups of M queries against N images at S
    positions with the compile-time `launch` (`launch_config`) on an H100/H200 (SMS SMs): the grid, the splits
    (`plan_splits`) and the kernel's integer arguments (`kernel_integers`, the launcher's own)."""
    import torch

    from elsfast.kernels.softmax_reduce import kernel_integers
    from elsfast.reduce.partials import plan_splits

    programs = math.ceil(M / launch["BLOCK_M"]) * G * math.ceil(launch["E"] / launch["BLOCK_E"])
    tiles = S * math.ceil(N / launch["BLOCK_N"])  # a tile: BLOCK_N images at one position (Triton.reduce)
    splits, per_split = plan_splits(tiles, 1, programs, torch.device("cuda"), splits, sms=SMS)
    integers = kernel_integers(G, M, N, S, pixels_per_image, per_split, launch)
    return {"integers": integers, "programs": programs * splits, "splits": splits, "tiles_per_split": per_split}


def specialisation(integers: dict, uint8: bool) -> tuple[dict, dict, dict, dict]:
    """`(signature, constants, attrs, described)` of the compile a launch with these integer arguments triggers:
    Triton's own rule (`native_specialize_impl`, what `JITFunction.run` applies to every argument): an integer
    equal to 1 becomes a constant, one divisible by 16 gets `tt.divisibility` 16; every pointer is 16-byte
    aligned (torch's allocations are) and gets the same hint. Float arguments are not specialised."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    from elsfast.kernels import softmax_reduce as module

    names = module.softmax_reduce_kernel.arg_names
    signature = dict(module.KERNEL_SIGNATURE)
    if uint8:
        signature["img_ptr"] = "*u8"
    constants, attrs, described = {}, {}, {}
    for name, kind in signature.items():
        if kind.startswith("*"):
            attrs[(names.index(name),)] = BaseBackend.parse_attr("D")
            described[name] = "aligned 16"
    for name, value in integers.items():
        kind, key = native_specialize_impl(BaseBackend, value, False, True, True)
        if kind == "constexpr":
            signature[name] = "constexpr"
            constants[name] = value
            described[name] = f"constant {value}"
        else:
            signature[name] = kind
            if key:
                attrs[(names.index(name),)] = BaseBackend.parse_attr(key)
            described[name] = f"{value} ({'divisible by 16' if key else 'no hint'})"
    return signature, constants, attrs, described


def compile_triton(config: Config, workdir: Path) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from elsfast.kernels import softmax_reduce as module

    launch = module.launch_config(
        config.D,
        config.E,
        is_uint8=config.uint8,
        provenance=config.provenance,
        dot_precision=config.precision,
        **config.detail,
    )
    options = {k: launch.pop(k) for k in ("num_warps", "num_stages") if k in launch}
    problem = PROBLEMS[config.C]
    S = problem["side"] ** 2
    planned = triton_launch(launch, 1, QUERY_IMAGES * S, problem["images"], S, config.C * S)
    signature, constants, attrs, described = specialisation(planned["integers"], config.uint8)
    signature.update(dict.fromkeys(launch, "constexpr"))
    source = ASTSource(module.softmax_reduce_kernel, signature, {**launch, **constants}, attrs)
    started = time.perf_counter()
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    compile_seconds = time.perf_counter() - started
    ptx = workdir / f"{config.name}.ptx"
    ptx.write_text(compiled.asm["ptx"])
    cubin = workdir / f"{config.name}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    arch = re.search(r"\.target\s+(sm_\w+)", compiled.asm["ptx"]).group(1)
    from triton.backends.nvidia.compiler import get_ptxas

    # the ptxas Triton itself uses for sm_90 (triton 3.9 emits PTX 9.x for its "ptxas-blackwell", 3.6 PTX 8.x)
    info = subprocess.run(
        [get_ptxas(90).path, f"-arch={arch}", "-v", str(ptx), "-o", str(workdir / "ptxas.cubin")],
        capture_output=True,
        text=True,
        check=True,
    )
    threads = compiled.metadata.num_warps * 32
    block = launch
    return {
        "cubin": cubin,
        "ptxas": ptxas_info(info.stdout + info.stderr),
        "shared_bytes": compiled.metadata.shared,
        "threads": threads,
        "pairs_per_iteration": block["BLOCK_M"] * block["BLOCK_N"],
        "tile": (block["BLOCK_M"], block["BLOCK_N"]),
        # the kernel's inner loop (runtime key-feature chunks, if any) runs over the chunks whose queries are not
        # resident: ceil(D / BLOCK_D) - RESIDENT_CHUNKS times (the resident ones are unrolled in the main loop)
        "trips": [math.ceil(config.D / block["BLOCK_D"]) - block.get("RESIDENT_CHUNKS", 0)],
        "launch": {**launch, **options},
        "specialisation": described,
        "problem_launch": {k: v for k, v in planned.items() if k != "integers"},
        "compile_seconds": compile_seconds,
        "compiler": f"triton {triton.__version__}",
    }


def cuda_configs(quick: bool) -> list[Config]:
    """The CUDA kernel for the same patch problems (its fp32 FMAs have no precision choice)."""
    out = []
    for P, C, uint8, provenance, precision in problem_sizes(quick):
        if precision in ("tf32", "ieee"):
            continue
        name = f"cuda-P{P}-C{C}-{'u8' if uint8 else 'f32'}-fp32{'-prov' if provenance else ''}"
        out.append(Config(name, "cuda", P, C, C * P * P, C, provenance, uint8, "fp32", True))
    return out


_CUDA_CACHE: dict[str, tuple[str, str, Path]] = {}


def compile_cuda_source(workdir: Path) -> tuple[str, str, Path]:
    """nvcc -arch=sm_90 -cubin -Xptxas -v csrc/reduce.cu -> (ptxas output, SASS, cubin); once per run."""
    key = str(workdir)
    if key not in _CUDA_CACHE:
        cubin = workdir / "reduce.cubin"
        done = subprocess.run(
            [
                "nvcc",
                "-arch=sm_90",
                "-cubin",
                "-O3",
                "-Xptxas",
                "-v",
                "-o",
                str(cubin),
                str(ROOT / "csrc" / "reduce.cu"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, check=True)
        _CUDA_CACHE[key] = (done.stdout + done.stderr, sass.stdout, cubin)
    return _CUDA_CACHE[key]


def cuda_kernel_info(config: Config, workdir: Path) -> dict:
    """The instance of the CUDA kernel this config launches; its ptxas figures and geometry (csrc/reduce.h)."""
    ptxas, sass, _ = compile_cuda_source(workdir)
    header = (ROOT / "csrc" / "reduce.h").read_text()
    constant = lambda name: int(re.search(rf"constexpr int {name} = (\d+);", header).group(1))  # noqa: E731
    block_q, tile_n, chunk_d = constant("kBlockQ"), constant("kTileN"), constant("kChunkD")
    functions = parse_sass(sass)
    # one instance per value channel count and provenance (template parameters kE, kProvenance):
    # reduce_kernel<E, provenance>, mangled ...ILi<E>ELb<0|1>E...
    instances = [f for f in functions if "reduce_kernel" in f]
    name = next(f for f in instances if f"ILi{config.E}ELb{int(config.provenance)}E" in f)
    sections = re.split(r"ptxas info\s+: Compiling entry function", ptxas)
    section = next(s for s in sections if name in s)
    return {
        "function": name,
        "code": functions[name],
        "ptxas": ptxas_info(section),
        "shared_bytes": ptxas_info(section)["static_shared_bytes"],
        "threads": block_q,
        "pairs_per_iteration": block_q * tile_n,
        "tile": (block_q, tile_n),
        "trips": [],  # set in measure(): the key-feature chunk loop runs ceil(D / kChunkD) times
        "chunk_loop_trips": math.ceil(config.D / chunk_d),
        "launch": {"kBlockQ": block_q, "kTileN": tile_n, "kChunkD": chunk_d},
        "compiler": "nvcc " + re.search(r"release (\S+),", _nvcc_version()).group(1).rstrip(","),
    }


def _nvcc_version() -> str:
    return subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout


# --- the roofline ----------------------------------------------------------------------------------------------------


def l2_sector_bytes(config: Config, queries_per_tile: int, entries_per_tile: int) -> float:
    """L2 traffic per pair in 32-byte sectors, from the patch geometry (issue 24; the lanes' requested bytes
    undercount it): a tile reads, per entry, C x P patch rows of P pixels (P bytes for uint8 images, 4P for fp32),
    each at a uniformly random offset within its sectors, so 1 + (bytes - 1) / 32 sectors a row; the values (the
    centre pixel's channels) lie in sectors the key rows already fetched; the pixel offsets are 4 B per feature
    per tile (Triton: one position per tile). Shared by `queries_per_tile` queries."""
    row = config.P * (1 if config.uint8 else 4)
    sectors_per_entry = config.C * config.P * (1 + (row - 1) / 32)
    per_tile = entries_per_tile * sectors_per_entry * 32 + 4 * config.D
    return per_tile / (queries_per_tile * entries_per_tile)


def roofline(per_pair: dict, flops: dict, gather_bytes: float) -> dict:
    """Bounds in pairs/s for one pair's cost: issue slots, MUFU lanes, tensor-core FLOPs, L2 bytes (in sectors,
    `l2_sector_bytes`)."""
    clock_sm = CLOCK_HZ * SMS
    total = sum(per_pair.values())
    bounds = {"issue": ISSUE_PER_CLOCK_SM * clock_sm / total if total else math.inf}
    bounds["mufu"] = MUFU_LANES_PER_CLOCK_SM * clock_sm / (32 * per_pair["mufu"]) if per_pair["mufu"] else math.inf
    tensor_clocks = sum(f / TENSOR_FLOP_PER_CLOCK_SM[kind] for kind, f in flops.items())  # per pair, per SM
    bounds["tensor"] = clock_sm / tensor_clocks if tensor_clocks else math.inf
    bounds["l2_sectors"] = L2_BYTES_PER_S / gather_bytes if gather_bytes else math.inf
    bound = min(bounds, key=bounds.get)
    return {"bounds": bounds, "bound_by": bound, "predicted_pairs_per_s": bounds[bound]}


# --- the serialised-latency estimate (issue 24) -------------------------------------------------------------------
# The roofline assumes every unit busy at once. This estimate assumes the opposite for one CTA: a tile's phases run
# one after the other (the kernel waits on every wgmma at once, barriers and fences separate the phases, one
# pipeline stage), and only other resident CTAs of the SM overlap with it. Its assumptions, none measured on a GPU:
SERIAL_ASSUMPTIONS = {
    "l2_latency_cycles": 280,  # an L2 hit, load to use (Chips and Cheese's H100 PCIe figure, ~260-300 cycles)
    "dependent_gather_levels": 2,  # per tile: the pixel offsets, then the pixels they point at
    "l2_traffic": "32-byte sectors from the patch geometry (l2_sector_bytes), at the SM's share of L2_BYTES_PER_S",
    "wgmma_wait_cycles": 128,  # the latency of the last wgmma group before its wait returns (all waited at once)
    "barrier_cycles": 24,  # one bar.sync / warpgroup arrive / fence with all warps of the CTA present
    "conversion_pipe_lanes_per_clock_sm": 16,  # MUFU.EX2 and I2F/F2I/F2F share the quarter-rate pipe
    "overlap": "within a CTA only the compute phase's issue and conversion pipe overlap (max of the two); the "
    "gather, tensor, compute and barrier phases follow each other; CTAs resident on one SM overlap fully",
    "waves": "a launch of n programs on SMS x ctas_per_sm slots runs ceil(n / slots) waves of tiles_per_split tiles",
}
_BARRIER = re.compile(r"^(BAR|WARPGROUP|FENCE|MEMBAR|SYNCS|DEPBAR|ERRBAR)")


def serialised_tile(result: dict, opcodes: dict, warps: int) -> dict:
    """Cycles one CTA spends on one tile (one main-loop iteration) when its phases run one after the other:
    gathers (exposed L2 latency per dependent level, then the tile's sectors at the SM's share of L2 bandwidth),
    tensor cores (the tile's FLOPs at the SM's rate plus one exposed wgmma latency), compute (every warp-instruction
    at 4 per clock, or the conversion pipe's MUFU.EX2 and conversions at 16 lanes per clock, whichever is slower:
    the warps' instructions interleave on the schedulers), and the barriers and fences between the phases."""
    a = SERIAL_ASSUMPTIONS
    pairs = result["main_loop"]["pairs_per_iteration"]
    barriers = sum(count for op, count in opcodes.items() if _BARRIER.match(op))  # once per CTA: all warps pass it
    pipe = sum(count * warps for op, count in opcodes.items() if opclass(op) in ("mufu", "conversion"))
    issued = sum(opcodes.values()) * warps
    l2_bytes_per_clock_sm = L2_BYTES_PER_S / CLOCK_HZ / SMS
    tensor_clocks = sum(f / TENSOR_FLOP_PER_CLOCK_SM[k] for k, f in result["tensor_flops_per_pair"].items()) * pairs
    phases = {
        "gather": a["dependent_gather_levels"] * a["l2_latency_cycles"]
        + result["l2_sector_bytes_per_pair"] * pairs / l2_bytes_per_clock_sm,
        "tensor": tensor_clocks + (a["wgmma_wait_cycles"] if tensor_clocks else 0.0),
        "compute": max(issued / ISSUE_PER_CLOCK_SM, pipe * 32 / a["conversion_pipe_lanes_per_clock_sm"]),
        "barrier": barriers * a["barrier_cycles"],
    }
    return {
        "tile_cycles": sum(phases.values()),
        "phase_cycles": phases,
        "compute_bound_by": "conversion_pipe" if pipe * 32 / 16 > issued / ISSUE_PER_CLOCK_SM else "issue",
        "barriers_per_tile": barriers,
    }


def waves(result: dict, launch: dict) -> float:
    """Waves of a launch of `launch["programs"]` programs: programs / (SMS x CTAs per SM)."""
    return launch["programs"] / (SMS * max(1, result["ctas_per_sm"]))


def launch_seconds(result: dict, programs: int, tiles_per_split: int) -> float:
    """Seconds of one launch under the serialised estimate: whole waves (the last one, however few programs it
    holds, takes as long as a full one) of `tiles_per_split` tiles each; the CTAs of one SM overlap, but an SM
    does not run a tile faster than its roofline allows."""
    per_tile = result["serialised"]["tile_cycles"] / max(1, result["ctas_per_sm"])
    pairs = result["main_loop"]["pairs_per_iteration"]
    per_tile = max(per_tile, pairs * CLOCK_HZ * SMS / result["predicted_pairs_per_s"])  # the roofline's floor
    slots = SMS * max(1, result["ctas_per_sm"])
    return math.ceil(programs / slots) * tiles_per_split * per_tile * max(1, result["ctas_per_sm"]) / CLOCK_HZ


def measure(config: Config, workdir: Path) -> dict:
    if config.kernel == "triton":
        built = compile_triton(config, workdir)
        sass = subprocess.run(
            [_tool("cuobjdump"), "-sass", str(built["cubin"])], capture_output=True, text=True, check=True
        ).stdout
        code = next(iter(parse_sass(sass).values()))
    else:
        built = cuda_kernel_info(config, workdir)
        code = built["code"]
    loop, inner = main_loop(code)
    if "chunk_loop_trips" in built:
        # The CUDA kernel's largest inner loop is its key-feature chunk loop (the dot products); the smaller ones
        # (cooperative tile loads, loops over the value channels) are counted once: a lower bound.
        outermost = sorted(c for c in inner if not any(o[0] <= c[0] and c[1] <= o[1] and o != c for o in inner))
        largest = max(range(len(outermost)), key=lambda k: outermost[k][1] - outermost[k][0]) if outermost else -1
        built["trips"] = [built["chunk_loop_trips"] if k == largest else None for k in range(len(outermost))]
    classes, opcodes, inner_described = loop_counts(code, loop, inner, built["trips"])
    warps = built["threads"] // 32
    pairs = built["pairs_per_iteration"]
    per_pair = {k: v * warps / pairs for k, v in classes.items()}
    flops: dict[str, float] = {}
    gather = 0.0
    divisions = 0.0
    for op, count in opcodes.items():
        f, kind = tensor_flops(op)
        if f:
            flops[kind] = flops.get(kind, 0.0) + f * count * warps / pairs
        gather += global_bytes(op) * count * warps / pairs
        if op.startswith("I2F") and ".RP" in op:  # each integer division starts with a reciprocal estimate
            divisions += count
    queries, entries = built["tile"]
    sectors = l2_sector_bytes(config, queries, entries)
    info = built["ptxas"]
    shared = built["shared_bytes"]
    occupancy = ctas_per_sm(info["registers"], built["threads"], shared)
    spills = info["spill_store_bytes"] + info["spill_load_bytes"]
    result = {
        "config": asdict(config),
        "compiler": built["compiler"],
        "launch": built["launch"],
        "registers": info["registers"],
        "stack_bytes": info["stack_bytes"],
        "spill_store_bytes": info["spill_store_bytes"],
        "spill_load_bytes": info["spill_load_bytes"],
        "spills": spills > 0,
        "shared_bytes": shared,
        "threads_per_cta": built["threads"],
        "ctas_per_sm": occupancy,
        "main_loop": {
            "instructions": loop[1] - loop[0] + 1,
            "warp_instructions_per_iteration": sum(classes.values()),
            "pairs_per_iteration": pairs,
            "inner_loops": inner_described,
            "inner_loops_counted_once": any(d["counted_once"] for d in inner_described),
            "integer_divisions_per_iteration": divisions,
            "spill_accesses_per_iteration": opcodes.get("LDL", 0) + opcodes.get("STL", 0)
            + sum(v for k, v in opcodes.items() if k.startswith(("LDL.", "STL."))),
        },
        "warp_instructions_per_pair": sum(per_pair.values()),
        "warp_instructions_per_pair_by_class": per_pair,
        "tensor_flops_per_pair": flops,
        "gather_bytes_per_pair": gather,  # requested by the lanes
        "l2_sector_bytes_per_pair": sectors,
        "top_opcodes_per_iteration": dict(sorted(opcodes.items(), key=lambda kv: -kv[1])[:25]),
    }  # fmt: skip
    result.update(roofline(per_pair, flops, sectors))
    result["problem_seconds"] = PROBLEM_PAIRS / result["predicted_pairs_per_s"]
    for key in ("specialisation", "problem_launch", "compile_seconds"):
        if key in built:
            result[key] = built[key]
    if config.kernel == "triton":
        result["serialised"] = serialised_tile(result, opcodes, warps)
        launch = built["problem_launch"]
        seconds = launch_seconds(result, launch["programs"], launch["tiles_per_split"])
        result["serialised"].update(
            problem_seconds=seconds, predicted_pairs_per_s=PROBLEM_PAIRS / seconds, waves=waves(result, launch)
        )
    return result


def constants() -> dict:
    return {
        "sms": SMS,
        "clock_hz": CLOCK_HZ,
        "issue_warp_instructions_per_clock_sm": ISSUE_PER_CLOCK_SM,
        "mufu_lanes_per_clock_sm": MUFU_LANES_PER_CLOCK_SM,
        "tensor_flop_per_clock_sm": TENSOR_FLOP_PER_CLOCK_SM,
        "l2_bytes_per_s": L2_BYTES_PER_S,
        "problem_pairs": PROBLEM_PAIRS,
    }


# The 100-image CIFAR-10 sample of issues 20 and 24: `elsfast.sample` with 20 steps, the published patch sizes
# P(t) (`elsfast.reference_scales()`), the sampler's default schedule, zero padding (ELS: one launch per group set of
# border classes), the full dictionary of 50,000 images; targets: under 60 s warm, under 2 minutes cold.
SAMPLE = dict(
    images=100, steps=20, patch_sizes="CIFAR10_ResNet_zeros_conditional", schedule="cosine-legacy", padding="zeros",
    dictionary_images=50_000, side=32, channels=3,
)  # fmt: skip
SAMPLE_TARGETS = {"warm_seconds": 60.0, "cold_seconds": 120.0}


def sample_steps() -> list[dict]:
    """The sample's evaluations, from the sampler's own code: `ddim_sample` calls the denoiser at i = steps - 1
    down to 1 (t = i / steps; `abar` from its schedule), at the patch size `resolve_patch_size(spec, steps)(t, i)`
    (the published list read at round(t x 20): entries 1 to 19, not 0 to 18); the machine reduces once per group set
    of `group_sets` (zero padding: the border classes), G groups of S positions each, whose M = images x S queries
    meet N x S entries: pairs = images x N x sum(G x S^2), not the same at every P."""
    from elsfast.common.scales import resolve_patch_size
    from elsfast.common.schedules import get_schedule
    from elsfast.reduce.patches import group_sets

    steps, side = SAMPLE["steps"], SAMPLE["side"]
    size_at = resolve_patch_size(SAMPLE["patch_sizes"], steps)
    abar_of = get_schedule(SAMPLE["schedule"])
    out = []
    for i in range(steps - 1, 0, -1):
        t = i / steps
        P = size_at(t, i)
        sets = [tuple(s.shape) for s in group_sets(side, side, P, SAMPLE["padding"], "els")]
        pairs = SAMPLE["images"] * SAMPLE["dictionary_images"] * sum(G * S * S for G, S in sets)
        out.append({"i": i, "t": t, "abar": abar_of(t), "P": P, "group_sets": sets, "pairs": pairs})
    return out


def sample_prediction(results: list[dict], kernel: str) -> dict | None:
    """Predicted seconds of the CIFAR-10 sample for `kernel` (C = 3, uint8, no provenance, the configs `auto`
    launches): per step, its pairs at the roofline's rate of its P; for Triton also the serialised estimate (every
    launch's waves and tiles, `launch_seconds`) and the cold compiles (one per distinct specialisation the
    sample's launches trigger, at the compile time measured here). None if a P of the sample was not measured."""
    measured = {
        r["config"]["P"]: r
        for r in results
        if "error" not in r and r["config"]["kernel"] == kernel and r["config"]["C"] == 3
        and r["config"]["uint8"] and not r["config"]["provenance"] and r["config"]["auto"]
    }  # fmt: skip
    steps = sample_steps()
    if any(step["P"] not in measured for step in steps):
        return None
    out = {
        "sample": SAMPLE,
        "targets": SAMPLE_TARGETS,
        "steps": [{k: v for k, v in step.items() if k != "group_sets"} for step in steps],
        "pairs": sum(step["pairs"] for step in steps),
        "roofline_seconds": sum(step["pairs"] / measured[step["P"]]["predicted_pairs_per_s"] for step in steps),
    }
    if kernel != "triton":
        return out
    N, pixels = SAMPLE["dictionary_images"], SAMPLE["channels"] * SAMPLE["side"] ** 2
    warm, compiles = 0.0, {}
    for step in steps:
        r = measured[step["P"]]
        seconds = 0.0
        for G, S in step["group_sets"]:
            planned = triton_launch(r["launch"], G, SAMPLE["images"] * S, N, S, pixels)
            seconds += launch_seconds(r, planned["programs"], planned["tiles_per_split"])
            _, constants, attrs, _ = specialisation(planned["integers"], uint8=True)
            compiles[(step["P"], tuple(sorted(constants)), tuple(sorted(attrs)))] = r["compile_seconds"]
        step_out = next(s for s in out["steps"] if s["i"] == step["i"])
        step_out["serialised_seconds"] = seconds
        warm += seconds
    out["serialised_warm_seconds"] = warm
    out["cold_compiles"] = len(compiles)
    out["compile_seconds"] = sum(compiles.values())
    out["serialised_cold_seconds"] = warm + out["compile_seconds"]
    out["meets_targets"] = {
        "warm": warm < SAMPLE_TARGETS["warm_seconds"],
        "cold": out["serialised_cold_seconds"] < SAMPLE_TARGETS["cold_seconds"],
    }
    return out


def run(configs: list[Config]) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        # a fresh Triton cache: every compile is a cold one, and its measured time (compile_seconds) is honest
        os.environ["TRITON_CACHE_DIR"] = str(Path(tmp) / "triton-cache")
        for config in configs:
            try:
                results.append(measure(config, Path(tmp)))
            except (subprocess.CalledProcessError, ValueError, RuntimeError) as error:
                detail = getattr(error, "stderr", "") or str(error)
                results.append({"config": asdict(config), "error": str(detail)[-2000:]})
            print(_summary(results[-1]), file=sys.stderr, flush=True)
    return results


def _summary(r: dict) -> str:
    if "error" in r:
        return f"{r['config']['name']:40s} ERROR {r['error'][-200:]}"
    spill = f"{r['spill_store_bytes']:5d}/{r['spill_load_bytes']:5d}"
    serialised = f" serialised {r['serialised']['predicted_pairs_per_s']:.3g}/s" if "serialised" in r else ""
    return (
        f"{r['config']['name']:40s} regs {r['registers']:3d} spill {spill} smem {r['shared_bytes'] // 1024:3d}K "
        f"ctas/SM {r['ctas_per_sm']:2d} wi/pair {r['warp_instructions_per_pair']:.3f} "
        f"pred {r['predicted_pairs_per_s']:.3g}/s ({r['bound_by']}){serialised}"
    )


def markdown_table(after: dict, before: dict | None = None) -> str:
    """A markdown table of a static-cost JSON document (and the same configs of an earlier one, side by side):
    the table of docs/performance.md."""
    old = {r["config"]["name"]: r for r in (before or {}).get("results", []) if "error" not in r}

    def cells(r: dict | None) -> list[str]:
        if r is None:
            return ["", "", "", ""]
        spill = r["spill_store_bytes"]
        return [
            f"{r['registers']} / {spill} B / {r['shared_bytes'] // 1024} KB / {r['ctas_per_sm']}",
            f"{r['warp_instructions_per_pair']:.3f}",
            f"{r['predicted_pairs_per_s']:.2e} ({r['bound_by']})",
            f"{r['problem_seconds']:.0f}",
        ]

    head = ["regs / spill stores / smem / CTAs per SM", "warp-inst per pair", "predicted pairs/s (bound)", "s"]
    lines = ["| config | " + " | ".join(f"{h} before" for h in head) + " | " + " | ".join(head) + " |"]
    lines.append("|---" * (1 + 2 * len(head)) + "|")
    for r in after["results"]:
        if "error" in r:
            continue
        name = r["config"]["name"]
        earlier = old.get(name) or old.get(name.replace("fp16x2", "tf32x3"))  # auto's uint8 precision before
        lines.append(f"| {name} | " + " | ".join(cells(earlier) + cells(r)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="the CI subset (P = 3 and 11, C = 3, uint8)")
    parser.add_argument("--kernels", default="triton,cuda", help="comma-separated: triton, cuda")
    parser.add_argument("--only", default="", help="measure only the configs whose name contains this")
    parser.add_argument(
        "--table", nargs="+", type=Path, metavar="JSON", help="print the markdown table of AFTER.json [BEFORE.json]"
    )
    args = parser.parse_args(argv)
    if args.table:
        documents = [json.loads(path.read_text()) for path in args.table]
        print(markdown_table(documents[0], documents[1] if len(documents) > 1 else None))
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: this tool compiles for a GPU")
    kinds = args.kernels.split(",")
    configs = (triton_configs(args.quick) if "triton" in kinds else []) + (
        cuda_configs(args.quick) if "cuda" in kinds else []
    )
    results = run([c for c in configs if args.only in c.name])
    document = {
        "command": " ".join(["python benchmarks/static_cost.py", *(argv if argv is not None else sys.argv[1:])]),
        "target": "sm_90 (H100/H200 SXM)",
        "constants": constants(),
        "serialised_assumptions": SERIAL_ASSUMPTIONS,
        # compile_seconds are measured here, one compile at a time, on this host (not the GPU machine)
        "compile_host": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "results": results,
        "sample_prediction": {k: sample_prediction(results, k) for k in ("triton", "cuda")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
