"""Autotune configurations of the Triton kernels, per GPU generation, and launch-time helpers.

The lists are starting points for sm_80 (A100) and sm_90 (H100/H200); `early_config_prune` keeps the
ones of the running GPU's generation that suit the padded rank. Under the Triton interpreter
(TRITON_INTERPRET=1, the CPU test path) every kernel gets a single small config: the interpreter
cannot benchmark, and its run time grows with the number of programs.
"""

import functools
import inspect
import os

import torch
import triton

try:  # triton >= 3.4 keeps its settings in knobs
    INTERPRET = bool(triton.knobs.runtime.interpret)
except AttributeError:  # pragma: no cover - older triton
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
XA_TILE_KEYS = ("BLOCK_M", None, "BLOCK_K")  # the xa kernel has no N dimension and no tile grouping


def config_of(row, keys=TILE_KEYS):
    meta = {k: v for k, v in zip(keys, row[:3]) if k is not None}
    if keys == TILE_KEYS:
        meta["GROUP_M"] = 8
    return triton.Config(meta, num_warps=row[3], num_stages=row[4])


# Rows: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, largest padded rank the row serves), per GPU generation
# and element size (2: fp16/bf16; 4: fp32, which needs smaller tiles for the same shared memory, and whose
# IEEE dots run on FMA units: wide-rank fp32 tiles are kept small, or they take minutes to compile).
# "gemm": the forward (output tile [BLOCK_M, BLOCK_N], reducing over K in BLOCK_K steps).
# "dx": the dX backward (output tile [BLOCK_M, BLOCK_K], reducing over N in BLOCK_N steps; a wide
# output tile also means fewer columns of programs recomputing G = dY B).
# "thin": xa = dropout(x) A^T and the low-rank backward (G = dY B over N, then dA and (G A) * D over K).
# Rank caps come from the compiled kernels' local memory (aot_check reports it): a row serves a padded rank only
# while every variant's register spills stay within aot_check.MAX_LOCAL_BYTES per thread. Past that ptxas
# often gives up on allocation (32 registers, kilobytes of stack); rows that did so at every rank were
# dropped (the 2-warp 16 x 32 x 256 decode tile, the widest dX tiles of sm_80 and a 4-warp 128 x 64 x 128
# dX tile of sm_90), and narrow tiles were added where no row served rank 256 any more. The decode tiles
# (BLOCK_M = 16) stream W0 with few rows: a 32-column tile gives twice the programs of a 64-column one for the
# SMs to share (one row of tiles covers the batch), which the autotuner weighs against longer K steps.
TABLES = {
    "gemm": {
        90: {2: [(128, 256, 64, 8, 3, 32), (128, 128, 64, 8, 4, 64), (128, 128, 64, 4, 4, 32),
                 (64, 128, 64, 4, 4, 256), (64, 64, 64, 4, 4, 256),
                 (16, 64, 128, 4, 4, 16), (16, 64, 64, 4, 4, 64), (16, 32, 64, 4, 4, 64)],  # decode (M <= 16)
             4: [(128, 128, 32, 8, 3, 64), (64, 128, 32, 4, 3, 32), (64, 64, 32, 4, 3, 256)]},
        80: {2: [(128, 256, 32, 8, 3, 32), (128, 128, 32, 4, 4, 32), (128, 64, 32, 4, 4, 32),
                 (64, 128, 32, 4, 4, 256), (64, 64, 32, 4, 3, 256),
                 (16, 64, 128, 4, 4, 16), (16, 64, 64, 4, 4, 64), (16, 32, 64, 4, 4, 64)],
             4: [(128, 128, 32, 8, 3, 32), (64, 128, 32, 4, 3, 32), (64, 64, 32, 4, 3, 256)]},
    },
    "dx": {
        90: {2: [(128, 64, 256, 8, 3, 16), (128, 64, 128, 8, 4, 64),
                 (64, 64, 128, 4, 4, 64), (64, 64, 64, 4, 2, 128), (32, 64, 64, 4, 2, 128), (32, 32, 32, 4, 2, 256)],
             4: [(128, 32, 128, 8, 3, 16), (64, 32, 128, 4, 3, 32), (32, 16, 64, 4, 2, 128), (16, 16, 32, 4, 2, 256)]},
        80: {2: [(128, 32, 64, 4, 4, 32), (64, 32, 128, 4, 4, 128), (64, 32, 64, 4, 3, 128), (32, 32, 32, 4, 2, 256)],
             4: [(128, 32, 128, 8, 3, 32), (64, 32, 128, 4, 3, 32), (32, 16, 64, 4, 2, 128), (16, 16, 32, 4, 2, 256)]},
    },
    "thin": {
        90: {2: [(64, 64, 128, 4, 4, 32), (128, 64, 64, 8, 3, 64), (32, 64, 128, 4, 4, 64),
                 (64, 64, 64, 4, 3, 64), (32, 64, 64, 4, 2, 128), (64, 64, 64, 8, 2, 256)],
             4: [(64, 32, 64, 4, 3, 32), (32, 32, 64, 4, 2, 64), (32, 16, 32, 4, 2, 128), (16, 16, 32, 4, 2, 256)]},
        80: {2: [(64, 64, 64, 4, 4, 64), (128, 64, 32, 8, 3, 64), (32, 64, 64, 4, 4, 64),
                 (64, 64, 32, 4, 3, 128), (32, 64, 32, 4, 2, 256), (64, 64, 32, 8, 2, 256)],
             4: [(64, 32, 32, 4, 3, 64), (32, 32, 32, 4, 2, 128), (32, 16, 32, 4, 2, 128), (16, 16, 32, 4, 2, 256)]},
    },
    # The forward over a quantized W0 (kernels/quantized.py): every W0 element costs a few integer operations and
    # table loads to dequantize, so tiles are narrower than the GEMM's and the decode rows (BLOCK_M = 16) come first;
    # the rank is streamed in BLOCK_K steps (no rank cap). 16-bit only: fp32 calls run cuBLAS on the dequantized W0.
    # The software pipeline stages the tile's code bytes and absmax entries too: the 64 x 128 tile takes two stages
    # (three need 217 KB of shared memory with double quantization, over sm_80's 163 KB).
    "quant": {
        90: {2: [(16, 64, 128, 4, 2, 256), (16, 32, 128, 4, 3, 256), (16, 64, 64, 4, 4, 256),
                 (64, 64, 64, 4, 3, 256), (128, 64, 64, 8, 3, 256)]},
        80: {2: [(16, 64, 128, 4, 2, 256), (16, 32, 128, 4, 3, 256), (16, 64, 64, 4, 4, 256),
                 (64, 64, 64, 4, 3, 256), (128, 64, 32, 8, 3, 256)]},
    },
}
_INTERPRETER = (32, 32, 32, 4, 1)


