"""Where images come from: storage URIs (local disk, S3, any S3-compatible store),
listing, bounded reads, tar shards, manifests and DICOMweb (QIDO/WADO) sources.

It turns a location into bytes and a listing into rows, and may use ``meddx.imaging`` to
decode what it reads. It must not import anything above it: the model, the output
store, the pipelines or the command line.
"""
