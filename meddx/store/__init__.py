"""How rows reach OUT: staging, the checked commit of a run's Parquet files, the index
of what OUT holds (kept by every commit), the lease that keeps two runs from writing the
same OUT, the progress a running job reports, and the query engine that joins listings
against the index.

It speaks only storage (``meddx.inputs.storage``), Parquet and SQL (DuckDB): it must not
import the model, imaging, pipelines, analysis or the command line.
"""