def _build(kind, keys=TILE_KEYS):
    """(all configs of a kind, {id(config): (arch, element size, row)})."""
    configs, info = [], {}
    for arch, by_size in TABLES[kind].items():
        for elem_bytes, table in by_size.items():
            for row in table:
                c = config_of(row, keys)
                configs.append(c)
                info[id(c)] = (arch, elem_bytes, row)
    return configs, info


if INTERPRET:
    FORWARD_CONFIGS = BACKWARD_CONFIGS = LOWRANK_CONFIGS = QUANT_CONFIGS = [config_of(_INTERPRETER)]
    XA_CONFIGS = [config_of(_INTERPRETER, XA_TILE_KEYS)]
    _INFO = {}
else:
    FORWARD_CONFIGS, _fwd_info = _build("gemm")
    BACKWARD_CONFIGS, _bwd_info = _build("dx")
    LOWRANK_CONFIGS, _lowrank_info = _build("thin")
    XA_CONFIGS, _xa_info = _build("thin", XA_TILE_KEYS)
    QUANT_CONFIGS, _quant_info = _build("quant")
    _INFO = {**_fwd_info, **_bwd_info, **_lowrank_info, **_xa_info, **_quant_info}


# False: launch the first eligible config of each table without timing the others (the tables list the usual
# winners first). Set by lora_kernels.plan from LORA_KERNELS_TUNE (off: nothing measured, bits repeat between runs).
AUTOTUNE = True

# Autotuning results are kept in Triton's disk cache (keyed by GPU, kernel source and config list), so a new process
# (a server restart, the next training job) does not time every config again on its first call of each shape
# bucket. Older Triton releases without the option time every process.
AUTOTUNE_KWARGS = ({"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {})


@functools.lru_cache(maxsize=None)
def _arch(device_index: int) -> int:
    major, _ = torch.cuda.get_device_capability(device_index)
    return 90 if major >= 9 else 80


def _eligible(configs, elem_bytes: int, block_r: int):
    """Configs of the running GPU's generation and this element size that serve the padded rank
    (if none does, the one serving the largest rank)."""
    if INTERPRET or not torch.cuda.is_available():
        return configs[:1]
    arch = _arch(torch.cuda.current_device())
    mine = [c for c in configs if _INFO[id(c)][:2] == (arch, elem_bytes)]
    kept = [c for c in mine if block_r <= _INFO[id(c)][2][5]]
    kept = kept or [max(mine, key=lambda c: _INFO[id(c)][2][5])]
    return kept if AUTOTUNE else kept[:1]


def prune_configs(configs, named_args, **kwargs):
    """early_config_prune hook of the autotuners; the first kernel argument (X or DY) gives the dtype."""
    first = next(iter(named_args.values()), None)
    elem_bytes = first.element_size() if isinstance(first, torch.Tensor) else 2
    return _eligible(configs, elem_bytes, kwargs.get("BLOCK_R", 16))


def fixed_config(configs, elem_bytes: int, block_r: int):
    """One config chosen without timing (deterministic mode, where buffer shapes follow BLOCK_M)."""
    return _eligible(configs, elem_bytes, block_r)[0]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs compute in true fp32 unless the user allowed TF32 for matmuls."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not INTERPRET:
        return "tf32"
    return "ieee"


def m_bucket(m: int) -> int:
    """Autotune key for M: one tuning per power of two, not per sequence length."""
    return triton.next_power_of_2(max(int(m), 1))
