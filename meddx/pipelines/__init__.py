"""The jobs: the one run skeleton (lease, recover, select, build, stage, check,
commit, results back) with scoring and nightly screening as its two policies, DDP
training with Ray Train, starting and sizing Ray, and the demo.

Everything below may be imported here; the command line may not, and no pipeline
imports another's policy.
"""
