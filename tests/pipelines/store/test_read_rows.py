"""``read_rows``: a local store's chunk files decoded by Blosc directly, the same rows as zarr reads."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, TransposeCodec

from stillroom.pipelines.store.label_store import direct_layout, read_rows


@pytest.mark.parametrize("dtype,row,transpose", [("int16", (3,), False), ("float16", (), False),
                                                 ("float32", (17,), True), ("uint8", (7,), True),
                                                 ("uint8", (7,), False)])
def test_direct_reads_equal_zarrs_for_ranges_rows_and_fill_chunks(tmp_path, dtype, row, transpose):
    group = zarr.open_group(str(tmp_path), mode="w", zarr_format=3)
    shape = (1003, *row)
    array = group.create_array("a", shape=shape, dtype=dtype, chunks=(64, *row), fill_value=0,
                               filters=[TransposeCodec(order=(1, 0))] if transpose else None,
                               compressors=BloscCodec(cname="zstd", clevel=9, shuffle="shuffle",
                                                      typesize=np.dtype(dtype).itemsize))
    rng = np.random.default_rng(0)
    values = (rng.normal(size=shape) * 100).astype(dtype)
    values[128:256] = 0  # chunks 2 and 3: fill values only, which zarr writes no file for
    array[:] = values
    assert direct_layout(array) is not None
    assert not (tmp_path / "a" / "c" / "2").exists()
    for start, stop in [(0, 1003), (5, 70), (128, 256), (100, 300), (960, 1003), (1000, 1003), (7, 7)]:
        np.testing.assert_array_equal(read_rows(array, direct_layout(array), start, stop), values[start:stop])
        if stop > start:
            for take in (np.sort(rng.choice(stop - start, min(9, stop - start), replace=False)),
                         rng.permutation(stop - start)[:6]):
                np.testing.assert_array_equal(read_rows(array, direct_layout(array), start, stop, take),
                                              values[start:stop][take])


def test_a_truncated_chunk_is_an_error_not_other_rows(tmp_path):
    group = zarr.open_group(str(tmp_path), mode="w", zarr_format=3)
    array = group.create_array("a", shape=(256, 4), dtype="int16", chunks=(64, 4), fill_value=0,
                               compressors=BloscCodec(cname="zstd", clevel=9, shuffle="shuffle", typesize=2))
    array[:] = np.arange(1024, dtype=np.int16).reshape(256, 4) + 1
    chunk = tmp_path / "a" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:20])
    with pytest.raises((ValueError, RuntimeError)):
        read_rows(array, direct_layout(array), 0, 256)
    np.testing.assert_array_equal(read_rows(array, direct_layout(array), 128, 256),  # the others still read
                                  np.asarray(array[128:256]))
