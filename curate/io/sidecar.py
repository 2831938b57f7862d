"""img2dataset's per-shard sidecar parquet: one row per input row, failures included."""

from __future__ import annotations

import pyarrow as pa

# The columns img2dataset writes beside each NNNNN.tar (ALGORITHMS.md, input contract).
IMG2DATASET_SIDECAR_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("caption", pa.string()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("original_width", pa.int64()),
        ("original_height", pa.int64()),
        ("exif", pa.string()),
        ("sha256", pa.string()),
    ]
)
