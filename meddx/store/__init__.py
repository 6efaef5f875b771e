"""How rows reach OUT: staging, the checked commit of a run's Parquet files, the index
of what OUT holds (kept by every commit), the lease that keeps two runs from writing the
same OUT, the progress a running job reports, the query engine that joins listings
against the index, the store of model-ready films (``films``) that ``meddx prepare``
fills and runs read, and the append-only audit log of every run (``audit``).

It speaks storage (``meddx.inputs``), Parquet and SQL (DuckDB), and pixels as
``meddx.imaging`` decodes them (the store of films): it must not import the model,
pipelines, analysis or the command line.
"""
