"""How rows reach OUT: staging, the checked commit of a run's Parquet files, the lease
that keeps two runs from writing the same OUT, and the progress a running job reports.

It speaks only storage (``meddx.inputs.storage``) and Parquet: it must not import the
model, imaging, pipelines, analysis or the command line.
"""
