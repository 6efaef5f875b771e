"""The jobs: the one run skeleton (``run.py``: lease, recover, select, build, stage,
check, commit, results back) with scoring and nightly screening as its two policies,
DDP training with Ray Train (the driver, and ``train_worker.py`` for what runs in Ray
Train's processes), starting and sizing Ray (``cluster.py``), a local S3 endpoint and
the demo.

Everything below may be imported here. A pipeline must not import the command line,
nor another pipeline's policy: ``scoring`` and ``screening`` share only the skeleton
and the modules it uses (``dataset``, ``path_names``, ``cluster``).
"""
