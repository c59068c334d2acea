"""The large-screen benchmark's input: a simulated screen written as a CSR `.npz` (the
`scipy.sparse.save_npz` layout) one block of genes at a time, never held whole."""

from __future__ import annotations

import argparse
import math
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npformat

CELL_LINES = ("HEK293T", "K562", "THP1")
NB_INVERSION_STEPS = 400


class Screen:
    """Per-gene and per-cell parameters (small), and per-block sparse content (regenerable)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.n_genes, self.n_cells, self.seed = args.genes, args.cells, args.seed
        self.block_rows = args.gen_block
        self.dtype = np.dtype("<i4") if args.dtype == "int32" else np.dtype("<f4")
        rng = np.random.default_rng([args.seed, 0])
        sigma = 1.0
        p = args.density * rng.lognormal(-0.5 * sigma**2, sigma, args.genes)
        zero = rng.random(args.genes) < args.zero_genes
        p[zero] = 0.0
        for _ in range(5):  # mean p = density after clipping at 0.95
            live = p > 0
            p[live] *= args.density / max(p.mean(), 1e-12)
            p = np.clip(p, 0.0, 0.95)
        self.p = p
        self.lam = rng.lognormal(0.0, 1.0, args.genes)  # extra counts above 1 (mean)
        # The cells table (small): ids, targets, cell lines, size factors, in table order.
        cell_rng = np.random.default_rng([args.seed, 1])
        n_targeting = args.cells - args.ntc
        self.targets = np.array(
            ["ntc"] * args.ntc + [f"TG{j % args.targets:05d}" for j in range(n_targeting)]
        )
        cell_rng.shuffle(self.targets)
        self.cell_ids = np.array([f"C{i:07d}" for i in range(args.cells)])
        self.cell_lines = cell_rng.choice(np.array(CELL_LINES), args.cells)
        self.table_sum_factor = cell_rng.lognormal(0.0, 0.25, args.cells)
        self.table_sum_factor /= self.table_sum_factor.mean()
        # The matrix's columns: the table's order, or (--shuffle-cells) a permutation of
        # it, which makes ingestion scatter every block into table order.
        order = cell_rng.permutation(args.cells) if args.shuffle_cells else np.arange(args.cells)
        self.matrix_cells = self.cell_ids[order]
        self.sum_factor = self.table_sum_factor[order]  # per matrix column
        self.n_blocks = math.ceil(self.n_genes / self.block_rows)
        self.model = getattr(args, "model", "hurdle")
        if self.model == "nb":
            self._nb_parameters(args, order)

    def _nb_parameters(self, args: argparse.Namespace, order: np.ndarray) -> None:
        """`--model nb`: y ~ NB(phi_g, mean sf_n mu_g 2^effect[line_n, g]), the model the
        fit assumes, so its posterior can be scored against the truth. mu_g log-normal
        around `--density` (a mean of ~0.1 a cell leaves ~90 % zeros), o_y = 1 / sqrt(phi)
        ~ Exponential(3) (the prior's mean rate) within [0.05, 1.5], log2 effects of the
        2nd and 3rd cell line N(0, 0.5) (the first is the baseline: 0)."""
        rng = np.random.default_rng([args.seed, 4])
        self.mu = args.density * rng.lognormal(-0.5, 1.0, args.genes)
        self.mu[self.p == 0] = 0.0  # the all-zero genes stay all zero
        self.o_y = np.clip(rng.exponential(1 / 3, args.genes), 0.05, 1.5)
        self.effects = np.zeros((len(CELL_LINES), args.genes))
        self.effects[1:] = rng.normal(0.0, 0.5, (len(CELL_LINES) - 1, args.genes))
        line_of = {line: k for k, line in enumerate(CELL_LINES)}
        self.line_code = np.array([line_of[c] for c in self.cell_lines[order]])  # per column

    def rows(self, b: int) -> range:
        return range(b * self.block_rows, min((b + 1) * self.block_rows, self.n_genes))

    def _columns(self, rng: np.random.Generator, p: float) -> np.ndarray:
        """Sorted non-zero columns of one row: a Bernoulli(p) process via geometric gaps."""
        n = self.n_cells
        if p <= 0.0:
            return np.empty(0, dtype=np.int64)
        expected = n * p
        m = int(expected + 8.0 * math.sqrt(expected * (1.0 - p)) + 16)
        pos = np.cumsum(rng.geometric(p, m)) - 1
        while pos[-1] < n:  # (practically never) not past the end yet: draw more gaps
            more = np.cumsum(rng.geometric(p, m)) + pos[-1]
            pos = np.concatenate([pos, more])
        return pos[: np.searchsorted(pos, n)]

    def _nb_row(self, rng: np.random.Generator, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Gene g's non-zero columns and counts, drawn by inversion of the NB CDF with one
        uniform per cell (the zeros cost one comparison): exact up to counts of
        NB_INVERSION_STEPS. A cell the recursion has not placed by then (a tail of
        probability far below 1e-12 at these means, or a uniform above the float64 CDF's
        rounded sum) gets a Poisson-gamma draw conditioned on > 0 instead."""
        phi = 1.0 / self.o_y[g] ** 2
        mean = self.sum_factor * self.mu[g] * np.exp2(self.effects[self.line_code, g])
        u = rng.random(self.n_cells)
        zero = np.exp(-phi * np.log1p(mean / phi))  # P(y = 0)
        cols = np.flatnonzero(u > zero)
        u, m, term = u[cols], mean[cols], zero[cols]
        q, cdf = m / (m + phi), term.copy()
        counts = np.zeros(cols.size, dtype=np.int64)
        active = np.arange(cols.size)
        for k in range(NB_INVERSION_STEPS):
            term = term * (k + phi) / (k + 1) * q[active]
            cdf = cdf + term
            done = u[active] <= cdf
            counts[active[done]] = k + 1
            keep = ~done
            active, term, cdf = active[keep], term[keep], cdf[keep]
            if not active.size:
                break
        for i in active:  # (practically never) beyond the recursion's reach
            draw = 0
            while draw == 0:
                draw = rng.poisson(rng.gamma(phi, m[i] / phi))
            counts[i] = draw
        return cols, counts

    def block(self, b: int, *, values: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(nnz per row, column indices, values or None) of block b, identical every call."""
        if self.model == "nb":
            rng = np.random.default_rng([self.seed, 5, b])
            rows = [self._nb_row(rng, g) for g in self.rows(b)]
            counts = np.array([len(c) for c, _ in rows], dtype=np.int64)
            columns = np.concatenate([c for c, _ in rows]) if rows else np.empty(0, np.int64)
            data = np.concatenate([v for _, v in rows]).astype(self.dtype) if values else None
            return counts, columns, data
        rng = np.random.default_rng([self.seed, 2, b])
        cols = [self._columns(rng, float(self.p[g])) for g in self.rows(b)]
        counts = np.array([len(c) for c in cols], dtype=np.int64)
        columns = np.concatenate(cols) if cols else np.empty(0, dtype=np.int64)
        data = None
        if values:
            vrng = np.random.default_rng([self.seed, 3, b])
            lam_rep = np.repeat(self.lam[self.rows(b).start : self.rows(b).stop], counts)
            data = (1 + vrng.poisson(lam_rep * self.sum_factor[columns])).astype(self.dtype)
        return counts, columns, data


def _prefetched(fn, n: int):
    """fn(0), fn(1), ... with the next one computed in a thread while the caller works."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(fn, 0) if n else None
        for i in range(n):
            result = future.result()
            if i + 1 < n:
                future = pool.submit(fn, i + 1)
            yield result


def _write_member(zf: zipfile.ZipFile, name: str, dtype: np.dtype, length: int, chunks) -> None:
    """One .npy member: a version 1.0 header (as np.save writes), then the values in order."""
    written = 0
    with zf.open(name, "w", force_zip64=True) as handle:
        header = {
            "descr": npformat.dtype_to_descr(dtype),
            "fortran_order": False,
            "shape": (length,),
        }
        npformat.write_array_header_1_0(handle, header)
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype=dtype)
            handle.write(memoryview(chunk).cast("B"))
            written += chunk.size
    if written != length:
        raise RuntimeError(f"{name}: wrote {written} values, header says {length}")


def _write_small(zf: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    with zf.open(name, "w") as handle:
        npformat.write_array(handle, np.asanyarray(array), allow_pickle=False)


def write_npz(screen: Screen, path: Path, *, compression: int, level: int | None, log) -> dict:
    """The CSR archive, streamed: three passes over regenerated blocks."""
    timings = {}
    t0 = time.perf_counter()
    indptr = np.zeros(screen.n_genes + 1, dtype=np.int64)
    for b in range(screen.n_blocks):  # pass 0: the pattern only
        counts, _, _ = screen.block(b, values=False)
        rows = screen.rows(b)
        indptr[rows.start + 1 : rows.stop + 1] = counts
    indptr = np.cumsum(indptr)
    nnz = int(indptr[-1])
    timings["pass0_indptr_s"] = round(time.perf_counter() - t0, 1)
    log(f"  pass 0 (indptr): nnz = {nnz:,} in {timings['pass0_indptr_s']} s")
    big = nnz > np.iinfo(np.int32).max or screen.n_cells > np.iinfo(np.int32).max
    index_dtype = np.dtype("<i8") if big else np.dtype("<i4")  # as scipy chooses
    kwargs = {"compresslevel": level} if compression == zipfile.ZIP_DEFLATED else {}
    with zipfile.ZipFile(path, "w", compression=compression, allowZip64=True, **kwargs) as zf:
        t0 = time.perf_counter()
        _write_member(
            zf,
            "indices.npy",
            index_dtype,
            nnz,
            (
                c
                for _, c, _ in _prefetched(lambda b: screen.block(b, values=False), screen.n_blocks)
            ),
        )
        timings["pass1_indices_s"] = round(time.perf_counter() - t0, 1)
        log(f"  pass 1 (indices): {timings['pass1_indices_s']} s")
        _write_small(zf, "indptr.npy", indptr.astype(index_dtype))
        _write_small(zf, "format.npy", np.array(b"csr"))
        _write_small(zf, "shape.npy", np.array([screen.n_genes, screen.n_cells], dtype=np.int64))
        t0 = time.perf_counter()
        _write_member(
            zf,
            "data.npy",
            screen.dtype,
            nnz,
            (d for _, _, d in _prefetched(lambda b: screen.block(b, values=True), screen.n_blocks)),
        )
        timings["pass2_data_s"] = round(time.perf_counter() - t0, 1)
        log(f"  pass 2 (data): {timings['pass2_data_s']} s")
    return {"nnz": nnz, "index_dtype": str(index_dtype), **timings}


def write_inputs(args: argparse.Namespace, inputs: Path, log) -> dict[str, Any]:
    """cells.csv, features.txt, cells.txt and counts.npz; nothing held whole."""
    import pandas as pd

    inputs.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    screen = Screen(args)
    pd.DataFrame(
        {
            "cell": screen.cell_ids,
            "target": screen.targets,
            "cell_line": screen.cell_lines,
            "sum_factor": np.round(screen.table_sum_factor, 6),
        }
    ).to_csv(inputs / "cells.csv", index=False)
    (inputs / "cells.txt").write_text("\n".join(screen.matrix_cells) + "\n")
    (inputs / "features.txt").write_text(
        "\n".join(f"GENE{g:05d}" for g in range(args.genes)) + "\n"
    )
    compression = zipfile.ZIP_STORED if args.stored else zipfile.ZIP_DEFLATED
    info = write_npz(
        screen,
        inputs / "counts.npz",
        compression=compression,
        level=None if args.compresslevel < 0 else args.compresslevel,
        log=log,
    )
    npz_bytes = (inputs / "counts.npz").stat().st_size
    if screen.model == "nb":  # the truth the fit is scored against
        np.savez(
            inputs / "truth.npz",
            cell_lines=np.array(CELL_LINES),
            effects=screen.effects,
            mu=screen.mu,
            o_y=screen.o_y,
        )
    return {
        "model": screen.model,
        "n_cells": args.cells,
        "n_ntc_cells": args.ntc,
        "n_genes": args.genes,
        "density_requested": args.density,
        "nnz": info["nnz"],
        "density": round(info["nnz"] / (args.genes * args.cells), 5),
        "all_zero_genes": int((screen.p == 0).sum()),
        "dtype": str(screen.dtype),
        "index_dtype": info["index_dtype"],
        "compression": "stored"
        if args.stored
        else (
            f"deflate (level {args.compresslevel})"
            if args.compresslevel >= 0
            else "deflate (zlib default level)"
        ),
        "shuffle_cells": args.shuffle_cells,
        "seed": args.seed,
        "npz_bytes": npz_bytes,
        "npz_gb": round(npz_bytes / 1e9, 3),
        "npz_uncompressed_gb": round(info["nnz"] * (screen.dtype.itemsize + 4) / 1e9, 3),
        "write_seconds": round(time.perf_counter() - t_start, 1),
        "write_passes_seconds": {k: v for k, v in info.items() if k.endswith("_s")},
        "format": (
            "cells.csv + counts.npz (CSR features x cells, save_npz layout, streamed) "
            "+ features.txt + cells.txt"
        ),
    }


def inputs_key(args: argparse.Namespace) -> dict[str, Any]:
    """What the inputs depend on (to reuse them from an earlier run in --workdir)."""
    keys = ("cells", "ntc", "genes", "density", "zero_genes", "targets", "seed", "dtype")
    keys += ("stored", "compresslevel", "gen_block", "shuffle_cells", "model")
    return {k: getattr(args, k) for k in keys}
