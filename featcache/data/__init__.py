"""Stage 1, the data: reading a folder, CSV or .npz into labelled image records (sources), decoding and the
backbone's eval transform (images), image filters (preprocessing)."""
