"""Synthetic chest films, DICOM films in every transfer syntax meddx reads, labelled
archives and the quality-control set: what the demo, the tests and the benchmarks run on.

It writes through ``meddx.inputs.storage``; it must not import the model, pipelines,
analysis or the command line.
"""
