"""Models in and out: loading any supported model (and recording where it came from), devices and dtypes,
fingerprints, the export writer and reader, and tiny random models for tests."""
