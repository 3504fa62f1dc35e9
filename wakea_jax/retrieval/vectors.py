"""Vector matrices on disk as chunked zarr arrays, written and read with tensorstore.

An index's float32 [n, dim] embeddings live in `<index>/embeddings.zarr/`: plain chunk files
of little-endian floats plus a JSON header, nothing executable, so reading them never runs
code (unlike a pickle), and a chunk can be read without the rest (`open_matrix(...)[a:b]`).
Every chunk file is listed with its sha256 in the index's meta.json like any other file.
"""

from __future__ import annotations

import os

import numpy as np
import tensorstore as ts

# Rows per chunk: 16k rows x 384 floats = 24 MiB, a few chunks for a brute-force corpus.
CHUNK_ROWS = 16384


def _spec(path: str | os.PathLike[str]) -> dict:
  return {"driver": "zarr3", "kvstore": {"driver": "file", "path": os.fspath(path)}}


def write_matrix(path: str | os.PathLike[str], matrix: np.ndarray) -> None:
  """Writes a 2-D array to a new zarr directory at `path`."""
  matrix = np.ascontiguousarray(matrix)
  if matrix.ndim != 2:
    raise ValueError(f"expected a 2-D matrix, got shape {matrix.shape}")
  rows = max(1, min(matrix.shape[0], CHUNK_ROWS))
  store = ts.open(_spec(path), create=True, dtype=ts.dtype(matrix.dtype.name),
                  shape=matrix.shape,
                  chunk_layout=ts.ChunkLayout(chunk_shape=[rows, max(1, matrix.shape[1])])
                  ).result()
  store.write(matrix).result()


def open_matrix(path: str | os.PathLike[str]) -> ts.TensorStore:
  """The zarr array at `path`, opened for reading (nothing is read until indexed)."""
  return ts.open(_spec(path), open=True, read=True).result()


def read_matrix(path: str | os.PathLike[str], *, shape: tuple[int, int], dtype: str
                ) -> np.ndarray:
  """The whole array at `path` as numpy, checked to be `dtype` of `shape`.

  Raises ValueError naming the path when it is unreadable or differs.
  """
  try:
    store = open_matrix(path)
  except ValueError as e:
    raise ValueError(f"{path}: unreadable zarr array ({e})") from None
  if tuple(store.shape) != tuple(shape) or store.dtype.numpy_dtype != np.dtype(dtype):
    raise ValueError(f"{path}: {store.dtype.numpy_dtype} {tuple(store.shape)}, expected "
                     f"{dtype} {tuple(shape)}")
  try:
    return np.asarray(store.read().result())
  except ValueError as e:
    raise ValueError(f"{path}: unreadable zarr chunk ({e})") from None
