"""Dataset readers, the processed on-disk format, and the ingest stage."""
