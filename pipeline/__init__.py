"""kiln's Beam job: read LAION-style metadata, prefilter, download, decode, resize, filter, embed,
write webdataset + Parquet shards, and account for every input row."""

from pipeline.compat import set_quiet_env

__version__ = "0.1.0"

set_quiet_env()
